"""`openai`: an engine that forwards to any OpenAI-compatible upstream server.

vLLM, llama.cpp's server, SGLang, Ollama and TGI all speak the OpenAI HTTP API, so one
engine serves them all. The client's original body is forwarded (only `model`, `stream`
and `stream_options` are rewritten), so every sampling parameter the upstream knows
reaches it untouched. Generation always streams from upstream; the worker re-aggregates
for non-streaming clients.

Ownership: `start()` creates one long-lived `httpx.AsyncClient` (a connection pool);
`aclose()` closes it. Each `chat`/`complete` call owns one upstream response inside
`async with client.stream(...)`: cancelling the consuming task (or closing the generator)
closes that response, which is how the upstream learns to abort the sequence.

Errors (all `common.errors.FleetError`; httpx exceptions are translated in `_translate`).
What reaches clients never names the upstream's URL or echoes its credentials; the URL
and the upstream's own text (scrubbed of the key) go to the log:

    upstream 4xx before the stream  -> EngineError with the upstream status/type/param/code,
                                       its message passed through `scrub` (worker/engines/
                                       scrub.py: keys, tokens, URL userinfo removed)
    upstream 401/403                -> UpstreamError 502, a fixed message (our credentials
                                       are wrong, not the client's; the upstream's text
                                       may name the key or the account)
    upstream 5xx before the stream  -> UpstreamError 502 naming only the status
    connect failure, timeout, reset -> UpstreamError 502, a fixed message
    `{"error": ...}` inside the SSE  -> UpstreamError 502 with the upstream message, scrubbed
    unreadable upstream chunk       -> UpstreamError 502

The upstream API key is sent only as `Authorization: Bearer` to the upstream and never
appears in an error message, a card or a log line.

Health (`health()`, the optional `worker.engine.HealthProbe`): `GET <root>/v1/models`
(`--upstream-health-path`) with the same headers; a connection failure, a timeout or a
5xx is a short fixed text ("health probe: connection refused"), which the runner counts
toward the model's circuit breaker.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import AsyncGenerator, Iterator
from typing import Any

import httpx
import msgspec
from msgspec import UNSET

from common.errors import (
    EngineError,
    FleetError,
    InvalidRequest,
    ServiceUnavailable,
    UpstreamError,
)
from common.openai_types import ChatRequest, CompletionRequest, EmbeddingRequest
from common.protocol import ChoiceDelta, Usage
from common.telemetry import UPSTREAM_TRACEPARENT
from worker.engine import EmbedResult, EngineEvent, ModelCard, Output, estimate_tokens
from worker.engines.httppool import ShardedClient
from worker.engines.limits import enforce_limit
from worker.engines.scrub import scrub
from worker.settings import OpenAISettings

log = logging.getLogger(__name__)

# An SSE event larger than this is not a token chunk: refuse it instead of buffering forever.
MAX_EVENT_BYTES = 16 * 1024 * 1024
# Error bodies are read only this far (they are a few hundred bytes when well-formed).
MAX_ERROR_BODY_BYTES = 64 * 1024
# After `[DONE]`, wait this long for the end of the body so the connection is reused.
DRAIN_AFTER_DONE_S = 1.0
# A health probe that takes longer than this counts as a failure ("timed out").
HEALTH_TIMEOUT_S = 5.0


# ---- upstream wire shapes (decoded with reused typed decoders; unknown fields ignored) ----


class _UpUsage(msgspec.Struct):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: dict[str, Any] | None = None
    completion_tokens_details: dict[str, Any] | None = None


class _UpErrorBody(msgspec.Struct):
    message: str = ""
    type: str | None = None
    param: str | None = None
    code: str | int | None = None


class _UpErrorDoc(msgspec.Struct):
    """OpenAI `{"error": {...}}`, TGI/Ollama `{"error": "..."}`, or legacy vLLM flat errors."""

    error: _UpErrorBody | str | None = None
    object: str | None = None
    message: str | None = None
    type: str | None = None
    param: str | None = None
    code: str | int | None = None


class _UpDelta(msgspec.Struct):
    content: str | None = None
    refusal: str | None = None
    reasoning_content: str | None = None
    reasoning: str | None = None
    tool_calls: list[dict[str, Any]] | None = None


class _UpChoice(msgspec.Struct):
    index: int = 0
    delta: _UpDelta | None = None  # chat
    text: str | None = None  # completions
    logprobs: dict[str, Any] | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None  # vLLM: the stop string (or token id) that ended it


class UpChunk(msgspec.Struct):
    choices: list[_UpChoice] = []
    usage: _UpUsage | None = None
    error: _UpErrorBody | str | None = None
    object: str | None = None  # legacy vLLM in-stream error: {"object": "error", "message"}
    message: str | None = None


class _UpEmbedding(msgspec.Struct):
    embedding: list[float] | str
    index: int = 0


class _UpEmbeddings(msgspec.Struct):
    data: list[_UpEmbedding]
    usage: _UpUsage | None = None


class _TokenCount(msgspec.Struct):
    count: int


_count_decoder = msgspec.json.Decoder(_TokenCount)
_body_decoder = msgspec.json.Decoder(dict[str, Any])
_chunk_decoder = msgspec.json.Decoder(UpChunk)
_error_decoder = msgspec.json.Decoder(_UpErrorDoc)
_embeddings_decoder = msgspec.json.Decoder(_UpEmbeddings)
_encoder = msgspec.json.Encoder()


# ---- pure helpers ---------------------------------------------------------------------------


class SSEParser:
    """Incremental `text/event-stream` parser: bytes in, complete event data payloads out.

    Handles LF and CRLF line ends, `:` comment lines, multi-line `data:` fields, and fields
    it does not need (`event:`, `id:`, `retry:`), which are ignored. Raises UpstreamError
    when one event would exceed `MAX_EVENT_BYTES`.
    """

    def __init__(self) -> None:
        self._partial = b""
        self._data: list[bytes] = []
        self._size = 0

    def feed(self, chunk: bytes) -> list[bytes]:
        buf = self._partial + chunk if self._partial else chunk
        lines = buf.split(b"\n")
        self._partial = lines.pop()
        events: list[bytes] = []
        for line in lines:
            self._line(line[:-1] if line.endswith(b"\r") else line, events)
        if len(self._partial) + self._size > MAX_EVENT_BYTES:
            raise UpstreamError("upstream sent an oversized stream event")
        return events

    def close(self) -> list[bytes]:
        """The events still pending at end of stream (a last event without a blank line)."""
        events: list[bytes] = []
        if self._partial:
            self._line(self._partial.rstrip(b"\r"), events)
            self._partial = b""
        self._line(b"", events)
        return events

    def _line(self, line: bytes, events: list[bytes]) -> None:
        if not line:
            if self._data:
                events.append(b"\n".join(self._data))
                self._data = []
                self._size = 0
        elif line.startswith(b"data:"):
            value = line[6:] if line.startswith(b"data: ") else line[5:]
            self._data.append(value)
            self._size += len(value) + 1


def chunk_output(chunk: UpChunk) -> Output | None:
    """The new output in one upstream chunk, or None when no choice advanced."""
    out: list[ChoiceDelta] = []
    for c in chunk.choices:
        d = c.delta
        refusal = None
        if d is not None:
            content = d.content or None
            reasoning = d.reasoning_content or d.reasoning or None
            tool_calls = d.tool_calls or None
            refusal = d.refusal or None
        else:
            content, reasoning, tool_calls = c.text or None, None, None
        if (
            content is None
            and reasoning is None
            and refusal is None
            and tool_calls is None
            and c.logprobs is None
            and c.finish_reason is None
        ):
            continue
        out.append(
            ChoiceDelta(
                index=c.index,
                content=content,
                reasoning_content=reasoning,
                refusal=refusal,
                tool_calls=tool_calls,
                logprobs=c.logprobs,
                finish_reason=c.finish_reason,
                stop_sequence=c.stop_reason if isinstance(c.stop_reason, str) else None,
            )
        )
    return Output(choices=out) if out else None


def _as_code(code: str | int | None) -> str | None:
    # Some servers put the HTTP status (an int) in `code`; OpenAI codes are identifiers.
    return code if isinstance(code, str) else None


def upstream_message(body: bytes) -> tuple[str, str | None, str | None, str | None]:
    """(message, type, param, code) of an upstream error body, in any of the shapes above;
    the message is a snippet of the body when it has none."""
    try:
        doc: _UpErrorDoc | None = _error_decoder.decode(body)
    except msgspec.MsgspecError:
        doc = None
    message, type_, param, code = "", None, None, None
    if doc is not None:
        if isinstance(doc.error, _UpErrorBody):
            e = doc.error
            message, type_, param, code = e.message, e.type, e.param, _as_code(e.code)
        elif isinstance(doc.error, str):
            message = doc.error
        elif doc.message is not None:
            message, type_, param, code = doc.message, doc.type, doc.param, _as_code(doc.code)
    if not message:
        message = body[:200].decode("utf-8", "replace").strip()
    return message, type_, param, code


def upstream_error(
    status: int,
    body: bytes,
    retry_after: float | None = None,
    secrets: tuple[str | None, ...] = (),
) -> FleetError:
    """Map an upstream non-2xx response to the error the client should see: a 4xx keeps
    the upstream's status and fields, its text scrubbed of credentials (and of `secrets`:
    the worker's key, the upstream URL); 401/403 and 5xx echo nothing of the upstream."""
    if status in (401, 403):
        return UpstreamError(f"The upstream rejected the worker's credentials (HTTP {status}).")
    if not 400 <= status < 500:
        return UpstreamError(f"The upstream failed with HTTP {status}.")
    message, type_, param, code = upstream_message(body)
    return EngineError(
        scrub(message, secrets) or f"The upstream answered HTTP {status}.",
        status=status,
        type=type_ or "invalid_request_error",
        param=None if param is None else scrub(param, secrets),
        code=code,
        retry_after=retry_after,
    )


