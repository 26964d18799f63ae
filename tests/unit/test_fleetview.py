"""Pure decisions behind `llmfleet status` and the worker's rates: expiry, model status,
sums per model, queues of models no worker serves, worker-name prefixes."""

from __future__ import annotations

from common import protocol as p
from common.queue import QueueDepth
from llmfleet.fleetview import (
    Seen,
    build_view,
    duration,
    gateway_rows,
    live,
    model_status,
    resolve_worker,
)
from worker.rates import RateWindow, Totals


def _announce(
    worker: str, state: str = "ready", **models: tuple[int, int, bool]
) -> p.WorkerAnnounce:
    return p.WorkerAnnounce(
        worker=worker,
        host=f"host-{worker}",
        version="0.1.0",
        state=state,
        ttl_s=3.0,
        started_at=0.0,
        models=[
            p.ModelStatus(
                id=m,
                engine="sim",
                max_concurrency=slots,
                in_flight=busy,
                loaded=loaded,
                completed=10,
                failed=1,
                tokens_per_s=5.0,
                req_per_s=0.5,
            )
            for m, (slots, busy, loaded) in models.items()
        ],
        failed=1,
    )


def test_expired_and_stopped_workers_are_not_live() -> None:
    seen = {
        "fresh": Seen(_announce("fresh", m=(1, 0, True)), at=100.0),
        "old": Seen(_announce("old", m=(1, 0, True)), at=96.9),
        "gone": Seen(_announce("gone", "stopped", m=(1, 0, True)), at=100.0),
    }
    assert set(live(seen, now=100.0)) == {"fresh"}
    assert set(live(seen, now=99.0)) == {"fresh", "old"}


def test_model_status_from_worker_states() -> None:
    assert model_status([("ready", True), ("starting", False)]) == "ready"
    assert model_status([("starting", False)]) == "loading"
    assert model_status([("ready", False)]) == "loading"
    assert model_status([("draining", True)]) == "draining"
    assert model_status([]) == "unavailable"


def test_view_sums_per_model_and_lists_queues_without_workers() -> None:
    seen = {
        "a": Seen(_announce("a", m=(4, 3, True), e=(2, 0, True)), at=10.0),
        "b": Seen(_announce("b", m=(8, 1, True)), at=10.0),
    }
    depths = {
        "m": QueueDepth(model="m", pending=7, starting=1, oldest_wait_s=2.5),
        "orphan": QueueDepth(model="orphan", pending=3, oldest_wait_s=9.0),
    }
    view = build_view(seen, depths, now=11.0)
    rows = {r.model: r for r in view.models}
    assert list(rows) == ["e", "m", "orphan"]
    m = rows["m"]
    assert (m.status, m.workers, m.slots_used, m.slots_total) == ("ready", 2, 4, 12)
    assert (m.queued, m.starting, m.oldest_wait_s) == (7, 1, 2.5)
    assert (m.completed, m.errors, m.tokens_per_s, m.req_per_s) == (20, 2, 10.0, 1.0)
    orphan = rows["orphan"]
    assert (orphan.status, orphan.workers, orphan.queued) == ("unavailable", 0, 3)
    workers = {w.worker: w for w in view.workers}
    assert (workers["a"].slots_used, workers["a"].slots_total) == (3, 6)
    assert workers["a"].models == ["m", "e"]
    assert workers["b"].last_seen_s == 1.0


def test_resolve_worker_by_unique_prefix() -> None:
    ids = ["gpu-1-aaaa", "gpu-1-bbbb", "gpu-2-cccc"]
    assert resolve_worker("gpu-2", ids) == "gpu-2-cccc"
    assert resolve_worker("gpu-1", ids) is None  # ambiguous
    assert resolve_worker("gpu-1-bbbb", ids) == "gpu-1-bbbb"
    assert resolve_worker("cpu", ids) is None


def test_duration_formats() -> None:
    assert duration(0.25) == "0.2s"
    assert duration(42) == "42s"
    assert duration(185) == "3m05s"
    assert duration(7620) == "2h07m"
    assert duration(3 * 86400 + 4 * 3600) == "3d04h"


def test_rate_window_uses_the_last_window_only() -> None:
    w = RateWindow(window_s=10.0)
    assert w.rates() == {}
    w.observe(0.0, {"m": Totals(completed=0, tokens_out=0)})
    w.observe(5.0, {"m": Totals(completed=50, tokens_out=500)})
    r = w.rates()["m"]
    assert (r.req_per_s, r.tokens_per_s) == (10.0, 100.0)
    # Idle for a long time: old samples leave the window and the rate falls to zero.
    for t in range(6, 40):
        w.observe(float(t), {"m": Totals(completed=50, tokens_out=500)})
    r = w.rates()["m"]
    assert (r.req_per_s, r.tokens_per_s) == (0.0, 0.0)


def test_gateway_rows_drop_stopped_and_expired_gateways() -> None:
    def g(name: str, state: str = "ready") -> Seen[p.GatewayAnnounce]:
        a = p.GatewayAnnounce(gateway=name, host="h", version="0.1.0", state=state, ttl_s=7.0)
        return Seen(a, at=100.0)

    seen = {"a": g("a"), "b": g("b", "stopped"), "c": g("c", "draining")}
    assert [r.gateway for r in gateway_rows(seen, now=101.0)] == ["a", "c"]
    assert gateway_rows(seen, now=108.0) == []
    view = build_view({}, {}, now=101.0, gateways=seen)
    assert [r.gateway for r in view.gateways] == ["a", "c"]


def test_a_model_is_unhealthy_when_every_ready_worker_or_a_gateway_has_it_open() -> None:
    import msgspec  # noqa: PLC0415

    def with_circuit(a: p.WorkerAnnounce, state: str) -> p.WorkerAnnounce:
        models = [msgspec.structs.replace(m, circuit=state) for m in a.models]
        return msgspec.structs.replace(a, models=models)

    w1 = with_circuit(_announce("w1", m=(2, 0, True)), "open")
    w2 = _announce("w2", m=(2, 0, True))
    one_open = {"w1": Seen(w1, 100.0), "w2": Seen(w2, 100.0)}
    (row,) = build_view(one_open, {}, now=100.5).models
    assert (row.status, row.circuits_open) == ("ready", 1)
    both = {**one_open, "w2": Seen(with_circuit(w2, "open"), 100.0)}
    (row,) = build_view(both, {}, now=100.5).models
    assert (row.status, row.circuits_open) == ("unhealthy", 2)
    gw = p.GatewayAnnounce(
        gateway="g1", host="h", version="0.1.0", state="ready", ttl_s=7.0, unhealthy=["m"]
    )
    (row,) = build_view(one_open, {}, now=100.5, gateways={"g1": Seen(gw, 100.0)}).models
    assert (row.status, row.unhealthy_at) == ("unhealthy", ["g1"])
