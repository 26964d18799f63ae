"""`ModelRunner`: the one task that owns a model's slots on this worker.

It speaks JetStream's pull protocol itself so that credits are exact: every pull request
asks for one message (batch 1) on its own reply subject, and ends with exactly one event,
a delivery or a status (408 expired, 409 ...). Deliveries carry the stream subject, not
the pull's, so a delivery closes the oldest open pull and a status closes its own (or,
if that one was already closed by a delivery, the oldest); either way one event closes
one pull and the count of open pulls is exact. Running jobs plus open pulls never exceed
`max_concurrency`: every request beyond that waits in the broker, where any worker with
a free slot takes the next one (fleet-wide FIFO per model).

Events (bounded inbox): Delivered, PullEnded, JobFinished, CancelJob, ListenerGone, Tick,
Drain, Reconnected. Effects go through the bus (`common.bus.Bus`): `publish` only (pull
requests, acks, naks, replies), so the accounting is unit-tested on the in-memory bus.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections import OrderedDict
from typing import Any

import msgspec

from common import names
from common import protocol as p
from common.bodies import BodyStore
from common.bus import Bus
from common.errors import GatewayTimeout, InvalidRequest, UpstreamError
from common.natsconn import flush
from worker.decide import Admission, RunnerState, admit, parse_ack_subject, pull_batch
from worker.engine import Engine
from worker.job import (
    BadMessage,
    JobHandle,
    JobResult,
    JobSpec,
    read_job,
    run_job,
    send_rejection,
)
from worker.observe import WorkerMetrics
from worker.settings import RunnerSettings

log = logging.getLogger(__name__)

_TICK_S = 0.5


class Delivered(msgspec.Struct):
    msg: Any


class PullEnded(msgspec.Struct):
    pull_id: int
    status: str


class JobFinished(msgspec.Struct):
    result: JobResult


class CancelJob(msgspec.Struct):
    request_id: str


class Tick(msgspec.Struct):
    pass


class Reconnected(msgspec.Struct):
    """The NATS connection was re-established: pull requests from before are gone."""


class ListenerGone(msgspec.Struct):
    """No-responders for a job's reply stream: nobody reads it any more."""

    token: str


class Drain(msgspec.Struct):
    grace_s: float


Event = Delivered | PullEnded | JobFinished | CancelJob | Tick | Drain | Reconnected | ListenerGone


class RunnerStats(msgspec.Struct, frozen=True):
    model: str
    state: str
    max_concurrency: int
    in_flight: int
    credits: int
    completed: int
    failed: int
    tokens_out: int
    peak_in_flight: int
    expired: int
    naks: int
    cancelled: int
    listener_gone: int
    tokens_in: int = 0
    drain_cancelled: int = 0


