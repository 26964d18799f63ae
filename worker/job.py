"""One request on a worker: read it, run the engine, stream the reply, report back.

`read_job` turns a delivered JetStream message into a `JobSpec` (pure). `run_job` owns its
reply sequence and broker-ack state (`JobHandle`), and keeps both alive itself while it
waits (`+WPI`, heartbeats); it never raises: every outcome becomes exactly one terminal
reply (`done` or `error`) and a `JobResult` for the runner.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import msgspec

from common import names
from common import protocol as p
from common.bodies import BodyReader
from common.bus import Publisher
from common.errors import (
    EngineError,
    FleetError,
    GatewayTimeout,
    InternalError,
    InvalidRequest,
    ServiceUnavailable,
)
from common.logs import bind
from common.openai_types import (
    CHAT_DECODER,
    COMPLETION_DECODER,
    EMBEDDING_DECODER,
    decode_error_message,
    prompt_texts,
)
from common.telemetry import UPSTREAM_TRACEPARENT
from worker.decide import Verdict, breaker_verdict, coalesce
from worker.engine import Engine, EngineEvent, Output
from worker.observe import JobObserver, WorkerMetrics

log = logging.getLogger(__name__)

_QUEUE_MAX = 256
_DRAIN_MAX = 64


class JobSpec(msgspec.Struct, frozen=True):
    """A readable request. `producer` comes from the subject (the broker vouches for it),
    `delivery` from the JetStream metadata; everything else from the producer's headers."""

    request_id: str
    op: str
    reply: str
    body: bytes
    producer: str = names.GATEWAY_PRODUCER
    delivery: str = ""
    queue_timeout_ms: int | None = None
    timeout_ms: int | None = None
    traceparent: str | None = None
    queued_ms: float | None = None
    body_ref: str | None = None


class JobResult(msgspec.Struct, frozen=True):
    key: str  # the runner's job key (the delivery)
    ok: bool
    tokens_out: int = 0
    tokens_in: int = 0
    status: int = 200  # the status its terminal message carried (audit)
    error: str = ""  # its error code
    ttft_s: float | None = None
    duration_s: float = 0.0
    # What the end says about the upstream, for the model's circuit breaker
    # (`worker.decide.breaker_verdict`), and the error's client-safe message.
    verdict: Verdict = Verdict.NONE
    detail: str = ""


class _Failed(msgspec.Struct):
    exc: Exception


class BadMessage(Exception):
    """A delivered message that is not a readable llmfleet request."""

    def __init__(self, reason: str, reply: str | None, request_id: str) -> None:
        super().__init__(reason)
        self.reason = reason
        self.reply = reply
        self.request_id = request_id


def _ms_header(headers: dict[str, str], name: str) -> int | None:
    """A non-negative duration in ms; anything else reads as absent."""
    v = headers.get(name)
    if v is None or not (v.isascii() and v.isdigit()) or len(v) > 15:
        return None
    return int(v)


MAX_REQUEST_ID = 256


def read_job(
    subject: str,
    headers: dict[str, str] | None,
    body: bytes,
    *,
    delivery: str,
    queued_ms: float | None,
) -> JobSpec:
    """Validate the request's subject and headers; raises BadMessage. The reply subject
    must lie in the reply space of the producer the subject names: a message that names
    any other (or an unusable one) is never answered at all (`BadMessage.reply` None)."""
    h = headers or {}
    rid = h.get(p.H_REQUEST_ID) or h.get(p.H_MSG_ID) or ""
    try:
        producer = names.parse_request_subject(subject)[1]
    except ValueError as exc:
        raise BadMessage(str(exc), None, rid) from None
    reply = h.get(p.H_REPLY) or None
    if reply is None:
        raise BadMessage(f"missing {p.H_REPLY} header", None, rid)
    try:
        names.check_reply(reply, producer)
    except ValueError as exc:
        raise BadMessage(f"{p.H_REPLY}: {exc}", None, rid) from None
    version = h.get(p.H_VERSION, p.PROTOCOL_VERSION)
    if version != p.PROTOCOL_VERSION:
        raise BadMessage(f"unsupported protocol version {version[:20]!r}", reply, rid)
    op = h.get(p.H_OP, "chat")
    if op not in p.OPS:
        raise BadMessage(f"unknown {p.H_OP} {op[:40]!r}; expected one of {p.OPS}", reply, rid)
    if not rid or len(rid) > MAX_REQUEST_ID:
        raise BadMessage(f"missing or too long {p.H_REQUEST_ID} header", reply, rid[:64])
    return JobSpec(
        request_id=rid,
        op=op,
        reply=reply,
        body=body,
        producer=producer,
        delivery=delivery,
        queue_timeout_ms=_ms_header(h, p.H_QUEUE_TIMEOUT),
        timeout_ms=_ms_header(h, p.H_TIMEOUT),
        traceparent=h.get(p.H_TRACEPARENT),
        queued_ms=queued_ms,
        body_ref=h.get(p.H_BODY_REF) or None,
    )


