"""The swap planner (control/planner.py), without an event loop: tables of fleet states and
the actions they call for, then a small discrete-time simulation of hosts, loads and
requests driven by the planner (swap counts with and without collation)."""

from __future__ import annotations

from collections import deque

import msgspec
import pytest

from control.planner import (
    DRAINING,
    LOADING,
    READY,
    Demand,
    Drain,
    Fleet,
    Host,
    Load,
    ModelSpec,
    Replica,
    Unload,
    plan,
)

ONE = ModelSpec(memory_gb=10)
MODELS = {"a": ONE, "b": ONE, "c": ONE}


def host(name: str, *replicas: Replica, capacity: float = 10, serves: str = "abc") -> Host:
    return Host(name, capacity, frozenset(serves), tuple(replicas))


def fleet(*hosts: Host, models: dict[str, ModelSpec] | None = None, **waiting: int) -> Fleet:
    demand = {m: Demand(n, oldest_since=float(i)) for i, (m, n) in enumerate(waiting.items())}
    return Fleet({h.name: h for h in hosts}, models or MODELS, demand)


# ---- tables ---------------------------------------------------------------------------


def test_a_cold_model_with_waiting_requests_is_loaded_once_on_the_roomiest_host() -> None:
    f = fleet(host("h1", capacity=10), host("h2", capacity=20), a=1)
    assert plan(f, 100.0) == [Load("h2", "a")]
    loading = fleet(host("h1"), host("h2", Replica("a", LOADING), capacity=20), a=3)
    assert plan(loading, 100.0) == []  # a load is under way: nobody else loads it


def test_a_backlog_beyond_the_replicas_loads_another_up_to_max_replicas() -> None:
    models = {"a": ModelSpec(10, max_concurrency=2, max_replicas=2)}
    busy = Replica("a", READY, running=2)
    assert plan(fleet(host("h1", busy), host("h2"), models=models, a=1), 0.0) == []
    assert plan(fleet(host("h1", busy), host("h2"), models=models, a=3), 0.0) == [Load("h2", "a")]
    both = fleet(host("h1", busy), host("h2", busy), host("h3"), models=models, a=50)
    assert plan(both, 0.0) == []  # max_replicas reached
    # scaling out never evicts: h2 is full of another model
    full = fleet(
        host("h1", busy), host("h2", Replica("b", READY)), models={**models, "b": ONE}, a=9
    )
    assert plan(full, 0.0) == []


def test_a_full_host_swaps_an_idle_model_for_a_waiting_one() -> None:
    f = fleet(host("h1", Replica("a", READY, idle_since=5.0)), b=1)
    assert plan(f, 10.0) == [Unload("h1", "a", "swap"), Load("h1", "b")]


def test_never_a_persistent_model_a_loading_one_or_a_busy_one_at_once() -> None:
    models = {**MODELS, "a": ModelSpec(10, persistent=True)}
    assert plan(fleet(host("h1", Replica("a", READY)), models=models, b=1), 10.0) == []
    assert plan(fleet(host("h1", Replica("a", LOADING)), b=1), 10.0) == []
    # a busy replica is drained first: no new requests, unloaded once idle
    busy = fleet(host("h1", Replica("a", READY, running=1)), b=1)
    assert plan(busy, 10.0) == [Drain("h1", "a")]
    draining = fleet(host("h1", Replica("a", DRAINING, running=1)), b=1)
    assert plan(draining, 11.0) == []
    drained = fleet(host("h1", Replica("a", DRAINING, running=0)), b=1)
    assert plan(drained, 12.0) == [Unload("h1", "a", "swap"), Load("h1", "b")]


def test_the_planner_evicts_what_the_fleet_loses_least() -> None:
    # h1 holds the only replica of `a`, h2 a second replica of `b`: h2 gives way
    f = fleet(
        host("h1", Replica("a", READY)),
        host("h2", Replica("b", READY)),
        host("h3", Replica("b", READY)),
        c=1,
    )
    acts = plan(f, 10.0)
    assert acts[-1] == Load(acts[0].host, "c")
    assert isinstance(acts[0], Unload) and acts[0].model == "b"
    # of two idle replicas, the one with nothing waiting, then the longest idle
    g = fleet(
        host("h1", Replica("a", READY, idle_since=1.0)),
        host("h2", Replica("b", READY, idle_since=9.0)),
        c=1,
    )
    assert plan(g, 10.0) == [Unload("h1", "a", "swap"), Load("h1", "c")]


def test_collation_keeps_a_backlog_until_the_starvation_bound() -> None:
    models = {**MODELS, "a": ModelSpec(10, max_wait_s=30)}
    f = Fleet(
        {"h1": host("h1", Replica("a", READY, running=1))},
        {**models, "b": ModelSpec(10, max_wait_s=30)},
        {"a": Demand(5, oldest_since=1.0), "b": Demand(1, oldest_since=0.0)},
    )
    assert plan(f, 10.0) == []  # a has its backlog: b waits
    assert plan(f, 30.0) == [Drain("h1", "a")]  # b waited 30 s: a drains for it
    # first come, first served: b's request is older than a's backlog, so a drains now
    assert plan(f, 10.0, collate=False) == [Drain("h1", "a")]


