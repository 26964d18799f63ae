"""The fleet catalog: which live workers serve which models, from worker announcements.

Workers publish a `WorkerAnnounce` on `llmfleet.hb.<worker>` every heartbeat and when
asked on `llmfleet.discover`; each is valid for its `ttl_s`. One task (`Catalog.run`)
owns the table; after every change it publishes a frozen `CatalogSnapshot` that request
handlers read without locks (a read never gates a mutation here).

A model whose last worker left stays listed as `unavailable` for a grace period (requests
for it queue and are served if a worker returns in time) instead of vanishing and coming
back. While the gateway itself is cut off from the broker nothing expires: silence then
says nothing about the workers.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import msgspec

from common import names
from common import protocol as p
from common.protocol import status_of


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

    loading: bool = False  # some worker is still starting (loading the model)
    ready_workers: int = 0  # workers in state ready
    open_workers: int = 0  # ready workers whose circuit for this model is open

    @property
    def status(self) -> str:
        return status_of(ready=self.ready, loading=self.loading, has_workers=bool(self.workers))


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


def remember_gone(
    gone: dict[str, tuple[ModelEntry, float]],
    before: CatalogSnapshot,
    after: CatalogSnapshot,
    now: float,
    grace_s: float,
) -> dict[str, tuple[ModelEntry, float]]:
    """Models that lost their last worker, with when; forgotten after `grace_s` (pure)."""
    out = {k: v for k, v in gone.items() if k not in after.models and now - v[1] < grace_s}
    for model_id, entry in before.models.items():
        if model_id not in after.models and model_id not in out and entry.workers:
            out[model_id] = (entry, now)
    return out


def with_gone(snap: CatalogSnapshot, gone: dict[str, tuple[ModelEntry, float]]) -> CatalogSnapshot:
    if not gone:
        return snap
    models = dict(snap.models)
    for model_id, (entry, _) in gone.items():
        models[model_id] = msgspec.structs.replace(
            entry,
            workers=(),
            slots=0,
            in_flight=0,
            ready=False,
            loading=False,
            ready_workers=0,
            open_workers=0,
        )
    return CatalogSnapshot(models=dict(sorted(models.items())), workers=snap.workers)


def build_snapshot(table: dict[str, _Seen]) -> CatalogSnapshot:
    """Group live workers by model. Starting (loading) and draining workers are listed but
    add no slots: requests for a model that is still loading wait in the broker."""
    models: dict[str, ModelEntry] = {}
    for seen in sorted(table.values(), key=lambda s: s.announce.worker):
        a = seen.announce
        for m in a.models:
            prev = models.get(m.id)
            ready = a.state == "ready"
            slots = m.max_concurrency if ready else 0
            is_open = ready and m.circuit == "open"
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
                    ready=ready,
                    loading=a.state == "starting",
                    ready_workers=int(ready),
                    open_workers=int(is_open),
                )
            else:
                models[m.id] = msgspec.structs.replace(
                    prev,
                    workers=(*prev.workers, a.worker),
                    slots=prev.slots + slots,
                    in_flight=prev.in_flight + m.in_flight,
                    created=min(prev.created, m.created),
                    ready=prev.ready or ready,
                    loading=prev.loading or a.state == "starting",
                    ready_workers=prev.ready_workers + int(ready),
                    open_workers=prev.open_workers + int(is_open),
                )
    return CatalogSnapshot(
        models=dict(sorted(models.items())),
        workers={k: v.announce for k, v in table.items()},
    )


class Connection(msgspec.Struct, frozen=True):
    """The gateway's own broker connection went down (False) or came back (True)."""

    connected: bool


CatalogEvent = p.WorkerAnnounce | Connection
RECONNECT_HOLD_S = 2.0  # after a reconnect, workers get this long to announce again


class CatalogState(msgspec.Struct, frozen=True):
    """Everything the catalog knows; replaced whole by `advance`."""

    table: dict[str, _Seen] = {}
    live: CatalogSnapshot = EMPTY
    gone: dict[str, tuple[ModelEntry, float]] = {}
    connected: bool = True
    hold_until: float = 0.0