class ReplyWriter:
    """Numbers and publishes one request's reply stream.

    With `watch` set, every message carries it as its reply subject: if nobody listens on
    the reply stream any more (the gateway died), the broker answers no-responders there
    and the runner cancels the job.
    """

    def __init__(self, nc: Publisher, subject: str, watch: str = "", delivery: str = "") -> None:
        self._nc = nc
        self.subject = subject
        self.watch = watch
        self.delivery = delivery
        self.seq = 0
        self.last_sent = time.monotonic()
        self.first_output_at: float | None = None  # perf_counter at the first delta

    def next_seq(self) -> int:
        s = self.seq
        self.seq += 1
        return s

    async def send(self, msg: msgspec.Struct) -> None:
        self.last_sent = time.monotonic()
        await self._nc.publish(self.subject, p.encode(msg), reply=self.watch)

    async def heartbeat(self) -> None:
        await self.send(p.Heartbeat(last_seq=self.seq - 1, delivery=self.delivery))

    async def accepted(self, spec: JobSpec, worker: str, model: str, ack_subject: str) -> None:
        await self.send(
            p.Accepted(
                worker=worker,
                model=model,
                seq=self.next_seq(),
                request_id=spec.request_id,
                queued_ms=spec.queued_ms,
                # Only the gateways may -NAK (docs/security.md): others need not learn it.
                ack_subject=ack_subject if spec.producer == names.GATEWAY_PRODUCER else "",
                delivery=self.delivery,
            )
        )

    async def error(self, err: FleetError) -> None:
        await self.send(
            p.Error(
                seq=self.next_seq(),
                status=err.status,
                error=err.body(),
                retry_after=err.retry_after,
                delivery=self.delivery,
            )
        )


async def send_rejection(nc: Publisher, reply: str, err: FleetError, delivery: str = "") -> None:
    """Answer a request that will not run (expired, unreadable) with a lone `error`. Only
    ever called with a reply subject `read_job` checked."""
    await ReplyWriter(nc, reply, delivery=delivery).error(err)


def _decode_error(exc: msgspec.DecodeError) -> InvalidRequest:
    message, param = decode_error_message(exc)
    return InvalidRequest(message, param=param)


class _Batch:
    """What one drain of a job's event queue holds, sorted."""

    __slots__ = ("failure", "finished", "keep_alive_due", "outputs", "usage")

    def __init__(self, batch: list[EngineEvent | _Failed | _KeepAliveDue | None]) -> None:
        self.outputs: list[list[p.ChoiceDelta]] = []
        self.usage: p.Usage | None = None
        self.failure: BaseException | None = None
        self.finished = self.keep_alive_due = False
        for ev in batch:
            if ev is KEEP_ALIVE_DUE:
                self.keep_alive_due = True
            elif isinstance(ev, Output):
                self.outputs.append(ev.choices)
            elif isinstance(ev, p.Usage):
                self.usage = ev
            elif isinstance(ev, _Failed):
                self.finished, self.failure = True, ev.exc
            elif ev is None:
                self.finished = True


async def _pump(
    events: AsyncIterator[EngineEvent],
    out: ReplyWriter,
    on_first: Callable[[], Awaitable[None]],
    keep_alive: Callable[[], Awaitable[None]],
) -> p.Usage:
    """Stream engine output to `out`, coalescing whatever piled up since the last send."""
    queue: asyncio.Queue[EngineEvent | _Failed | _KeepAliveDue | None] = asyncio.Queue(_QUEUE_MAX)
    usage = p.Usage()
    failure: BaseException | None = None
    produced = 0

    async def produce() -> None:
        try:
            async for ev in events:
                await queue.put(ev)
        except Exception as exc:  # handed to the consumer, raised there as itself
            await queue.put(_Failed(exc))
            return
        await queue.put(None)

    first = True
    ticker = _Ticker(queue)
    try:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(produce())
            finished = False
            while not finished:
                batch = [await queue.get()]
                while len(batch) < _DRAIN_MAX and not queue.empty():
                    batch.append(queue.get_nowait())
                got = _Batch(batch)
                usage = got.usage or usage
                failure = failure or got.failure
                finished, outputs = got.finished, got.outputs
                produced += len(outputs)
                for choices in coalesce(outputs):
                    if first:
                        first = False
                        out.first_output_at = time.perf_counter()
                        await on_first()
                    await out.send(
                        p.Delta(
                            seq=out.next_seq(),
                            choices=choices,
                            tokens=produced,
                            delivery=out.delivery,
                        )
                    )
                if got.keep_alive_due:
                    await keep_alive()
    finally:
        ticker.stop()
    if failure is not None:
        raise failure
    if first:
        await on_first()
    return usage


