"""Gateways agree on ledger time whatever their own clocks say (common/clock.py)."""

from __future__ import annotations

import asyncio
import datetime as dt
import time

import pytest

from common.clock import BrokerClock
from control.keys import KeyRecord, Secret
from control.quota import Quota, QuotaExceeded
from tests.unit.test_quota import FakeKV


class _Msg:
    def __init__(self, data: bytes) -> None:
        self.data = data


class SkewedBroker:
    """Answers INFO requests with `ts` = the real time plus `skew_s`, after `delay_s`."""

    def __init__(self, skew_s: float, delay_s: float = 0.002) -> None:
        self.skew_s = skew_s
        self.delay_s = delay_s

    async def request(self, subject: str, payload: bytes, timeout: float) -> _Msg:
        await asyncio.sleep(self.delay_s)
        t = dt.datetime.fromtimestamp(time.time() + self.skew_s, dt.UTC)
        return _Msg(b'{"ts":"' + t.strftime("%Y-%m-%dT%H:%M:%S.%fZ").encode() + b'"}')


async def test_the_offset_is_the_brokers_within_half_a_round_trip() -> None:
    clock = BrokerClock(SkewedBroker(-42.0), "$JS.API.STREAM.INFO.X")
    for _ in range(3):
        await clock.probe()
    assert abs(clock.offset_s + 42.0) < 0.05
    assert abs(clock.now() - (time.time() - 42.0)) < 0.05


async def test_an_old_broker_without_ts_keeps_the_local_clock() -> None:
    class Mute(SkewedBroker):
        async def request(self, subject: str, payload: bytes, timeout: float) -> _Msg:
            return _Msg(b"{}")

    clock = BrokerClock(Mute(0), "x")
    await clock.probe()
    assert clock.offset_s == 0.0


async def test_a_fast_gateway_does_not_steal_a_slow_ones_hold() -> None:
    """Gateway b's clock is 11 s fast (a hold lives 10 s). On its own clock it reads a's
    hold as expired and runs a second request past max-parallel 1; on the broker's
    clock it does not."""
    rec = KeyRecord(name="k", secrets=(Secret(sha256="h", created_at=0),), max_parallel=1)

    def fast_local() -> float:
        return time.time() + 11.0

    slow = BrokerClock(SkewedBroker(0.0), "x")
    fast = BrokerClock(SkewedBroker(0.0), "x", local=fast_local)
    await slow.probe()
    await fast.probe()
    assert abs(fast.now() - time.time()) < 0.05

    kv = FakeKV()
    await Quota(kv, "a", clock=slow.now).admit(rec, 1)
    with pytest.raises(QuotaExceeded):
        await Quota(kv, "b", clock=fast.now).admit(rec, 1)
    # The same on b's own clock: the bound would not hold (what the broker clock fixes).
    kv = FakeKV()
    await Quota(kv, "a", clock=time.time).admit(rec, 1)
    await Quota(kv, "b", clock=fast_local).admit(rec, 1)
