"""The catalog's decisions (gateway/catalog.py `advance`), without an event loop: the hold
while the gateway is cut off from the broker and after it reconnects, and the grace period
of a model whose last worker left."""

from __future__ import annotations

from common import protocol as p
from gateway.catalog import RECONNECT_HOLD_S, CatalogState, Connection, advance, with_gone

GRACE = 30.0


def _ann(worker: str, state: str = "ready", ttl: float = 3.0) -> p.WorkerAnnounce:
    return p.WorkerAnnounce(
        worker=worker,
        host="h",
        version="1",
        state=state,
        ttl_s=ttl,
        started_at=0.0,
        models=[p.ModelStatus(id="m", engine="sim", max_concurrency=2, created=10)],
    )


def _run(events: list[tuple[float, p.WorkerAnnounce | Connection | None]]) -> CatalogState:
    state = CatalogState()
    for now, ev in events:
        state, _ = advance(state, ev, now, GRACE)
    return state


def _status(state: CatalogState) -> str | None:
    entry = with_gone(state.live, state.gone).lookup("m")
    return None if entry is None else entry.status


def test_an_announcement_lists_the_model_and_changes_the_snapshot() -> None:
    state, changed = advance(CatalogState(), _ann("a"), 0.0, GRACE)
    assert changed and _status(state) == "ready"
    state, changed = advance(state, None, 0.5, GRACE)
    assert not changed  # a tick with nothing new


def test_a_silent_worker_expires_when_its_ttl_passes() -> None:
    assert _status(_run([(0.0, _ann("a")), (2.9, None)])) == "ready"
    assert _status(_run([(0.0, _ann("a")), (3.1, None)])) == "unavailable"  # in its grace


def test_nothing_expires_while_the_gateway_is_cut_off() -> None:
    state = _run([(0.0, _ann("a")), (1.0, Connection(False)), (60.0, None)])
    assert _status(state) == "ready"  # silence says nothing about the workers then
    assert not state.connected


def test_after_a_reconnect_workers_get_a_hold_to_announce_again() -> None:
    events: list[tuple[float, p.WorkerAnnounce | Connection | None]] = [
        (0.0, _ann("a")),
        (1.0, Connection(False)),
        (60.0, Connection(True)),
    ]
    assert _status(_run([*events, (60.0 + RECONNECT_HOLD_S - 0.1, None)])) == "ready"
    gone = _run([*events, (60.0 + RECONNECT_HOLD_S + 1.0, None)])
    assert _status(gone) == "unavailable"  # it never announced again
    back = _run([*events, (61.0, _ann("a")), (62.5, None)])
    assert _status(back) == "ready"


def test_a_model_without_workers_stays_listed_for_its_grace_then_goes() -> None:
    left = [(0.0, _ann("a")), (1.0, _ann("a", state="stopped"))]
    assert _status(_run(left)) == "unavailable"
    assert _status(_run([*left, (1.0 + GRACE - 0.5, None)])) == "unavailable"
    assert _status(_run([*left, (1.0 + GRACE + 0.5, None)])) is None


def test_a_worker_back_within_the_grace_makes_the_model_ready_again() -> None:
    state = _run([(0.0, _ann("a")), (1.0, _ann("a", state="stopped")), (5.0, _ann("b"))])
    assert _status(state) == "ready" and state.gone == {}


def test_a_loading_worker_lists_the_model_as_loading_with_no_slots() -> None:
    state = _run([(0.0, _ann("a", state="starting"))])
    entry = state.live.lookup("m")
    assert entry is not None and entry.status == "loading" and entry.slots == 0
