"""The broker's clock, as read from its JetStream API answers (their `ts` field)."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from collections.abc import Callable
from typing import Any

import msgspec

log = logging.getLogger(__name__)


def parse_rfc3339_ns(text: str) -> int:
    """`2026-12-01T23:49:03.503307644Z` (the broker's `ts`) in unix ns; ValueError if not."""
    if not text.endswith("Z"):
        raise ValueError(f"not a UTC RFC 3339 time: {text[:40]!r}")
    head, _, frac = text[:-1].partition(".")
    if frac and not frac.isdigit():
        raise ValueError(f"not a UTC RFC 3339 time: {text[:40]!r}")
    base = dt.datetime.strptime(head, "%Y-%m-%dT%H:%M:%S").replace(tzinfo=dt.UTC)
    return int(base.timestamp()) * 10**9 + int((frac + "000000000")[:9])


class BrokerClock:
    """The broker's time for this process: local time plus an offset measured from the
    `ts` of a JetStream API answer (`api` is any cheap INFO subject this process may
    ask), estimated as the broker's stamp minus the midpoint of the round trip, keeping
    the sample with the shortest round trip of the last `keep` probes (error: at most
    half that round trip).

    Gateways stamp the fleet-wide quota ledgers with it (control/quota.py): with each
    gateway's own clock, one running 11 s fast would read another's concurrency holds
    as expired, and one a minute fast would age out another's rate-limit windows."""

    def __init__(
        self, nc: Any, api: str, keep: int = 10, local: Callable[[], float] = time.time
    ) -> None:
        self._nc = nc
        self._local = local
        self._api = api
        self._keep = keep
        self._samples: list[tuple[float, float]] = []  # (round trip, offset) in seconds
        self.offset_s = 0.0

    def now(self) -> float:
        return self._local() + self.offset_s

    async def probe(self) -> None:
        """One sample; raises what the request raises (the caller logs it)."""
        t0 = self._local()
        msg = await self._nc.request(self._api, b"", timeout=2.0)
        t1 = self._local()
        ts = _TS.decode(msg.data).ts
        if not ts:
            return  # a broker too old to stamp its answers: keep the local clock
        broker = parse_rfc3339_ns(ts) / 1e9
        self._samples = [*self._samples[-(self._keep - 1) :], (t1 - t0, broker - (t0 + t1) / 2)]
        self.offset_s = min(self._samples)[1]

    async def run(self, every_s: float = 30.0) -> None:
        """Probe every `every_s` until cancelled (the first probe is the caller's)."""
        while True:
            await asyncio.sleep(every_s)
            try:
                await self.probe()
            except Exception as exc:
                log.warning("broker clock probe failed: %s", exc)


class _Stamped(msgspec.Struct):
    ts: str = ""


_TS = msgspec.json.Decoder(_Stamped)
