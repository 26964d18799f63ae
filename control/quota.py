"""Fleet-wide limits and budgets, spent locally from leases: one `Quota` per gateway.

A request is admitted by `admit()`: for each limit its key has (rpm, tpm, max-parallel,
token budget, cost budget) it takes what the request may use from this gateway's local
lease, and only when a lease runs dry does it take a new one from the shared ledger in
`LLMFLEET_QUOTA` (one compare-and-set, control/ledger.py decides how much). If any limit
refuses, everything taken is put back first: a refused request consumes nothing
(LiteLLM #39309). `Ticket.settle()` gives back what the request reserved but did not use,
and records the real usage. A sweeper task returns leases left idle, renews concurrency
holds and writes usage deltas (`Quota.run`).

Bounds (G gateways; a lease is at most `lease_fraction` of a limit, at least 1):
- rpm, tpm: admissions in any 60 s window <= limit + G x (lease - 1). Tokens count when a
  request is admitted (its reservation) and settle to the real usage when it ends; usage
  beyond the reservation is charged at once and can exceed a limit by that excess.
- max-parallel and budgets: never exceeded, across any number of gateways (holds and
  grants come from the ledger; a lease is only spendable by its own gateway). A budget
  counts reservations as spent until they settle.

State: every lease is owned by the event loop thread; `admit`/`settle` change it only in
synchronous stretches (no await between a read and the write it gates); ledger writes
happen in child tasks whose results come back through futures.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec

from common.errors import FleetError, RateLimited, ServiceUnavailable
from common.natsconn import NATS_ERRORS
from control import ledger as L
from control.keys import KeyRecord, period_end, period_id
from control.store import StoreUnavailable, cas

log = logging.getLogger(__name__)

_LEDGER_ERRORS: tuple[type[Exception], ...] = (
    StoreUnavailable,
    msgspec.DecodeError,
    msgspec.ValidationError,
    *NATS_ERRORS,
)
FULL_CACHE_S = 0.05  # a full ledger is not asked again for as much within this
MAX_TRIES = 64  # leases one admission may wait for (others may spend each one first)
WINDOWED = ("rpm", "tpm")


class QuotaSettings(msgspec.Struct, frozen=True):
    lease_fraction: float = 0.05  # a lease takes at most this share of a limit
    linger_s: float = 1.0  # an idle lease goes back to the ledger after this long
    hold_ttl_s: float = 10.0  # a concurrency hold dies this long after its last renewal
    sweep_s: float = 0.25
    usage_flush_s: float = 1.0


class QuotaExceeded(RateLimited):
    """429 with OpenAI's `rate_limit_exceeded` (type `requests` or `tokens`)."""

    code = "rate_limit_exceeded"


class BudgetExhausted(RateLimited):
    status = 429
    type = "insufficient_quota"
    code = "insufficient_quota"


@dataclass
class Lease:
    """This gateway's spendable share of one ledger (one key, one limit, one period)."""

    key: str
    dim: str
    limit: int
    lots: dict[int, int] = field(default_factory=dict)  # grant second -> units (windows)
    balance: int = 0  # units spendable here (sum of lots for windows)
    in_use: int = 0  # max-parallel: slots running here
    outstanding: int = 0  # units taken by requests not yet settled
    held: int = 0  # max-parallel: slots the ledger holds for this gateway
    last_used: float = 0.0
    pending: asyncio.Future[None] | None = None
    view_used: int = 0  # the ledger's count at our last write (headers)
    view_reset_s: float = 0.0
    view_at: float = 0.0
    view_free_s: float = 0.0  # when refused: until the request would fit
    renewed_at: float = 0.0
    last_got: int = -1  # what the last lease taken got (0: the ledger had no room)
    last_need: int = 0  # ... for a request that needed this much


@dataclass
class Ticket:
    """What one admitted request took, to settle when it ends."""

    record: KeyRecord
    taken: dict[str, int]  # ledger key -> units
    lots: dict[str, list[tuple[int, int]]] = field(default_factory=dict)  # windows: from where
    cost_per: Callable[[int, int], int] | None = None
    settled: bool = False
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)


