"""`llamacpp`: a GGUF model run in the worker process by llama-cpp-python.

One `Llama` context generates one sequence at a time, so the engine runs at most one
generation at once (the worker caps `--max-concurrency` at 1 for this engine: more waits
in the broker, where another worker can take it). Generation runs on a dedicated thread
(llama.cpp releases the GIL while it computes), and tokens cross to the event loop through
a bounded queue, so heartbeats and other models keep flowing. Cancellation is checked
between tokens. Usage comes from the model's own tokenizer.

Chat uses the chat template in the GGUF's metadata, or `--chat-format` when given (some
GGUFs, like the packaged Gemma 3 270M, carry none: llmfleet then picks a format from the
model's architecture).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import msgspec

from common.errors import InvalidRequest, ServiceUnavailable
from common.openai_types import ChatRequest, CompletionRequest, EmbeddingRequest, prompt_texts
from common.protocol import ChoiceDelta, Usage
from worker.engine import EmbedResult, EngineEvent, ModelCard, Output

log = logging.getLogger(__name__)

_QUEUE = 256
_ARCH_FORMATS = {"gemma3": "gemma", "gemma2": "gemma", "gemma": "gemma"}


class LlamaCppSettings(msgspec.Struct, frozen=True):
    model_path: str
    chat_format: str | None = None
    n_ctx: int = 4096
    n_threads: int | None = None
    n_gpu_layers: int = 0
    seed: int = 0


class _End(msgspec.Struct):
    finish_reason: str | None


class _Fail(msgspec.Struct):
    exc: Exception


class LlamaCppEngine:
    def __init__(self, settings: LlamaCppSettings) -> None:
        self.settings = settings
        self._llm: Any = None
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llamacpp")

    def card(self) -> ModelCard:
        return ModelCard(
            engine="llamacpp", owned_by="llmfleet", description=self.settings.model_path
        )

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._llm = await loop.run_in_executor(self._pool, self._load)

    def _load(self) -> Any:
        from llama_cpp import Llama  # noqa: PLC0415 - optional extra `llmfleet[llamacpp]`

        s = self.settings
        kwargs: dict[str, Any] = {
            "model_path": s.model_path,
            "n_ctx": s.n_ctx,
            "n_gpu_layers": s.n_gpu_layers,
            "seed": s.seed,
            "verbose": False,
        }
        if s.n_threads:
            kwargs["n_threads"] = s.n_threads
        llm = Llama(**kwargs)
        fmt = s.chat_format
        if fmt is None and "tokenizer.chat_template" not in llm.metadata:
            fmt = _ARCH_FORMATS.get(str(llm.metadata.get("general.architecture", "")))
        if fmt is not None:  # chosen per call by llama-cpp-python: no need to load again
            llm.chat_format = fmt
        log.info("loaded %s (chat format %s)", s.model_path, llm.chat_format)
        return llm

    async def aclose(self) -> None:
        self._llm = None
        self._pool.shutdown(wait=True, cancel_futures=True)

    # ---- generation ------------------------------------------------------------------

    def chat(self, req: ChatRequest, raw: bytes) -> AsyncIterator[EngineEvent]:
        if req.choices() != 1:
            raise InvalidRequest("The llamacpp engine generates one choice (n=1).", param="n")
        messages = [msgspec.structs.asdict(m) for m in req.messages]
        messages = [{k: v for k, v in m.items() if v is not None} for m in messages]
        kwargs = self._sampling(req.temperature, req.top_p, req.stop, req.seed)
        kwargs["max_tokens"] = req.token_limit()
        prompt_tokens = self._count_chat_prompt(messages)
        return self._run(
            lambda llm: llm.create_chat_completion(messages=messages, stream=True, **kwargs),
            prompt_tokens,
            chat=True,
        )

    def complete(self, req: CompletionRequest, raw: bytes) -> AsyncIterator[EngineEvent]:
        prompts = prompt_texts(req.prompt)
        if len(prompts) != 1 or req.choices() != 1 or not isinstance(prompts[0], str):
            raise InvalidRequest(
                "The llamacpp engine takes one text prompt and generates one choice.",
                param="prompt",
            )
        prompt = prompts[0]
        kwargs = self._sampling(req.temperature, req.top_p, req.stop, req.seed)
        kwargs["max_tokens"] = req.token_limit() or None
        prompt_tokens = len(self._require().tokenize(prompt.encode(), add_bos=True))
        return self._run(
            lambda llm: llm.create_completion(prompt=prompt, stream=True, **kwargs),
            prompt_tokens,
            chat=False,
        )

    async def embed(self, req: EmbeddingRequest, raw: bytes) -> EmbedResult:
        raise InvalidRequest("This model does not serve embeddings.", param="model")

    # ---- internals ------------------------------------------------------------------------

    def _require(self) -> Any:
        if self._llm is None:
            raise ServiceUnavailable("the llamacpp engine is not loaded")
        return self._llm

    @staticmethod
    def _sampling(
        temperature: float | None,
        top_p: float | None,
        stop: str | list[str] | None,
        seed: int | None,
    ) -> dict[str, Any]:
        kw: dict[str, Any] = {"temperature": 1.0 if temperature is None else temperature}
        if top_p is not None:
            kw["top_p"] = top_p
        if stop:
            kw["stop"] = [stop] if isinstance(stop, str) else list(stop)
        if seed is not None:
            kw["seed"] = seed
        return kw

    def _count_chat_prompt(self, messages: list[dict[str, Any]]) -> int:
        """Prompt tokens as the model sees them: the chat-formatted prompt, tokenized."""
        llm = self._require()
        from llama_cpp import llama_chat_format  # noqa: PLC0415

        handler = llama_chat_format.get_chat_completion_handler(llm.chat_format)
        formatter = getattr(handler, "__closure__", None)
        prompt = None
        for cell in formatter or ():
            fn = cell.cell_contents
            if callable(fn) and getattr(fn, "__name__", "").startswith("format_"):
                prompt = fn(messages=messages).prompt
                break
        if prompt is None:  # templates from the GGUF go through the Jinja2 formatter
            text = "\n".join(str(m.get("content") or "") for m in messages)
            return len(llm.tokenize(text.encode(), add_bos=True))
        return len(llm.tokenize(prompt.encode(), add_bos=True, special=True))

    async def _run(
        self, make: Any, prompt_tokens: int, *, chat: bool
    ) -> AsyncIterator[EngineEvent]:
        llm = self._require()
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[str | _End | _Fail] = asyncio.Queue(_QUEUE)
        stop = threading.Event()
        room = threading.Semaphore(_QUEUE)

        def put(item: str | _End | _Fail) -> None:
            room.acquire()
            loop.call_soon_threadsafe(queue.put_nowait, item)

        def generate() -> None:
            finish: str | None = None
            try:
                stream: Iterator[dict[str, Any]] = make(llm)
                try:
                    for chunk in stream:
                        if stop.is_set():
                            finish = None
                            break
                        choice = chunk["choices"][0]
                        text = choice["delta"].get("content") if chat else choice.get("text")
                        if text:
                            put(text)
                        if choice.get("finish_reason"):
                            finish = choice["finish_reason"]
                finally:
                    close = getattr(stream, "close", None)
                    if close is not None:
                        close()
                put(_End(finish))
            except Exception as exc:
                put(_Fail(exc))

        future = loop.run_in_executor(self._pool, generate)
        pieces: list[str] = []
        finish: str | None = None
        try:
            while True:
                item = await queue.get()
                room.release()
                if isinstance(item, _Fail):
                    raise item.exc
                if isinstance(item, _End):
                    finish = item.finish_reason
                    break
                pieces.append(item)
                yield Output(choices=[ChoiceDelta(index=0, content=item)])
        finally:
            stop.set()
            while not queue.empty():  # let a blocked producer finish
                queue.get_nowait()
                room.release()
            with contextlib.suppress(Exception):
                await asyncio.shield(future)
        yield Output(choices=[ChoiceDelta(index=0, finish_reason=finish or "stop")])
        text = "".join(pieces)
        completion = len(llm.tokenize(text.encode(), add_bos=False)) if text else 0
        yield Usage(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion,
            total_tokens=prompt_tokens + completion,
        )
