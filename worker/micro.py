"""The worker as a NATS micro service (`$SRV.PING|INFO|STATS`, so `nats micro ls` works).

Service `llmfleet-worker`, one instance per worker process, with the worker id, host,
engine and models in its metadata, and two endpoints on the worker's own subjects (no
queue group sharing between workers: each instance answers for itself):

    llmfleet.ctl.<worker>.status   -> the worker's `WorkerAnnounce` (JSON)
    llmfleet.ctl.<worker>.drain    -> starts a drain; answers the announcement (state draining)

`$SRV.STATS` carries the same announcement as the `status` endpoint's `data`. nats-py runs
micro handlers one at a time; both handlers only read a snapshot or set an event.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgspec
import nats.micro

from common import __version__, names
from common import protocol as p


async def start_service(
    nc: Any,
    *,
    worker_id: str,
    host: str,
    engine: str,
    models: list[str],
    snapshot: Callable[[], p.WorkerAnnounce],
    drain: Callable[[], None],
) -> Any:
    """Register the service on `nc`; returns it (call `await svc.stop()` before closing)."""

    def stats_data(endpoint: Any) -> Any:
        if endpoint.name == "status":
            return msgspec.to_builtins(snapshot())
        return None

    svc = await nats.micro.add_service(
        nc,
        name=names.SERVICE_NAME,
        version=_semver(__version__),
        description="llmfleet inference worker",
        metadata={
            "worker": worker_id,
            "host": host,
            "engine": engine,
            "models": ",".join(models),
        },
        stats_handler=stats_data,
    )

    # Only requests answered into an inbox are served: a request whose reply is elsewhere
    # may be a confused deputy's (docs/security.md).
    async def on_status(req: Any) -> None:
        if names.answerable(_reply(req)):
            await req.respond(p.encode(snapshot()))

    async def on_drain(req: Any) -> None:
        if not names.answerable(_reply(req)):
            return
        drain()
        await req.respond(p.encode(snapshot()))

    await svc.add_endpoint(
        name="status",
        subject=names.service_subject(worker_id, "status"),
        handler=on_status,
        queue_group=f"q-{worker_id}",
    )
    await svc.add_endpoint(
        name="drain",
        subject=names.service_subject(worker_id, "drain"),
        handler=on_drain,
        queue_group=f"q-{worker_id}",
    )
    return svc


def _reply(req: Any) -> str:
    """The reply subject of a micro request (nats-py's `Request` keeps its message private)."""
    return str(getattr(getattr(req, "_msg", None), "reply", "") or "")


def _semver(version: str) -> str:
    """nats micro wants semver; a local dev version like `0.1.0.dev3` becomes `0.1.0-dev3`."""
    parts = version.split(".")
    if len(parts) > 3:
        return ".".join(parts[:3]) + "-" + ".".join(parts[3:])
    return version
