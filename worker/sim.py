"""`sim`: a deterministic simulated model for development, tests and benchmarks.

It is honest about being simulated: its catalog entry says `simulated: true`. Output is a
stream of words chosen by hashing (prompt, seed, choice, position), so the same request
gives the same text, streamed or not. A "token" is one word; prompt tokens are the words
of the prompt. Timing: the first token after `ttft_ms`, then one every `itl_ms`, on an
absolute schedule (no drift under load). Embeddings are normalised hashed bags of words,
so texts that share words are closer than texts that do not.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import math
import struct
from collections.abc import AsyncIterator

import msgspec

from common.openai_types import (
    ChatRequest,
    CompletionRequest,
    EmbeddingRequest,
    prompt_texts,
)
from common.protocol import ChoiceDelta, Usage
from worker.engine import EmbedResult, EngineEvent, ModelCard, Output

_VOCAB = (
    "the fleet serves every request with care and the broker keeps the queue fair while "
    "workers stream tokens back through reply inboxes so clients see answers arrive one "
    "word at a time from models loaded on hosts that joined over outbound links only"
).split()


class SimSettings(msgspec.Struct, frozen=True):
    ttft_ms: float = 20.0
    itl_ms: float = 5.0
    tokens: int = 32
    embedding_dim: int = 384


def _words(text: str) -> list[str]:
    return text.split()


def sim_word(key: bytes, i: int) -> str:
    h = hashlib.blake2b(key + i.to_bytes(4, "little"), digest_size=4).digest()
    return _VOCAB[int.from_bytes(h, "little") % len(_VOCAB)]


def sim_text(key: bytes, count: int) -> list[str]:
    """The pieces of a simulated answer: `count` words, the first without a leading space."""
    return [(" " if i else "") + sim_word(key, i) for i in range(count)]


def apply_stop(pieces: list[str], stop: list[str]) -> tuple[list[str], bool]:
    """Cut `pieces` before the first stop string; returns (pieces, stopped)."""
    if not stop:
        return pieces, False
    text = ""
    for i, p in enumerate(pieces):
        text += p
        hits = [text.find(s) for s in stop if s and s in text]
        if hits:
            cut = min(hits)
            before = "".join(pieces[:i])
            kept = pieces[:i]
            if cut > len(before):
                kept = [*kept, text[len(before) : cut]]
            return kept, True
    return pieces, False


def embed_text(text: str, dim: int) -> list[float]:
    vec = [0.0] * dim
    for w in _words(text.lower()) or [""]:
        h = hashlib.blake2b(w.encode(), digest_size=8).digest()
        idx = int.from_bytes(h[:4], "little") % dim
        vec[idx] += 1.0 if h[4] & 1 else -1.0
    norm = math.sqrt(sum(v * v for v in vec)) or 1.0
    return [v / norm for v in vec]


def to_base64(vec: list[float]) -> str:
    return base64.b64encode(struct.pack(f"<{len(vec)}f", *vec)).decode("ascii")


class SimEngine:
    def __init__(self, settings: SimSettings) -> None:
        self.settings = settings

    def card(self) -> ModelCard:
        s = self.settings
        return ModelCard(
            engine="sim",
            owned_by="llmfleet-sim",
            simulated=True,
            description=(
                f"simulated model (ttft {s.ttft_ms:g} ms, itl {s.itl_ms:g} ms, "
                f"{s.tokens} tokens): not a real LLM"
            ),
        )

    async def start(self) -> None:
        return None

    async def aclose(self) -> None:
        return None

    def chat(self, req: ChatRequest, raw: bytes) -> AsyncIterator[EngineEvent]:
        prompt = "\n".join(m.text() for m in req.messages)
        return self._generate(prompt, req.n, req.token_limit(), req.seed, req.stop)

    def complete(self, req: CompletionRequest, raw: bytes) -> AsyncIterator[EngineEvent]:
        prompts = prompt_texts(req.prompt)
        prompt = "\n".join(p if isinstance(p, str) else " ".join(map(str, p)) for p in prompts)
        return self._generate(prompt, req.n, req.max_tokens, req.seed, req.stop)

    async def _generate(
        self,
        prompt: str,
        n: int,
        limit: int | None,
        seed: int | None,
        stop: str | list[str] | None,
    ) -> AsyncIterator[EngineEvent]:
        s = self.settings
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        count = s.tokens if limit is None else min(limit, s.tokens)
        base = hashlib.blake2b(f"{seed}|{prompt}".encode(), digest_size=16).digest()
        answers: list[list[str]] = []
        finish: list[str] = []
        for c in range(n):
            pieces, stopped = apply_stop(sim_text(base + bytes([c % 256]), count), stops)
            answers.append(pieces)
            hit_limit = limit is not None and limit <= s.tokens and not stopped
            finish.append("length" if hit_limit else "stop")
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        longest = max((len(a) for a in answers), default=0)
        for i in range(longest):
            due = t0 + (s.ttft_ms + i * s.itl_ms) / 1000.0
            delay = due - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            out: list[ChoiceDelta] = []
            for c, pieces in enumerate(answers):
                if i < len(pieces):
                    last = i == len(pieces) - 1
                    out.append(
                        ChoiceDelta(
                            index=c,
                            content=pieces[i],
                            finish_reason=finish[c] if last else None,
                        )
                    )
            yield Output(choices=out)
        for c, pieces in enumerate(answers):
            if not pieces:
                yield Output(choices=[ChoiceDelta(index=c, content="", finish_reason=finish[c])])
        prompt_tokens = len(_words(prompt))
        completion_tokens = sum(len(a) for a in answers)
        yield Usage(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
        )

    async def embed(self, req: EmbeddingRequest, raw: bytes) -> EmbedResult:
        dim = req.dimensions or self.settings.embedding_dim
        inputs = prompt_texts(req.input)
        texts = [t if isinstance(t, str) else " ".join(map(str, t)) for t in inputs]
        vectors = [embed_text(t, dim) for t in texts]
        data: list[list[float] | str] = (
            [to_base64(v) for v in vectors] if req.encoding_format == "base64" else list(vectors)
        )
        tokens = sum(max(1, len(_words(t))) for t in texts)
        await asyncio.sleep(self.settings.ttft_ms / 1000.0)
        return EmbedResult(
            embeddings=data,
            usage=Usage(prompt_tokens=tokens, completion_tokens=0, total_tokens=tokens),
        )
