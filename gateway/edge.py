"""The gateway's HTTP edge: uvicorn's httptools protocol, with what one connection may cost
bounded before any request reaches the app.

uvicorn buffers a request head without limit (httptools joins a header's pieces until the
header ends) and waits for it forever: one huge header grows the gateway's memory, and a
client that sends a byte now and then holds a connection open (slowloris). `EdgeProtocol`
adds, per connection, in uvicorn's own protocol callbacks (event loop, no task, no lock):

    head bytes   bytes of the request head received so far; the parser is never fed
                 more than one byte past `max_header_bytes` of a head: 431 and close.
                 (A pipelined request's head that starts inside the read that ended the
                 request before it may get that read's rest, <= 256 KiB, uncounted.)
    head timer   armed when the connection opens and whenever it waits for the client's
                 next request; the head not complete in `header_timeout_s`: 408 (nothing
                 if no byte came) and close. Also bounds a body the app did not read.
    overload     `max_connections` open connections, or as many requests running: 503
                 `too_many_connections` in the OpenAI envelope, Retry-After, close
                 (uvicorn's own `limit_concurrency` answer is plain text).

A refusal lingers: the answer is written, the write side shut, and what the client still
sends is dropped for up to `REFUSE_LINGER_S`, so that the client reads the answer instead
of a reset. Idle keep-alive connections are closed by uvicorn's `timeout_keep_alive`
(5 s). The answers the edge writes itself are counted in `EdgeCounters` (one per server, read by the
metrics at scrape time).

    data ──► [head: count, timer] ──headers complete──► app (or 503) ──response──► [head]
                 │ > max_header_bytes: 431          │ timer: 408
                 └───────────────────────────────────┴──► close
"""

from __future__ import annotations

import asyncio
import http
import logging
import time
from typing import Any

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from common.errors import FleetError, ServiceUnavailable, envelope_bytes
from gateway.http import Receive, Scope, Send, send_json
from gateway.settings import EdgeSettings

log = logging.getLogger(__name__)

OVERLOAD_RETRY_AFTER_S = 1
REFUSE_LINGER_S = 1.0  # after a refusal, what the client still sends is dropped this long
_WARN_EVERY_S = 10.0  # a refusal flood logs one line per reason this often


class EdgeCounters:
    """Requests and connections the edge answered itself (they never reached the app).
    Written by the protocols of one server (event-loop callbacks), read by the metrics."""

    REASONS = ("headers_too_large", "header_timeouts", "overloaded")

    def __init__(self) -> None:
        self.headers_too_large = 0  # 431
        self.header_timeouts = 0  # 408, or closed before any byte came
        self.overloaded = 0  # 503 too_many_connections
        self._warned: dict[str, float] = {}

    def count(self, reason: str, detail: str) -> None:
        setattr(self, reason, getattr(self, reason) + 1)
        now = time.monotonic()
        if now - self._warned.get(reason, -_WARN_EVERY_S) >= _WARN_EVERY_S:
            self._warned[reason] = now
            log.warning("HTTP edge: %s (%d so far)", detail, getattr(self, reason))


def headers_too_large(limit: int) -> FleetError:
    return FleetError(
        f"Request line and headers exceed the limit of {limit} bytes.",
        status=431,
        type="invalid_request_error",
        code="request_header_fields_too_large",
    )


def header_timeout(seconds: float) -> FleetError:
    return FleetError(
        f"The request headers did not arrive within {seconds:g} s.",
        status=408,
        type="invalid_request_error",
        code="request_timeout",
    )


def too_many_connections() -> ServiceUnavailable:
    return ServiceUnavailable(
        "The gateway has too many open connections; retry shortly.",
        code="too_many_connections",
        retry_after=OVERLOAD_RETRY_AFTER_S,
    )


def raw_response(err: FleetError) -> bytes:
    """A whole HTTP/1.1 response carrying `err`'s envelope, for the protocol to write
    itself (no request cycle exists for a head it refused); it closes the connection."""
    body = envelope_bytes(err)
    head = [
        b"HTTP/1.1 %d %s\r\n" % (err.status, http.HTTPStatus(err.status).phrase.encode()),
        b"content-type: application/json\r\n",
        b"content-length: %d\r\n" % len(body),
        b"connection: close\r\n",
    ]
    if err.retry_after is not None:
        head.append(b"retry-after: %d\r\n" % max(1, round(err.retry_after)))
    return b"".join([*head, b"\r\n", body])


async def _overloaded(scope: Scope, receive: Receive, send: Send) -> None:
    err = too_many_connections()
    extra = [(b"retry-after", str(OVERLOAD_RETRY_AFTER_S).encode()), (b"connection", b"close")]
    await send_json(send, err.status, envelope_bytes(err), extra)


