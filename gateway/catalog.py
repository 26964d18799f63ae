"""The fleet catalog: which live workers serve which models, from worker announcements.

Workers publish a `WorkerAnnounce` on `llmfleet.hb.<worker>` every heartbeat and when
asked on `llmfleet.discover`; each is valid for its `ttl_s`. One task (`Catalog.run`)
owns the table; after every change it publishes a frozen `CatalogSnapshot` that request
handlers read without locks (a read never gates a mutation here).
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import msgspec

from common import protocol as p


class ModelEntry(msgspec.Struct, frozen=True):
    id: str
    workers: tuple[str, ...]
    slots: int
    in_flight: int
    owned_by: str
    created: int
    simulated: bool
    description: str
    ready: bool  # some worker has it loaded; else it is loading and requests queue


class CatalogSnapshot(msgspec.Struct, frozen=True):
    models: dict[str, ModelEntry]
    workers: dict[str, p.WorkerAnnounce]

    def lookup(self, model_id: str) -> ModelEntry | None:
        return self.models.get(model_id)


EMPTY = CatalogSnapshot(models={}, workers={})


class _Seen(msgspec.Struct):
    announce: p.WorkerAnnounce
    expires_at: float


def apply_announce(
    table: dict[str, _Seen], announce: p.WorkerAnnounce, now: float
) -> dict[str, _Seen]:
    """The table after `announce` (pure: returns a new dict)."""
    out = dict(table)
    if announce.state == "stopped":
        out.pop(announce.worker, None)
    else:
        out[announce.worker] = _Seen(announce, now + announce.ttl_s)
    return out


def expire(table: dict[str, _Seen], now: float) -> dict[str, _Seen]:
    return {k: v for k, v in table.items() if v.expires_at > now}


def build_snapshot(table: dict[str, _Seen]) -> CatalogSnapshot:
    """Group live workers by model. Starting (loading) and draining workers are listed but
    add no slots: requests for a model that is still loading wait in the broker."""
    models: dict[str, ModelEntry] = {}
    for seen in sorted(table.values(), key=lambda s: s.announce.worker):
        a = seen.announce
        for m in a.models:
            prev = models.get(m.id)
            slots = m.max_concurrency if a.state == "ready" else 0
            if prev is None:
                models[m.id] = ModelEntry(
                    id=m.id,
                    workers=(a.worker,),
                    slots=slots,
                    in_flight=m.in_flight,
                    owned_by=m.owned_by,
                    created=m.created,
                    simulated=m.simulated,
                    description=m.description,
                    ready=a.state == "ready",
                )
            else:
                models[m.id] = msgspec.structs.replace(
                    prev,
                    workers=(*prev.workers, a.worker),
                    slots=prev.slots + slots,
                    in_flight=prev.in_flight + m.in_flight,
                    created=min(prev.created, m.created),
                    ready=prev.ready or a.state == "ready",
                )
    return CatalogSnapshot(
        models=dict(sorted(models.items())),
        workers={k: v.announce for k, v in table.items()},
    )


class Catalog:
    """Owner of the worker table. Feed it with `post_announce` (from the NATS callback)."""

    def __init__(self, tick_s: float = 0.5) -> None:
        self._inbox: asyncio.Queue[p.WorkerAnnounce] = asyncio.Queue(maxsize=10_000)
        self._table: dict[str, _Seen] = {}
        self.snapshot: CatalogSnapshot = EMPTY
        self._tick_s = tick_s
        self.changed = asyncio.Event()

    def post_announce(self, data: bytes) -> None:
        try:
            announce = p.decode_announce(data)
        except msgspec.DecodeError:
            return
        # Announcements repeat every heartbeat: dropping one when full loses nothing.
        with contextlib.suppress(asyncio.QueueFull):
            self._inbox.put_nowait(announce)

    async def run(self) -> None:
        while True:
            ev: p.WorkerAnnounce | None = None
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._tick_s):
                    ev = await self._inbox.get()
            now = time.monotonic()
            table = expire(self._table, now)
            if ev is not None:
                table = apply_announce(table, ev, now)
            if table != self._table or ev is not None:
                self._table = table
                self.snapshot = build_snapshot(table)
                self.changed.set()
                self.changed = asyncio.Event()