T = TypeVar("T")

KEEP_ALIVE_S = 0.5
"""While a job waits (for the engine, a body by reference), it checks this often whether
the broker needs a `+WPI` or the stream a `heartbeat`."""


class JobHandle:
    """One job's reply writer and broker-ack state, owned by the job's task alone.

    While the job waits it calls `keep_alive` itself (every `KEEP_ALIVE_S`): until the first
    output the broker hears `+WPI` (so a live worker keeps the message), and a stream silent
    for `heartbeat_s` gets a `heartbeat`. The runner only reads `writer.watch`.
    """

    def __init__(
        self,
        nc: Publisher,
        spec: JobSpec,
        ack_subject: str,
        watch: str,
        bodies: BodyReader | None = None,
        heartbeat_s: float = 1.0,
        deadline_at: float | None = None,
    ) -> None:
        self._nc = nc
        self.spec = spec
        self.bodies = bodies
        self.ack_subject = ack_subject
        self.deadline_at = deadline_at  # loop time: the request's timeout, on this clock
        self.writer = ReplyWriter(nc, spec.reply, watch, spec.delivery)
        self.acked = False
        self.heartbeat_s = heartbeat_s
        self.engine_started = False  # the engine was called (its failures are its own)

    async def ack(self) -> None:
        if not self.acked:
            self.acked = True
            await self._nc.publish(self.ack_subject, b"+ACK")

    async def keep_alive(self) -> None:
        if not self.acked:
            await self._nc.publish(self.ack_subject, b"+WPI")
        # Never before `accepted` (seq 0): a stream must start with it.
        quiet = time.monotonic() - self.writer.last_sent
        if self.writer.seq > 0 and quiet >= self.heartbeat_s:
            await self.writer.heartbeat()

    async def alive_while(self, work: Awaitable[T]) -> T:
        """Await `work` (run as a child task, owned here), keeping the job alive meanwhile.
        Its exception is raised as itself (a 400 stays a 400), not wrapped in a group."""
        task = asyncio.ensure_future(work)
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=KEEP_ALIVE_S)
                if done:
                    return task.result()
                await self.keep_alive()
        finally:
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task


class _KeepAliveDue:
    """Put in a job's own event queue every `KEEP_ALIVE_S` by a loop timer (which touches
    nothing else): the job's task then sends what is due. Costs nothing per token."""


KEEP_ALIVE_DUE = _KeepAliveDue()


class _Ticker:
    def __init__(self, queue: asyncio.Queue[Any]) -> None:
        self._queue = queue
        self._loop = asyncio.get_running_loop()
        self._handle = self._loop.call_later(KEEP_ALIVE_S, self._tick)

    def _tick(self) -> None:
        with contextlib.suppress(asyncio.QueueFull):  # full: the job is busy sending anyway
            self._queue.put_nowait(KEEP_ALIVE_DUE)
        self._handle = self._loop.call_later(KEEP_ALIVE_S, self._tick)

    def stop(self) -> None:
        self._handle.cancel()


async def run_job(
    handle: JobHandle,
    *,
    engine: Engine,
    worker: str,
    model: str,
    metrics: WorkerMetrics | None = None,
) -> JobResult:
    """Run one accepted request to its terminal reply. Never raises (except cancellation).

    The broker message is acked just before the first output or terminal message, so a
    worker that dies before its first token leaves the request to be redelivered.
    With `metrics`, the job is traced and timed (`JobObserver`).
    """
    spec, out = handle.spec, handle.writer
    bind(request_id=spec.request_id, model=model, worker=worker)
    obs = None if metrics is None else _observer(metrics, spec, engine, worker, model)
    usage: p.Usage | None = None
    outcome, error = "failed", "internal_error"
    status = 500
    failure: FleetError = InternalError("The worker failed while generating.")
    t0 = time.perf_counter()
    await out.accepted(spec, worker, model, handle.ack_subject)
    try:
        usage = await _generate(handle, engine, obs)
        await out.send(p.Done(seq=out.next_seq(), usage=usage, delivery=out.delivery))
        outcome, error = "completed", ""
        return JobResult(
            spec.delivery,
            ok=True,
            tokens_out=usage.completion_tokens,
            tokens_in=usage.prompt_tokens,
            ttft_s=_since(t0, out.first_output_at),
            duration_s=time.perf_counter() - t0,
            # A count may be an estimate made without the upstream: no word about it.
            verdict=Verdict.NONE if spec.op == "count_tokens" else Verdict.SUCCESS,
        )
    except asyncio.CancelledError:
        log.debug("request %s cancelled", spec.request_id)
        outcome, error = "cancelled", "cancelled"
        # Cancelled (client gone, drain grace over): still end the stream properly.
        err = ServiceUnavailable("The request was cancelled on the worker.", code="cancelled")
        await asyncio.shield(_end_with(handle, err))
        raise
    except FleetError as exc:
        error, status, failure = exc.code or exc.type, exc.status, exc
        await _end_with(handle, exc)
    except TimeoutError:
        error, status = "deadline_exceeded", 504
        failure = GatewayTimeout("The request's deadline passed during generation.")
        await _end_with(handle, failure)
    except Exception:
        log.exception("request %s failed in the engine", spec.request_id)
        await _end_with(handle, failure)
    finally:
        if obs is not None:
            obs.finish(outcome, out.first_output_at, usage, error or None)
    verdict = breaker_verdict(
        ok=False,
        status=status,
        code=error,
        engine_ran=handle.engine_started,
        upstream_answered=isinstance(failure, EngineError),
    )
    return JobResult(
        spec.delivery,
        ok=False,
        status=status,
        error=error,
        ttft_s=_since(t0, out.first_output_at),
        duration_s=time.perf_counter() - t0,
        verdict=verdict,
        # A fixed text per kind of failure: announcements are read fleet-wide, and an
        # upstream's message may carry one producer's request into another's view.
        detail=f"{status} {error}",
    )


