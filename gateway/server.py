"""The gateway process's composition root: NATS connection, catalog, mux, dispatcher and
the uvicorn HTTP server (uvloop + httptools), with a graceful stop."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import secrets
import signal
import socket
import time
from collections.abc import Iterator
from typing import Any

import uvicorn

from common import __version__, names
from common import protocol as p
from common.audit import GATEWAY_AUDIT_PREFIX, AuditSettings, AuditWriter, ensure_audit_stream
from common.bodies import BodyStore, ensure_buckets
from common.clock import BrokerClock
from common.natsconn import (
    CONTROL_PENDING,
    Throttle,
    close,
    connect,
    flush,
    jetstream,
    jetstream_ready,
    publish_best_effort,
)
from common.queue import ensure_stream
from common.settings import BodySettings
from common.telemetry import Telemetry, serve_metrics
from control.keyring import Keyring
from control.quota import Quota
from control.routes import MAX_BYTES as MAX_ROUTES_BYTES
from control.routes import Routes, RoutesError, parse_routes
from control.routes_watch import RoutesWatch
from control.store import QUOTA_BUCKET, open_bucket, quota_config
from gateway.app import GatewayApp
from gateway.auth import Authenticator
from gateway.catalog import Catalog
from gateway.dispatch import Dispatcher
from gateway.edge import EdgeConfig, EdgeCounters
from gateway.govern import Governor
from gateway.mux import ReplyMux
from gateway.observe import observe_gateway
from gateway.responses_store import ResponseStore
from gateway.routing import UNHEALTHY, Router, observe_routing
from gateway.settings import GatewaySettings, auth_mode, parse_listen
from gateway.stats import GatewayCounters

log = logging.getLogger(__name__)

QUOTA_STREAM = "KV_" + QUOTA_BUCKET
KEYS_WAIT_S = 10.0  # --auth keys: the longest a start waits to read the keys


def read_routes_file(path: str) -> tuple[Routes, str]:
    """The routes in `path` and a version naming them (`sha256:` of the text);
    RoutesError when it cannot be read or is not valid."""
    try:
        with open(path, "rb") as f:
            text = f.read(MAX_ROUTES_BYTES + 1)
    except OSError as exc:
        raise RoutesError(path, f"cannot read it: {exc.strerror or exc}") from exc
    routes = parse_routes(text, path)
    return routes, "sha256:" + hashlib.sha256(text).hexdigest()[:12]


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling: the composition root decides when to stop.
    `wait_started` is woken by uvicorn's own startup (no polling)."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self._up = asyncio.Event()

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        try:
            await super().startup(sockets)
        finally:
            self._up.set()  # listening, or failed (then `started` stays False)

    async def wait_started(self, serving: asyncio.Task[None]) -> bool:
        """True once uvicorn listens; False if it could not (`serving` ended first)."""
        up = asyncio.ensure_future(self._up.wait())
        try:
            await asyncio.wait({up, serving}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            up.cancel()
        return bool(self.started)


class Gateway:
    """One gateway process. `telemetry` (metrics, tracing) is built by the caller, which
    also shuts it down; without one, `/metrics` is empty and nothing is traced."""

    def __init__(self, settings: GatewaySettings, telemetry: Telemetry | None = None) -> None:
        self.settings = settings
        self.telemetry = telemetry or Telemetry.off("llmfleet-gateway")
        # Ids become subject tokens (reply subjects, announcements): same rule as workers'.
        self.gateway_id = names.check_worker_id(
            settings.gateway_id or secrets.token_hex(4), "gateway"
        )
        self._stop = asyncio.Event()
        self.app: GatewayApp | None = None
        self.port: int | None = None
        self.metrics_port: int | None = None  # the bound --metrics-listen port, once serving
        self.counters = GatewayCounters()
        self.edge_counters = EdgeCounters()
        self._started = time.monotonic()
        self._host = socket.gethostname()
        self.auth = auth_mode(settings)
        self.keyring = Keyring() if self.auth == "keys" else None
        self.quota: Quota | None = None
        self.clock: BrokerClock | None = None
        self.audit: AuditWriter | None = None
        self.responses: ResponseStore | None = None
        self.router = Router(source="none", settings=settings.breaker)
        self.routes_watch: RoutesWatch | None = None
        self._reload_wanted = asyncio.Event()
        if settings.routes == "kv":
            self.router.source = "kv"
            self.routes_watch = RoutesWatch(self.router.replace, self.router.reject)
        elif settings.routes:
            self.router.source = f"file {settings.routes}"
            self.router.replace(*read_routes_file(settings.routes))  # RoutesError: no start

    def request_reload(self) -> None:
        """SIGHUP: the reload runs in `_reloads`' task (the file is read and parsed in a
        thread, never in the signal callback or on the event loop)."""
        self._reload_wanted.set()

    async def _reloads(self) -> None:
        while True:
            await self._reload_wanted.wait()
            self._reload_wanted.clear()
            await self.reload_routes()

    async def reload_routes(self) -> None:
        """Read the routes file again; a bad one is refused (logged, counted) and the last
        good routes stay. With `--routes kv` the watch reads the entry again."""
        path = self.settings.routes
        if self.routes_watch is not None:
            self.routes_watch.restart()
        elif path:
            try:
                routes, version = await asyncio.to_thread(read_routes_file, path)
            except RoutesError as exc:
                self.router.reject(str(exc))
                return
            except Exception as exc:  # a parser bug: refused like a bad file, never fatal
                log.exception("reading %s failed", path)
                self.router.reject(f"{path}: unreadable ({type(exc).__name__})")
                return
            self.router.replace(routes, version)
        else:
            log.info("SIGHUP: no --routes to reload")

    def announcement(self, catalog: Catalog, state: str) -> p.GatewayAnnounce:
        """This gateway for operators: `llmfleet.gwhb.<gateway>` (see common/protocol.py)."""
        st = self.counters.snapshot()
        return p.GatewayAnnounce(
            gateway=self.gateway_id,
            host=self._host,
            version=__version__,
            state=state,
            ttl_s=self.settings.announce_s * 3.5,
            uptime_s=round(time.monotonic() - self._started, 3),
            listen=f"{self.settings.host}:{self.port}",
            requests=st.requests,
            in_flight=st.in_flight,
            ok=st.ok,
            client_errors=st.client_errors,
            server_errors=st.server_errors,
            workers=len(catalog.snapshot.workers),
            unhealthy=[
                m.id for m in catalog.snapshot.models.values() if self.router.status(m) == UNHEALTHY
            ],
        )

    async def _announce(self, nc: Any, catalog: Catalog, state: str = "ready") -> None:
        subject = names.GATEWAY_HB_PREFIX + self.gateway_id
        await publish_best_effort(nc, subject, p.encode(self.announcement(catalog, state)))

    async def _announce_every(self, nc: Any, catalog: Catalog) -> None:
        while True:
            await self._announce(nc, catalog)
            await asyncio.sleep(self.settings.announce_s)

    def request_stop(self) -> None:
        self._stop.set()

    def _body_settings(self) -> BodySettings:
        return BodySettings(replicas=self.settings.queue.replicas)

    async def run(self, ready: asyncio.Future[None] | None = None) -> None:
        # SIGHUP from the start to the end: a reload asked for while starting or draining
        # waits for the serving phase (or is dropped), it never kills the process.
        loop = asyncio.get_running_loop()
        try:
            loop.add_signal_handler(signal.SIGHUP, self.request_reload)
            hup = True
        except (ValueError, RuntimeError, NotImplementedError):  # not the main thread
            hup = False
        try:
            await self._run(ready)
        finally:
            if hup:
                loop.remove_signal_handler(signal.SIGHUP)
                signal.signal(signal.SIGHUP, signal.SIG_IGN)

    async def _run(self, ready: asyncio.Future[None] | None) -> None:
        s = self.settings
        catalog = Catalog(model_grace_s=s.model_grace_s)

        async def on_disconnect() -> None:
            catalog.post_connection(False)

        async def on_reconnect() -> None:
            # A restarted broker may have lost the (memory) stream; workers re-create
            # their consumers, and a discover round refreshes the catalog at once.
            catalog.post_connection(True)
            if self.keyring is not None:
                self.keyring.restart()  # the watch may have missed changes meanwhile
            if self.routes_watch is not None:
                self.routes_watch.restart()
            await nc.publish(names.DISCOVER_SUBJECT, b"")
            await ensure_stream(jetstream(nc), s.queue, update=True)
            await ensure_buckets(jetstream(nc), s.producer_buckets, self._body_settings())

        nc = await connect(
            s.nats_url,
            name=f"llmfleet-gateway-{self.gateway_id}",
            inbox_prefix=names.gateway_inbox_prefix(self.gateway_id),
            on_reconnect=on_reconnect,
            on_disconnect=on_disconnect,
            tls_ca=s.nats_ca,
            tls_cert=s.nats_cert,
            tls_key=s.nats_key,
        )
        try:
            js = jetstream(nc)
            await ensure_stream(js, s.queue, update=True)
            await ensure_buckets(js, s.producer_buckets, self._body_settings())
            await self._govern(nc, js)
            await self._open_responses(nc, js)
            await self._serve(nc, js, catalog, ready)
        finally:
            await close(nc)

    async def _govern(self, nc: Any, js: Any) -> None:
        """The control layer's broker state: the quota ledgers (virtual keys) and the
        audit stream; both are created when missing. Ledgers are stamped with the
        broker's time, so gateways with different clocks still agree on them."""
        s = self.settings
        if self.keyring is not None:
            kv = await open_bucket(js, quota_config(s.queue.replicas), create=True)
            self.clock = BrokerClock(nc, "$JS.API.STREAM.INFO." + QUOTA_STREAM)
            try:
                await self.clock.probe()
            except Exception as exc:
                log.warning("broker clock probe failed (local clock used): %s", exc)
            self.quota = Quota(kv, self.gateway_id, clock=self.clock.now)
            self.keyring.clock = self.clock.now  # expiries too, on the broker's time
        if s.audit == "on":
            await ensure_audit_stream(
                js,
                AuditSettings(
                    retention_days=s.audit_retention_days,
                    max_bytes=s.audit_max_bytes,
                    replicas=s.queue.replicas,
                ),
            )
            self.audit = AuditWriter(js, GATEWAY_AUDIT_PREFIX + self.gateway_id)

    async def _open_responses(self, nc: Any, js: Any) -> None:
        """Stored responses (/v1/responses): the KV bucket, created when missing; its parts
        fit this broker's max_payload. StoreUnavailable stops the start (an accounts.conf
        without the bucket's rights: grant them, or --responses-store off)."""
        s = self.settings
        if s.responses != "on":
            return
        self.responses = await ResponseStore.open(
            js,
            ttl_s=s.responses_ttl_s,
            max_bytes=s.responses_max_bytes,
            replicas=s.queue.replicas,
            max_payload=nc.max_payload,
        )

    async def _read_keys(self, tg: asyncio.TaskGroup, js: Any) -> list[asyncio.Task[None]]:
        """Start the control layer's tasks; with virtual keys, serve only once the keys
        are read (fail closed: OSError if they cannot be read in time)."""
        tasks = []
        if self.audit is not None:
            tasks.append(tg.create_task(self.audit.run()))
        if self.quota is not None:
            tasks.append(tg.create_task(self.quota.run()))
        if self.clock is not None:
            tasks.append(tg.create_task(self.clock.run()))
        if self.routes_watch is not None:
            tasks.append(tg.create_task(self.routes_watch.run(js)))
            try:  # serve without aliases rather than not at all; the watch goes on
                async with asyncio.timeout(KEYS_WAIT_S):
                    await self.routes_watch.ready.wait()
            except TimeoutError:
                log.warning("--routes kv: the routes entry could not be read yet")
        if self.keyring is not None:
            tasks.append(tg.create_task(self.keyring.run(js, create=False)))
            try:
                async with asyncio.timeout(KEYS_WAIT_S):
                    await self.keyring.ready.wait()
            except TimeoutError:
                for t in tasks:
                    t.cancel()
                raise OSError(
                    f"--auth keys: could not read the keys bucket within {KEYS_WAIT_S:.0f} s"
                ) from None
        return tasks

    async def _serve(
        self, nc: Any, js: Any, catalog: Catalog, ready: asyncio.Future[None] | None
    ) -> None:
        """Build the parts, serve HTTP until stopped, then drain: phases in order."""
        s = self.settings
        mux, hb = await self._subscribe(nc, catalog)
        self.app = self._build_app(nc, js, mux, catalog)
        server = _Server(self._uvicorn_config(self.app))
        async with asyncio.TaskGroup() as tg:
            background = [tg.create_task(catalog.run()), *await self._read_keys(tg, js)]
            if self.telemetry.metrics and s.queue_poll_s > 0:
                models = lambda: list(catalog.snapshot.models)  # noqa: E731
                background.append(
                    tg.create_task(self.app.metrics.poll_queues(js, models, s.queue_poll_s))
                )
            if s.metrics_listen:
                background.append(await self._serve_metrics(tg, s.metrics_listen))
            await self._discover(nc, catalog)
            srv_task = tg.create_task(server.serve())
            if await server.wait_started(srv_task):
                await self._until_stopped(nc, catalog, server, srv_task, ready)
            await srv_task
            if server.started:
                await self._announce(nc, catalog, "stopped")
            for task in background:
                task.cancel()
            await hb.unsubscribe()
            await mux.stop()
        if not server.started:
            raise OSError(f"could not serve HTTP on {s.host}:{s.port}")

    async def _serve_metrics(self, tg: asyncio.TaskGroup, listen: str) -> asyncio.Task[None]:
        """`GET /metrics` without auth on `--metrics-listen` (a private network's
        Prometheus); returns once it listens, raises OSError if it cannot."""
        host, port = parse_listen(listen)
        bound: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        task = tg.create_task(serve_metrics(self.telemetry, host, port, bound))
        self.metrics_port = await bound
        return task

    async def _subscribe(self, nc: Any, catalog: Catalog) -> tuple[ReplyMux, Any]:
        """The reply inbox and the worker announcements, subscribed before anything runs."""

        async def on_orphan(acc: p.Accepted) -> None:
            if self.app is not None:
                await self.app.dispatcher.send_cancel(acc.worker, acc.request_id, acc.delivery)

        async def on_heartbeat(msg: Any) -> None:
            catalog.post_announce(msg.subject, msg.data)

        mux = ReplyMux(nc, self.gateway_id, on_orphan, self.counters)
        await mux.start()
        hb = await nc.subscribe(names.HEARTBEAT_PREFIX + "*", cb=on_heartbeat)
        await flush(nc)
        return mux, hb

    def _build_app(self, nc: Any, js: Any, mux: ReplyMux, catalog: Catalog) -> GatewayApp:
        s = self.settings
        dispatcher = Dispatcher(
            nc,
            js,
            mux,
            s.dispatch,
            self.counters,
            BodyStore(js, settings=self._body_settings()),
            telemetry=self.telemetry,
            max_message_bytes=s.queue.max_msg_bytes,
        )

        async def ready_check() -> bool:
            if self.keyring is not None and not self.keyring.ready.is_set():
                return False
            return await jetstream_ready(nc, js)

        governor = Governor(
            Authenticator(self.auth, s.api_key, self.keyring),
            quota=self.quota,
            audit_writer=self.audit,
            audit_required=s.audit_required,
            gateway_id=self.gateway_id,
            reserve_tokens=s.reserve_tokens,
            key_queue_cap=math.ceil(s.queue.max_per_model * s.key_queue_share),
            telemetry=self.telemetry,
        )

        app = GatewayApp(
            dispatcher=dispatcher,
            catalog=catalog,
            limits=s.limits,
            api_key=s.api_key,
            metrics_token=s.metrics_token,
            default_model=s.default_model,
            ready_check=ready_check,
            governor=governor,
            cors_origins=s.cors_origins,
            resume_on_failure=s.resume_on_failure,
            telemetry=self.telemetry,
            responses=self.responses,
            router=self.router,
        )
        observe_routing(self.telemetry, self.router, lambda: catalog.snapshot)
        observe_gateway(
            self.telemetry,
            stats=lambda: self.counters.snapshot(mux.open_streams),
            catalog=catalog,
            nc=nc,
            edge=self.edge_counters,
        )
        return app

    def _uvicorn_config(self, app: GatewayApp) -> uvicorn.Config:
        """uvicorn on uvloop + httptools, through the edge (gateway/edge.py): bounded heads,
        a head timeout, and `--max-connections` answered in the error envelope."""
        s = self.settings
        return EdgeConfig(
            app,
            edge=s.edge,
            counters=self.edge_counters,
            host=s.host,
            port=s.port,
            lifespan="off",
            access_log=False,
            server_header=False,
            log_config=None,  # uvicorn's loggers go through ours (--log-format)
            log_level="warning",
            timeout_graceful_shutdown=int(s.shutdown_grace_s),
            backlog=4096,
        )

    async def _discover(self, nc: Any, catalog: Catalog) -> None:
        """Ask every worker to announce, and give the answers a moment to arrive, so the
        first requests do not see an empty catalog."""
        await nc.publish(names.DISCOVER_SUBJECT, b"")
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.settings.discover_wait_s):
                await catalog.changed.wait()

    async def _until_stopped(
        self,
        nc: Any,
        catalog: Catalog,
        server: _Server,
        srv_task: asyncio.Task[None],
        ready: asyncio.Future[None] | None,
    ) -> None:
        """Serving: announce, answer discovers, until a stop (or uvicorn quits); then
        announce `draining` and let uvicorn finish the open streams."""
        self.port = server.servers[0].sockets[0].getsockname()[1]
        log.info(
            "gateway %s serving on http://%s:%s", self.gateway_id, self.settings.host, self.port
        )

        answers = Throttle()  # a flood of discovers: one announcement per 0.25 s

        async def on_discover(msg: Any) -> None:
            await answers.run(lambda: self._announce(nc, catalog))

        disc = await nc.subscribe(
            names.DISCOVER_SUBJECT, cb=on_discover, pending_msgs_limit=CONTROL_PENDING
        )
        async with asyncio.TaskGroup() as tg:
            beats = tg.create_task(self._announce_every(nc, catalog))
            reloads = tg.create_task(self._reloads())
            if ready is not None:
                ready.set_result(None)
            stop = tg.create_task(self._stop.wait())
            await asyncio.wait({stop, srv_task}, return_when=asyncio.FIRST_COMPLETED)
            stop.cancel()
            beats.cancel()
            reloads.cancel()
        await disc.unsubscribe()
        await self._announce(nc, catalog, "draining")  # open streams may finish
        server.should_exit = True
