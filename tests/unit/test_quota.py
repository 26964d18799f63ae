"""Fleet-wide limits from leases: two `Quota`s (two gateways) on one ledger.

The ledger is an in-memory stand-in for a KV bucket with compare-and-set (get / create /
update with the last revision), yielding between the read and the write so that the two
gateways really interleave; the integration tests run the same through a real broker
(tests/e2e/test_limits_fleet.py)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import nats.js.errors
import pytest

from common.errors import ServiceUnavailable
from control import ledger as L
from control.keys import KeyRecord, Secret
from control.quota import BudgetExhausted, Quota, QuotaExceeded, QuotaSettings


@dataclass
class _Entry:
    value: bytes
    revision: int


class FakeKV:
    def __init__(self) -> None:
        self.data: dict[str, _Entry] = {}
        self.rev = 0
        self.down = False
        self.writes = 0

    async def get(self, key: str) -> _Entry:
        await asyncio.sleep(0)
        if self.down:
            raise nats.js.errors.ServiceUnavailableError()
        if key not in self.data:
            raise nats.js.errors.KeyNotFoundError()
        return self.data[key]

    async def create(self, key: str, value: bytes) -> int:
        await asyncio.sleep(0)
        if key in self.data:
            raise nats.js.errors.KeyWrongLastSequenceError()
        return self._put(key, value)

    async def update(self, key: str, value: bytes, last: int) -> int:
        await asyncio.sleep(0)
        if self.data[key].revision != last:
            raise nats.js.errors.KeyWrongLastSequenceError()
        return self._put(key, value)

    def _put(self, key: str, value: bytes) -> int:
        self.rev += 1
        self.writes += 1
        self.data[key] = _Entry(value, self.rev)
        return self.rev

    def window_used(self, key: str, now_s: int) -> int:
        return L.window_used(L.WINDOW_DECODER.decode(self.data[key].value), now_s)


class Clock:
    def __init__(self) -> None:
        self.t = 1_800_000_000.0  # 2027-01-15 08:00 UTC

    def __call__(self) -> float:
        return self.t


def _key(**kw: Any) -> KeyRecord:
    return KeyRecord(name="k", secrets=(Secret(sha256="h", created_at=0.0),), **kw)


def _pair(kv: FakeKV, clock: Clock) -> tuple[Quota, Quota]:
    return Quota(kv, "gw-a", clock=clock), Quota(kv, "gw-b", clock=clock)


async def _try(q: Quota, rec: KeyRecord, tokens: int = 10) -> Any:
    try:
        return await q.admit(rec, tokens)
    except (QuotaExceeded, BudgetExhausted) as exc:
        return exc


async def test_rpm_holds_exactly_across_two_gateways_at_small_limits() -> None:
    kv, clock = FakeKV(), Clock()
    a, b = _pair(kv, clock)
    rec = _key(rpm=10)
    results = await asyncio.gather(*[_try(a if i % 2 else b, rec) for i in range(30)])
    admitted = [r for r in results if not isinstance(r, Exception)]
    refused = [r for r in results if isinstance(r, QuotaExceeded)]
    assert len(admitted) == 10 and len(refused) == 20
    assert all(r.retry_after and r.retry_after >= 1 for r in refused)
    assert refused[0].code == "rate_limit_exceeded" and refused[0].type == "requests"
    # 61 s later the window is empty again.
    clock.t += 62
    assert not isinstance(await _try(a, rec), Exception)


async def test_rpm_overshoot_is_at_most_one_lease_per_gateway() -> None:
    kv, clock = FakeKV(), Clock()
    a, b = _pair(kv, clock)
    rec = _key(rpm=200)  # leases of 10
    results = await asyncio.gather(*[_try(a if i % 2 else b, rec) for i in range(400)])
    admitted = sum(1 for r in results if not isinstance(r, Exception))
    lease = int(200 * QuotaSettings().lease_fraction)
    assert 200 - 2 * lease <= admitted <= 200  # granted never exceeds the limit
    assert kv.window_used("k.rpm", int(clock.t)) <= 200


async def test_a_request_refused_by_one_limit_consumes_nothing_from_the_others() -> None:
    """LiteLLM #39309: a request refused by tpm had used up rpm."""
    kv, clock = FakeKV(), Clock()
    q = Quota(kv, "gw", clock=clock)
    rec = _key(rpm=2, tpm=100)
    t1 = await q.admit(rec, 80)
    refused = await _try(q, rec, 80)
    assert isinstance(refused, QuotaExceeded) and refused.type == "tokens"
    q.settle(t1, 10, 10)
    assert not isinstance(await _try(q, rec, 10), Exception)  # rpm: the 2nd request
    assert isinstance(await _try(q, rec, 10), QuotaExceeded)  # and no 3rd


async def test_max_parallel_is_never_exceeded_fleet_wide() -> None:
    kv, clock = FakeKV(), Clock()
    a, b = _pair(kv, clock)
    rec = _key(max_parallel=2)
    gateways = [a if i % 2 else b for i in range(6)]
    results = await asyncio.gather(*[_try(q, rec) for q in gateways])
    running = [
        (r, q) for r, q in zip(results, gateways, strict=True) if not isinstance(r, Exception)
    ]
    assert len(running) == 2
    assert all(isinstance(r, QuotaExceeded) for r in results if isinstance(r, Exception))
    # One ends: its slot lingers at its gateway, then goes back to the ledger.
    ticket, owner = running[0]
    owner.settle(ticket, 1, 1)
    clock.t += QuotaSettings().linger_s + 0.1
    await a.sweep()
    await b.sweep()
    again = await asyncio.gather(_try(a, rec), _try(b, rec))
    assert sum(1 for r in again if not isinstance(r, Exception)) == 1