def advance(
    state: CatalogState, event: CatalogEvent | None, now: float, grace_s: float
) -> tuple[CatalogState, bool]:
    """The catalog after `event` (None: a tick), and whether the snapshot changed (pure).

    While cut off from the broker, and for `RECONNECT_HOLD_S` after a reconnect, nothing
    expires: silence then says nothing about the workers.
    """
    connected, hold_until = state.connected, state.hold_until
    if isinstance(event, Connection):
        connected = event.connected
        if connected:
            hold_until = now + RECONNECT_HOLD_S
    holding = not connected or now < hold_until
    table = state.table if holding else expire(state.table, now)
    if isinstance(event, p.WorkerAnnounce):
        table = apply_announce(table, event, now)
    if holding:  # keep everyone alive until they had a chance to announce again
        table = {k: _Seen(v.announce, max(v.expires_at, now + 0.5)) for k, v in table.items()}
    live = build_snapshot(table)
    gone = remember_gone(state.gone, state.live, live, now, grace_s)
    changed = (
        table != state.table
        or isinstance(event, p.WorkerAnnounce)
        or gone.keys() != state.gone.keys()
    )
    return CatalogState(table, live, gone, connected, hold_until), changed


MAX_TTL_S = 60.0
"""The longest an announcement may claim to stay valid (workers send 3.5 heartbeats)."""


def accepted_announce(subject: str, announce: p.WorkerAnnounce) -> p.WorkerAnnounce:
    """The announcement as the catalog keeps it (pure): ValueError if its `worker` is not
    the worker its subject names; a TTL outside (0, MAX_TTL_S] is clamped into it."""
    if subject != names.heartbeat_subject(announce.worker):
        raise ValueError("announcement for another worker's subject")
    if not 0.0 < announce.ttl_s <= MAX_TTL_S:  # NaN too: then it expires at once
        ttl = MAX_TTL_S if announce.ttl_s > MAX_TTL_S else 0.0
        announce = msgspec.structs.replace(announce, ttl_s=ttl)
    return announce


class Catalog:
    """Owner of the worker table: `run()` is the one task that changes it. Feed it with
    `post_announce` (heartbeat callback) and `post_connection` (connection callbacks)."""

    def __init__(self, tick_s: float = 0.5, model_grace_s: float = 30.0) -> None:
        self._inbox: asyncio.Queue[CatalogEvent] = asyncio.Queue(maxsize=10_000)
        self._state = CatalogState()
        self.snapshot: CatalogSnapshot = EMPTY
        self._tick_s = tick_s
        self._grace_s = model_grace_s
        self.changed = asyncio.Event()

    def post_connection(self, connected: bool) -> None:
        """The broker connection changed. Never dropped: an announcement makes room."""
        while True:
            try:
                self._inbox.put_nowait(Connection(connected))
                return
            except asyncio.QueueFull:
                self._inbox.get_nowait()  # announcements repeat: the oldest is not missed

    def post_announce(self, subject: str, data: bytes) -> None:
        """An announcement on `llmfleet.hb.<worker>`: the subject's token names the worker
        (NATS permissions decide who may publish there), so a payload that names another
        worker is dropped; its TTL is clamped to `MAX_TTL_S`."""
        try:
            announce = accepted_announce(subject, p.decode_announce(data))
        except (msgspec.DecodeError, ValueError):
            return
        # Announcements repeat every heartbeat: dropping one when full loses nothing.
        with contextlib.suppress(asyncio.QueueFull):
            self._inbox.put_nowait(announce)

    async def run(self) -> None:
        while True:
            ev: CatalogEvent | None = None
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._tick_s):
                    ev = await self._inbox.get()
            self._state, changed = advance(self._state, ev, time.monotonic(), self._grace_s)
            if changed:
                self.snapshot = with_gone(self._state.live, self._state.gone)
                self.changed.set()
                self.changed = asyncio.Event()