class EdgeConfig(uvicorn.Config):
    """uvicorn's config with the edge's limits, serving through `EdgeProtocol`."""

    def __init__(
        self, app: Any, *, edge: EdgeSettings, counters: EdgeCounters, **kwargs: Any
    ) -> None:
        super().__init__(app, http=EdgeProtocol, ws="none", **kwargs)
        self.edge = edge
        self.counters = counters


class EdgeProtocol(HttpToolsProtocol):
    """One HTTP/1.1 connection (see the module docstring for what it adds to uvicorn's)."""

    def __init__(self, config: uvicorn.Config, *args: Any, **kwargs: Any) -> None:
        super().__init__(config, *args, **kwargs)
        if isinstance(config, EdgeConfig):
            self.edge, self.counters = config.edge, config.counters
        else:
            self.edge, self.counters = EdgeSettings(), EdgeCounters()
        self.limit_concurrency = None  # uvicorn's plain-text 503: ours replaces it
        self._app = self.app
        self._head: int | None = 0  # bytes of the request head so far; None past the head
        self._head_ended = False  # a request ended during this read (see data_received)
        self._head_begun = False  # a byte of the current head arrived
        self._head_timer: asyncio.TimerHandle | None = None
        self._refused = False

    # ---- connection ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        # Inside a head the parser gets no more than one byte past the limit at a time,
        # so a head is refused before more than `max_header_bytes` of it is buffered.
        while data and not self._refused and not self.transport.is_closing():
            piece = data
            if self._head is not None:
                piece = data[: self.edge.max_header_bytes - self._head + 1]
            data = data[len(piece) :]
            self._feed(piece)

    def _feed(self, data: bytes) -> None:
        in_head = self._head is not None
        self._head_ended = False
        super().data_received(data)
        # Every byte of a piece that began and ended inside one head is a head byte. A
        # piece where the head ended is not counted (the rest is body), nor one where a new
        # head began after a request ended (pipelining): that head's first bytes go
        # uncounted, at most one read of them per request.
        if in_head and self._head is not None and not self._head_ended:
            self._head += len(data)
            if self._head > self.edge.max_header_bytes:
                self.counters.count(
                    "headers_too_large", f"request head over {self.edge.max_header_bytes} bytes"
                )
                self._refuse(headers_too_large(self.edge.max_header_bytes))

    # ---- parser callbacks ----------------------------------------------------------------

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_begun = True

    def on_headers_complete(self) -> None:
        self._head = None
        self._head_begun = False
        self._cancel_head_timer()
        limit = self.edge.max_connections
        # This connection is one of `connections`; this request is not yet one of `tasks`.
        over = len(self.connections) > limit or len(self.tasks) >= limit
        if over:
            self.counters.count("overloaded", f"over {limit} connections or requests: 503")
        self.app = _overloaded if over else self._app
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._head = 0  # what comes next is the next request's head
        self._head_ended = True

    def on_response_complete(self) -> None:
        super().on_response_complete()
        # uvicorn arms its keep-alive timer when the connection now waits for the client
        # (no pipelined request was ready): the next head (or the rest of a body the app
        # did not read) gets `header_timeout_s` however the client trickles it in.
        if self.timeout_keep_alive_task is not None:
            self._arm_head_timer()

    # ---- refusals ------------------------------------------------------------------------

    def _arm_head_timer(self) -> None:
        self._cancel_head_timer()
        self._head_timer = self.loop.call_later(self.edge.header_timeout_s, self._head_timed_out)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport.is_closing():
            return
        self.counters.count(
            "header_timeouts", f"request head not complete within {self.edge.header_timeout_s} s"
        )
        if self._head_begun:
            self._refuse(header_timeout(self.edge.header_timeout_s))
        else:
            self._refuse(None)

    def _refuse(self, err: FleetError | None) -> None:
        """Answer `err` (unless a response is under way, or there is none) and close.

        The close lingers: what the client still sends is read and dropped for up to
        `REFUSE_LINGER_S`, so that its kernel does not answer our close with a reset that
        discards the answer before the client has read it."""
        self._refused = True
        self._cancel_head_timer()
        transport = self.transport
        if transport.is_closing():
            return
        responding = self.cycle is not None and not self.cycle.response_complete
        if err is None or responding or not transport.can_write_eof():
            transport.close()
            return
        transport.write(raw_response(err))
        transport.write_eof()
        self.flow.resume_reading()  # keep draining, even if uvicorn had paused reading
        self.loop.call_later(REFUSE_LINGER_S, transport.close)