async def test_a_dead_gateways_hold_expires() -> None:
    kv, clock = FakeKV(), Clock()
    a, b = _pair(kv, clock)
    rec = _key(max_parallel=1)
    await a.admit(rec, 1)  # gateway a dies holding it (never settles, never renews)
    assert isinstance(await _try(b, rec), QuotaExceeded)
    clock.t += QuotaSettings().hold_ttl_s + 0.1
    assert not isinstance(await _try(b, rec), Exception)


async def test_budget_is_never_exceeded_by_concurrent_requests() -> None:
    kv, clock = FakeKV(), Clock()
    a, b = _pair(kv, clock)
    rec = _key(budget_tokens=1000, budget_period="day")
    results = await asyncio.gather(*[_try(a if i % 2 else b, rec, 300) for i in range(10)])
    tickets = [
        (r, q) for r, q in zip(results, [b, a] * 5, strict=True) if not isinstance(r, Exception)
    ]
    assert len(tickets) == 3  # 3 x 300 <= 1000 < 4 x 300
    refused = [r for r in results if isinstance(r, Exception)]
    assert all(isinstance(r, BudgetExhausted) and r.code == "insufficient_quota" for r in refused)
    for t, q in tickets:
        q.settle(t, 50, 50)  # each used 100 of its 300
    clock.t += 2
    for q in (a, b):
        await q.sweep()
        await q.flush_usage()
    budget = L.BUDGET_DECODER.decode(kv.data["k.btok.d20270115"].value)
    assert budget.granted == 300  # what was really used; the rest came back
    day = L.USAGE_DECODER.decode(kv.data["k.use.d20270115"].value)
    assert (day.requests, day.prompt_tokens, day.completion_tokens) == (3, 150, 150)
    assert L.USAGE_DECODER.decode(kv.data["k.use.total"].value).requests == 3


async def test_usage_beyond_the_reservation_is_charged() -> None:
    kv, clock = FakeKV(), Clock()
    q = Quota(kv, "gw", clock=clock)
    rec = _key(tpm=1000)
    t = await q.admit(rec, 100)
    q.settle(t, 150, 150)  # a tokenizer counted more than the reservation
    await q.sweep()
    assert kv.window_used("k.tpm", int(clock.t)) >= 300


async def test_an_unreachable_ledger_fails_closed() -> None:
    kv, clock = FakeKV(), Clock()
    q = Quota(kv, "gw", clock=clock)
    kv.down = True
    with pytest.raises(ServiceUnavailable) as err:
        await q.admit(_key(rpm=5), 1)
    assert err.value.code == "limits_unavailable"


async def test_idle_leases_go_back_to_the_ledger() -> None:
    kv, clock = FakeKV(), Clock()
    a, _ = _pair(kv, clock)
    rec = _key(rpm=100)  # leases of 5
    await a.admit(rec, 1)
    assert kv.window_used("k.rpm", int(clock.t)) == 5
    clock.t += QuotaSettings().linger_s + 0.1
    await a.sweep()
    assert kv.window_used("k.rpm", int(clock.t)) == 1  # 4 unused came back


async def test_rate_limit_headers() -> None:
    kv, clock = FakeKV(), Clock()
    q = Quota(kv, "gw", clock=clock)
    t = await q.admit(_key(rpm=3, tpm=1000), 100)
    h = dict(t.headers)
    assert h[b"x-ratelimit-limit-requests"] == b"3"
    assert h[b"x-ratelimit-remaining-requests"] == b"2"
    assert h[b"x-ratelimit-limit-tokens"] == b"1000"
    assert int(h[b"x-ratelimit-remaining-tokens"]) <= 900
    assert h[b"x-ratelimit-reset-requests"].endswith(b"s")


async def test_settled_reservations_go_back_to_the_window_they_came_from() -> None:
    kv, clock = FakeKV(), Clock()
    q = Quota(kv, "gw", clock=clock)
    rec = _key(tpm=10_000)
    t = await q.admit(rec, 5000)
    clock.t += 3  # the request ran 3 s: its unused tokens still belong to their grant second
    q.settle(t, 60, 40)
    clock.t += QuotaSettings().linger_s + 0.1
    await q.sweep()
    assert kv.window_used("k.tpm", int(clock.t)) == 100  # what was used, not reserved


async def test_local_lots_stay_bounded_under_load() -> None:
    kv, clock = FakeKV(), Clock()
    q = Quota(kv, "gw", clock=clock)
    rec = _key(rpm=10**9, tpm=10**12)
    for i in range(3000):
        if i % 50 == 0:
            clock.t += 0.5
        t = await q.admit(rec, 200)
        q.settle(t, 10, 10)
    lease = q._leases["k.tpm"]
    assert len(lease.lots) <= 62  # at most one per second of the window