def _stream_error(chunk: UpChunk, secrets: tuple[str | None, ...]) -> UpstreamError | None:
    if isinstance(chunk.error, _UpErrorBody):
        message = chunk.error.message or "unknown"
    elif isinstance(chunk.error, str):
        message = chunk.error
    elif chunk.object == "error":
        message = chunk.message or "unknown"
    else:
        return None
    return UpstreamError(f"upstream error mid-stream: {scrub(message, secrets)}")


def _retry_after(resp: httpx.Response) -> float | None:
    try:
        return float(resp.headers["retry-after"])
    except (KeyError, ValueError):
        return None


def body_of(raw: bytes) -> dict[str, Any]:
    """A request body as a dict (the form engines rewrite it in); 400 if it is not one."""
    try:
        return _body_decoder.decode(raw)
    except msgspec.MsgspecError as exc:
        raise InvalidRequest("request body must be a JSON object") from exc


def _root_url(base_url: str) -> str:
    """The server's root for `base_url` (`http://h:8000/v1` -> `http://h:8000`): vLLM
    serves `/tokenize` there, outside `/v1`."""
    url = base_url.rstrip("/")
    return url[: -len("/v1")] if url.endswith("/v1") else url


def _connect_failure(exc: BaseException) -> str:
    """Why a connection failed, in a few words naming neither host nor port."""
    seen: BaseException | None = exc
    for _ in range(8):  # the cause chain: httpx -> httpcore -> OSError -> the socket's
        if seen is None:
            break
        if isinstance(seen, ConnectionRefusedError):
            return "connection refused"
        if isinstance(seen, socket.gaierror):
            return "host not found"
        seen = seen.__cause__ or seen.__context__
    return "cannot connect"


