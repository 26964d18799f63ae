"""`anthropic`: an engine that serves chat from the Anthropic Messages API (or any
Messages-compatible upstream).

The chat body on the wire becomes a Messages request (`common.apis.anthropic_upstream`,
pure, field by field in its docstring), and the upstream's Messages events become chat
deltas (`common.apis.anthropic_events`). Generation always streams from upstream; the
worker re-aggregates for non-streaming clients. Chat only: `complete` and `embed` answer
400; `count_tokens` asks the upstream's `POST /v1/messages/count_tokens`.

It shares the `openai` engine's plumbing (it subclasses `OpenAIEngine`): the same settings
and `--upstream*` flags, one `ShardedClient` owned between `start()` and `aclose()`, the
readiness wait, the one seam where httpx exceptions are translated, and the scrubbing of
upstream texts. What differs is the wire:

    URL       `--upstream` is the API root (https://api.anthropic.com, the default); a
              trailing /v1 is accepted. Requests go to /v1/messages.
    headers   `x-api-key: <--upstream-api-key>` and `anthropic-version: 2023-06-01`; the key
              never appears in an error, a log line or the card.
    ready     Messages has no unauthenticated health route: `start()` waits until
              `GET /v1/models` (sent with the key) answers below 500, as the openai engine
              waits for `/models`. A wrong key is then a 502 on each request, and logged.
    health    the inherited probe asks `GET /v1/models` (`--upstream-health-path`) with the
              same x-api-key and anthropic-version headers (worker.engine.HealthProbe).

Errors (all `common.errors.FleetError`):

    upstream 429                       -> RateLimited 429 rate_limit_error, Retry-After from
                                          the upstream's `retry-after` (else RETRY_AFTER_S)
    upstream 529 overloaded, or an     -> ServiceUnavailable 503 with Retry-After: the
    `overloaded_error` event before       client may retry (so may the fleet: nothing was
    any output                            sent); `rate_limit_error` there -> 429 likewise
    upstream 401/403                   -> UpstreamError 502, a fixed message
    upstream other 5xx                 -> UpstreamError 502 naming only the status
    upstream other 4xx                 -> EngineError with the upstream status and type,
                                          its message scrubbed (worker/engines/scrub.py)
    `error` event after output         -> UpstreamError 502, the message scrubbed
    connect failure, timeout, reset    -> UpstreamError 502, a fixed message
    stream ended before a stop_reason  -> UpstreamError 502

Usage is exact: the upstream's input, output and cache counts (`from_anthropic_usage`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator
from typing import Any

import httpx
import msgspec

from common.apis.anthropic import ANTHROPIC_VERSION
from common.apis.anthropic_events import EventReader, MessagesStreamError
from common.apis.anthropic_upstream import chat_to_messages, count_tokens_body, wants_json_output
from common.errors import (
    FleetError,
    InvalidRequest,
    RateLimited,
    ServiceUnavailable,
    UpstreamError,
)
from common.openai_types import ChatRequest, CompletionRequest, EmbeddingRequest
from common.telemetry import UPSTREAM_TRACEPARENT
from worker.engine import EmbedResult, EngineEvent, ModelCard, Output
from worker.engines.openai import (
    DRAIN_AFTER_DONE_S,
    MAX_EVENT_BYTES,
    OpenAIEngine,
    SSEParser,
    body_of,
    upstream_error,
)
from worker.engines.scrub import scrub
from worker.settings import UPSTREAM_DEFAULTS, AnthropicSettings, OpenAISettings

log = logging.getLogger(__name__)

RETRY_AFTER_S = 2.0  # when a 429/529 names no retry-after (or it is an in-stream error)
CHAT_ONLY = "The anthropic engine serves chat only (POST /v1/chat/completions)."

_encoder = msgspec.json.Encoder()


class _CountTokens(msgspec.Struct):
    input_tokens: int


_count_decoder = msgspec.json.Decoder(_CountTokens)


def api_root(base_url: str) -> str:
    """The API root of `--upstream` (`https://api.anthropic.com`, a trailing `/v1` cut)."""
    root = base_url.rstrip("/")
    return root.removesuffix("/v1")


def retry_after_of(resp: httpx.Response) -> float:
    try:
        return max(0.0, float(resp.headers["retry-after"]))
    except (KeyError, ValueError):
        return RETRY_AFTER_S


class AnthropicEngine(OpenAIEngine):
    """Serves one model from a Messages upstream (see the module docstring)."""

    def __init__(
        self, settings: OpenAISettings, anthropic: AnthropicSettings | None = None
    ) -> None:
        self._root = api_root(settings.base_url or UPSTREAM_DEFAULTS["anthropic"])
        # The client's base is the root's /v1: the inherited readiness wait asks /v1/models.
        super().__init__(msgspec.structs.replace(settings, base_url=self._root + "/v1"))
        self.anthropic = anthropic or AnthropicSettings()

    def card(self) -> ModelCard:
        # The catalog is public (`/v1/models`): the upstream's address stays in the logs.
        return ModelCard(
            engine="anthropic",
            owned_by="llmfleet",
            description="served by an Anthropic Messages upstream",
        )

    @property
    def _secrets(self) -> tuple[str | None, ...]:
        return (*super()._secrets, self._root)

    def _headers(self) -> dict[str, str]:
        headers = {"Accept-Encoding": "identity", "anthropic-version": ANTHROPIC_VERSION}
        if self.settings.api_key:
            headers["x-api-key"] = self.settings.api_key
        return headers

    # ---- the Engine operations --------------------------------------------------------------

    def chat(self, req: ChatRequest, raw: bytes) -> AsyncGenerator[EngineEvent, None]:
        return self._messages(raw)

    def complete(self, req: CompletionRequest, raw: bytes) -> AsyncGenerator[EngineEvent, None]:
        return _refuse()

    async def embed(self, req: EmbeddingRequest, raw: bytes) -> EmbedResult:
        raise InvalidRequest(CHAT_ONLY)

    async def count_tokens(self, req: ChatRequest, raw: bytes) -> int:
        """The prompt's size in the upstream model's tokens (its count_tokens route)."""
        client = self._require_client()
        body = count_tokens_body(self._request(body_of(raw)))
        with self._translate():
            resp = await client.post(
                "/messages/count_tokens", content=_encoder.encode(body), headers=_headers()
            )
            await self._raise_for_status(resp)
        try:
            return _count_decoder.decode(resp.content).input_tokens
        except msgspec.MsgspecError as exc:
            log.warning("upstream %s sent an unreadable count_tokens body", self._url)
            raise UpstreamError("The upstream sent an unreadable token count.") from exc

    # ---- internals ------------------------------------------------------------------------

    def _request(self, chat: dict[str, Any]) -> dict[str, Any]:
        limit = self.anthropic.default_max_tokens
        return chat_to_messages(chat, self._model, default_max_tokens=limit)

    def _status_error(self, resp: httpx.Response, body: bytes) -> FleetError:
        """429 and 529 (overloaded) are retryable, with the upstream's Retry-After."""
        if resp.status_code == 429:
            return RateLimited(
                "The upstream is rate limiting this model; retry later.",
                code="upstream_rate_limited",
                retry_after=retry_after_of(resp),
            )
        if resp.status_code == 529:
            return ServiceUnavailable(
                "The upstream is overloaded; retry later.",
                code="upstream_overloaded",
                retry_after=retry_after_of(resp),
            )
        return upstream_error(resp.status_code, body, None, self._secrets)

    def _stream_error(self, exc: MessagesStreamError) -> FleetError:
        """An in-stream `error` event as the client's error (the one seam for them)."""
        if not exc.after_output and exc.error_type == "overloaded_error":
            return ServiceUnavailable(
                "The upstream is overloaded; retry later.",
                code="upstream_overloaded",
                retry_after=RETRY_AFTER_S,
            )
        if not exc.after_output and exc.error_type == "rate_limit_error":
            return RateLimited(
                "The upstream is rate limiting this model; retry later.",
                code="upstream_rate_limited",
                retry_after=RETRY_AFTER_S,
            )
        message = scrub(exc.message or exc.error_type, self._secrets)
        log.warning("upstream %s failed mid-stream (%s): %s", self._url, exc.error_type, message)
        return UpstreamError(f"upstream error mid-stream: {message}")

    async def _messages(self, raw: bytes) -> AsyncGenerator[EngineEvent, None]:
        client = self._require_client()
        chat = body_of(raw)
        body = self._request(chat)
        body["stream"] = True
        reader = EventReader(json_output=wants_json_output(chat))
        with self._translate():
            async with client.stream(
                "POST",
                "/messages",
                content=_encoder.encode(body),
                headers=_headers(stream=True),
                timeout=self._stream_timeout,
            ) as resp:
                await self._raise_for_status(resp)
                sse = resp.headers.get("content-type", "").startswith("text/event-stream")
                # An upstream that ignores `stream` answers with one Message body.
                parser: SSEParser | _WholeBody = SSEParser() if sse else _WholeBody()
                chunks = resp.aiter_bytes()
                async for data in chunks:
                    for out in self._take(reader, parser.feed(data)):
                        yield out
                    if reader.done:
                        break
                else:
                    for out in self._take(reader, parser.close()):
                        yield out
                if not reader.finished:
                    raise UpstreamError("The upstream ended the stream before the message ended.")
                yield reader.usage()
                if reader.done:
                    # Read the end of the body so the connection goes back to the pool.
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(DRAIN_AFTER_DONE_S):
                            async for _ in chunks:
                                pass

    def _take(self, reader: EventReader, payloads: list[bytes]) -> list[Output]:
        outs: list[Output] = []
        for payload in payloads:
            if reader.done:
                break
            try:
                deltas = reader.feed(payload)
            except MessagesStreamError as exc:
                raise self._stream_error(exc) from exc
            # one Output per delta: an Output advances each choice at most once
            outs.extend(Output(choices=[d]) for d in deltas)
        return outs


class _WholeBody:
    """A non-stream body, collected (bounded) and handed over as one payload at its end."""

    def __init__(self) -> None:
        self._body = b""

    def feed(self, chunk: bytes) -> list[bytes]:
        self._body += chunk
        if len(self._body) > MAX_EVENT_BYTES:
            raise UpstreamError("upstream sent an oversized message body")
        return []

    def close(self) -> list[bytes]:
        return [self._body] if self._body else []


async def _refuse() -> AsyncGenerator[EngineEvent, None]:
    raise InvalidRequest(CHAT_ONLY)
    yield  # an async generator, like every engine's complete()


def _headers(*, stream: bool = False) -> dict[str, str]:
    """The per-request headers, with this request's `traceparent` if it has one."""
    headers = {"Content-Type": "application/json"}
    if stream:
        headers["Accept"] = "text/event-stream"
    tp = UPSTREAM_TRACEPARENT.get()
    if tp:
        headers["traceparent"] = tp
    return headers
