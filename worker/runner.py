"""`ModelRunner`: the one task that owns a model's slots on this worker.

It speaks JetStream's pull protocol itself so that credits are exact: every pull request
asks for one message (batch 1) on its own reply subject, and ends with exactly one event,
a delivery or a status (408 expired, 409 ...). Deliveries carry the stream subject, not
the pull's, so a delivery closes the oldest open pull and a status closes its own (or,
if that one was already closed by a delivery, the oldest); either way one event closes
one pull and the count of open pulls is exact. Running jobs plus open pulls never exceed
`max_concurrency`: every request beyond that waits in the broker, where any worker with
a free slot takes the next one (fleet-wide FIFO per model).

Events (`worker.inbox.Inbox`): the lifecycle events Delivered, PullEnded, JobFinished,
Drain and Reconnected are never dropped; CancelJob, ListenerGone, Tick, ClockSample and
HealthResult are offered, so a flood of them is refused (and counted) instead of crowding
those out. Effects go through the bus (`common.bus.Bus`): `publish` only (pull requests,
acks, naks, replies), so the accounting is unit-tested on the in-memory bus.

Jobs are keyed by delivery (`<stream seq>.<delivery count>`), never by the producer's
request id, so a reused id cannot exceed `max_concurrency` nor cancel someone else's job:
a cancel names the producer (from its subject, which NATS permissions bind) and matches
only that producer's jobs. One untrusted message can only fail itself: whatever handling
a delivery or running a job raises is caught at that edge, the message is terminated and
counted, and the runner's TaskGroup never sees it.

The model's circuit breaker on this worker (`common.breaker`, one circuit, owned here) is
fed by finished jobs (`JobResult.verdict`) and by the engine's health probe, a child task
that posts `HealthResult`; while the circuit is open nothing is pulled, half-open one
request (the probe) at most, and a delivery the circuit refuses is given back (delayed).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec

from common import names
from common.audit import AuditEvent, AuditWriter
from common.audit import now as audit_now
from common.bodies import BodyReader
from common.breaker import CLOSED, OPEN, STATES, Breakers, Circuit, view
from common.bus import Bus
from common.clock import parse_rfc3339_ns
from common.errors import FleetError, GatewayTimeout, InvalidRequest, UpstreamError
from common.natsconn import flush
from worker.decide import (
    CIRCUIT_NAK_DELAY_S,
    CLOCK_PROBE_S,
    Admission,
    ClockOffset,
    RunnerState,
    Verdict,
    admit,
    parse_ack_subject,
    pull_batch,
)
from worker.engine import Engine, health_probe
from worker.inbox import Inbox
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
_CIRCUIT_NAK = b'-NAK {"delay":%d}' % int(CIRCUIT_NAK_DELAY_S * 1e9)


class Delivered(msgspec.Struct):
    msg: Any


class PullEnded(msgspec.Struct):
    pull_id: int
    status: str


class JobFinished(msgspec.Struct):
    result: JobResult


class CancelJob(msgspec.Struct):
    producer: str
    request_id: str
    delivery: str = ""


class Tick(msgspec.Struct):
    pass


class Reconnected(msgspec.Struct):
    """The NATS connection was re-established: pull requests from before are gone."""


class ListenerGone(msgspec.Struct):
    """No-responders for a job's reply stream: nobody reads it any more."""

    token: str


class Drain(msgspec.Struct):
    grace_s: float


class ClockSample(msgspec.Struct):
    """The broker's time (`broker_ns`, from a consumer-info answer) and when it arrived."""

    mono_s: float
    local_ns: int
    broker_ns: int


class HealthResult(msgspec.Struct):
    """The engine's health probe answered: None = the upstream is up, else why not."""

    error: str | None


class _BrokerTime(msgspec.Struct):
    ts: str = ""


_broker_time = msgspec.json.Decoder(_BrokerTime)

