"""The pure circuit breaker (common/breaker.py): its transitions as functions of a circuit
and the time, the backoff, the one probe of a half-open circuit, and `Breakers`."""

from __future__ import annotations

import pytest

from common.breaker import (
    CLOSED,
    HALF_OPEN,
    OPEN,
    Breakers,
    BreakerSettings,
    Circuit,
    available,
    backoff_s,
    on_abandon,
    on_failure,
    on_success,
    state_at,
    try_pass,
    view,
)

S = BreakerSettings(threshold=3, base_s=5.0, max_s=60.0)
T = 1000.0  # "now", on the caller's monotonic clock


def opened(at: float = T, trips: int = 1) -> Circuit:
    return Circuit(OPEN, 3, trips, at + backoff_s(trips, S), "boom")


def half_open_probing() -> Circuit:
    allowed, probe, c = try_pass(opened(), T + 5.0)
    assert allowed and probe
    return c


@pytest.mark.parametrize(
    ("before", "event", "state", "failures", "trips"),
    [
        # closed: failures count up to the threshold, a success resets them
        (Circuit(), "failure", CLOSED, 1, 0),
        (Circuit(failures=1), "failure", CLOSED, 2, 0),
        (Circuit(failures=2), "failure", OPEN, 3, 1),
        (Circuit(failures=2), "success", CLOSED, 0, 0),
        # open (backoff not over): a late failure is noted, a late success changes nothing
        (opened(), "failure", OPEN, 4, 1),
        (opened(), "success", OPEN, 3, 1),
        # half-open with its probe out: the probe decides
        (half_open_probing(), "probe_success", CLOSED, 0, 0),
        (half_open_probing(), "probe_failure", OPEN, 4, 2),
        (half_open_probing(), "success", HALF_OPEN, 3, 1),  # not the probe: no verdict
        (half_open_probing(), "failure", OPEN, 4, 2),  # any failure while half-open
    ],
)
def test_transitions(before: Circuit, event: str, state: str, failures: int, trips: int) -> None:
    now = T + 5.0 if before.state == HALF_OPEN else T + 1.0
    match event:
        case "failure":
            after = on_failure(before, now, "x", S)
        case "probe_failure":
            after = on_failure(before, now, "x", S, probe=True)
        case "success":
            after = on_success(before)
        case _:
            after = on_success(before, probe=True)
    assert (after.state, after.failures, after.trips) == (state, failures, trips)


def test_the_threshold_opens_for_the_base_backoff() -> None:
    c = Circuit()
    for i in range(3):
        c = on_failure(c, T, f"e{i}", S)
    assert c.state == OPEN and c.reopen_at == T + 5.0 and c.last_error == "e2"
    assert state_at(c, T + 4.9) == OPEN and not available(c, T + 4.9)
    assert state_at(c, T + 5.0) == HALF_OPEN and available(c, T + 5.0)


def test_backoff_doubles_up_to_the_max() -> None:
    assert [backoff_s(t, S) for t in range(1, 7)] == [5.0, 10.0, 20.0, 40.0, 60.0, 60.0]
    assert backoff_s(0, S) == 5.0
    assert backoff_s(100_000, S) == 60.0  # days of failed probes: no float overflow
    c, now = opened(), T
    for want in (10.0, 20.0, 40.0, 60.0, 60.0):  # each failed probe doubles the wait
        now = c.reopen_at
        _, probe, c = try_pass(c, now)
        c = on_failure(c, now, "still down", S, probe=probe)
        assert c.state == OPEN and c.reopen_at - now == want


def test_half_open_lets_exactly_one_probe_through() -> None:
    c = opened()
    assert try_pass(c, T + 1.0) == (False, False, c)  # still open
    allowed, probe, c = try_pass(c, T + 5.0)
    assert (allowed, probe, c.state, c.probing) == (True, True, HALF_OPEN, True)
    assert try_pass(c, T + 5.1)[:2] == (False, False)  # the probe is out
    assert not available(c, T + 5.1)
    closed = on_success(c, probe=True)
    assert closed.state == CLOSED and closed.failures == 0 and closed.trips == 0
    assert try_pass(closed, T + 5.2)[:2] == (True, False)  # closed: no probe, no limit


def test_an_abandoned_probe_lets_another_request_probe() -> None:
    c = half_open_probing()
    assert on_abandon(c, probe=False) == c  # not the probe: nothing
    c = on_abandon(c, probe=True)
    assert c.state == HALF_OPEN and not c.probing
    assert try_pass(c, T + 6.0)[:2] == (True, True)
    assert on_abandon(Circuit(), probe=True) == Circuit()


def test_view() -> None:
    c = opened()
    assert view(c, T + 1.0).state == OPEN and view(c, T + 1.0).reopen_in_s == 4.0
    assert view(c, T + 1.0).failures == 3 and view(c, T + 1.0).last_error == "boom"
    assert view(c, T + 6.0).state == HALF_OPEN and view(c, T + 6.0).reopen_in_s == 0.0
    assert view(Circuit(), T).state == CLOSED


def test_breakers_keep_one_circuit_per_key_and_count_openings() -> None:
    b = Breakers(S, max_keys=2)
    assert b.state("m", T) == CLOSED and b.try_pass("m", T) == (True, False)
    assert b.views(T) == {}  # closed and clean: nothing remembered
    for _ in range(3):
        b.failure("m", T, "down")
    assert b.state("m", T) == OPEN and b.opened == 1
    b.failure("m", T + 1.0, "down")  # noted while open: not another opening
    assert b.opened == 1 and b.get("m").failures == 4
    assert b.try_pass("m", T + 1.0) == (False, False)
    assert b.try_pass("m", T + 5.0) == (True, True)
    b.failure("m", T + 5.5, "down", probe=True)  # re-opened, doubled
    assert b.opened == 2 and b.get("m").reopen_at == T + 15.5
    assert b.try_pass("m", T + 15.5) == (True, True)
    b.success("m", probe=True)
    assert b.state("m", T + 16.0) == CLOSED and b.opened == 2
    assert b.views(T + 16.0)["m"].last_error == "down"  # kept for the operator
    b.success("other")  # unknown: closed, nothing stored
    assert set(b.views(T)) == {"m"}
    b.failure("k2", T, "x")
    b.failure("k3", T, "x")  # beyond max_keys: not remembered (treated as closed)
    assert set(b.views(T)) == {"m", "k2"} and b.state("k3", T) == CLOSED
