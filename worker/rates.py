"""Request and token rates over a sliding window, from the runners' cumulative counters.

Owned by the worker's heartbeat task (the only caller of `observe`); the announcement
reads `rates()`. Pure bookkeeping: no I/O, no clock of its own.
"""

from __future__ import annotations

from collections import deque

import msgspec


class Totals(msgspec.Struct, frozen=True):
    completed: int = 0
    tokens_out: int = 0


class Rate(msgspec.Struct, frozen=True):
    req_per_s: float = 0.0
    tokens_per_s: float = 0.0


class RateWindow:
    """Rates per key over the last `window_s` seconds (at least two samples apart)."""

    def __init__(self, window_s: float = 10.0, max_samples: int = 64) -> None:
        self.window_s = window_s
        self._samples: deque[tuple[float, dict[str, Totals]]] = deque(maxlen=max_samples)

    def observe(self, now: float, totals: dict[str, Totals]) -> None:
        self._samples.append((now, dict(totals)))
        while len(self._samples) > 2 and now - self._samples[1][0] >= self.window_s:
            self._samples.popleft()

    def rates(self) -> dict[str, Rate]:
        if len(self._samples) < 2:
            return {}
        (t0, first), (t1, last) = self._samples[0], self._samples[-1]
        dt = t1 - t0
        if dt <= 0:
            return {}
        out = {}
        for key, now_totals in last.items():
            before = first.get(key, Totals())
            out[key] = Rate(
                req_per_s=max(0, now_totals.completed - before.completed) / dt,
                tokens_per_s=max(0, now_totals.tokens_out - before.tokens_out) / dt,
            )
        return out
