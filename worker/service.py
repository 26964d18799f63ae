"""The worker process's composition root: one NATS connection, one runner per model,
the announcer, and the control subscription. SIGTERM (or a remote `drain`) = drain.

Lifecycle: STARTING -> READY -> DRAINING -> STOPPED. Announcements carry the state; a
final `stopped` announcement removes the worker from every gateway's catalog at once.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
import time
from typing import Any

import msgspec
from nats.js.errors import ServiceUnavailableError

from common import __version__, names
from common import protocol as p
from common.audit import WORKER_AUDIT_PREFIX, AuditWriter
from common.bodies import BodyReader
from common.breaker import CLOSED
from common.natsconn import Throttle, close, connect, flush, jetstream
from common.queue import ensure_consumer, ensure_stream
from common.telemetry import Telemetry, serve_metrics
from worker.decide import RunnerState, transition
from worker.engine import Engine
from worker.micro import start_service
from worker.observe import WorkerMetrics, observe_worker
from worker.rates import Rate, RateWindow, Totals
from worker.runner import ModelRunner
from worker.settings import WorkerSettings, check_worker

log = logging.getLogger(__name__)


class ServedModel(msgspec.Struct):
    model_id: str
    engine: Engine
    max_concurrency: int


def default_worker_id() -> str:
    host = "".join(c if c.isalnum() or c in "-_" else "-" for c in socket.gethostname())[:40]
    return f"{host}-{os.getpid()}-{secrets.token_hex(2)}"


class Worker:
    def __init__(
        self,
        settings: WorkerSettings,
        models: list[ServedModel],
        telemetry: Telemetry | None = None,
    ) -> None:
        if not models:
            raise ValueError("a worker needs at least one model")
        check_worker(settings)
        self.settings = settings
        self.worker_id = names.check_worker_id(settings.worker_id or default_worker_id())
        self.models = models
        self.runners: list[ModelRunner] = []
        self.audit: AuditWriter | None = None
        self.state = RunnerState.STARTING
        self.started_at = time.time()
        self._started_mono = time.monotonic()
        self.host = socket.gethostname()
        self.engine_kinds = ",".join(dict.fromkeys(m.engine.card().engine for m in models))
        self._rates = RateWindow()
        self._stop = asyncio.Event()
        self._discover_answers = Throttle()
        self._nc: Any = None
        self.failed = False  # an engine failed to start; the process should exit non-zero
        # Metrics and traces; built (and shut down) by the caller, like the gateway's.
        self.telemetry = telemetry or Telemetry.off("llmfleet-worker")
        self._job_metrics = WorkerMetrics(self.telemetry)
        observe_worker(self.telemetry, lambda: list(self.runners), lambda: self._nc)
        self.metrics_port: int | None = None  # the bound /metrics port, once serving

    def announcement(self) -> p.WorkerAnnounce:
        """This worker's stats snapshot: the catalog entry, `status` and `$SRV.STATS`."""
        stats = {r.model_id: r.stats() for r in self.runners}
        rates = self._rates.rates()
        models = []
        for m in self.models:
            card = m.engine.card()
            st = stats.get(m.model_id)
            rate = rates.get(m.model_id, Rate())
            models.append(
                p.ModelStatus(
                    id=m.model_id,
                    engine=card.engine,
                    max_concurrency=m.max_concurrency,
                    in_flight=st.in_flight if st else 0,
                    owned_by=card.owned_by,
                    created=int(self.started_at),
                    simulated=card.simulated,
                    description=card.description,
                    loaded=st is not None,
                    completed=st.completed if st else 0,
                    failed=st.failed if st else 0,
                    cancelled=st.cancelled if st else 0,
                    tokens_out=st.tokens_out if st else 0,
                    req_per_s=round(rate.req_per_s, 3),
                    tokens_per_s=round(rate.tokens_per_s, 3),
                    circuit=st.circuit if st else CLOSED,
                    circuit_failures=st.circuit_failures if st else 0,
                    circuit_error=st.circuit_error if st else "",
                    circuit_reopen_in_s=st.circuit_reopen_in_s if st else 0.0,
                )
            )
        all_stats = list(stats.values())
        return p.WorkerAnnounce(
            worker=self.worker_id,
            host=self.host,
            version=__version__,
            state=self.state.value,
            ttl_s=self.settings.heartbeat_s * 3.5,
            started_at=self.started_at,
            models=models,
            completed=sum(x.completed for x in all_stats),
            failed=sum(x.failed for x in all_stats),
            tokens_out=sum(x.tokens_out for x in all_stats),
            peak_in_flight=max((x.peak_in_flight for x in all_stats), default=0),
            engine=self.engine_kinds,
            uptime_s=round(time.monotonic() - self._started_mono, 3),
            slots_used=sum(m.in_flight for m in models),
            slots_total=sum(m.max_concurrency for m in models),
            req_per_s=round(sum(m.req_per_s for m in models), 3),
            tokens_per_s=round(sum(m.tokens_per_s for m in models), 3),
        )

    def _observe_rates(self) -> None:
        totals = {}
        for r in self.runners:
            st = r.stats()
            totals[r.model_id] = Totals(
                completed=st.completed + st.failed, tokens_out=st.tokens_out
            )
        self._rates.observe(time.monotonic(), totals)

    async def _announce(self) -> None:
        if self._nc is not None and self._nc.is_connected:
            subject = names.heartbeat_subject(self.worker_id)
            await self._nc.publish(subject, p.encode(self.announcement()))

    async def _heartbeats(self) -> None:
        while True:
            self._observe_rates()
            await self._announce()
            await asyncio.sleep(self.settings.heartbeat_s)

    async def _on_control(self, msg: Any) -> None:
        try:
            cmd = p.decode_control(msg.data)
        except msgspec.DecodeError:
            log.warning("ignored unreadable control message")
            return
        match cmd:
            case p.Ping():
                if msg.reply and names.answerable(msg.reply):
                    await msg.respond(p.PONG)
            case p.Cancel():
                pass  # only on the cancel subject, which names the producer

    async def _on_cancel(self, msg: Any) -> None:
        """`llmfleet.cancel.<worker>.<producer>`: the subject's last token (bound to the
        producer's NATS user by permissions) says whose request to cancel."""
        producer = msg.subject.rsplit(".", 1)[-1]
        try:
            cmd = p.decode_control(msg.data)
        except msgspec.DecodeError:
            return
        if isinstance(cmd, p.Cancel):
            for r in self.runners:
                r.cancel(producer, cmd.request_id, cmd.delivery)

    async def _on_discover(self, msg: Any) -> None:
        await self._discover_answers.run(self._announce)  # a flood: one answer per 0.25 s

    def request_drain(self) -> None:
        self.state = transition(self.state, RunnerState.DRAINING)
        self._stop.set()

    async def run(self, ready: asyncio.Future[None] | None = None) -> None:
        s = self.settings

        async def on_reconnect() -> None:
            # A restarted broker may have lost the (memory) stream and consumers.
            await self._ensure_queue(jetstream(nc), retry=False)
            for r in self.runners:
                r.reconnected()
            await self._announce()

        nc = await connect(
            s.nats_url,
            name=f"llmfleet-worker-{self.worker_id}",
            inbox_prefix=names.worker_inbox_prefix(self.worker_id),
            on_reconnect=on_reconnect,
            tls_ca=s.nats_ca,
            tls_cert=s.nats_cert,
            tls_key=s.nats_key,
        )
        self._nc = nc
        try:
            await self._ensure_queue(jetstream(nc), retry=True)
            await self._serve(nc, ready)
        finally:
            for m in self.models:
                await m.engine.aclose()
            await close(nc)

    async def _ensure_queue(self, js: Any, *, retry: bool) -> None:
        """Create the stream and this worker's consumers unless they exist. With `retry`,
        wait for JetStream while it does not answer (a cluster electing its leader, a leaf
        node still connecting to its hub) instead of failing the start."""
        delay = 0.25
        while True:
            try:
                await ensure_stream(js, self.settings.queue)
                for m in self.models:
                    await ensure_consumer(js, m.model_id, self.settings.queue)
                return
            except (ServiceUnavailableError, TimeoutError) as exc:
                if not retry:
                    raise
                log.warning(
                    "worker %s: JetStream is not answering (%s); retrying in %.1fs",
                    self.worker_id,
                    type(exc).__name__,
                    delay,
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def _start_engines(self) -> bool:
        """Start every engine; False (logged) if one cannot, so the worker leaves cleanly."""
        try:
            for m in self.models:
                log.info("worker %s: starting engine for %s", self.worker_id, m.model_id)
                await m.engine.start()
        except Exception as exc:
            log.error("worker %s: engine failed to start: %s", self.worker_id, exc)
            return False
        return True

    async def _serve(self, nc: Any, ready: asyncio.Future[None] | None) -> None:
        """Announce at once (state `starting`: gateways list the models and requests queue
        in the broker), load engines, then pull; drain on stop. Phases in order."""
        s = self.settings
        async with asyncio.TaskGroup() as tg:
            subs, svc = await self._listen(nc)
            background = [tg.create_task(self._heartbeats())]
            if s.audit == "on":  # stopped last: it flushes the runners' last events
                self.audit = AuditWriter(jetstream(nc), WORKER_AUDIT_PREFIX + self.worker_id)
                background.append(tg.create_task(self.audit.run()))
            if s.metrics_port > 0 and self.telemetry.metrics:
                bound: asyncio.Future[int] = asyncio.get_running_loop().create_future()
                background.append(
                    tg.create_task(
                        serve_metrics(self.telemetry, s.metrics_host, s.metrics_port, bound)
                    )
                )
                self.metrics_port = await bound
            runner_tasks: list[asyncio.Task[None]] = []
            if await self._started():
                runner_tasks = await self._start_runners(nc, tg)
                self.state = transition(self.state, RunnerState.READY)  # not if draining
                await self._announce()
                log.info(
                    "worker %s ready: %s",
                    self.worker_id,
                    ", ".join(f"{m.model_id} x{m.max_concurrency}" for m in self.models),
                )
                if ready is not None:
                    ready.set_result(None)
                await self._stop.wait()
                log.info("worker %s draining (grace %.0fs)", self.worker_id, s.drain_grace_s)
            self.state = transition(self.state, RunnerState.DRAINING)
            await self._announce()
            for r in self.runners:
                r.drain(s.drain_grace_s)
            await asyncio.gather(*runner_tasks)
            await svc.stop()
            for sub in subs:
                await sub.unsubscribe()
            self.state = transition(self.state, RunnerState.STOPPED)
            for task in background:
                task.cancel()
            await self._announce()
            log.info("worker %s stopped", self.worker_id)

    async def _listen(self, nc: Any) -> tuple[list[Any], Any]:
        """The control subject, `discover`, and the micro service, before anything runs."""
        ctl = await nc.subscribe(names.control_subject(self.worker_id), cb=self._on_control)
        cancels = await nc.subscribe(names.cancel_subject(self.worker_id, "*"), cb=self._on_cancel)
        disc = await nc.subscribe(names.DISCOVER_SUBJECT, cb=self._on_discover)
        svc = await start_service(
            nc,
            worker_id=self.worker_id,
            host=self.host,
            engine=self.engine_kinds,
            models=[m.model_id for m in self.models],
            snapshot=self.announcement,
            drain=self.request_drain,
        )
        await flush(nc)
        return [disc, ctl, cancels], svc

    async def _started(self) -> bool:
        """Load every engine, unless a stop comes first. False: do not serve (the engines
        failed, `self.failed` is set; or a stop came while they loaded)."""
        async with asyncio.TaskGroup() as tg:
            starting = tg.create_task(self._start_engines())
            stop = tg.create_task(self._stop.wait())
            await asyncio.wait({starting, stop}, return_when=asyncio.FIRST_COMPLETED)
            stop.cancel()
            if not starting.done():
                starting.cancel()
                log.info("worker %s stopped while starting", self.worker_id)
                return False
        if not starting.result():
            self.failed = True
            return False
        return True

    async def _start_runners(self, nc: Any, tg: asyncio.TaskGroup) -> list[asyncio.Task[None]]:
        """One runner per model, each started (subscribed to its pulls) before the next."""
        s = self.settings
        tasks = []
        bodies = BodyReader(jetstream(nc))
        audit = self.audit
        for m in self.models:
            runner = ModelRunner(
                model_id=m.model_id,
                engine=m.engine,
                max_concurrency=m.max_concurrency,
                nc=nc,
                worker_id=self.worker_id,
                settings=s.runner,
                bodies=bodies,
                metrics=self._job_metrics if self.telemetry.enabled else None,
                audit=audit,
            )
            started: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            tasks.append(tg.create_task(runner.run(started)))
            await started
            self.runners.append(runner)
        return tasks
