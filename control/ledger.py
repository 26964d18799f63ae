"""Fleet-wide quota ledgers: pure functions over the values stored in `LLMFLEET_QUOTA`.

Every gateway takes quota from the same ledgers by compare-and-set (control/store.py
`cas`), in leases it then spends locally (control/quota.py); these functions decide
what a lease may take. No I/O, no clock: `now` is passed in.

    <key>.rpm / <key>.tpm     Window   units granted per second, over a sliding 60 s
    <key>.par                 Holds    slots held per gateway, each with an expiry
    <key>.btok.<period>       Budget   tokens granted in the period (spent + leased)
    <key>.bcost.<period>      Budget   cost granted in the period, in micro-units
    <key>.use.<period>        Usage    what was really used (day, month and total)

A window counts a grant from the second it was made until 61 s later (never early); a
budget never resets: a new period is a new entry, so no gateway can erase another's
spend (LiteLLM #36940).
"""

from __future__ import annotations

import msgspec

WINDOW_S = 60


class Window(msgspec.Struct, array_like=True):
    """(second, units) grants, oldest first, at most one per second."""

    slots: list[tuple[int, int]] = []


class Holds(msgspec.Struct):
    """gateway -> (slots, expires at): concurrency held by live gateways."""

    holds: dict[str, tuple[int, float]] = {}


class Budget(msgspec.Struct):
    granted: int = 0


class Usage(msgspec.Struct, omit_defaults=True):
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_micros: int = 0
    refused: int = 0  # requests refused by a limit or a budget


def rpm_key(key: str) -> str:
    return f"{key}.rpm"


def tpm_key(key: str) -> str:
    return f"{key}.tpm"


def par_key(key: str) -> str:
    return f"{key}.par"


def budget_key(key: str, kind: str, period: str) -> str:
    return f"{key}.{kind}.{period}"


def usage_key(key: str, period: str) -> str:
    return f"{key}.use.{period}"


# ---- sliding windows (rpm, tpm) -------------------------------------------------------


def live(w: Window, now_s: int) -> list[tuple[int, int]]:
    return [(s, n) for s, n in w.slots if s > now_s - WINDOW_S - 1]


def window_used(w: Window, now_s: int) -> int:
    return sum(n for _, n in live(w, now_s))


def window_grant(w: Window, now_s: int, want: int, need: int, limit: int) -> tuple[Window, int]:
    """Take up to `want` units, at least `need` (else 0), within `limit` over the window."""
    slots = live(w, now_s)
    room = limit - sum(n for _, n in slots)
    got = min(want, room)
    if got < need or got <= 0:
        return Window(slots), 0
    return Window(_add(slots, now_s, got)), got


def window_charge(w: Window, now_s: int, units: int) -> Window:
    """Record `units` used beyond what was granted (a request that used more than it
    reserved): counted even past the limit, so the next requests wait."""
    return Window(_add(live(w, now_s), now_s, units))


def window_refund(w: Window, now_s: int, second: int, units: int) -> Window:
    """Give back `units` granted at `second` (a lease returned unused)."""
    slots = []
    for s, n in live(w, now_s):
        left = n
        if s == second and units > 0:
            back = min(n, units)
            left -= back
            units -= back
        if left > 0:
            slots.append((s, left))
    return Window(slots)


def window_free_in(w: Window, now_s: int, need: int, limit: int) -> float:
    """Seconds until `need` units fit under `limit` (0: now; the window length if they
    never fit)."""
    slots = live(w, now_s)
    used = sum(n for _, n in slots)
    if used + need <= limit:
        return 0.0
    for s, n in slots:
        used -= n
        if used + need <= limit:
            return float(s + WINDOW_S + 1 - now_s)
    return float(WINDOW_S + 1)


def _add(slots: list[tuple[int, int]], now_s: int, units: int) -> list[tuple[int, int]]:
    if slots and slots[-1][0] == now_s:
        return [*slots[:-1], (now_s, slots[-1][1] + units)]
    return [*slots, (now_s, units)]


# ---- concurrency (max-parallel) -------------------------------------------------------


def holds_live(h: Holds, now: float) -> dict[str, tuple[int, float]]:
    return {g: (n, exp) for g, (n, exp) in h.holds.items() if exp > now and n > 0}


def holds_take(
    h: Holds, gateway: str, now: float, want: int, limit: int, ttl_s: float
) -> tuple[Holds, int]:
    """Raise `gateway`'s hold by up to `want` slots within `limit` (held by live
    gateways; a gateway that stopped renewing loses its hold at its expiry)."""
    holds = holds_live(h, now)
    mine = holds.get(gateway, (0, 0.0))[0]
    room = limit - sum(n for n, _ in holds.values())
    got = max(0, min(want, room))
    if mine + got > 0:
        holds[gateway] = (mine + got, now + ttl_s)
    return Holds(holds), got


def holds_set(h: Holds, gateway: str, now: float, slots: int, ttl_s: float) -> Holds:
    """Set `gateway`'s hold to `slots` (a renewal, or a release when fewer)."""
    holds = holds_live(h, now)
    if slots > 0:
        holds[gateway] = (slots, now + ttl_s)
    else:
        holds.pop(gateway, None)
    return Holds(holds)


def holds_total(h: Holds, now: float) -> int:
    return sum(n for n, _ in holds_live(h, now).values())


# ---- budgets --------------------------------------------------------------------------


def budget_grant(b: Budget, want: int, need: int, limit: int) -> tuple[Budget, int]:
    got = min(want, limit - b.granted)
    if got < need or got <= 0:
        return b, 0
    return Budget(b.granted + got), got


def budget_refund(b: Budget, units: int) -> Budget:
    return Budget(max(0, b.granted - units))


def budget_charge(b: Budget, units: int) -> Budget:
    return Budget(b.granted + units)


def usage_add(u: Usage, d: Usage) -> Usage:
    return Usage(
        requests=u.requests + d.requests,
        prompt_tokens=u.prompt_tokens + d.prompt_tokens,
        completion_tokens=u.completion_tokens + d.completion_tokens,
        cost_micros=u.cost_micros + d.cost_micros,
        refused=u.refused + d.refused,
    )


ENCODER = msgspec.json.Encoder()
WINDOW_DECODER = msgspec.json.Decoder(Window)
HOLDS_DECODER = msgspec.json.Decoder(Holds)
BUDGET_DECODER = msgspec.json.Decoder(Budget)
USAGE_DECODER = msgspec.json.Decoder(Usage)
