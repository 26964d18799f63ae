"""`llmfleet status` and `llmfleet drain`: the operator's view of the fleet, over NATS only.

Status listens to worker and gateway announcements (`llmfleet.hb.*`, `llmfleet.gwhb.*`,
after asking everyone to announce at once on `llmfleet.discover`) and reads each model's
queue from its JetStream consumer; `llmfleet.fleetview` turns all that into rows. Drain asks
one worker, through its micro-service endpoint `llmfleet.ctl.<worker>.drain`, to stop
taking work, finish what runs and exit; `--wait` follows it until it has left.

The announcement table is written only by the subscription callback (one owner); the
display loop reads it.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import nats.errors
from nats.js.errors import APIError, NotFoundError
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from common import names
from common import protocol as p
from common.natsconn import TLSRequiredError, open_client, redact_url
from common.queue import QueueDepth, queue_depth, queued_models
from llmfleet.fleetview import FleetView, Seen, build_view, duration, resolve_worker


class StatusError(Exception):
    """The fleet could not be read (broker unreachable, unknown worker...)."""


# ---- reading the fleet -------------------------------------------------------------------


class FleetWatcher:
    """Collects announcements while open; `view()` builds a frame with fresh queue depths."""

    def __init__(self, nc: Any) -> None:
        self._nc = nc
        self._js = nc.jetstream(timeout=3.0)
        self.seen: dict[str, Seen[p.WorkerAnnounce]] = {}
        self.gateways: dict[str, Seen[p.GatewayAnnounce]] = {}
        self._subs: list[Any] = []

    async def _on_announce(self, msg: Any) -> None:
        with contextlib.suppress(msgspec.DecodeError):
            a = p.decode_announce(msg.data)
            self.seen[a.worker] = Seen(a, time.monotonic())

    async def _on_gateway(self, msg: Any) -> None:
        with contextlib.suppress(msgspec.DecodeError):
            g = p.decode_gateway_announce(msg.data)
            self.gateways[g.gateway] = Seen(g, time.monotonic())

    async def start(self) -> None:
        self._subs = [
            await self._nc.subscribe(names.HEARTBEAT_PREFIX + "*", cb=self._on_announce),
            await self._nc.subscribe(names.GATEWAY_HB_PREFIX + "*", cb=self._on_gateway),
        ]
        await self._nc.flush()
        await self._nc.publish(names.DISCOVER_SUBJECT, b"")
        await self._nc.flush()

    async def stop(self) -> None:
        for sub in self._subs:
            with contextlib.suppress(nats.errors.Error):
                await sub.unsubscribe()

    async def depths(self, models: set[str]) -> tuple[dict[str, QueueDepth], str]:
        """Queue depth of every model with a consumer, plus `models`; an error text instead
        when JetStream cannot be read."""
        try:
            infos = await self._js.consumers_info(names.REQUEST_STREAM)
        except NotFoundError:
            infos = []
        except (APIError, nats.errors.Error, TimeoutError) as exc:
            return {}, f"queue depths unavailable: {type(exc).__name__} {exc}".strip()
        try:  # models with requests queued, including ones no worker ever served
            models |= await queued_models(self._js)
        except (APIError, nats.errors.Error, TimeoutError) as exc:
            return {}, f"queue depths unavailable: {type(exc).__name__} {exc}".strip()
        for info in infos:
            name = info.name or ""
            if name.startswith(names.CONSUMER_PREFIX):
                with contextlib.suppress(ValueError):
                    models.add(names.unescape_model(name[len(names.CONSUMER_PREFIX) :]))
        ordered = sorted(models)
        try:
            got = await asyncio.gather(*(queue_depth(self._js, m) for m in ordered))
        except (APIError, nats.errors.Error, TimeoutError) as exc:
            return {}, f"queue depths unavailable: {type(exc).__name__} {exc}".strip()
        return dict(zip(ordered, got, strict=True)), ""

    async def view(self) -> FleetView:
        models = {m.id for s in self.seen.values() for m in s.announce.models}
        depths, err = await self.depths(models)
        return build_view(self.seen, depths, time.monotonic(), err, self.gateways)


@contextlib.asynccontextmanager
async def connected(
    url: str, tls: ssl.SSLContext | None = None, *, timeout: float = 5.0
) -> AsyncIterator[Any]:
    """A NATS connection for a CLI command (`tls` from `common.natsconn.tls_context`: TLS
    required, as for a tls:// URL); StatusError if none within `timeout`, or if a server
    does not offer TLS where it is required."""

    async def quiet(exc: Exception) -> None:
        return None

    urls = [u.strip() for u in url.split(",") if u.strip()]
    try:
        nc = await asyncio.wait_for(
            open_client(
                urls,
                tls=tls,
                name="llmfleet-cli",
                inbox_prefix=names.ADMIN_INBOX_PREFIX,
                connect_timeout=2,
                max_reconnect_attempts=-1,
                reconnect_time_wait=0.5,
                error_cb=quiet,
            ),
            timeout,
        )
    except TLSRequiredError as exc:
        raise StatusError(str(exc).removeprefix("nats: ")) from exc
    except (TimeoutError, OSError, nats.errors.Error) as exc:
        raise StatusError(f"cannot reach the NATS server at {redact_url(url)}") from exc
    try:
        yield nc
    finally:
        with contextlib.suppress(nats.errors.Error, TimeoutError, OSError):
            await nc.close()


# ---- rendering ---------------------------------------------------------------------------

_STATUS_STYLE = {"ready": "green", "loading": "yellow", "draining": "magenta"}


def _rate(x: float) -> str:
    return f"{x:,.1f}" if x < 100 else f"{x:,.0f}"


def _table(title: str, columns: str, left: set[str]) -> Table:
    """A table with these columns (`-` in a name is a space); numbers align right."""
    table = Table(title=title, title_justify="left")
    for col in columns.split():
        table.add_column(col.replace("-", " "), justify="left" if col in left else "right")
    return table


def render(view: FleetView, title: str = "") -> Group:
    """The two tables: models, then workers."""
    mt = _table(
        title or "models",
        "model status workers slots queued oldest-wait starting req/s tok/s done errors",
        left={"model", "status"},
    )
    for m in view.models:
        mt.add_row(
            m.model,
            Text(m.status, style=_STATUS_STYLE.get(m.status, "red")),
            str(m.workers),
            f"{m.slots_used}/{m.slots_total}",
            Text(f"{m.queued:,}", style="bold yellow" if m.queued else ""),
            duration(m.oldest_wait_s) if m.queued else "-",
            str(m.starting),
            _rate(m.req_per_s),
            _rate(m.tokens_per_s),
            f"{m.completed:,}",
            Text(f"{m.errors:,}", style="red" if m.errors else ""),
        )
    wt = _table(
        "workers",
        "worker host state engine models load tok/s errors version uptime last-seen",
        left={"worker", "host", "state", "engine", "models", "version"},
    )
    for w in view.workers:
        wt.add_row(
            w.worker,
            w.host,
            Text(w.state, style=_STATUS_STYLE.get(w.state, "")),
            w.engine,
            ", ".join(w.models),
            f"{w.slots_used}/{w.slots_total}",
            _rate(w.tokens_per_s),
            Text(f"{w.errors:,}", style="red" if w.errors else ""),
            w.version,
            duration(w.uptime_s),
            f"{w.last_seen_s:.1f}s ago",
        )
    gt = _table(
        "gateways",
        "gateway host state listen in-flight requests 4xx 5xx workers version uptime last-seen",
        left={"gateway", "host", "state", "listen", "version"},
    )
    for g in view.gateways:
        gt.add_row(
            g.gateway,
            g.host,
            Text(g.state, style=_STATUS_STYLE.get(g.state, "")),
            g.listen,
            str(g.in_flight),
            f"{g.requests:,}",
            f"{g.client_errors:,}",
            Text(f"{g.server_errors:,}", style="red" if g.server_errors else ""),
            str(g.workers),
            g.version,
            duration(g.uptime_s),
            f"{g.last_seen_s:.1f}s ago",
        )
    parts: list[Any] = [mt, wt, gt]
    if not view.models and not view.workers:
        parts = [Text("no workers and no queued requests found", style="yellow"), gt]
    if view.queue_error:
        parts.append(Text(view.queue_error, style="red"))
    return Group(*parts)


def _console(out: Any) -> Console:
    """A terminal gets its own width; a pipe or file gets wide lines instead of wrapped cells."""
    isatty = getattr(out, "isatty", None)
    return Console(file=out, width=None if isatty is not None and isatty() else 200)


_json = msgspec.json.Encoder()


def to_json(view: FleetView, *, pretty: bool = True) -> bytes:
    raw = _json.encode(view)
    return msgspec.json.format(raw, indent=2) if pretty else raw


# ---- commands ----------------------------------------------------------------------------


async def status(
    url: str,
    *,
    watch: bool,
    interval: float,
    as_json: bool,
    wait: float,
    out: Any = None,
    tls: ssl.SSLContext | None = None,
) -> None:
    """Print the fleet once (after `wait` seconds of listening), or refresh it until Ctrl-C."""
    out = out or sys.stdout
    async with connected(url, tls) as nc:
        w = FleetWatcher(nc)
        await w.start()
        try:
            await asyncio.sleep(wait)
            if as_json:  # one document; with --watch, one compact line per refresh
                while True:
                    doc = to_json(await w.view(), pretty=not watch)
                    out.write(doc.decode() + "\n")
                    out.flush()
                    if not watch:
                        return
                    await asyncio.sleep(interval)
            console = _console(out)
            if not watch:
                console.print(render(await w.view()))
                return
            title = f"models  ({url}, every {interval:g}s, Ctrl-C to stop)"
            if not console.is_terminal:  # a pipe or a log: whole frames, one after another
                while True:
                    console.rule(time.strftime("%H:%M:%S"))
                    console.print(render(await w.view(), title))
                    out.flush()
                    await asyncio.sleep(interval)
            with Live(console=console, auto_refresh=False) as live:
                while True:
                    live.update(render(await w.view(), title), refresh=True)
                    await asyncio.sleep(interval)
        finally:
            await w.stop()


async def drain(
    url: str,
    worker: str,
    *,
    wait: bool,
    timeout: float,
    out: Any = None,
    tls: ssl.SSLContext | None = None,
) -> str:
    """Ask `worker` (an id or a unique prefix of one) to drain; with `wait`, follow it until
    it has stopped (or `timeout` passes: StatusError). Returns the full worker id."""
    console = Console(file=out or sys.stderr)
    async with connected(url, tls) as nc:
        w = FleetWatcher(nc)
        await w.start()
        try:
            await asyncio.sleep(0.5)
            known = sorted(w.seen)
            target = resolve_worker(worker, known)
            if target is None:
                hint = ", ".join(known) or "none"
                raise StatusError(f"no single live worker matches {worker!r} (live: {hint})")
            try:
                reply = await nc.request(names.service_subject(target, "drain"), b"", timeout=3)
            except nats.errors.NoRespondersError as exc:
                raise StatusError(f"worker {target} did not answer (gone?)") from exc
            except TimeoutError as exc:
                raise StatusError(f"worker {target} did not answer in 3 s") from exc
            a = p.decode_announce(reply.data)
            console.print(
                f"worker {target} is {a.state}: {a.slots_used} request(s) in flight, "
                "no new work taken"
            )
            if wait:
                await _follow_drain(w, target, timeout, console)
            return target
        finally:
            await w.stop()


async def _follow_drain(w: FleetWatcher, target: str, timeout: float, console: Console) -> None:
    deadline = time.monotonic() + timeout
    with console.status(f"draining {target}") as spinner:
        while True:
            now = time.monotonic()
            s = w.seen.get(target)
            if s is None or s.announce.state == "stopped" or now - s.at > s.announce.ttl_s:
                console.print(f"worker {target} has stopped")
                return
            if now > deadline:
                raise StatusError(f"worker {target} still draining after {timeout:g}s")
            spinner.update(f"draining {target}: {s.announce.slots_used} request(s) in flight")
            await asyncio.sleep(0.2)
