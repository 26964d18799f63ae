"""Circuit breakers: per model at each gateway, per model on each worker (its upstream).

    closed ──N failures in a row──> open ──backoff passes──> half_open
      ^                              ^                          │ one probe at a time
      └──────── probe succeeded ─────┼──── probe failed ────────┘ (backoff doubles)

The transitions are pure functions of a frozen `Circuit` and the time (`time.monotonic()`
of the caller), so they are unit-tested without an event loop. `Breakers` keeps one circuit
per key for its owner (a gateway's request tasks, a worker's runner), which changes them
only in synchronous stretches on its event loop: no lock, no read that gates a mutation
across an `await`.

Failures that count are decided by the caller (upstream 5xx and 429, a lost worker, a
broken stream, a queue timeout); answers to the client's own mistakes (4xx) are successes
for the breaker: the model answered.
"""

from __future__ import annotations

import msgspec

CLOSED = "closed"
OPEN = "open"
HALF_OPEN = "half_open"
STATES = (CLOSED, HALF_OPEN, OPEN)  # also the gauge's values: 0, 1, 2


class BreakerSettings(msgspec.Struct, frozen=True):
    threshold: int = 3  # failures in a row that open the circuit
    base_s: float = 5.0  # the first open period
    max_s: float = 60.0  # the backoff doubles up to this


class Circuit(msgspec.Struct, frozen=True):
    state: str = CLOSED
    failures: int = 0  # in a row (reset by a success)
    trips: int = 0  # times opened since it was last closed (the backoff's exponent)
    reopen_at: float = 0.0  # while open: when a probe may go (caller's monotonic clock)
    last_error: str = ""
    probing: bool = False  # half-open: the one probe is out


def backoff_s(trips: int, s: BreakerSettings) -> float:
    """The open period after the `trips`-th opening in a row (1: base_s)."""
    # The exponent is capped: a circuit re-opened for days would otherwise overflow the
    # float (2 ** 1024), and 2 ** 62 already exceeds any sensible max_s / base_s.
    return float(min(s.max_s, s.base_s * 2 ** min(62, max(0, trips - 1))))


def state_at(c: Circuit, now: float) -> str:
    """The state as seen at `now`: an open circuit whose backoff passed is half-open."""
    if c.state == OPEN and now >= c.reopen_at:
        return HALF_OPEN
    return c.state


def available(c: Circuit, now: float) -> bool:
    """Would a request be let through now (closed, or half-open with no probe out)?"""
    st = state_at(c, now)
    return st == CLOSED or (st == HALF_OPEN and not c.probing)


def try_pass(c: Circuit, now: float) -> tuple[bool, bool, Circuit]:
    """(allowed, is_probe, circuit after). Half-open lets exactly one probe through."""
    st = state_at(c, now)
    if st == CLOSED:
        return True, False, c
    if st == HALF_OPEN and not c.probing:
        return True, True, msgspec.structs.replace(c, state=HALF_OPEN, probing=True)
    return False, False, c


def on_success(c: Circuit, probe: bool = False) -> Circuit:
    """A request (or the probe) succeeded: a probe closes the circuit; a success while
    closed resets the run of failures. A success reported by a request let through
    before the circuit opened changes nothing else."""
    if probe:
        return Circuit(last_error=c.last_error)
    if c.state == CLOSED and c.failures:
        return msgspec.structs.replace(c, failures=0)
    return c


def on_failure(
    c: Circuit, now: float, error: str, s: BreakerSettings, probe: bool = False
) -> Circuit:
    """A failure: the N-th in a row opens the circuit; a failed probe (or any failure
    while half-open) re-opens it with the backoff doubled."""
    failures = c.failures + 1
    if probe or state_at(c, now) == HALF_OPEN:
        trips = c.trips + 1
        return Circuit(OPEN, failures, trips, now + backoff_s(trips, s), error)
    if c.state == OPEN:  # a request let through before it opened: noted, nothing more
        return msgspec.structs.replace(c, failures=failures, last_error=error)
    if failures >= s.threshold:
        trips = c.trips + 1
        return Circuit(OPEN, failures, trips, now + backoff_s(trips, s), error)
    return msgspec.structs.replace(c, failures=failures, last_error=error)


def on_abandon(c: Circuit, probe: bool) -> Circuit:
    """The probe ended with no verdict (the client left, a 4xx before the model ran):
    another request may probe."""
    if probe and c.probing:
        return msgspec.structs.replace(c, probing=False)
    return c


class CircuitView(msgspec.Struct, frozen=True):
    """One circuit for `/v1/health`, announcements and `llmfleet status`."""

    state: str
    failures: int
    last_error: str
    reopen_in_s: float  # 0 unless open


def view(c: Circuit, now: float) -> CircuitView:
    st = state_at(c, now)
    reopen = round(max(0.0, c.reopen_at - now), 3) if st == OPEN else 0.0
    return CircuitView(st, c.failures, c.last_error, reopen)


class Breakers:
    """One circuit per key (a model id, or `model worker`), owned by whoever made it and
    changed only on its event loop. Unknown keys are closed."""

    def __init__(self, settings: BreakerSettings | None = None, max_keys: int = 10_000) -> None:
        self.settings = settings or BreakerSettings()
        self._c: dict[str, Circuit] = {}
        self._max = max_keys
        self.opened = 0  # times any circuit opened (a counter for metrics)

    def get(self, key: str) -> Circuit:
        return self._c.get(key) or _CLOSED

    def available(self, key: str, now: float) -> bool:
        return available(self.get(key), now)

    def state(self, key: str, now: float) -> str:
        return state_at(self.get(key), now)

    def try_pass(self, key: str, now: float) -> tuple[bool, bool]:
        allowed, probe, c = try_pass(self.get(key), now)
        self._put(key, c)
        return allowed, probe

    def success(self, key: str, probe: bool = False) -> None:
        c = self._c.get(key)
        if c is not None:
            self._put(key, on_success(c, probe))

    def failure(self, key: str, now: float, error: str, probe: bool = False) -> None:
        before = self.get(key)
        after = on_failure(before, now, error, self.settings, probe)
        if after.state == OPEN and (before.state != OPEN or after.trips != before.trips):
            self.opened += 1
        self._put(key, after)

    def abandon(self, key: str, probe: bool) -> None:
        c = self._c.get(key)
        if c is not None:
            self._put(key, on_abandon(c, probe))

    def views(self, now: float) -> dict[str, CircuitView]:
        return {k: view(c, now) for k, c in sorted(self._c.items())}

    def _put(self, key: str, c: Circuit) -> None:
        if c == _CLOSED:
            self._c.pop(key, None)  # closed and clean: nothing to remember
        elif key in self._c or len(self._c) < self._max:
            self._c[key] = c


_CLOSED = Circuit()
