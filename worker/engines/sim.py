"""`sim`: a deterministic simulated model for development, tests and benchmarks.

What it answers is decided in `worker/engines/sim_plan.py`; this module plays it out in time.

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
from collections.abc import AsyncIterator, Callable
from typing import Any

from common.openai_types import (
    ChatRequest,
    CompletionRequest,
    EmbeddingRequest,
    prompt_texts,
)
from common.protocol import ChoiceDelta, Usage
from worker.engine import EmbedResult, EngineEvent, ModelCard, Output
from worker.engines.sim_plan import (
    Plan,
    chat_logprobs,
    completion_logprobs,
    plan_chat,
    plan_completion,
    prompt_tokens,
)
from worker.settings import SimSettings


def _words(text: str) -> list[str]:
    return text.split()


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
        plans, prompt_tokens = plan_chat(req, self.settings.tokens)
        top = req.top_logprobs or 0
        logprobs = (lambda piece, _off: chat_logprobs(piece, top)) if req.logprobs else None
        return self._play(plans, prompt_tokens, logprobs)

    def complete(self, req: CompletionRequest, raw: bytes) -> AsyncIterator[EngineEvent]:
        plans, prompt_tokens = plan_completion(req, self.settings.tokens)
        echo = bool(req.echo)
        logprobs = (
            (lambda piece, off: completion_logprobs(piece, off, echo=echo))
            if req.logprobs is not None
            else None
        )
        return self._play(plans, prompt_tokens, logprobs)

    async def _play(
        self,
        plans: list[Plan],
        prompt_tokens: int,
        logprobs: Callable[[str, int], dict[str, Any]] | None,
    ) -> AsyncIterator[EngineEvent]:
        """Emit the plans on the simulated clock: piece i of every choice at ttft + i*itl."""
        s = self.settings
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        offsets = [0] * len(plans)
        longest = max((max(len(pl.pieces), 1) for pl in plans), default=0)
        for i in range(longest):
            due = t0 + (s.ttft_ms + i * s.itl_ms) / 1000.0
            delay = due - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            out: list[ChoiceDelta] = []
            for k, pl in enumerate(plans):
                last = i == max(len(pl.pieces), 1) - 1
                if i >= max(len(pl.pieces), 1):
                    continue
                piece = pl.pieces[i] if pl.pieces else ""
                if pl.tool_calls is not None:
                    out.append(_tool_piece(pl, i, piece, last))
                    continue
                out.append(
                    ChoiceDelta(
                        pl.index,
                        content=piece,
                        logprobs=logprobs(piece, offsets[k]) if logprobs and piece else None,
                        finish_reason=pl.finish_reason if last else None,
                        stop_sequence=pl.stop_sequence if last else None,
                    )
                )
                offsets[k] += len(piece)
            yield Output(choices=out)
        completion_tokens = sum(len(pl.pieces) - pl.echoed for pl in plans)
        yield Usage(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
        )

    async def count_tokens(self, req: ChatRequest, raw: bytes) -> int:
        """Exactly the prompt tokens a chat with these messages reports (sim's words)."""
        return prompt_tokens(req)

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


def _tool_piece(plan: Plan, i: int, piece: str, last: bool) -> ChoiceDelta:
    """Piece `i` of a tool call's arguments: the first names the call (id, type, name)."""
    call = (plan.tool_calls or [{}])[0]
    if i == 0:
        frag = {**call, "function": {"name": call["function"]["name"], "arguments": piece}}
    else:
        frag = {"index": call["index"], "function": {"arguments": piece}}
    return ChoiceDelta(
        plan.index, tool_calls=[frag], finish_reason=plan.finish_reason if last else None
    )