def _display_url(base_url: str) -> str:
    """The base URL without any userinfo, safe for messages and the catalog."""
    try:
        return str(httpx.URL(base_url).copy_with(username=None, password=None))
    except httpx.InvalidURL:
        return "<invalid upstream url>"


# ---- the engine -----------------------------------------------------------------------------


class OpenAIEngine:
    """Proxies one served model to an OpenAI-compatible upstream.

    Owns a `ShardedClient` (several small httpx pools) between `start()` and `aclose()`;
    requests made outside that window raise ServiceUnavailable.
    """

    def __init__(self, settings: OpenAISettings) -> None:
        self.settings = settings
        self._model = settings.upstream_model or settings.served_model
        self._url = _display_url(settings.base_url)
        self._client: ShardedClient | None = None
        self._tokenize_ok = True  # until the upstream answers /tokenize with a 404
        self._tokenize_url = _root_url(settings.base_url) + "/tokenize"
        self._health_url = _root_url(settings.base_url) + settings.health_path
        s = settings
        self._stream_timeout = httpx.Timeout(
            connect=s.connect_timeout_s, read=None, write=s.timeout_s, pool=s.timeout_s
        )

    def card(self) -> ModelCard:
        # The catalog is public (`/v1/models`): the upstream's address stays in the logs.
        return ModelCard(
            engine="openai",
            owned_by="llmfleet",
            description="served by an OpenAI-compatible upstream",
        )

    @property
    def _secrets(self) -> tuple[str | None, ...]:
        """What no text from the upstream may carry to a client."""
        s = self.settings
        return (s.api_key, s.base_url, self._url)

    def _headers(self) -> dict[str, str]:
        """Sent with every upstream request (the key goes only here)."""
        headers = {"Accept-Encoding": "identity"}
        if self.settings.api_key:
            headers["Authorization"] = f"Bearer {self.settings.api_key}"
        return headers

    async def start(self) -> None:
        s = self.settings
        self._client = ShardedClient(
            s.max_connections,
            base_url=s.base_url,
            headers=self._headers(),
            timeout=httpx.Timeout(s.timeout_s, connect=s.connect_timeout_s),
            # The upstream is an internal server: never route it through an env proxy.
            trust_env=False,
        )
        await self._wait_ready()

    async def _wait_ready(self) -> None:
        """Wait until the upstream answers `GET /models` (vLLM loads weights for minutes).

        Until then the worker announces the model as loading and pulls nothing, so requests
        wait in the broker instead of failing with 502.
        """
        assert self._client is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.wait_ready_s
        next_log = loop.time()
        while True:
            try:
                r = await self._client.client().get("/models", timeout=5.0)
                if r.status_code < 500:  # up (a 401/404 shows on requests, clearly)
                    return
                why = f"HTTP {r.status_code}"
            except httpx.HTTPError as exc:
                why = type(exc).__name__
            now = loop.time()
            if now > deadline:
                raise UpstreamError(
                    f"The upstream {_display_url(self.settings.base_url)} was not ready within "
                    f"{self.settings.wait_ready_s:.0f} s ({why})."
                )
            if now >= next_log:
                log.info("waiting for upstream %s (%s)", _display_url(self.settings.base_url), why)
                next_log = now + 10.0
            await asyncio.sleep(1.0)

    async def health(self) -> str | None:
        """The health probe (`worker.engine.HealthProbe`): `GET <root><--upstream-health-
        path>` with the auth headers. None when the upstream answers below 500 (a 401 or
        404 shows on requests, clearly); else a short fixed text for the announcement,
        never the URL or the key (the cause goes to the debug log, scrubbed)."""
        if self._client is None:
            return "health probe: the engine is not running"
        try:
            r = await self._client.client().get(self._health_url, timeout=HEALTH_TIMEOUT_S)
        except httpx.TimeoutException:
            return "health probe: timed out"
        except httpx.ConnectError as exc:
            log.debug("health probe of %s: %s", self._url, self._scrub(str(exc)))
            return "health probe: " + _connect_failure(exc)
        except httpx.HTTPError as exc:
            log.debug("health probe of %s: %s", self._url, self._scrub(repr(exc)))
            return f"health probe: {type(exc).__name__}"
        if r.status_code >= 500:
            return f"health probe: HTTP {r.status_code}"
        return None

    async def aclose(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    def chat(self, req: ChatRequest, raw: bytes) -> AsyncGenerator[EngineEvent, None]:
        return self._stream("/chat/completions", raw, req.token_limit())

    def complete(self, req: CompletionRequest, raw: bytes) -> AsyncGenerator[EngineEvent, None]:
        return self._stream("/completions", raw, req.token_limit())

    async def count_tokens(self, req: ChatRequest, raw: bytes) -> int:
        """vLLM's `POST /tokenize` (at the server's root) with the messages, through the
        model's chat template; upstreams without it (404 once, remembered) are estimated."""
        if not self._tokenize_ok:
            return estimate_tokens(req, raw)
        client = self._require_client()
        body = body_of(raw)
        doc: dict[str, Any] = {k: body[k] for k in ("messages", "tools") if k in body}
        doc["model"] = self._model
        doc["add_generation_prompt"] = True
        with self._translate():
            resp = await client.post(
                self._tokenize_url,
                content=_encoder.encode(doc),
                headers={"Content-Type": "application/json"},
            )
        if resp.status_code in (404, 405, 501):
            log.info("upstream %s has no /tokenize: token counts are estimated", self._url)
            self._tokenize_ok = False
            return estimate_tokens(req, raw)
        await self._raise_for_status(resp)
        try:
            return int(_count_decoder.decode(resp.content).count)
        except msgspec.MsgspecError as exc:
            raise UpstreamError("The upstream sent an unreadable /tokenize answer.") from exc

    async def embed(self, req: EmbeddingRequest, raw: bytes) -> EmbedResult:
        client = self._require_client()
        body = self._rewrite(raw, stream=False)
        with self._translate():
            resp = await client.post(
                "/embeddings",
                content=body,
                headers=_trace_headers({"Content-Type": "application/json"}),
            )
            await self._raise_for_status(resp)
        try:
            parsed = _embeddings_decoder.decode(resp.content)
        except msgspec.MsgspecError as exc:
            log.warning("upstream %s sent an unreadable embeddings body", self._url)
            raise UpstreamError("The upstream sent an unreadable embeddings body.") from exc
        items = sorted(parsed.data, key=lambda item: item.index)
        u = parsed.usage or _UpUsage()
        return EmbedResult(
            embeddings=[item.embedding for item in items],
            usage=Usage(
                prompt_tokens=u.prompt_tokens,
                completion_tokens=0,
                total_tokens=u.total_tokens or u.prompt_tokens,
            ),
        )

    # ---- internals ------------------------------------------------------------------------

    def _require_client(self) -> httpx.AsyncClient:
        if self._client is None:
            raise ServiceUnavailable(f"the {self.card().engine} engine is not running")
        return self._client.client()

    def _rewrite(self, raw: bytes, *, stream: bool, limit: int | None = None) -> bytes:
        """The client's body with `model` (and, for streams, `stream*`) set for upstream,
        and `limit` as its only length field (engines/limits.py)."""
        body = body_of(raw)
        body["model"] = self._model
        body.pop("thinking", None)  # Anthropic's (common/apis/design.md): not OpenAI's API
        enforce_limit(body, limit, keep_name=True)
        if stream:
            body["stream"] = True
            opts = body.get("stream_options")
            body["stream_options"] = {
                **(opts if isinstance(opts, dict) else {}),
                "include_usage": True,
            }
        return _encoder.encode(body)

    @contextlib.contextmanager
    def _translate(self) -> Iterator[None]:
        """The one seam where httpx exceptions become UpstreamError: a fixed message for
        the client, the URL and the cause (never the key) for the log."""
        try:
            yield
        except httpx.TimeoutException as exc:
            self._log_failure(exc)
            raise UpstreamError("The upstream timed out.") from exc
        except httpx.ConnectError as exc:
            self._log_failure(exc)
            raise UpstreamError("The worker cannot connect to its upstream.") from exc
        except httpx.HTTPError as exc:
            self._log_failure(exc)
            raise UpstreamError(
                f"The request to the upstream failed ({type(exc).__name__})."
            ) from exc

    def _log_failure(self, exc: Exception) -> None:
        cause = self._scrub(f"{type(exc).__name__}: {exc}")
        log.warning("request to upstream %s failed: %s", self._url, cause)

    def _scrub(self, message: str) -> str:
        key = self.settings.api_key
        return message.replace(key, "***") if key else message

    async def _raise_for_status(self, resp: httpx.Response) -> None:
        if resp.is_success:
            return
        body = b""
        async for part in resp.aiter_bytes():
            body += part
            if len(body) >= MAX_ERROR_BODY_BYTES:
                break
        status = resp.status_code
        if status in (401, 403, 429) or status >= 500:  # the operator's business
            text = scrub(upstream_message(body)[0], (self.settings.api_key,))
            log.warning("upstream %s answered HTTP %d: %s", self._url, status, text)
        raise self._status_error(resp, body)

    def _status_error(self, resp: httpx.Response, body: bytes) -> FleetError:
        """The client's error for an upstream's non-2xx answer (`upstream_error`)."""
        return upstream_error(resp.status_code, body, _retry_after(resp), self._secrets)

    async def _stream(
        self, path: str, raw: bytes, limit: int | None
    ) -> AsyncGenerator[EngineEvent, None]:
        client = self._require_client()
        body = self._rewrite(raw, stream=True, limit=limit)
        parser = SSEParser()
        state = _StreamState(self._secrets)
        with self._translate():
            async with client.stream(
                "POST",
                path,
                content=body,
                headers=_trace_headers(
                    {"Content-Type": "application/json", "Accept": "text/event-stream"}
                ),
                timeout=self._stream_timeout,
            ) as resp:
                await self._raise_for_status(resp)
                chunks = resp.aiter_bytes()
                async for data in chunks:
                    for out in state.take(parser.feed(data)):
                        yield out
                    if state.done:
                        break
                else:
                    for out in state.take(parser.close()):
                        yield out
                    if not state.seen:
                        raise UpstreamError("The upstream ended the stream without data.")
                yield state.usage()
                if state.done:
                    # Read the end of the body so the connection goes back to the pool; a
                    # server that keeps the response open after [DONE] is simply cut off.
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(DRAIN_AFTER_DONE_S):
                            async for _ in chunks:
                                pass


class _StreamState:
    """What one upstream stream has said so far: `[DONE]` seen, last usage reported."""

    def __init__(self, secrets: tuple[str | None, ...]) -> None:
        self.secrets = secrets  # scrubbed from upstream texts (see `scrub`)
        self.done = False
        self.seen = False
        self._usage: _UpUsage | None = None

    def take(self, events: list[bytes]) -> list[Output]:
        """The outputs in `events`; raises UpstreamError for an in-stream error or bad JSON."""
        outs: list[Output] = []
        for event in events:
            if self.done:
                break
            if event == b"[DONE]":
                self.done = True
                break
            self.seen = True
            try:
                chunk = _chunk_decoder.decode(event)
            except msgspec.MsgspecError as exc:
                raise UpstreamError("The upstream sent an unreadable stream chunk.") from exc
            err = _stream_error(chunk, self.secrets)
            if err is not None:
                raise err
            if chunk.usage is not None:
                self._usage = chunk.usage
            out = chunk_output(chunk)
            if out is not None:
                outs.append(out)
        return outs

    def usage(self) -> Usage:
        """The last usage upstream reported (zeros when it never sent one)."""
        return up_usage(self._usage or _UpUsage())


def up_usage(u: _UpUsage) -> Usage:
    """An upstream's usage object as ours (total computed when the upstream left it out)."""
    return Usage(
        prompt_tokens=u.prompt_tokens,
        completion_tokens=u.completion_tokens,
        total_tokens=u.total_tokens or u.prompt_tokens + u.completion_tokens,
        prompt_tokens_details=u.prompt_tokens_details or UNSET,
        completion_tokens_details=u.completion_tokens_details or UNSET,
    )


def _trace_headers(headers: dict[str, str]) -> dict[str, str]:
    """`headers` plus this request's `traceparent`, if it has one (common.telemetry)."""
    tp = UPSTREAM_TRACEPARENT.get()
    if tp:
        headers["traceparent"] = tp
    return headers
