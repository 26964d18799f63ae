"""The gateway process's composition root: NATS connection, catalog, mux, dispatcher and
the uvicorn HTTP server (uvloop + httptools), with a graceful stop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import socket
import time
from collections.abc import Iterator
from typing import Any

import msgspec
import nats.errors
import nats.js.errors
import uvicorn

from common import __version__, names
from common import protocol as p
from common.bodies import BodySettings, BodyStore
from common.natsconn import close, connect, flush, jetstream
from common.queue import QueueSettings, ensure_stream
from common.telemetry import Telemetry
from gateway.app import GatewayApp
from gateway.catalog import Catalog
from gateway.dispatch import Dispatcher, DispatchSettings
from gateway.mux import ReplyMux
from gateway.observe import observe_gateway
from gateway.validate import Limits

log = logging.getLogger(__name__)


class GatewaySettings(msgspec.Struct, frozen=True):
    nats_url: str
    host: str = "127.0.0.1"
    port: int = 8080
    gateway_id: str = ""
    api_key: str | None = None
    default_model: str | None = None  # for requests that name no model
    limits: Limits = Limits()
    dispatch: DispatchSettings = DispatchSettings()
    queue: QueueSettings = QueueSettings()
    discover_wait_s: float = 0.5
    model_grace_s: float = 30.0
    cors_origins: tuple[str, ...] = ()
    resume_on_failure: bool = False
    shutdown_grace_s: float = 30.0
    queue_poll_s: float = 5.0  # queue-depth metric refresh (0: off)
    announce_s: float = 2.0  # GatewayAnnounce interval (for `llmfleet status`)


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling: the composition root decides when to stop."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


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
        self._started = time.monotonic()
        self._host = socket.gethostname()

    def announcement(self, catalog: Catalog, state: str) -> p.GatewayAnnounce:
        """This gateway for operators: `llmfleet.gwhb.<gateway>` (see common/protocol.py)."""
        st = self.app.stats if self.app is not None else None
        return p.GatewayAnnounce(
            gateway=self.gateway_id,
            host=self._host,
            version=__version__,
            state=state,
            ttl_s=self.settings.announce_s * 3.5,
            uptime_s=round(time.monotonic() - self._started, 3),
            listen=f"{self.settings.host}:{self.port}",
            requests=st.requests if st else 0,
            in_flight=st.in_flight if st else 0,
            ok=st.ok if st else 0,
            client_errors=st.client_errors if st else 0,
            server_errors=st.server_errors if st else 0,
            workers=len(catalog.snapshot.workers),
        )

    async def _announce(self, nc: Any, catalog: Catalog, state: str = "ready") -> None:
        if nc.is_connected:
            subject = names.GATEWAY_HB_PREFIX + self.gateway_id
            with contextlib.suppress(nats.errors.Error):
                await nc.publish(subject, p.encode(self.announcement(catalog, state)))

    async def _announce_every(self, nc: Any, catalog: Catalog) -> None:
        while True:
            await self._announce(nc, catalog)
            await asyncio.sleep(self.settings.announce_s)

    def request_stop(self) -> None:
        self._stop.set()

    async def run(self, ready: asyncio.Future[None] | None = None) -> None:
        s = self.settings
        catalog = Catalog(model_grace_s=s.model_grace_s)

        async def on_disconnect() -> None:
            catalog.set_connected(False)

        async def on_reconnect() -> None:
            # A restarted broker may have lost the (memory) stream; workers re-create
            # their consumers, and a discover round refreshes the catalog at once.
            catalog.set_connected(True)
            await nc.publish(names.DISCOVER_SUBJECT, b"")
            await ensure_stream(jetstream(nc), s.queue, update=True)

        nc = await connect(
            s.nats_url,
            name=f"llmfleet-gateway-{self.gateway_id}",
            inbox_prefix=names.gateway_inbox_prefix(self.gateway_id),
            on_reconnect=on_reconnect,
            on_disconnect=on_disconnect,
        )
        try:
            js = jetstream(nc)
            await ensure_stream(js, s.queue, update=True)
            await self._serve(nc, js, catalog, ready)
        finally:
            await close(nc)

    async def _serve(
        self, nc: Any, js: Any, catalog: Catalog, ready: asyncio.Future[None] | None
    ) -> None:
        s = self.settings
        dispatcher: Dispatcher | None = None

        async def on_orphan(acc: p.Accepted) -> None:
            if dispatcher is not None:
                await dispatcher.send_cancel(acc.worker, acc.request_id)

        async def on_heartbeat(msg: Any) -> None:
            catalog.post_announce(msg.data)

        mux = ReplyMux(nc, self.gateway_id, on_orphan)
        await mux.start()
        hb = await nc.subscribe(names.HEARTBEAT_PREFIX + "*", cb=on_heartbeat)
        await flush(nc)
        dispatcher = Dispatcher(
            nc,
            js,
            mux,
            s.dispatch,
            BodyStore(js, BodySettings(replicas=s.queue.replicas)),
            telemetry=self.telemetry,
        )

        async def ready_check() -> bool:
            if not nc.is_connected:
                return False
            try:
                await js.account_info()
            except (nats.errors.Error, nats.js.errors.Error, TimeoutError):
                return False
            return True

        self.app = GatewayApp(
            dispatcher=dispatcher,
            catalog=catalog,
            limits=s.limits,
            api_key=s.api_key,
            default_model=s.default_model,
            ready_check=ready_check,
            cors_origins=s.cors_origins,
            resume_on_failure=s.resume_on_failure,
            telemetry=self.telemetry,
        )
        observe_gateway(
            self.telemetry, stats=self.app.stats, dispatcher=dispatcher, catalog=catalog, nc=nc
        )
        config = uvicorn.Config(
            self.app,
            host=s.host,
            port=s.port,
            http="httptools",
            lifespan="off",
            access_log=False,
            server_header=False,
            log_config=None,  # uvicorn's loggers go through ours (--log-format)
            log_level="warning",
            timeout_graceful_shutdown=int(s.shutdown_grace_s),
            backlog=4096,
        )
        server = _Server(config)
        async with asyncio.TaskGroup() as tg:
            cat_task = tg.create_task(catalog.run())
            poll_task = None
            if self.telemetry.metrics and s.queue_poll_s > 0:
                poll_task = tg.create_task(
                    self.app.metrics.poll_queues(
                        js, lambda: list(catalog.snapshot.models), s.queue_poll_s
                    )
                )
            await nc.publish(names.DISCOVER_SUBJECT, b"")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(s.discover_wait_s):
                    await catalog.changed.wait()
            srv_task = tg.create_task(server.serve())
            while not server.started:
                if srv_task.done():
                    break
                await asyncio.sleep(0.01)
            if server.started:
                self.port = server.servers[0].sockets[0].getsockname()[1]
                log.info("gateway %s serving on http://%s:%s", self.gateway_id, s.host, self.port)

                async def on_discover(msg: Any) -> None:
                    await self._announce(nc, catalog)

                disc = await nc.subscribe(names.DISCOVER_SUBJECT, cb=on_discover)
                beats = tg.create_task(self._announce_every(nc, catalog))
                if ready is not None:
                    ready.set_result(None)
                stop = tg.create_task(self._stop.wait())
                await asyncio.wait({stop, srv_task}, return_when=asyncio.FIRST_COMPLETED)
                stop.cancel()
                beats.cancel()
                await disc.unsubscribe()
                await self._announce(nc, catalog, "draining")  # open streams may finish
                server.should_exit = True
            await srv_task
            if server.started:
                await self._announce(nc, catalog, "stopped")
            cat_task.cancel()
            if poll_task is not None:
                poll_task.cancel()
            await hb.unsubscribe()
            await mux.stop()
        if not server.started:
            raise OSError(f"could not serve HTTP on {s.host}:{s.port}")
