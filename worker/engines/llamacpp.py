"""`llamacpp`: a GGUF model run in the worker process by llama.cpp's own server (xllamacpp).

xllamacpp embeds llama.cpp's C++ server in the process: continuous batching over
`n_parallel` slots (the worker's `--max-concurrency`), prompt caching, its OpenAI-compatible
chat and completions handling (chat templates, tool-call parsing, JSON schema constraints,
logprobs), and exact usage from the model's tokenizer. The PyPI wheel is prebuilt without
`-march=native`: no AVX-512 or AMX instructions, so it runs on any x86-64 machine with AVX2.

Ownership: `start()` loads the model on a dedicated thread and runs one token through it
(a smoke check: a broken build or file fails at start, not at the first request);
`aclose()` drops the server. Each request runs one blocking `handle_*` call on a thread of
a pool sized to the slots; llama.cpp calls our callback on that thread for every chunk,
and the chunks cross to the event loop through a bounded queue. Cancelling the consuming
task makes the callback return True, which stops the sequence at its next token.

The client's body is forwarded as is (only `model`, `stream` and `stream_options` are set),
like the openai engine, so every parameter llama.cpp knows reaches it. Errors:

    llama.cpp 4xx (a bad parameter)       -> EngineError with its status and message (scrubbed)
    prompt longer than the context         -> 400 invalid_request_error context_length_exceeded
    llama.cpp 5xx (e.g. unparsable output) -> UpstreamError 502 naming only the status (the
                                              text, which may hold internals, is logged)
    `echo` (llama.cpp cannot score prompts) -> 400 naming `echo`
    the model fails to load or to run      -> EngineError at start (the worker exits non-zero)

The embedded server also listens on a loopback HTTP port; it is given a random API key
that never leaves the process, so nothing else on the host can use it.

Chat templates: the GGUF's own (Jinja), or `--chat-format`: a llama.cpp built-in template
name (`chatml`, `llama3`, `gemma`, ...) or the path of a Jinja template file. A GGUF with no
template whose architecture is Gemma gets the Gemma template shipped beside this module.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from typing import Any

import httpx
import msgspec

from common.errors import EngineError, InvalidRequest, ServiceUnavailable, UpstreamError
from common.openai_types import ChatRequest, CompletionRequest, EmbeddingRequest, prompt_texts
from common.protocol import ChoiceDelta, Usage
from worker.engine import EmbedResult, EngineEvent, ModelCard, Output, estimate_tokens
from worker.engines.gguf import GGUFError, read_metadata
from worker.engines.limits import enforce_limit
from worker.engines.openai import UpChunk, body_of, chunk_output, up_usage
from worker.engines.scrub import scrub
from worker.settings import LlamaCppSettings

log = logging.getLogger(__name__)

_QUEUE = 256  # chunks buffered between llama.cpp's thread and the event loop
_BUILTIN_BY_ARCH = {"gemma3": "gemma.jinja", "gemma2": "gemma.jinja", "gemma": "gemma.jinja"}


class _End(msgspec.Struct):
    pass


class _Fail(msgspec.Struct):
    exc: BaseException


def chat_template(settings: LlamaCppSettings, meta: dict[str, Any]) -> tuple[str, bool]:
    """(template, use_jinja) for llama.cpp: "" with Jinja means the GGUF's own template."""
    fmt = settings.chat_format
    if fmt:
        if os.path.isfile(fmt):
            with open(fmt, encoding="utf-8") as f:
                return f.read(), True
        return fmt, False  # a llama.cpp built-in name (no tool-call parsing without Jinja)
    if "tokenizer.chat_template" in meta:
        return "", True
    shipped = _BUILTIN_BY_ARCH.get(str(meta.get("general.architecture", "")))
    if shipped is None:
        return "", True  # llama.cpp falls back to chatml
    return resources.files("worker.engines").joinpath("templates", shipped).read_text("utf-8"), True


def engine_error(err: Any) -> EngineError | UpstreamError:
    """llama.cpp's `{"error": {...}}` as the error the client should see: a 4xx keeps its
    status and (scrubbed) message; anything else names only its status, and is logged."""
    if not isinstance(err, dict):
        log.warning("llama.cpp failed: %.500r", err)
        return UpstreamError("llama.cpp failed.")
    message = str(err.get("message") or "llama.cpp failed")
    code = err.get("code")
    status = code if isinstance(code, int) else 500
    if err.get("type") == "exceed_context_size_error":
        return EngineError(
            scrub(message),
            status=400,
            type="invalid_request_error",
            param="messages",
            code="context_length_exceeded",
        )
    if 400 <= status < 500:
        return EngineError(
            scrub(message), status=status, type=str(err.get("type") or "invalid_request_error")
        )
    log.warning("llama.cpp failed with HTTP %d: %.500s", status, message)
    return UpstreamError(f"llama.cpp failed with HTTP {status}.")