class Quota:
    """One gateway's leases on the fleet-wide ledgers. `kv` is the LLMFLEET_QUOTA bucket
    (nats-py KeyValue or anything with get/create/update)."""

    def __init__(
        self,
        kv: Any,
        gateway_id: str,
        settings: QuotaSettings | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.kv = kv
        self.gateway = gateway_id
        self.settings = settings or QuotaSettings()
        self.clock = clock
        self._leases: dict[str, Lease] = {}  # by ledger key
        self._usage: dict[str, L.Usage] = {}  # ledger key -> delta not yet written
        self._charges: list[tuple[str, str, int]] = []  # (ledger key, dim, units) over
        self.counters = {"leases": 0, "returns": 0, "refused": 0, "errors": 0}

    # ---- admission ----------------------------------------------------------------------

    def needs(self, record: KeyRecord, tokens: int, cost: int) -> dict[str, int]:
        out: dict[str, int] = {}
        if record.rpm is not None:
            out["rpm"] = 1
        if record.tpm is not None:
            out["tpm"] = min(tokens, record.tpm)  # a request larger than tpm fits an empty window
        if record.max_parallel is not None:
            out["par"] = 1
        if record.budget_tokens is not None:
            out["btok"] = tokens
        if record.budget_cost is not None:
            out["bcost"] = cost
        return out

    async def admit(
        self,
        record: KeyRecord,
        tokens: int,
        cost: int = 0,
        cost_per: Callable[[int, int], int] | None = None,
    ) -> Ticket:
        """Take `tokens` (the request's reservation) and one request from every limit of
        `record`, or raise QuotaExceeded / BudgetExhausted (429) having taken nothing, or
        ServiceUnavailable when the ledger cannot be reached (fail closed)."""
        now = self.clock()
        period = period_id(record.budget_period, now)
        needs = self.needs(record, tokens, cost)
        taken: dict[str, int] = {}
        lots: dict[str, list[tuple[int, int]]] = {}
        try:
            for dim, need in needs.items():
                lkey = _ledger_key(record.name, dim, period)
                lots[lkey] = await self._take(record, dim, lkey, need)
                taken[lkey] = need
        except FleetError as err:
            self._refused(record, taken, lots, now)
            err.headers = (*err.headers, *self.headers(record, now))
            raise
        except BaseException:
            self._refused(record, taken, lots, now)
            raise
        used = self.clock()
        for lkey in taken:  # only an admission counts as use (see sweep: idle leases)
            self._leases[lkey].last_used = used
        ticket = Ticket(record, taken, lots, cost_per)
        ticket.headers = self.headers(record, now)
        return ticket

    def _refused(
        self,
        record: KeyRecord,
        taken: dict[str, int],
        lots: dict[str, list[tuple[int, int]]],
        now: float,
    ) -> None:
        """Put back everything a refused request took: it consumes nothing."""
        for lkey, n in taken.items():
            self._put_back(lkey, n, n, lots.get(lkey, []))
        self._usage_delta(record.name, now, L.Usage(refused=1))
        self.counters["refused"] += 1

    async def _take(
        self, record: KeyRecord, dim: str, lkey: str, need: int
    ) -> list[tuple[int, int]]:
        """Spend `need` from the lease of `lkey`, leasing more when it runs dry; the
        window lots it came from (to put back unused units where they were granted)."""
        limit = _limit(record, dim)
        lease = self._leases.get(lkey)
        if lease is None:
            lease = self._leases[lkey] = Lease(record.name, dim, limit)
        lease.limit = limit  # an update of the key applies at once
        for _ in range(MAX_TRIES):
            got_lots = self._spend(lease, dim, need)
            if got_lots is not None:
                return got_lots
            if lease.pending is not None:  # another request is taking a lease: share it
                await asyncio.shield(lease.pending)
                continue
            short = need if dim == "par" else need - lease.balance  # ours counts too
            if self._known_full(lease, short):
                break  # a lease for as much just found no room: no second round trip
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            lease.pending = fut
            try:
                got = await self._lease(lkey, lease, short)
            finally:
                lease.pending = None
                fut.set_result(None)
            if got == 0:
                break
        got_lots = self._spend(lease, dim, need)
        if got_lots is not None:
            return got_lots
        raise self._refusal(record, dim, need, lease)

    def _known_full(self, lease: Lease, need: int) -> bool:
        return (
            lease.last_got == 0
            and need >= lease.last_need
            and self.clock() - lease.view_at < FULL_CACHE_S
        )

    def _spend(self, lease: Lease, dim: str, need: int) -> list[tuple[int, int]] | None:
        """Take `need` from the local lease (synchronous: no await between check and
        take): None if it has not enough, else the lots spent (windows; oldest first).
        Only an admission counts as use (`admit`): refused requests do not keep a lease
        from going back."""
        if dim == "par":
            if lease.held - lease.in_use >= need:
                lease.in_use += need
                lease.outstanding += need
                return []
            return None
        if lease.balance < need:
            return None
        lease.balance -= need
        lease.outstanding += need
        spent: list[tuple[int, int]] = []
        if dim in WINDOWED:
            left = need
            for second in sorted(lease.lots):  # at most one lot per second of the window
                use = min(lease.lots[second], left)
                if use:
                    spent.append((second, use))
                    left -= use
                    if use == lease.lots[second]:
                        del lease.lots[second]
                    else:
                        lease.lots[second] -= use
                if left == 0:
                    break
        return spent

    def _put_back(
        self, lkey: str, units: int, took: int, lots: list[tuple[int, int]] | None = None
    ) -> None:
        """A request that took `took` units (from window `lots`) is done with them and
        leaves `units` unused (refused: all of them; settled: what it did not use): back
        to the local lease, into the lots they were granted in (newest first), so the
        ledger's window and ours agree; what is over the lease size goes back to the
        ledger at the next sweep."""
        lease = self._leases.get(lkey)
        if lease is None:
            return
        lease.outstanding = max(0, lease.outstanding - took)
        if units <= 0:
            return
        dim = lease.dim
        if dim == "par":
            lease.in_use = max(0, lease.in_use - units)
            return
        if dim not in WINDOWED:
            lease.balance += units
            return
        oldest = int(self.clock()) - L.WINDOW_S
        for second, n in reversed(lots or []):
            back = min(n, units)
            units -= back
            if second > oldest:  # a lot out of the window is out of the ledger too
                lease.lots[second] = lease.lots.get(second, 0) + back
                lease.balance += back
            if units == 0:
                break

    def _chunk(self, limit: int) -> int:
        """The most a lease takes (beyond what one request needs) or keeps once idle."""
        return max(1, int(limit * self.settings.lease_fraction))

    def _want(self, dim: str, need: int, limit: int) -> int:
        chunk = self._chunk(limit)
        if dim == "par":
            return need
        if dim == "rpm":
            return max(need, chunk)
        return need + chunk

    async def _lease(self, lkey: str, lease: Lease, need: int) -> int:
        """Take a lease from the shared ledger (one compare-and-set); 0 if nothing fits."""
        dim, limit = lease.dim, lease.limit
        want = self._want(dim, need, limit)
        now = self.clock()
        now_s = int(now)
        got = 0
        ttl = self.settings.hold_ttl_s

        def step(raw: bytes | None) -> bytes | None:
            nonlocal got
            if dim in WINDOWED:
                w = L.WINDOW_DECODER.decode(raw) if raw else L.Window()
                w2, got = L.window_grant(w, now_s, want, need, limit)
                lease.view_used = L.window_used(w2, now_s)
                lease.view_reset_s = _reset_s(w2, now_s)
                lease.view_free_s = L.window_free_in(w2, now_s, need, limit)
                return L.ENCODER.encode(w2) if got else None
            if dim == "par":
                h = L.HOLDS_DECODER.decode(raw) if raw else L.Holds()
                h2, got = L.holds_take(h, self.gateway, now, want, limit, ttl)
                lease.view_used = L.holds_total(h2, now)
                return L.ENCODER.encode(h2) if got else None
            b = L.BUDGET_DECODER.decode(raw) if raw else L.Budget()
            b2, got = L.budget_grant(b, want, need, limit)
            lease.view_used = b2.granted
            return L.ENCODER.encode(b2) if got else None

        try:
            await cas(self.kv, lkey, step)
        except _LEDGER_ERRORS as exc:
            self.counters["errors"] += 1
            log.warning("quota ledger %s unavailable: %s", lkey, exc)
            raise ServiceUnavailable(
                "The gateway cannot check this key's limits right now.",
                code="limits_unavailable",
                retry_after=1.0,
            ) from exc
        lease.view_at = now
        lease.last_got, lease.last_need = got, need
        if got:
            lease.last_used = now  # fresh: not idle
            self.counters["leases"] += 1
            if dim == "par":
                lease.held += got
                lease.renewed_at = now
            else:
                lease.balance += got
                if dim in WINDOWED:
                    lease.lots[now_s] = lease.lots.get(now_s, 0) + got
        return got

    def _refusal(self, record: KeyRecord, dim: str, need: int, lease: Lease) -> FleetError:
        limit = _limit(record, dim)
        now = self.clock()
        if dim in ("btok", "bcost"):
            end = period_end(record.budget_period, now)
            what = "token" if dim == "btok" else "cost"
            return BudgetExhausted(
                f"Key '{record.name}' has used its {record.budget_period} {what} budget "
                f"({limit}); this request needs {need} more.",
                retry_after=None if end is None else max(1.0, math.ceil(end - now)),
            )
        if dim == "par":
            return QuotaExceeded(
                f"Rate limit reached for key '{record.name}' on concurrent requests: "
                f"Limit {limit}, In use {lease.view_used}.",
                type="requests",
                retry_after=1.0,
            )
        unit = "requests per min (RPM)" if dim == "rpm" else "tokens per min (TPM)"
        wait = max(1.0, math.ceil(lease.view_free_s)) if lease.view_free_s else 1.0
        return QuotaExceeded(
            f"Rate limit reached for key '{record.name}' on {unit}: Limit {limit}, "
            f"Used {lease.view_used}, Requested {need}. Please try again in {int(wait)}s.",
            type="requests" if dim == "rpm" else "tokens",
            retry_after=wait,
        )

    # ---- settle -------------------------------------------------------------------------

    def settle(self, ticket: Ticket, prompt: int, completion: int) -> None:
        """The request ended having used `prompt` + `completion` tokens: give back what it
        reserved beyond that, charge what it used beyond the reservation, record usage.
        Synchronous; ledger writes happen in the sweeper. Idempotent."""
        if ticket.settled:
            return
        ticket.settled = True
        rec = ticket.record
        used = prompt + completion
        cost = ticket.cost_per(prompt, completion) if ticket.cost_per else 0
        actual = {"rpm": 1, "tpm": used, "par": 0, "btok": used, "bcost": cost}
        for lkey, took in ticket.taken.items():
            dim = lkey.split(".")[1]
            if dim == "par":
                self._put_back(lkey, took, took)
                continue
            real = actual[dim]
            self._put_back(lkey, took - real, took, ticket.lots.get(lkey))
            if real > took:
                self._charges.append((lkey, dim, real - took))
        self.record_usage(rec.name, prompt, completion, cost)

    def record_usage(self, key: str, prompt: int, completion: int, cost: int = 0) -> None:
        """Count one request of `key` in its usage (written by the sweeper)."""
        self._usage_delta(
            key,
            self.clock(),
            L.Usage(
                requests=1, prompt_tokens=prompt, completion_tokens=completion, cost_micros=cost
            ),
        )

    def _usage_delta(self, key: str, now: float, d: L.Usage) -> None:
        for period in ("day", "month", "total"):
            k = L.usage_key(key, period_id(period, now))
            self._usage[k] = L.usage_add(self._usage.get(k, L.Usage()), d)

    # ---- headers ------------------------------------------------------------------------

    def headers(self, record: KeyRecord, now: float) -> list[tuple[bytes, bytes]]:
        """OpenAI's x-ratelimit-* headers for the key's rpm and tpm (our latest view)."""
        out: list[tuple[bytes, bytes]] = []
        for dim, suffix in (("rpm", b"requests"), ("tpm", b"tokens")):
            limit = _limit(record, dim) if getattr(record, dim) is not None else None
            if limit is None:
                continue
            lease = self._leases.get(_ledger_key(record.name, dim, ""), Lease("", dim, limit))
            remaining = max(0, limit - lease.view_used + lease.balance)
            reset = max(0.0, lease.view_reset_s - (now - lease.view_at)) if lease.view_at else 0.0
            out += [
                (b"x-ratelimit-limit-" + suffix, str(limit).encode()),
                (b"x-ratelimit-remaining-" + suffix, str(min(limit, remaining)).encode()),
                (b"x-ratelimit-reset-" + suffix, _duration(reset).encode()),
            ]
        return out

    # ---- the sweeper --------------------------------------------------------------------

    async def run(self) -> None:
        """Return idle leases, renew holds, write charges and usage; until cancelled."""
        last_flush = 0.0
        try:
            while True:
                await asyncio.sleep(self.settings.sweep_s)
                await self.sweep()
                if self.clock() - last_flush >= self.settings.usage_flush_s:
                    last_flush = self.clock()
                    await self.flush_usage()
        finally:
            with contextlib.suppress(*NATS_ERRORS, StoreUnavailable):
                await asyncio.shield(self.release_all())

    async def sweep(self) -> None:
        now = self.clock()
        idle = self.settings.linger_s
        for lkey, lease in list(self._leases.items()):
            if lease.pending is not None:
                continue
            dim = lease.dim
            if dim == "par":
                keep = lease.in_use if now - lease.last_used >= idle else lease.held
                if keep != lease.held or now - lease.renewed_at >= self.settings.hold_ttl_s / 3:
                    await self._set_hold(lkey, lease, keep, now)
                if lease.held == 0 and lease.outstanding == 0 and now - lease.last_used > 10 * idle:
                    self._leases.pop(lkey, None)
                continue
            keep = 0 if now - lease.last_used >= idle else self._chunk(lease.limit)
            excess = lease.balance - keep
            if dim in WINDOWED:
                # Lots about to leave the window are gone from the ledger: drop them.
                oldest = int(now) - L.WINDOW_S
                lease.lots = {s: n for s, n in lease.lots.items() if s > oldest}
                lease.balance = sum(lease.lots.values())
            if excess > 0:
                await self._return(lkey, lease, excess, now)
            if lease.balance == 0 and lease.outstanding == 0 and now - lease.last_used > 10 * idle:
                self._leases.pop(lkey, None)
        charges, self._charges = self._charges, []
        for ledger_key, dim, units in charges:
            if not await self._charge(ledger_key, dim, units):
                self._charges.append((ledger_key, dim, units))  # again at the next sweep

    async def _return(self, lkey: str, lease: Lease, units: int, now: float) -> None:
        """Give `units` of the local lease back to the ledger (newest lots first)."""
        dim = lease.dim
        units = min(units, lease.balance)
        back: list[tuple[int, int]] = []
        if dim in WINDOWED:
            left = units
            for second in sorted(lease.lots, reverse=True):
                take = min(lease.lots[second], left)
                left -= take
                back.append((second, take))
                if take == lease.lots[second]:
                    del lease.lots[second]
                else:
                    lease.lots[second] -= take
                if left == 0:
                    break
        lease.balance -= units
        now_s = int(now)

        def step(raw: bytes | None) -> bytes | None:
            if raw is None:
                return None
            if dim in WINDOWED:
                w = L.WINDOW_DECODER.decode(raw)
                for second, n in back:
                    w = L.window_refund(w, now_s, second, n)
                lease.view_used = L.window_used(w, now_s)
                return L.ENCODER.encode(w)
            b = L.budget_refund(L.BUDGET_DECODER.decode(raw), units)
            lease.view_used = b.granted
            return L.ENCODER.encode(b)

        await self._write(lkey, step)
        self.counters["returns"] += 1

    async def _set_hold(self, lkey: str, lease: Lease, slots: int, now: float) -> None:
        ttl = self.settings.hold_ttl_s

        def step(raw: bytes | None) -> bytes | None:
            h = L.HOLDS_DECODER.decode(raw) if raw else L.Holds()
            h2 = L.holds_set(h, self.gateway, now, slots, ttl)
            lease.view_used = L.holds_total(h2, now)
            return L.ENCODER.encode(h2)

        if await self._write(lkey, step):
            lease.held = slots
            lease.renewed_at = now

    async def _charge(self, ledger_key: str, dim: str, units: int) -> bool:
        now_s = int(self.clock())

        def step(raw: bytes | None) -> bytes | None:
            if dim in WINDOWED:
                w = L.WINDOW_DECODER.decode(raw) if raw else L.Window()
                return L.ENCODER.encode(L.window_charge(w, now_s, units))
            b = L.BUDGET_DECODER.decode(raw) if raw else L.Budget()
            return L.ENCODER.encode(L.budget_charge(b, units))

        return await self._write(ledger_key, step)

    async def flush_usage(self) -> None:
        pending, self._usage = self._usage, {}
        for ledger_key, delta in pending.items():

            def step(raw: bytes | None, delta: L.Usage = delta) -> bytes:
                u = L.USAGE_DECODER.decode(raw) if raw else L.Usage()
                return L.ENCODER.encode(L.usage_add(u, delta))

            if not await self._write(ledger_key, step):
                prev = self._usage.get(ledger_key, L.Usage())
                self._usage[ledger_key] = L.usage_add(prev, delta)  # try again next time

    async def release_all(self) -> None:
        """Give every idle lease back (a gateway stopping): others may use them at once."""
        now = self.clock()
        for lkey, lease in list(self._leases.items()):
            if lease.dim == "par":
                await self._set_hold(lkey, lease, lease.in_use, now)
            elif lease.balance > 0:
                await self._return(lkey, lease, lease.balance, now)
        await self.flush_usage()

    async def _write(self, ledger_key: str, step: Callable[[bytes | None], bytes | None]) -> bool:
        try:
            await cas(self.kv, ledger_key, step)
            return True
        except _LEDGER_ERRORS as exc:
            self.counters["errors"] += 1
            log.warning("quota ledger %s: %s", ledger_key, exc)
            return False


def _limit(record: KeyRecord, dim: str) -> int:
    value = {
        "rpm": record.rpm,
        "tpm": record.tpm,
        "par": record.max_parallel,
        "btok": record.budget_tokens,
        "bcost": None if record.budget_cost is None else round(record.budget_cost * 1e6),
    }[dim]
    assert value is not None
    return int(value)


def _ledger_key(key: str, dim: str, period: str) -> str:
    if dim == "rpm":
        return L.rpm_key(key)
    if dim == "tpm":
        return L.tpm_key(key)
    if dim == "par":
        return L.par_key(key)
    return L.budget_key(key, dim, period)


def _reset_s(w: L.Window, now_s: int) -> float:
    """Seconds until the window is empty again (OpenAI's x-ratelimit-reset-*)."""
    slots = L.live(w, now_s)
    return float(slots[-1][0] + L.WINDOW_S + 1 - now_s) if slots else 0.0


def _duration(seconds: float) -> str:
    """OpenAI's reset format: `20ms`, `1s`, `6m0s`."""
    if seconds <= 0:
        return "0s"
    if seconds < 1:
        return f"{round(seconds * 1000)}ms"
    s = math.ceil(seconds)
    return f"{s // 60}m{s % 60}s" if s >= 60 else f"{s}s"