Event = (
    Delivered
    | PullEnded
    | JobFinished
    | CancelJob
    | Tick
    | Drain
    | Reconnected
    | ListenerGone
    | ClockSample
    | HealthResult
)


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
    terminated: int = 0  # deliveries refused as unreadable or unanswerable (poison)
    job_errors: int = 0  # jobs that raised past their own error handling (a bug)
    refused_events: int = 0  # cancels/notices refused while the inbox was full
    # the model's circuit on this worker (common/breaker.py), as of the snapshot
    circuit: str = CLOSED
    circuit_state: int = 0  # the same as a number (gauge): 0 closed, 1 half_open, 2 open
    circuit_failures: int = 0  # upstream failures in a row
    circuit_error: str = ""  # the last one (client-safe: no URL, no key)
    circuit_reopen_in_s: float = 0.0  # while open: until one request may probe
    circuit_opened: int = 0  # times it opened (or re-opened after a failed probe)
    circuit_naks: int = 0  # deliveries given back because the circuit was open


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
        bodies: BodyReader | None = None,
        metrics: WorkerMetrics | None = None,
        audit: AuditWriter | None = None,
    ) -> None:
        self._bodies = bodies
        self._audit = audit  # requests straight over NATS are audited here
        self._metrics = metrics
        self.model_id = model_id
        self.engine = engine
        self.max_concurrency = max_concurrency
        self.worker_id = worker_id
        self.settings = settings or RunnerSettings()
        self._nc = nc
        self._inbox: Inbox[Event] = Inbox(max_offered=4 * max_concurrency + 256)
        self._pull_prefix = f"{names.INBOX_ROOT}.w.{worker_id}.{names.escape_model(model_id)}"
        consumer = f"{names.REQUEST_STREAM}.{names.consumer_name(model_id)}"
        self._next_api = f"$JS.API.CONSUMER.MSG.NEXT.{consumer}"
        self._info_api = f"$JS.API.CONSUMER.INFO.{consumer}"
        self._pull_ids = itertools.count(1)
        self._pulls: OrderedDict[int, float] = OrderedDict()  # pull id -> expires at
        self._jobs: dict[str, tuple[asyncio.Task[JobResult], JobHandle]] = {}  # by delivery
        self._by_request: dict[tuple[str, str], set[str]] = {}  # (producer, id) -> deliveries
        self._watch: dict[str, str] = {}  # no-responders token -> delivery
        self._cancels_queued: set[tuple[str, str, str]] = set()  # in the inbox, not handled
        self._gone_queued: set[str] = set()  # listener-gone tokens in the inbox
        self._clock = ClockOffset()
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
        self._terminated = 0
        self._job_errors = 0
        self._breakers = Breakers(self.settings.breaker, max_keys=1)  # key: the model
        self._probe_job: str | None = None  # the delivery that probes a half-open circuit
        self._circuit_naks = 0

    # ---- called from other tasks: only enqueue ---------------------------------------------

    def post(self, ev: Event) -> None:
        """Queue an event: lifecycle events always, the others unless a flood fills the
        inbox (then refused and counted: a cancel or a tick lost under a flood is safe)."""
        if isinstance(ev, (CancelJob, ListenerGone, Tick, ClockSample, HealthResult)):
            self._inbox.offer(ev)
        else:
            self._inbox.put(ev)

    def stats(self) -> RunnerStats:
        credits = len(self._pulls)
        circuit = view(self._breakers.get(self.model_id), self._now())
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
            terminated=self._terminated,
            job_errors=self._job_errors,
            refused_events=self._inbox.refused,
            circuit=circuit.state,
            circuit_state=STATES.index(circuit.state),
            circuit_failures=circuit.failures,
            circuit_error=circuit.last_error,
            circuit_reopen_in_s=circuit.reopen_in_s,
            circuit_opened=self._breakers.opened,
            circuit_naks=self._circuit_naks,
        )

    async def _on_msg(self, msg: Any) -> None:
        if (msg.reply or "").startswith("$JS.ACK."):
            self.post(Delivered(msg))  # a delivery, whatever headers its producer set
            return
        status = (msg.headers or {}).get("Status")
        if status and not msg.data:
            tail = msg.subject.rsplit(".", 1)[-1]
            if tail.startswith("nr"):
                if status == "503" and tail in self._watch and tail not in self._gone_queued:
                    self._gone_queued.add(tail)  # one notice per job, however many 503s
                    if not self._inbox.offer(ListenerGone(tail)):
                        self._gone_queued.discard(tail)
            elif status != "100":  # 100 = idle heartbeat, not the end of a pull
                try:
                    self.post(PullEnded(int(tail), status))
                except ValueError:
                    return
        # anything else is not for this runner (nothing else may publish here)

    # ---- the owner ---------------------------------------------------------------------

    async def run(self, ready: asyncio.Future[None]) -> None:
        sub = await self._nc.subscribe(self._pull_prefix + ".*", cb=self._on_msg)
        await flush(self._nc)
        first = await self._sample_clock()  # the broker's time before the first delivery
        if first is not None:
            self._clock.observe(first.mono_s, first.local_ns, first.broker_ns)
        self._state = RunnerState.READY
        ready.set_result(None)
        try:
            async with asyncio.TaskGroup() as tg:
                background = [tg.create_task(self._tick()), tg.create_task(self._clock_probes())]
                probe = health_probe(self.engine)
                if probe is not None and self.settings.health_interval_s > 0:
                    background.append(tg.create_task(self._health_probes(probe)))
                self._tg = tg
                while self._state is not RunnerState.STOPPED:
                    try:
                        await self._top_up()
                    except Exception:  # the broker connection; the next tick retries
                        log.exception("runner %s: could not ask for work", self.model_id)
                    ev = await self._inbox.get()
                    await self._handle(ev)
                for task in background:
                    task.cancel()
        finally:
            self._state = RunnerState.STOPPED
            await sub.unsubscribe()

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(_TICK_S)
            self.post(Tick())

    async def _sample_clock(self) -> ClockSample | None:
        """Ask the broker for its time (the `ts` of this model's consumer info)."""
        try:
            msg = await self._nc.request(self._info_api, b"", timeout=2.0)
            local_ns = time.time_ns()
            broker_ns = parse_rfc3339_ns(_broker_time.decode(msg.data).ts)
        except Exception:  # no answer, no permission, an old broker: deliveries still teach
            return None
        return ClockSample(asyncio.get_running_loop().time(), local_ns, broker_ns)

    async def _clock_probes(self) -> None:
        while True:
            await asyncio.sleep(CLOCK_PROBE_S)
            sample = await self._sample_clock()
            if sample is not None:
                self.post(sample)

    async def _health_probes(self, probe: Callable[[], Awaitable[str | None]]) -> None:
        """Ask the engine about its upstream every `health_interval_s`; the answer is posted
        to the runner (the breaker changes only there)."""
        while True:
            await asyncio.sleep(self.settings.health_interval_s)
            try:
                error = await probe()
            except Exception:  # the engine's bug, not word of the upstream: no verdict
                log.exception("runner %s: the health probe raised", self.model_id)
                continue
            self.post(HealthResult(error))

    @staticmethod
    def _now() -> float:
        """The breaker's clock: `stats()` may be read from a metrics exporter's thread."""
        return time.monotonic()

    async def _top_up(self) -> None:
        circuit = self._breakers.state(self.model_id, self._now())
        n = pull_batch(
            self.max_concurrency, len(self._jobs), len(self._pulls), self._state, circuit=circuit
        )
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
                await self._on_delivery_event(msg)
            case PullEnded(pull_id=pid, status=status):
                self._on_pull_ended(pid, status)
            case JobFinished(result=res):
                self._on_finished(res)
            case CancelJob():
                self._on_cancel(ev)
            case ListenerGone(token=token):
                self._on_listener_gone(token)
            case Reconnected():
                self._pulls.clear()
            case Tick():
                self._on_tick()
            case ClockSample(mono_s=mono, local_ns=local, broker_ns=broker):
                self._clock.observe(mono, local, broker)
            case HealthResult(error=None):
                self._feed_breaker(Verdict.SUCCESS, "", probe=False)
            case HealthResult(error=str(error)):
                self._feed_breaker(Verdict.FAILURE, error, probe=False)
            case Drain(grace_s=grace):
                if self._state is RunnerState.READY:
                    self._state = RunnerState.DRAINING
                    self._drain_deadline = asyncio.get_running_loop().time() + grace
                self._maybe_stopped()

    async def _on_delivery_event(self, msg: Any) -> None:
        if self._pulls:
            self._pulls.popitem(last=False)
        try:
            await self._on_delivered(msg)
        except Exception:  # one message can only fail itself
            log.exception("runner %s: could not handle a delivery", self.model_id)
            await self._terminate(msg.reply)

    def _on_cancel(self, ev: CancelJob) -> None:
        self._cancels_queued.discard((ev.producer, ev.request_id, ev.delivery))
        for key in list(self._by_request.get((ev.producer, ev.request_id), ())):
            job = self._jobs.get(key)
            if job is not None and ev.delivery in ("", key) and not job[0].cancelling():
                self._cancelled += 1
                job[0].cancel()

    def _on_pull_ended(self, pull_id: int, status: str) -> None:
        if self._pulls.pop(pull_id, None) is None and self._pulls:
            self._pulls.popitem(last=False)
        if status != "408":  # 409 etc.: the broker refused the pull; do not spin
            log.warning("pull for %s refused: status %s", self.model_id, status)
            self._pull_backoff_until = asyncio.get_running_loop().time() + 1.0

    def _on_finished(self, res: JobResult) -> None:
        job = self._jobs.pop(res.key, None)
        if job is not None:
            self._watch.pop(job[1].writer.watch.rsplit(".", 1)[-1], None)
            spec = job[1].spec
            if self._audit is not None and spec.producer != names.GATEWAY_PRODUCER:
                self._audit.submit(self._audit_event(spec, res), spec.delivery)
            keys = self._by_request.get((spec.producer, spec.request_id))
            if keys is not None:
                keys.discard(res.key)
                if not keys:
                    del self._by_request[(spec.producer, spec.request_id)]
        if res.ok:
            self._completed += 1
            self._tokens_out += res.tokens_out
            self._tokens_in += res.tokens_in
        else:
            self._failed += 1
        # The probe's verdict is the probe's only while its circuit still waits for it (a
        # failed health probe may have re-opened the circuit meanwhile).
        probe = res.key == self._probe_job
        if probe:
            self._probe_job = None
        probe = probe and self._breakers.get(self.model_id).probing
        self._feed_breaker(res.verdict, res.detail, probe)
        self._maybe_stopped()

    def _feed_breaker(self, verdict: Verdict, error: str, probe: bool) -> None:
        """One verdict about the upstream (a job's end, a health probe's answer)."""
        key, now = self.model_id, self._now()
        before = self._breakers.get(key)
        match verdict:
            case Verdict.SUCCESS:
                self._breakers.success(key, probe)
            case Verdict.FAILURE:
                self._breakers.failure(key, now, error or "upstream failure", probe)
            case Verdict.NONE:
                self._breakers.abandon(key, probe)
        self._log_circuit(before, self._breakers.get(key), now)

    def _log_circuit(self, before: Circuit, after: Circuit, now: float) -> None:
        if after.state == OPEN and (before.state != OPEN or after.trips != before.trips):
            log.warning(
                "runner %s: circuit open for %.1fs after %d upstream failures (last: %s)",
                self.model_id,
                after.reopen_at - now,
                after.failures,
                after.last_error,
            )
        elif after.state == CLOSED and before.state != CLOSED:
            log.info("runner %s: circuit closed (the probe request succeeded)", self.model_id)

    def _audit_event(self, spec: JobSpec, res: JobResult) -> AuditEvent:
        """A request from a batch producer (the gateway audits its own): the principal
        is the producer the request subject names, which NATS permissions vouch for."""
        return AuditEvent(
            ts=audit_now(),
            request_id=spec.request_id,
            key=f"producer:{spec.producer}",
            route=spec.op,
            model=self.model_id,
            served_model=self.model_id,
            worker=self.worker_id,
            status=res.status if not res.ok else 200,
            error="" if res.ok else res.error,
            prompt_tokens=res.tokens_in,
            completion_tokens=res.tokens_out,
            ttft_ms=None if res.ttft_s is None else round(res.ttft_s * 1000, 3),
            duration_ms=round(res.duration_s * 1000, 3),
            stream=True,
            client=spec.producer,
        )

    def _on_listener_gone(self, token: str) -> None:
        self._gone_queued.discard(token)
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

    async def _terminate(self, ack_subject: str) -> None:
        """Drop a delivery for good (+TERM), counted; never raises."""
        self._terminated += 1
        try:
            await self._nc.publish(ack_subject, b"+TERM")
        except Exception:
            log.warning("runner %s: could not terminate a delivery", self.model_id)

    async def _reject(self, spec: JobSpec, err: FleetError) -> None:
        if self._audit is not None and spec.producer != names.GATEWAY_PRODUCER:
            res = JobResult(spec.delivery, ok=False, status=err.status, error=err.code or err.type)
            self._audit.submit(self._audit_event(spec, res), spec.delivery)
        try:
            await send_rejection(self._nc, spec.reply, err, spec.delivery)
        except Exception:
            log.warning("runner %s: could not send a rejection", self.model_id)

    async def _on_delivered(self, msg: Any) -> None:
        info = parse_ack_subject(msg.reply)
        if info is None:
            await self._terminate(msg.reply)
            return
        local_ns = time.time_ns()
        self._clock.observe(asyncio.get_running_loop().time(), local_ns, info.timestamp_ns)
        queued_ms = self._clock.queued_ms(local_ns, info.timestamp_ns)
        delivery = f"{info.stream_seq}.{info.delivered}"
        try:
            spec = read_job(
                msg.subject, msg.headers, msg.data, delivery=delivery, queued_ms=queued_ms
            )
        except BadMessage as bad:
            await self._terminate(msg.reply)
            if bad.reply:
                try:
                    await send_rejection(self._nc, bad.reply, InvalidRequest(bad.reason), delivery)
                except Exception:
                    log.warning("runner %s: could not send a rejection", self.model_id)
            return
        now = self._now()
        decision = admit(
            state=self._state,
            running=len(self._jobs),
            max_concurrency=self.max_concurrency,
            queue_timeout_ms=spec.queue_timeout_ms,
            queued_ms=queued_ms,
            delivered=info.delivered,
            circuit_allows=self._breakers.available(self.model_id, now),
        )
        match decision:
            case Admission.NAK:
                self._naks += 1
                await self._nc.publish(msg.reply, b"-NAK")
            case Admission.CIRCUIT_OPEN:
                # Given back with a delay: a plain -NAK would come straight back into this
                # worker's other open pulls, burning the request's deliveries (poison at 10).
                self._circuit_naks += 1
                await self._nc.publish(msg.reply, _CIRCUIT_NAK)
            case Admission.EXPIRED:
                self._expired += 1
                await self._nc.publish(msg.reply, b"+ACK")
                await self._reject(
                    spec, GatewayTimeout("The request waited in the queue past its timeout.")
                )
            case Admission.POISON:
                await self._terminate(msg.reply)
                await self._reject(
                    spec,
                    UpstreamError(
                        "The request was handed to too many workers without an answer.",
                        code="too_many_deliveries",
                    ),
                )
            case Admission.RUN:
                _, probe = self._breakers.try_pass(self.model_id, now)  # allowed: admit said
                if probe:
                    self._probe_job = spec.delivery
                    log.info("runner %s: circuit half-open, one request probes", self.model_id)
                cap_ms = self.settings.max_request_s * 1000.0
                timeout_ms = cap_ms if spec.timeout_ms is None else min(spec.timeout_ms, cap_ms)
                left_s = (timeout_ms - queued_ms) / 1000.0
                self._start(spec, msg.reply, asyncio.get_running_loop().time() + left_s)

    def _start(self, spec: JobSpec, ack_subject: str, deadline_at: float) -> None:
        token = f"nr{next(self._tokens)}"
        watch = f"{self._pull_prefix}.{token}"
        key = spec.delivery
        handle = JobHandle(
            self._nc,
            spec,
            ack_subject,
            watch,
            self._bodies,
            self.settings.heartbeat_s,
            deadline_at=deadline_at,
        )
        assert self._tg is not None
        task = self._tg.create_task(self._guarded(handle))
        self._jobs[key] = (task, handle)
        self._by_request.setdefault((spec.producer, spec.request_id), set()).add(key)
        self._watch[token] = key
        self._peak = max(self._peak, len(self._jobs))

        def done(t: asyncio.Task[JobResult]) -> None:
            cancelled = JobResult(key, ok=False, status=499, error="cancelled")
            res = cancelled if t.cancelled() else t.result()
            self.post(JobFinished(res))

        task.add_done_callback(done)

    async def _guarded(self, handle: JobHandle) -> JobResult:
        """The job, with anything it raises past its own handling caught here (counted):
        one request never ends the runner's TaskGroup."""
        try:
            return await run_job(
                handle,
                engine=self.engine,
                worker=self.worker_id,
                model=self.model_id,
                metrics=self._metrics,
            )
        except Exception:
            self._job_errors += 1
            log.exception("runner %s: request %s raised", self.model_id, handle.spec.request_id)
            return JobResult(handle.spec.delivery, ok=False)

    def drain(self, grace_s: float) -> None:
        self.post(Drain(grace_s))

    def cancel(self, producer: str, request_id: str, delivery: str = "") -> None:
        """A cancel from `producer` (the subject it came on says who). Only a cancel that
        can stop a job of that producer here is queued, and only once until handled: a
        flood of cancels (for other ids, other deliveries, the same one again) costs
        nothing and cannot crowd out anyone else's."""
        keys = self._by_request.get((producer, request_id))
        if not keys or (delivery and delivery not in keys):
            return
        key = (producer, request_id, delivery)
        if key not in self._cancels_queued:
            self._cancels_queued.add(key)
            if not self._inbox.offer(CancelJob(producer, request_id, delivery)):
                self._cancels_queued.discard(key)

    def reconnected(self) -> None:
        self.post(Reconnected())
