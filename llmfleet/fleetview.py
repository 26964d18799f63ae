"""The fleet as operators see it: pure functions from worker announcements and queue depths
to the rows of `llmfleet status` (tables, `--watch` and `--json` all render one `FleetView`).

No I/O and no clock here: the caller passes `now` and what it received, so every decision
(expiry, model status, sums) is tested without a broker.
"""

from __future__ import annotations

from typing import Generic, TypeVar

import msgspec

from common import protocol as p
from common.protocol import status_of
from common.queue import QueueDepth

A = TypeVar("A", p.WorkerAnnounce, p.GatewayAnnounce)


class Seen(msgspec.Struct, Generic[A], frozen=True):
    """An announcement (a worker's or a gateway's) and when it arrived (the receiver's
    monotonic clock)."""

    announce: A
    at: float


class ModelRow(msgspec.Struct, frozen=True):
    model: str
    status: str  # ready | loading | draining | unavailable (queue exists, no worker)
    workers: int
    slots_used: int
    slots_total: int
    queued: int  # waiting in the broker, no worker took them yet
    starting: int  # taken by a worker, first output not sent yet
    oldest_wait_s: float
    req_per_s: float
    tokens_per_s: float
    completed: int
    errors: int
    cancelled: int
    circuits_open: int = 0  # workers whose circuit for the model is open
    unhealthy_at: list[str] = []  # gateways whose circuit for the model is open


class WorkerRow(msgspec.Struct, frozen=True):
    worker: str
    host: str
    state: str
    engine: str
    models: list[str]
    slots_used: int
    slots_total: int
    req_per_s: float
    tokens_per_s: float
    completed: int
    errors: int
    version: str
    uptime_s: float
    last_seen_s: float


class GatewayRow(msgspec.Struct, frozen=True):
    gateway: str
    host: str
    state: str
    listen: str
    version: str
    uptime_s: float
    in_flight: int
    requests: int
    client_errors: int
    server_errors: int
    workers: int  # live workers in its catalog
    last_seen_s: float


class FleetView(msgspec.Struct, frozen=True):
    models: list[ModelRow]
    workers: list[WorkerRow]
    queue_error: str = ""  # why queue depths are missing (e.g. no JetStream permission)
    gateways: list[GatewayRow] = []


def live(seen: dict[str, Seen[A]], now: float) -> dict[str, Seen[A]]:
    """Drop workers (or gateways) whose last announcement expired or said `stopped`."""
    return {
        w: s
        for w, s in seen.items()
        if s.announce.state != "stopped" and now - s.at <= s.announce.ttl_s
    }


def model_status(states: list[tuple[str, bool]]) -> str:
    """A model's status from its workers' (worker state, model loaded) pairs."""
    return status_of(
        ready=any(state == "ready" and loaded for state, loaded in states),
        loading=any(
            state == "starting" or (state == "ready" and not loaded) for state, loaded in states
        ),
        has_workers=bool(states),
    )


def gateway_rows(gateways: dict[str, Seen[p.GatewayAnnounce]], now: float) -> list[GatewayRow]:
    """Live gateways (not stopped, announcement not expired), by host and id."""
    rows = []
    alive = live(gateways, now)
    for g in sorted(alive.values(), key=lambda g: (g.announce.host, g.announce.gateway)):
        a = g.announce
        rows.append(
            GatewayRow(
                gateway=a.gateway,
                host=a.host,
                state=a.state,
                listen=a.listen,
                version=a.version,
                uptime_s=a.uptime_s,
                in_flight=a.in_flight,
                requests=a.requests,
                client_errors=a.client_errors,
                server_errors=a.server_errors,
                workers=a.workers,
                last_seen_s=max(0.0, now - g.at),
            )
        )
    return rows


def build_view(
    seen: dict[str, Seen[p.WorkerAnnounce]],
    depths: dict[str, QueueDepth],
    now: float,
    queue_error: str = "",
    gateways: dict[str, Seen[p.GatewayAnnounce]] | None = None,
) -> FleetView:
    """One frame of the status display. `depths` may name models no live worker serves
    (requests queued for them): those are listed as `unavailable`."""
    alive = live(seen, now)
    per_model: dict[str, list[tuple[p.WorkerAnnounce, p.ModelStatus]]] = {}
    workers = []
    for s in sorted(alive.values(), key=lambda s: (s.announce.host, s.announce.worker)):
        a = s.announce
        for m in a.models:
            per_model.setdefault(m.id, []).append((a, m))
        workers.append(
            WorkerRow(
                worker=a.worker,
                host=a.host,
                state=a.state,
                engine=a.engine or ",".join(dict.fromkeys(m.engine for m in a.models)),
                models=[m.id for m in a.models],
                slots_used=a.slots_used or sum(m.in_flight for m in a.models),
                slots_total=a.slots_total or sum(m.max_concurrency for m in a.models),
                req_per_s=a.req_per_s,
                tokens_per_s=a.tokens_per_s,
                completed=a.completed,
                errors=a.failed,
                version=a.version,
                uptime_s=a.uptime_s,
                last_seen_s=max(0.0, now - s.at),
            )
        )
    rows = []
    open_at: dict[str, list[str]] = {}
    for g in live(gateways or {}, now).values():
        for m_id in g.announce.unhealthy:
            open_at.setdefault(m_id, []).append(g.announce.gateway)
    for model in sorted(set(per_model) | set(depths)):
        entries = per_model.get(model, [])
        depth = depths.get(model, QueueDepth(model=model))
        status = model_status([(a.state, m.loaded) for a, m in entries])
        ready = [m for a, m in entries if a.state == "ready" and m.loaded]
        circuits_open = sum(1 for m in ready if m.circuit == "open")
        if status == "ready" and (circuits_open == len(ready) or model in open_at):
            status = "unhealthy"  # no worker takes it, or a gateway's circuit is open
        rows.append(
            ModelRow(
                model=model,
                status=status,
                circuits_open=circuits_open,
                unhealthy_at=sorted(open_at.get(model, [])),
                workers=len(entries),
                slots_used=sum(m.in_flight for _, m in entries),
                slots_total=sum(m.max_concurrency for _, m in entries),
                queued=depth.pending,
                starting=depth.starting,
                oldest_wait_s=depth.oldest_wait_s,
                req_per_s=sum(m.req_per_s for _, m in entries),
                tokens_per_s=sum(m.tokens_per_s for _, m in entries),
                completed=sum(m.completed for _, m in entries),
                errors=sum(m.failed for _, m in entries),
                cancelled=sum(m.cancelled for _, m in entries),
            )
        )
    return FleetView(
        models=rows,
        workers=workers,
        queue_error=queue_error,
        gateways=gateway_rows(gateways or {}, now),
    )


def duration(seconds: float) -> str:
    """`42s`, `3m05s`, `2h07m`, `3d04h`: short and sortable by eye."""
    s = int(seconds)
    if s < 60:
        return f"{seconds:.0f}s" if seconds >= 1 else f"{seconds:.1f}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def resolve_worker(name: str, workers: list[str]) -> str | None:
    """`name` itself, or the one worker id it is a prefix of; None if none or ambiguous."""
    if name in workers:
        return name
    matches = [w for w in workers if w.startswith(name)]
    return matches[0] if len(matches) == 1 else None