class ModelRunner:
    def __init__(
        self,
        *,
        model_id: str,
        engine: Engine,
        max_concurrency: int,
        nc: Bus,
        worker_id: str,
        settings: RunnerSettings | None = None,
        bodies: BodyStore | None = None,
        metrics: WorkerMetrics | None = None,
    ) -> None:
        self._bodies = bodies
        self._metrics = metrics
        self.model_id = model_id
        self.engine = engine
        self.max_concurrency = max_concurrency
        self.worker_id = worker_id
        self.settings = settings or RunnerSettings()
        self._nc = nc
        self._inbox: asyncio.Queue[Event] = asyncio.Queue(maxsize=4 * max_concurrency + 256)
        self._pull_prefix = f"{names.INBOX_ROOT}.w.{worker_id}.{names.escape_model(model_id)}"
        self._next_api = (
            f"$JS.API.CONSUMER.MSG.NEXT.{names.REQUEST_STREAM}.{names.consumer_name(model_id)}"
        )
        self._pull_ids = itertools.count(1)
        self._pulls: OrderedDict[int, float] = OrderedDict()  # pull id -> expires at
        self._jobs: dict[str, tuple[asyncio.Task[JobResult], JobHandle]] = {}
        self._watch: dict[str, str] = {}  # no-responders token -> request id
        self._tokens = itertools.count(1)
        self._state = RunnerState.STARTING
        self._tg: asyncio.TaskGroup | None = None
        self._pull_backoff_until = 0.0
        self._drain_deadline: float | None = None
        self._completed = 0
        self._failed = 0
        self._tokens_out = 0
        self._tokens_in = 0
        self._drain_cancelled = 0
        self._peak = 0
        self._expired = 0
        self._naks = 0
        self._cancelled = 0
        self._listener_gone = 0

    # ---- called from other tasks: only enqueue ---------------------------------------------

    def post(self, ev: Event) -> None:
        try:
            self._inbox.put_nowait(ev)
        except asyncio.QueueFull:
            # Bounded by credits, so overflow means a bug (or a flood of cancels). A dropped
            # delivery is not lost (never acked: the broker redelivers it after ack_wait),
            # but a dropped JobFinished would leak its slot: issue 12 makes those undroppable.
            log.error("runner %s inbox full; dropped %s", self.model_id, type(ev).__name__)

    def stats(self) -> RunnerStats:
        credits = len(self._pulls)
        return RunnerStats(
            model=self.model_id,
            state=self._state.value,
            max_concurrency=self.max_concurrency,
            in_flight=len(self._jobs),
            credits=credits,
            completed=self._completed,
            failed=self._failed,
            tokens_out=self._tokens_out,
            peak_in_flight=self._peak,
            expired=self._expired,
            naks=self._naks,
            cancelled=self._cancelled,
            listener_gone=self._listener_gone,
            tokens_in=self._tokens_in,
            drain_cancelled=self._drain_cancelled,
        )

    async def _on_msg(self, msg: Any) -> None:
        status = (msg.headers or {}).get("Status")
        if status and not msg.data:
            tail = msg.subject.rsplit(".", 1)[-1]
            if tail.startswith("nr"):
                if status == "503":
                    self.post(ListenerGone(tail))
            elif status != "100":  # 100 = idle heartbeat, not the end of a pull
                try:
                    self.post(PullEnded(int(tail), status))
                except ValueError:
                    return
            return
        self.post(Delivered(msg))

    # ---- the owner ---------------------------------------------------------------------

    async def run(self, ready: asyncio.Future[None]) -> None:
        sub = await self._nc.subscribe(self._pull_prefix + ".*", cb=self._on_msg)
        await flush(self._nc)
        self._state = RunnerState.READY
        ready.set_result(None)
        try:
            async with asyncio.TaskGroup() as tg:
                ticker = tg.create_task(self._tick())
                self._tg = tg
                while self._state is not RunnerState.STOPPED:
                    await self._top_up()
                    ev = await self._inbox.get()
                    await self._handle(ev)
                ticker.cancel()
        finally:
            self._state = RunnerState.STOPPED
            await sub.unsubscribe()

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(_TICK_S)
            self.post(Tick())

    async def _top_up(self) -> None:
        n = pull_batch(self.max_concurrency, len(self._jobs), len(self._pulls), self._state)
        if n <= 0 or asyncio.get_running_loop().time() < self._pull_backoff_until:
            return
        expires = self.settings.pull_expires_s
        deadline = asyncio.get_running_loop().time() + expires
        body = b'{"batch":1,"expires":%d}' % int(expires * 1e9)
        for _ in range(n):
            pull_id = next(self._pull_ids)
            self._pulls[pull_id] = deadline
            await self._nc.publish(self._next_api, body, reply=f"{self._pull_prefix}.{pull_id}")

    async def _handle(self, ev: Event) -> None:
        match ev:
            case Delivered(msg=msg):
                if self._pulls:
                    self._pulls.popitem(last=False)
                await self._on_delivered(msg)
            case PullEnded(pull_id=pid, status=status):
                self._on_pull_ended(pid, status)
            case JobFinished(result=res):
                self._on_finished(res)
            case CancelJob(request_id=rid):
                job = self._jobs.get(rid)
                if job is not None:
                    self._cancelled += 1
                    job[0].cancel()
            case ListenerGone(token=token):
                self._on_listener_gone(token)
            case Reconnected():
                self._pulls.clear()
            case Tick():
                self._on_tick()
            case Drain(grace_s=grace):
                if self._state is RunnerState.READY:
                    self._state = RunnerState.DRAINING
                    self._drain_deadline = asyncio.get_running_loop().time() + grace
                self._maybe_stopped()

    def _on_pull_ended(self, pull_id: int, status: str) -> None:
        if self._pulls.pop(pull_id, None) is None and self._pulls:
            self._pulls.popitem(last=False)
        if status != "408":  # 409 etc.: the broker refused the pull; do not spin
            log.warning("pull for %s refused: status %s", self.model_id, status)
            self._pull_backoff_until = asyncio.get_running_loop().time() + 1.0

    def _on_finished(self, res: JobResult) -> None:
        job = self._jobs.pop(res.request_id, None)
        if job is not None:
            self._watch.pop(job[1].writer.watch.rsplit(".", 1)[-1], None)
        if res.ok:
            self._completed += 1
            self._tokens_out += res.tokens_out
            self._tokens_in += res.tokens_in
        else:
            self._failed += 1
        self._maybe_stopped()

    def _on_listener_gone(self, token: str) -> None:
        owner = self._watch.get(token)
        job = self._jobs.get(owner) if owner is not None else None
        if job is not None:
            self._listener_gone += 1
            log.info("request %s: nobody reads its replies; cancelled", owner)
            job[0].cancel()

    def _on_tick(self) -> None:
        now = asyncio.get_running_loop().time()
        # A pull request the server never answered (reconnect, restart) is forgotten.
        # A late status for it would close one live pull too early: then at worst one
        # message too many arrives, and admission gives it straight back (NAK).
        for pid in [k for k, exp in self._pulls.items() if now > exp + 5.0]:
            del self._pulls[pid]
        if self._drain_deadline is not None and now > self._drain_deadline:
            for task, _ in self._jobs.values():
                if not task.cancelling():
                    self._drain_cancelled += 1
                task.cancel()

    def _maybe_stopped(self) -> None:
        if self._state is RunnerState.DRAINING and not self._jobs:
            self._state = RunnerState.STOPPED

    async def _on_delivered(self, msg: Any) -> None:
        info = parse_ack_subject(msg.reply or "")
        queued_ms = None
        if info is not None:
            queued_ms = max(0.0, (p.now_ms() * 1e6 - info.timestamp_ns) / 1e6)
        try:
            spec = read_job(msg.headers, msg.data, queued_ms)
        except BadMessage as bad:
            await self._nc.publish(msg.reply, b"+TERM")
            if bad.reply:
                await send_rejection(self._nc, bad.reply, InvalidRequest(bad.reason))
            return
        decision = admit(
            state=self._state,
            running=len(self._jobs),
            max_concurrency=self.max_concurrency,
            start_by_ms=spec.start_by_ms,
            now_ms=p.now_ms(),
            delivered=info.delivered if info is not None else 1,
        )
        match decision:
            case Admission.NAK:
                self._naks += 1
                await self._nc.publish(msg.reply, b"-NAK")
            case Admission.EXPIRED:
                self._expired += 1
                await self._nc.publish(msg.reply, b"+ACK")
                await send_rejection(
                    self._nc,
                    spec.reply,
                    GatewayTimeout("The request waited in the queue past its start-by time."),
                )
            case Admission.POISON:
                await self._nc.publish(msg.reply, b"+TERM")
                await send_rejection(
                    self._nc,
                    spec.reply,
                    UpstreamError(
                        "The request was handed to too many workers without an answer.",
                        code="too_many_deliveries",
                    ),
                )
            case Admission.RUN:
                self._start(spec, msg.reply)

    def _start(self, spec: JobSpec, ack_subject: str) -> None:
        token = f"nr{next(self._tokens)}"
        watch = f"{self._pull_prefix}.{token}"
        handle = JobHandle(
            self._nc, spec, ack_subject, watch, self._bodies, self.settings.heartbeat_s
        )
        job = run_job(
            handle,
            engine=self.engine,
            worker=self.worker_id,
            model=self.model_id,
            metrics=self._metrics,
        )
        assert self._tg is not None
        task = self._tg.create_task(job)
        self._jobs[spec.request_id] = (task, handle)
        self._watch[token] = spec.request_id
        self._peak = max(self._peak, len(self._jobs))

        def done(t: asyncio.Task[JobResult]) -> None:
            if t.cancelled() or t.exception() is not None:
                res = JobResult(spec.request_id, ok=False)
            else:
                res = t.result()
            self.post(JobFinished(res))

        task.add_done_callback(done)

    def drain(self, grace_s: float) -> None:
        self.post(Drain(grace_s))

    def cancel(self, request_id: str) -> None:
        self.post(CancelJob(request_id))

    def reconnected(self) -> None:
        self.post(Reconnected())