class LlamaCppEngine:
    """One model in one embedded llama.cpp server; `n_parallel` sequences batch together."""

    def __init__(self, settings: LlamaCppSettings) -> None:
        self.settings = settings
        self._server: Any = None
        self._api_key = secrets.token_urlsafe(32)
        # One thread per slot (each request blocks one), one for load and the smoke check.
        self._pool = ThreadPoolExecutor(
            max_workers=settings.n_parallel + 1, thread_name_prefix="llamacpp"
        )

    def card(self) -> ModelCard:
        return ModelCard(
            engine="llamacpp",
            owned_by="llmfleet",
            description=f"llama.cpp: {os.path.basename(self.settings.model_path)}",
        )

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.run_in_executor(self._pool, self._load)
        await loop.run_in_executor(self._pool, self._smoke_check)

    def _load(self) -> Any:
        try:
            import xllamacpp  # noqa: PLC0415 - optional extra `llmfleet[llamacpp]`
        except ImportError as exc:
            raise EngineError(
                "the llamacpp engine needs xllamacpp: pip install 'llmfleet[llamacpp]'"
            ) from exc
        s = self.settings
        try:
            meta = read_metadata(s.model_path)
        except (OSError, GGUFError) as exc:
            raise EngineError(f"cannot read the model file {s.model_path}: {exc}") from exc
        template, jinja = chat_template(s, meta)
        p = xllamacpp.CommonParams()
        p.model.path = s.model_path
        p.n_parallel = s.n_parallel
        p.n_ctx = s.n_ctx * s.n_parallel
        p.n_gpu_layers = s.n_gpu_layers
        p.use_jinja = jinja
        p.chat_template = template
        p.warmup = False  # the smoke check below runs a real token instead
        p.hostnames = ["127.0.0.1"]
        p.api_keys = [self._api_key]  # its loopback HTTP port is ours alone
        p.endpoint_metrics = False
        p.verbosity = 0 if log.isEnabledFor(logging.DEBUG) else -1
        if s.n_threads:
            p.cpuparams.n_threads = s.n_threads
            p.cpuparams_batch.n_threads = s.n_threads
        try:
            server = xllamacpp.Server(p)
        except Exception as exc:
            raise EngineError(f"llama.cpp could not load {s.model_path}: {exc}") from exc
        log.info(
            "loaded %s (%s, %d slots x %d tokens, %s)",
            s.model_path,
            meta.get("general.name", "?"),
            s.n_parallel,
            s.n_ctx,
            "GGUF template" if jinja and not template else (s.chat_format or "shipped template"),
        )
        return server

    def _smoke_check(self) -> None:
        """One token through the model: a build that cannot run here fails now, clearly."""
        t0 = time.perf_counter()
        try:
            out = self._server.handle_completions({"prompt": "Hello", "max_tokens": 1})
        except Exception as exc:
            raise EngineError(f"llama.cpp failed its start-up check: {exc}") from exc
        if not isinstance(out, dict) or "error" in out or not out.get("choices"):
            raise EngineError(f"llama.cpp failed its start-up check: {out!r:.300}")
        log.info("start-up check passed: one token in %.0f ms", (time.perf_counter() - t0) * 1e3)

    async def aclose(self) -> None:
        self._server = None
        self._pool.shutdown(wait=True, cancel_futures=True)

    # ---- generation ------------------------------------------------------------------

    def chat(self, req: ChatRequest, raw: bytes) -> AsyncIterator[EngineEvent]:
        if req.choices() != 1:
            raise InvalidRequest("The llamacpp engine generates one choice (n=1).", param="n")
        server = self._require()
        limit = req.token_limit()
        return self._run(server.handle_chat_completions, self._body(raw, limit), limit)

    def complete(self, req: CompletionRequest, raw: bytes) -> AsyncIterator[EngineEvent]:
        if req.echo:
            raise InvalidRequest(
                "The llamacpp engine cannot echo or score the prompt (llama.cpp does not "
                "support 'echo'); use an engine that does, such as vLLM.",
                param="echo",
            )
        if req.suffix:
            raise InvalidRequest("The llamacpp engine does not support 'suffix'.", param="suffix")
        if len(prompt_texts(req.prompt)) != 1 or req.choices() != 1:
            raise InvalidRequest(
                "The llamacpp engine takes one prompt and generates one choice (n=1).",
                param="prompt",
            )
        server = self._require()
        limit = req.token_limit()
        return self._run(server.handle_completions, self._body(raw, limit), limit)

    async def embed(self, req: EmbeddingRequest, raw: bytes) -> EmbedResult:
        raise InvalidRequest("This model does not serve embeddings.", param="model")

    async def count_tokens(self, req: ChatRequest, raw: bytes) -> int:
        """Exact: the messages through the model's chat template (`/apply-template` of the
        embedded server, on loopback), then its tokenizer (`/tokenize`)."""
        server = self._require()
        doc = body_of(raw)
        templ = {k: doc[k] for k in ("messages", "tools") if k in doc}
        auth = {"Authorization": f"Bearer {self._api_key}"}
        try:
            async with httpx.AsyncClient(
                base_url=server.listening_address, headers=auth, timeout=30.0, trust_env=False
            ) as client:
                r = await client.post("/apply-template", json=templ)
                r.raise_for_status()
                prompt = r.json()["prompt"]
                r = await client.post(
                    "/tokenize",
                    json={"content": prompt, "add_special": True, "parse_special": True},
                )
                r.raise_for_status()
                return len(r.json()["tokens"])
        except (httpx.HTTPError, KeyError, ValueError) as exc:
            log.warning("llama.cpp could not count tokens: %s", exc)
            return estimate_tokens(req, raw)

    # ---- internals ------------------------------------------------------------------------

    def _require(self) -> Any:
        if self._server is None:
            raise ServiceUnavailable("the llamacpp engine is not loaded")
        return self._server

    @staticmethod
    def _body(raw: bytes, limit: int | None) -> dict[str, Any]:
        body = body_of(raw)
        body.pop("model", None)
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
        body.pop("best_of", None)  # best_of <= n (validated): nothing more to sample
        return enforce_limit(body, limit)  # n_predict may not outrun max_tokens

    async def _run(
        self,
        call: Callable[[dict[str, Any], Callable[[Any], bool]], Any],
        body: dict[str, Any],
        limit: int | None,
    ) -> AsyncIterator[EngineEvent]:
        """Stream one request; `limit` 0 scores the prompt only (usage, no completion)."""
        if limit == 0:  # llama.cpp reads max_tokens 0 as "no limit": run one, report none
            body["max_tokens"] = 1
            body.pop("max_completion_tokens", None)
        loop = asyncio.get_running_loop()
        bridge = _Bridge(loop)
        future = loop.run_in_executor(self._pool, bridge.generate, call, body)
        usage: Usage | None = None
        try:
            async for chunk in bridge.chunks():
                if chunk.usage is not None:
                    usage = up_usage(chunk.usage)
                out = None if limit == 0 else chunk_output(chunk)
                if out is not None:
                    yield out
        finally:
            bridge.close()
            await asyncio.shield(asyncio.wait([future]))
        if usage is None:
            raise UpstreamError("llama.cpp ended the stream without usage")
        if limit == 0:
            yield Output(choices=[ChoiceDelta(index=0, content="", finish_reason="length")])
            usage = Usage(
                prompt_tokens=usage.prompt_tokens,
                completion_tokens=0,
                total_tokens=usage.prompt_tokens,
            )
        yield usage