def test_ttl_unloads_idle_replicas_but_keeps_min_replicas_and_persistent_ones() -> None:
    models = {
        "a": ModelSpec(10, ttl_s=60),
        "b": ModelSpec(10, ttl_s=60, min_replicas=1),
        "c": ModelSpec(10, ttl_s=60, persistent=True),
    }
    hosts = [
        host("h1", Replica("a", READY, idle_since=0.0)),
        host("h2", Replica("b", READY, idle_since=0.0)),
        host("h3", Replica("c", READY, idle_since=0.0)),
    ]
    assert plan(fleet(*hosts, models=models), 59.0) == []
    assert plan(fleet(*hosts, models=models), 60.0) == [Unload("h1", "a", "ttl")]
    assert plan(fleet(*hosts, models=models, a=1), 60.0) == []  # something waits for it


def test_a_model_no_host_lists_is_left_waiting() -> None:
    f = Fleet({"h1": host("h1", serves="a")}, {"a": ONE}, {"zz": Demand(3)})
    assert plan(f, 0.0) == []
    g = fleet(host("h1", serves="a"), b=2)
    assert plan(g, 0.0) == []


# ---- simulation -----------------------------------------------------------------------


class _SimReplica(msgspec.Struct):
    model: str
    state: str
    ready_at: float
    idle_since: float
    running: list[float] = []


def simulate(
    arrivals: list[tuple[float, str]],
    capacities: list[float],
    *,
    collate: bool,
    load_s: float = 1.0,
    service_s: float = 1.0,
    step: float = 0.05,
    limit_s: float = 600.0,
) -> dict[str, int]:
    """Hosts that fit `capacities` GB, models of 10 GB and one slot each; every request
    takes `service_s`, every load `load_s`. Each tick: arrivals, loads and requests that
    finish, then the planner's actions, then free slots take the oldest waiting request
    of their model. Returns the counts of loads, swaps and completed requests."""
    pending = deque(sorted(arrivals))
    queues: dict[str, deque[float]] = {m: deque() for m in MODELS}
    hosts = {f"h{i}": list[_SimReplica]() for i in range(len(capacities))}
    caps = {f"h{i}": c for i, c in enumerate(capacities)}
    counts = {"loads": 0, "swaps": 0, "completed": 0}
    t = 0.0
    while t < limit_s and (pending or any(queues.values()) or _busy(hosts)):
        while pending and pending[0][0] <= t:
            at, model = pending.popleft()
            queues[model].append(at)
        for rs in hosts.values():
            for r in rs:
                if r.state == LOADING and r.ready_at <= t:
                    r.state, r.idle_since = READY, t
                done = [f for f in r.running if f <= t]
                if done:
                    counts["completed"] += len(done)
                    r.running = [f for f in r.running if f > t]
                    if not r.running:
                        r.idle_since = t
        snapshot = Fleet(
            {
                h: Host(
                    h,
                    caps[h],
                    frozenset(MODELS),
                    tuple(Replica(r.model, r.state, len(r.running), r.idle_since) for r in rs),
                )
                for h, rs in hosts.items()
            },
            MODELS,
            {m: Demand(len(q), q[0]) for m, q in queues.items() if q},
        )
        for act in plan(snapshot, t, collate=collate):
            rs = hosts[act.host]
            match act:
                case Unload():
                    rs.remove(next(r for r in rs if r.model == act.model))
                    counts["swaps"] += act.reason == "swap"
                case Drain():
                    next(r for r in rs if r.model == act.model).state = DRAINING
                case Load():
                    rs.append(_SimReplica(act.model, LOADING, t + load_s, t))
                    counts["loads"] += 1
        for rs in hosts.values():
            for r in rs:
                if r.state == READY and not r.running and queues[r.model]:
                    queues[r.model].popleft()
                    r.running.append(t + service_s)
        t = round(t + step, 6)
    assert not pending and not any(queues.values()), "the simulation ran out of time"
    return counts


def _busy(hosts: dict[str, list[_SimReplica]]) -> bool:
    return any(r.running for rs in hosts.values() for r in rs)


ABCABC = [(i * 0.01, m) for i, m in enumerate("abcabc")]


@pytest.mark.parametrize(("collate", "swaps"), [(True, 2), (False, 5)])
def test_abcabc_on_a_host_that_fits_one_model(collate: bool, swaps: int) -> None:
    """A A B B C C with collation (2 swaps); first come, first served: A B C A B C (5)."""
    counts = simulate(ABCABC, [10], collate=collate)
    assert counts == {"loads": swaps + 1, "swaps": swaps, "completed": 6}


def test_two_hosts_three_interleaved_models_collate_with_fewer_swaps() -> None:
    arrivals = [(i * 0.2, "abc"[i % 3]) for i in range(30)]
    collated = simulate(arrivals, [10, 10], collate=True)
    fcfs = simulate(arrivals, [10, 10], collate=False)
    assert collated["completed"] == fcfs["completed"] == 30
    assert collated["swaps"] < fcfs["swaps"], (collated, fcfs)


def test_a_host_that_fits_everything_never_swaps() -> None:
    counts = simulate([(i * 0.1, "abc"[i % 3]) for i in range(12)], [30], collate=True)
    assert counts == {"loads": 3, "swaps": 0, "completed": 12}