def _since(t0: float, t: float | None) -> float | None:
    return None if t is None else t - t0


def _observer(
    metrics: WorkerMetrics, spec: JobSpec, engine: Engine, worker: str, model: str
) -> JobObserver:
    return metrics.job(
        request_id=spec.request_id,
        op=spec.op,
        model=model,
        worker=worker,
        engine=engine,
        traceparent=spec.traceparent,
        queued_ms=spec.queued_ms,
    )


async def _generate(handle: JobHandle, engine: Engine, obs: JobObserver | None) -> p.Usage:
    """The engine's answer streamed to the reply subject, within the request's deadline."""
    spec = handle.spec
    async with asyncio.timeout_at(handle.deadline_at):
        if spec.body_ref is not None:
            spec = await handle.alive_while(_load_body(handle))
        upstream_tp = spec.traceparent
        if obs is not None:
            obs.engine_started()
            upstream_tp = obs.upstream_traceparent() or upstream_tp
        UPSTREAM_TRACEPARENT.set(upstream_tp)  # this job's task only
        handle.engine_started = True
        return await _execute(spec, engine, handle)


async def _end_with(handle: JobHandle, err: FleetError) -> None:
    """The terminal `error` (acked first: the request has its answer)."""
    await handle.ack()
    await handle.writer.error(err)


async def _load_body(handle: JobHandle) -> JobSpec:
    """Fetch a body passed by reference from the producer's own bucket (the producer
    deletes it once answered; the bucket's TTL otherwise)."""
    ref = handle.spec.body_ref
    assert ref is not None
    if handle.bodies is None:
        raise InternalError("This worker cannot read bodies passed by reference.")
    body = await handle.bodies.get(handle.spec.producer, ref)  # bounded in time there
    return msgspec.structs.replace(handle.spec, body=body)


async def _execute(spec: JobSpec, engine: Engine, handle: JobHandle) -> p.Usage:
    out, first, alive = handle.writer, handle.ack, handle.keep_alive
    try:
        match spec.op:
            case "chat":
                chat = CHAT_DECODER.decode(spec.body)
                return await _pump(engine.chat(chat, spec.body), out, first, alive)
            case "completion":
                comp = COMPLETION_DECODER.decode(spec.body)
                try:
                    prompt_texts(comp.prompt)
                except ValueError as exc:
                    raise InvalidRequest(f"'prompt' {exc}", param="prompt") from exc
                return await _pump(engine.complete(comp, spec.body), out, first, alive)
            case "count_tokens":
                chat = CHAT_DECODER.decode(spec.body)
                tokens = await handle.alive_while(engine.count_tokens(chat, spec.body))
                await first()
                return p.Usage(prompt_tokens=tokens, total_tokens=tokens)
            case _:
                emb = EMBEDDING_DECODER.decode(spec.body)
                try:
                    prompt_texts(emb.input)
                except ValueError as exc:
                    raise InvalidRequest(f"'input' {exc}", param="input") from exc
                result = await handle.alive_while(engine.embed(emb, spec.body))
                await first()
                for i, vec in enumerate(result.embeddings):
                    await out.send(
                        p.Embedding(
                            seq=out.next_seq(), index=i, embedding=vec, delivery=out.delivery
                        )
                    )
                return result.usage
    except msgspec.DecodeError as exc:
        raise _decode_error(exc) from exc
    except UnicodeDecodeError as exc:
        raise InvalidRequest("Request body is not valid UTF-8.") from exc
    except RecursionError as exc:  # a producer's hostile nesting depth
        raise InvalidRequest("Request body is nested too deeply.") from exc