class _Bridge:
    """Carries one request's chunks from llama.cpp's thread to the event loop.

    The thread side (`generate`, and `on_chunk`, llama.cpp's callback) blocks while `_QUEUE`
    chunks wait for the consumer; `close()` (the consumer left or was cancelled) makes the
    callback return True, which stops the sequence at its next token.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._queue: asyncio.Queue[UpChunk | _End | _Fail] = asyncio.Queue()
        self._stop = threading.Event()
        self._room = threading.Semaphore(_QUEUE)

    def close(self) -> None:
        self._stop.set()

    # ---- thread side ---------------------------------------------------------------------

    def _put(self, item: UpChunk | _End | _Fail) -> None:
        while not self._room.acquire(timeout=0.1):  # wait for the consumer, unless it left
            if self._stop.is_set():
                return
        self._loop.call_soon_threadsafe(self._queue.put_nowait, item)

    def on_chunk(self, chunk: Any) -> bool:
        if self._stop.is_set():
            return True
        item: UpChunk | _Fail
        if isinstance(chunk, dict) and "error" in chunk:
            item = _Fail(engine_error(chunk["error"]))
        else:
            try:
                item = msgspec.convert(chunk, UpChunk)
            except msgspec.ValidationError as exc:
                log.warning("llama.cpp sent an unreadable chunk: %s", exc)
                item = _Fail(UpstreamError("llama.cpp sent an unreadable chunk."))
        self._put(item)
        return self._stop.is_set()

    def generate(
        self, call: Callable[[dict[str, Any], Callable[[Any], bool]], Any], body: dict[str, Any]
    ) -> None:
        try:
            result = call(body, self.on_chunk)
            if isinstance(result, dict) and "error" in result:
                self._put(_Fail(engine_error(result["error"])))
            else:
                self._put(_End())
        except BaseException as exc:  # reported to the consumer, never lost in the pool
            self._put(_Fail(exc))

    # ---- event-loop side -----------------------------------------------------------------

    async def chunks(self) -> AsyncIterator[UpChunk]:
        """The chunks until llama.cpp returns; raises the error it reported."""
        while True:
            item = await self._queue.get()
            self._room.release()
            if isinstance(item, _End):
                return
            if isinstance(item, _Fail):
                if isinstance(item.exc, (EngineError, UpstreamError)):
                    raise item.exc
                log.warning("llama.cpp failed: %r", item.exc)
                raise UpstreamError("llama.cpp failed.") from item.exc
            yield item
