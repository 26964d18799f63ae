"""Publishing a request to the fleet and reading its reply stream.

`Dispatcher.submit` publishes the OpenAI body to `llmfleet.req.<model>.gateway` on
JetStream (the PubAck proves it is queued; a full per-model queue answers 429 at once, a
broker out of room 503) with a reply subject from the mux. `Submission` then yields the
typed reply messages, enforcing the protocol: sequence numbers without gaps, a bounded wait
for `accepted` (the queue timeout, or the client's own shorter timeout, then 503/504 and
the message is deleted from the queue), liveness checks while a stream is silent
(heartbeats, ping, the stall timeout), and exactly one terminal message.

Deliveries are fenced: every reply message names its delivery, the stream follows one
delivery at a time, and a delivery the gateway gave up on (its worker stopped answering,
or another delivery replaced it) is told to cancel and its messages are ignored, so a
worker that comes back never mixes its output into the replacement's.

This is the gateway's seam for nats errors: they leave here as `FleetError`s.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Protocol

import msgspec
import nats.errors
import nats.js.errors
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import SpanKind, Status, StatusCode

from common import names
from common import protocol as p
from common.bodies import BodyStore
from common.bus import Bus, JetStream
from common.errors import (
    FleetError,
    GatewayTimeout,
    PayloadTooLarge,
    RateLimited,
    ServiceUnavailable,
    UpstreamError,
)
from common.natsconn import NATS_ERRORS, header_bytes
from common.telemetry import Telemetry, gen_ai_operation
from gateway.mux import ReplyMux, ReplyQueue
from gateway.settings import DispatchSettings
from gateway.stats import GatewayCounters
from gateway.validate import Parsed

log = logging.getLogger(__name__)


class Courier(Protocol):
    """What a `Submission` needs from the dispatcher that made it, and nothing more."""

    settings: DispatchSettings
    counters: GatewayCounters

    async def probe(self, worker: str | None) -> bool | None: ...

    async def withdraw(self, sub: Submission) -> None: ...

    async def hand_back(self, ack_subject: str) -> None: ...

    async def send_cancel(self, worker: str, request_id: str, delivery: str = "") -> None: ...

    def close_stream(self, rq: ReplyQueue) -> None: ...

    async def forget_body(self, ref: str) -> None: ...


class Submission:
    """One request's reply stream. Iterate with `first()` then `next()` until terminal."""

    def __init__(self, dispatcher: Courier, rq: ReplyQueue, request_id: str, seq: int) -> None:
        self._d = dispatcher
        self._rq = rq
        self.request_id = request_id
        self.stream_seq = seq
        self.queue_wait_s = dispatcher.settings.queue_timeout_s
        self.redelivery_wait_s = dispatcher.settings.redelivery_wait_s
        self.withdrawn = False  # taken back out of the queue already (its wait ran out)
        self.traceparent: str | None = None  # passed on to continuations
        self.timeout_s: float | None = None
        self.client_bound = False  # the client's timeout, not the queue timeout, limits it
        self.worker: str | None = None
        self.model = ""  # the model as the accepting worker names it
        self.ack_subject = ""
        self.delivery = ""  # the delivery the stream follows
        self._fenced: set[str] = set()  # deliveries given up on: their messages are ignored
        self.body_ref: str | None = None  # the body passed by reference, deleted at close
        self.queued_ms: float | None = None
        self.accepted_at: float | None = None  # perf_counter at the first `accepted`
        self.queue_span: trace.Span | None = None  # "queue wait": publish -> accepted
        self._expect = 0
        self.terminal = False
        self.started = False  # any content received

    async def _get(self, timeout: float, what: str) -> p.Reply:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            try:
                async with asyncio.timeout_at(deadline):
                    data = await self._rq.get()
            except TimeoutError:
                raise _Timeout(what) from None
            if self._rq.overflowed:
                raise UpstreamError(
                    "The reply stream overflowed the gateway's buffer.", code="stream_overflow"
                )
            try:
                msg = p.decode_reply(data)
            except msgspec.DecodeError as exc:
                if p.is_unknown_type(data):
                    continue  # a message type from a newer protocol revision: skip it
                raise UpstreamError("A worker sent an unreadable reply message.") from exc
            if msg.delivery in self._fenced:
                self._d.counters.fenced += 1
                continue
            return msg

    async def _fence(self, worker: str | None, delivery: str) -> None:
        """Give up on `delivery`: ignore its messages from now on and tell its worker to
        stop (it may come back from a network blip and go on generating)."""
        if delivery in self._fenced:
            return
        self._fenced.add(delivery)
        if worker is not None:
            await self._d.send_cancel(worker, self.request_id, delivery)

    async def _get_opening(self, timeout: float, what: str) -> p.Reply:
        """The first message of a (re)started stream, skipping stray heartbeats."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            msg = await self._get(deadline - asyncio.get_running_loop().time(), what)
            if not isinstance(msg, p.Heartbeat):
                return msg

    async def first(self) -> p.Accepted:
        """Wait (up to the queue timeout) for a worker to accept; raises on error/timeout."""
        try:
            msg = await self._get_opening(self.queue_wait_s, "queue")
        except _Timeout:
            await self._d.withdraw(self)
            self.withdrawn = True
            try:  # a worker may have taken it while we withdrew: then serve it after all
                late: p.Reply | None = await self._get_opening(0.0, "queue")
            except _Timeout:
                late = None
            if isinstance(late, p.Accepted):
                return self._on_first(late)
            self._d.counters.queue_timeouts += 1
            self._end_queue_span("queue_timeout")
            await self.close()  # from here on, a late `accepted` is cancelled at once
            if self.client_bound:
                raise GatewayTimeout(
                    "The request's timeout passed while it waited for a worker."
                ) from None
            retry = self._d.settings.retry_after_s
            raise ServiceUnavailable(
                "No worker had capacity for this model within the queue timeout.",
                code="queue_timeout",
                retry_after=retry,
            ) from None
        return self._on_first(msg)

    def _on_first(self, msg: p.Reply) -> p.Accepted:
        if isinstance(msg, p.Error):
            self.terminal = True
            self._end_queue_span(msg.error.code or msg.error.type)
            raise FleetError.from_body(msg.status, msg.error, msg.retry_after)
        if not isinstance(msg, p.Accepted):
            self._end_queue_span("protocol_error")
            raise UpstreamError("A worker's reply stream did not start with 'accepted'.")
        self.worker = msg.worker
        self.model = msg.model
        self.ack_subject = msg.ack_subject
        self.delivery = msg.delivery
        self.queued_ms = msg.queued_ms
        self._expect = msg.seq + 1
        if self.accepted_at is None:
            self.accepted_at = time.perf_counter()
            if self.queue_span is not None:
                self.queue_span.set_attribute("llmfleet.worker", msg.worker)
                if msg.queued_ms is not None:
                    self.queue_span.set_attribute("llmfleet.queued_ms", msg.queued_ms)
                self._end_queue_span(None)
        return msg

    def _end_queue_span(self, error: str | None) -> None:
        span, self.queue_span = self.queue_span, None
        if span is None:
            return
        if error is not None:
            span.set_attribute("error.type", error)
            span.set_status(Status(StatusCode.ERROR, error))
        span.end()

    async def next(self) -> p.Delta | p.Embedding | p.Done:
        """The next content or `done` message; raises FleetError for `error` and faults.

        Workers send a `heartbeat` when a stream is silent, so silence means trouble: after
        `probe_after_s` the worker is pinged (a dead one answers no-responders at once),
        and after `stall_timeout_s` it is given up on either way. A worker lost before any
        content is not an error: the broker redelivers the un-acked request to another
        worker, whose `accepted` the stream then continues with.
        """
        s = self._d.settings
        loop = asyncio.get_running_loop()
        silent_since = loop.time()
        while True:
            try:
                msg = await self._get(s.probe_after_s, "idle")
            except _Timeout:
                alive = await self._d.probe(self.worker)
                if alive is False or loop.time() - silent_since >= s.stall_timeout_s:
                    await self._worker_lost()
                    silent_since = loop.time()
                continue
            silent_since = loop.time()
            if msg.delivery != self.delivery and not await self._other_delivery(msg):
                continue
            if isinstance(msg, p.Heartbeat):
                if msg.last_seq != self._expect - 1:
                    raise UpstreamError(
                        f"Reply stream gap: {msg.last_seq + 1} messages sent, "
                        f"{self._expect} received.",
                        code="stream_gap",
                    )
                continue
            if isinstance(msg, p.Accepted):
                continue  # the same delivery announced twice
            if isinstance(msg, p.Error) and msg.seq == 0 and not self.started:
                self.terminal = True  # a redelivery refused outright (its queue timeout passed)
                raise FleetError.from_body(msg.status, msg.error, msg.retry_after)
            if msg.seq != self._expect:
                raise UpstreamError(
                    f"Reply stream gap: expected message {self._expect}, got {msg.seq}.",
                    code="stream_gap",
                )
            self._expect += 1
            if isinstance(msg, p.Error):
                self.terminal = True
                raise FleetError.from_body(msg.status, msg.error, msg.retry_after)
            if isinstance(msg, p.Done):
                self.terminal = True
            else:
                self.started = True
            return msg

    async def _other_delivery(self, msg: p.Reply) -> bool:
        """A message of a delivery the stream does not follow: True if the stream should
        take it (a redelivery's first message before any content); else it is ignored."""
        if isinstance(msg, p.Accepted):
            if self.started:  # a second run of a request already answering: stop it
                await self._fence(msg.worker, msg.delivery)
                self._d.counters.fenced += 1
                return False
            await self._fence(self.worker, self.delivery)  # redelivered before any output
            self._on_first(msg)
            return False
        if isinstance(msg, p.Error) and msg.seq == 0 and not self.started:
            return True  # a redelivery refused outright (e.g. its queue timeout passed)
        self._d.counters.fenced += 1
        return False

    async def _worker_lost(self) -> None:
        log.warning("request %s: worker %s stopped responding", self.request_id, self.worker)
        self._d.counters.workers_lost += 1
        if self.started:
            raise UpstreamError(
                "The worker serving this request stopped responding mid-stream.",
                code="worker_lost",
            )
        await self._fence(self.worker, self.delivery)
        self.worker = None
        if self.ack_subject:
            await self._d.hand_back(self.ack_subject)
        try:
            msg = await self._get_opening(self.redelivery_wait_s, "redelivery")
        except _Timeout:
            raise ServiceUnavailable(
                "The worker that took this request died and no other worker took it over.",
                code="worker_lost",
                retry_after=self._d.settings.retry_after_s,
            ) from None
        self._on_first(msg)
        self._d.counters.redelivered += 1

    def has_pending(self) -> bool:
        """Reply messages are already waiting (the client can take several at once)."""
        return not self._rq.empty()

    async def close(self) -> None:
        """Stop listening. A worker whose `accepted` was never read (it arrived while the
        request was being given up) is told to cancel: nobody will read its stream. Later
        messages go to the mux's orphan handling, which does the same."""
        self._d.close_stream(self._rq)
        self._end_queue_span("cancelled")  # still open: nobody accepted it
        if self.body_ref is not None:
            ref, self.body_ref = self.body_ref, None
            await self._d.forget_body(ref)
        if self.terminal:
            return
        while not self._rq.empty():
            data = self._rq.get_nowait()
            if b'"accepted"' not in data:
                continue
            try:
                msg = p.decode_reply(data)
            except msgspec.DecodeError:
                continue
            if isinstance(msg, p.Accepted) and msg.delivery != self.delivery:
                await self._d.send_cancel(msg.worker, self.request_id, msg.delivery)


_ACK_PREFIX = f"$JS.ACK.{names.REQUEST_STREAM}."


def queue_refusal(err_code: int | None, description: str | None) -> str | None:
    """Why JetStream refused a publish (pure): "queue_full" when the subject's (the model's,
    for this producer) bound is reached, "queue_storage_full" when the stream or the broker
    has no room left, None for anything else (transient). Both limits answer err_code
    10077; only the description tells them apart."""
    text = (description or "").lower()
    if "per subject" in text:
        return "queue_full"
    if err_code in (10077, 10047, 10023) or "maximum" in text or "insufficient" in text:
        return "queue_storage_full"
    return None


class _Timeout(Exception):
    pass


class _Transient(Exception):
    """The broker cannot take the message right now (reconnecting, electing a leader)."""


class Dispatcher:
    def __init__(
        self,
        nc: Bus,
        js: JetStream,
        mux: ReplyMux,
        settings: DispatchSettings,
        counters: GatewayCounters,
        bodies: BodyStore | None = None,
        telemetry: Telemetry | None = None,
        max_message_bytes: int | None = None,
    ) -> None:
        self.tel = telemetry or Telemetry.off()
        # The request stream's max message size: a larger request goes by reference.
        self.max_message_bytes = max_message_bytes
        self.counters = counters
        self.nc = nc
        self.js = js
        self.bodies = bodies
        self.mux = mux
        self.settings = settings
        self.producer = names.GATEWAY_PRODUCER  # the NATS user every gateway logs in as

    def _headers(
        self,
        parsed: Parsed,
        request_id: str,
        reply: str,
        traceparent: str | None,
        timeout_s: float | None,
        hop_timeout_s: float | None = None,
    ) -> dict[str, str]:
        total = min(timeout_s or self.settings.request_timeout_s, self.settings.request_timeout_s)
        wait = min(self.settings.queue_timeout_s, total, hop_timeout_s or total)
        h = {
            p.H_VERSION: p.PROTOCOL_VERSION,
            p.H_OP: parsed.op,
            p.H_REQUEST_ID: request_id,
            p.H_MSG_ID: request_id,
            p.H_REPLY: reply,
            p.H_QUEUE_TIMEOUT: str(int(wait * 1000)),
            p.H_TIMEOUT: str(int(total * 1000)),
        }
        if traceparent:
            h[p.H_TRACEPARENT] = traceparent
        return h

    async def submit(
        self,
        parsed: Parsed,
        request_id: str,
        traceparent: str | None = None,
        timeout_s: float | None = None,
        trace_context: Context | None = None,
        hop_timeout_s: float | None = None,
    ) -> Submission:
        """Publish the request. With `trace_context` (tracing on) a `queue wait` span starts
        under it, and its traceparent (not the incoming `traceparent`) goes to the worker.
        `hop_timeout_s` (one hop of an alias chain) bounds the wait for a worker further,
        on the worker's side too: a worker that gets it later drops it."""
        rq = self.mux.open()
        span: trace.Span | None = None
        body_ref: str | None = None
        subject = names.request_subject(parsed.model, self.producer)
        if trace_context is not None:
            span = self.tel.tracer.start_span(
                "queue wait",
                context=trace_context,
                kind=SpanKind.PRODUCER,
                attributes={
                    "messaging.system": "nats",
                    "messaging.operation.type": "send",
                    "messaging.destination.name": subject,
                    "gen_ai.operation.name": gen_ai_operation(parsed.op),
                    "gen_ai.request.model": parsed.model,
                    "llmfleet.request_id": request_id,
                },
            )
            traceparent = self.tel.traceparent(span)
        try:
            headers = self._headers(
                parsed, request_id, rq.subject, traceparent, timeout_s, hop_timeout_s
            )
            payload = parsed.body
            size = len(payload) + header_bytes(headers)
            limit = min(self.nc.max_payload, self.max_message_bytes or self.nc.max_payload)
            if size > limit:
                if self.bodies is None:
                    raise PayloadTooLarge(
                        f"Request of {size} bytes exceeds the fleet's message limit of "
                        f"{limit} bytes.",
                    )
                # Too big for one message: pass the body by reference (object store).
                body_ref = await self.bodies.put(request_id, payload, self.nc.max_payload)
                headers[p.H_BODY_REF] = body_ref
                payload = b""
                self.counters.by_reference += 1
            seq = await self._publish(subject, payload, headers)
        except BaseException as exc:
            self.mux.close(rq)
            if body_ref is not None:
                await self.forget_body(body_ref)
            if span is not None:
                err = exc.code if isinstance(exc, FleetError) and exc.code else type(exc).__name__
                span.set_attribute("error.type", err)
                span.set_status(Status(StatusCode.ERROR, err))
                span.end()
            raise
        self.counters.published += 1
        sub = Submission(self, rq, request_id, seq)
        sub.traceparent, sub.timeout_s = traceparent, timeout_s
        sub.queue_span = span
        sub.body_ref = body_ref
        if timeout_s is not None and timeout_s < self.settings.queue_timeout_s:
            sub.queue_wait_s, sub.client_bound = timeout_s, True
        if hop_timeout_s is not None:  # one hop of a chain: no wait of it outlasts the hop
            if hop_timeout_s < sub.queue_wait_s:
                sub.queue_wait_s, sub.client_bound = hop_timeout_s, False
            sub.redelivery_wait_s = min(sub.redelivery_wait_s, hop_timeout_s)
        return sub

    async def _publish(self, subject: str, body: bytes, headers: dict[str, str]) -> int:
        """Publish until the broker stores it, riding out reconnects and leader elections
        (up to `publish_retry_s`); retries are safe: `Nats-Msg-Id` deduplicates them."""
        loop = asyncio.get_running_loop()
        s = self.settings
        deadline = loop.time() + min(s.queue_timeout_s, s.publish_retry_s)
        delay = 0.05
        retry = False
        while True:
            try:
                return await self._publish_once(subject, body, headers, retry=retry)
            except _Transient as exc:
                if loop.time() + delay > deadline:
                    raise ServiceUnavailable(
                        "The request queue is unavailable.", retry_after=s.retry_after_s
                    ) from exc.__cause__
                self.counters.publish_retries += 1
                retry = True  # a duplicate from now on may be our own first try
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.5)

    async def _publish_once(
        self, subject: str, body: bytes, headers: dict[str, str], *, retry: bool = False
    ) -> int:
        if not self.nc.is_connected:
            raise _Transient
        try:
            ack = await self.js.publish(
                subject, body, timeout=self.settings.publish_timeout_s, headers=headers
            )
        except nats.js.errors.APIError as exc:
            match queue_refusal(exc.err_code, exc.description):
                case "queue_full":
                    self.counters.rejected_full += 1
                    raise RateLimited(
                        "This model's queue is full; retry later.",
                        retry_after=self.settings.retry_after_s,
                    ) from exc
                case "queue_storage_full":
                    self.counters.rejected_storage += 1
                    raise ServiceUnavailable(
                        "The broker has no room left for queued requests; retry later.",
                        code="queue_storage_full",
                        retry_after=self.settings.retry_after_s,
                    ) from exc
            raise _Transient from exc
        except NATS_ERRORS as exc:
            raise _Transient from exc
        if ack.duplicate and not retry:
            # Another publish with this Nats-Msg-Id is in the duplicate window (the window
            # is the stream's, shared by every producer): never follow someone else's.
            raise ServiceUnavailable(
                "The request id collided with another request; retry.",
                retry_after=self.settings.retry_after_s,
            )
        return int(ack.seq)

    async def probe(self, worker: str | None) -> bool | None:
        """Is `worker` alive? True (pong), False (no responders: gone), None (no answer)."""
        if worker is None or not self.nc.is_connected:
            return None
        try:
            await self.nc.request(names.control_subject(worker), p.encode(p.Ping()), timeout=0.5)
        except nats.errors.NoRespondersError:
            return False
        except (nats.errors.Error, TimeoutError):
            return None
        return True

    async def withdraw(self, sub: Submission) -> None:
        """Take a not-yet-accepted request back out of the queue (best effort)."""
        try:
            await self.js.delete_msg(names.REQUEST_STREAM, sub.stream_seq)
        except NATS_ERRORS:
            pass  # already delivered (its queue timeout makes the worker drop it) or gone

    async def cancel(self, sub: Submission) -> None:
        """The client left: stop the worker (if one accepted) or withdraw from the queue."""
        if sub.terminal:
            return
        if sub.worker is None:
            if sub.withdrawn:
                return  # its queue timeout took it out already
            self.counters.withdrawn += 1
            await self.withdraw(sub)
            return
        await self.send_cancel(sub.worker, sub.request_id, sub.delivery)

    async def hand_back(self, ack_subject: str) -> None:
        """Give an un-acked delivery back to the broker at once (`-NAK`) instead of
        waiting out its ack_wait: its worker is gone."""
        if self.nc.is_connected and ack_subject.startswith(_ACK_PREFIX):
            await self.nc.publish(ack_subject, b"-NAK")

    def close_stream(self, rq: ReplyQueue) -> None:
        self.mux.close(rq)

    async def send_cancel(self, worker: str, request_id: str, delivery: str = "") -> None:
        """Tell `worker` to stop this gateway's `request_id` (only `delivery`, if given)."""
        self.counters.cancels_sent += 1
        if self.nc.is_connected and names.WORKER_ID.match(worker):
            await self.nc.publish(
                names.cancel_subject(worker, self.producer),
                p.encode(p.Cancel(request_id=request_id, delivery=delivery)),
            )

    async def forget_body(self, ref: str) -> None:
        """Delete a body passed by reference: its request is answered or given up."""
        if self.bodies is not None:
            await self.bodies.delete(ref)
