"""Aliases, fallback chains and model circuit breakers: which model a request tries next.

`Router` holds the routes in force (`control/routes.py`, replaced whole by a reload: the
file on SIGHUP, or the KV entry's watch) and this gateway's circuit per model
(`common/breaker.py`). A `Call` asks it for a `Plan` once, at admission, then for each hop:

    plan(name, principal, snapshot)  the hops the key may run, in chain order; the same
                                     404 as a missing model when none is left
    pick(plan, start, snapshot, now) the next hop to try: the first ready and healthy
                                     one; else one that is only not ready (the request
                                     queues there); None when every circuit left is open
    verdict(model, probe, outcome)   the hop's outcome, for its circuit

Permissions are checked on every hop by construction: a target the key may not run is
never in the plan, so it is never tried, never named, never counted. A direct request is
a plan of one hop with no fallback.

All of this runs on the event loop in synchronous stretches (the routes are replaced
whole, circuits are changed between awaits), like the gateway's counters.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import msgspec

from common import breaker
from common.breaker import Breakers, BreakerSettings
from common.errors import FleetError, ServiceUnavailable
from control.routes import Routes
from gateway.auth import Principal, model_not_found
from gateway.catalog import CatalogSnapshot, ModelEntry
from gateway.validate import Parsed

log = logging.getLogger(__name__)

READY, NOT_READY, OPEN, DOWN = "ready", "not_ready", "open", "down"
NORMAL, PROBE, LAST = "normal", "probe", "last"  # a hop's kind, for its circuit (`pick`)
UNHEALTHY = "unhealthy"  # the model status shown when its circuit (or its workers') is open

# Errors that say the model (not the caller) failed: they count against its circuit.
COUNTED = frozenset({"queue_timeout", "worker_lost", "upstream_error", "rate_limited"})
# The key's own limits are answered as they are: another model would not change them.
_KEY_LIMITS = frozenset(
    {"rate_limit_exceeded", "insufficient_quota", "key_queue_full", "limits_unavailable"}
)


class Plan(msgspec.Struct, frozen=True):
    alias: str  # "" for a request that named a model
    hops: tuple[str, ...]  # model ids the key may run, in order
    fallback_on: frozenset[str] = frozenset()
    hop_timeout_s: float | None = None  # None: the normal queue timeout


def reason_of(err: FleetError, from_worker: bool) -> str | None:
    """Why a hop failed, in the routes file's words (pure); None: not a reason to fall
    back (the caller's mistake, its own limits, its own deadline)."""
    code = err.code or ""
    if code in ("queue_timeout", "worker_lost", "context_length_exceeded"):
        return code
    if code in _KEY_LIMITS:
        return None
    if err.status == 429:
        return "rate_limited"
    if code in ("stream_gap", "cancelled") or err.status in (500, 502):
        return "worker_lost" if code == "cancelled" else "upstream_error"
    if err.status == 503:
        return "upstream_error" if from_worker else "unavailable"
    return None


_body = msgspec.json.Decoder(dict[str, msgspec.Raw])
_encode = msgspec.json.Encoder().encode


def for_hop(parsed: Parsed, model: str) -> Parsed:
    """The request as one hop sends it: its body names the hop's model. Only `model` is
    rewritten: every other field goes on byte for byte (validation does not read them
    all, and a value it never read, say `1e400`, must not fail here)."""
    doc = _body.decode(parsed.body)
    doc["model"] = msgspec.Raw(_encode(model))
    return msgspec.structs.replace(parsed, model=model, body=_encode(doc))


# Failures that say nothing about the model: the gateway's own (its audit log, a reply
# buffer a slow client let fill up) and a worker stopped on purpose (a drain's grace ran
# out: a rolling restart is not a sick model).
_NOT_THE_MODEL = frozenset({"audit_unavailable", "stream_overflow", "cancelled"})


def counts_against(reason: str | None, from_worker: bool, code: str | None = None) -> bool:
    """Does this failure count against the model's circuit? A full queue at the broker
    (429 before any worker saw the request) is back-pressure, not a sick model."""
    if code in _NOT_THE_MODEL:
        return False
    if reason == "rate_limited":
        return from_worker
    return reason in COUNTED


def condition(model: str, snapshot: CatalogSnapshot, breakers: Breakers, now: float) -> str:
    """DOWN (every ready worker's own circuit for it is open: nobody takes it), OPEN (this
    gateway's circuit is open, or half-open with its probe out), NOT_READY (no ready worker
    now: loading, or gone within its grace) or READY."""
    entry = snapshot.lookup(model)
    if entry is not None and entry.ready and workers_open(entry):
        return DOWN
    if not breakers.available(model, now):
        return OPEN
    if entry is None or not entry.ready:
        return NOT_READY
    return READY


def workers_open(entry: ModelEntry) -> bool:
    return entry.ready_workers > 0 and entry.open_workers >= entry.ready_workers


def pick_hop(conditions: Sequence[str], start: int, skip_unavailable: bool) -> int | None:
    """The index of the hop to try (pure), from `start`: the first READY one, else the
    first NOT_READY one (the request waits there for a worker), else the first OPEN one
    (this gateway's circuit is open, but it may only have been busy: tried rather than
    refused), else None (every hop left is DOWN: no worker would take it). Without
    `skip_unavailable` (the alias does not fall back on `unavailable`) hops are not
    passed over for having no ready worker: the first that is READY or NOT_READY is
    tried (only open circuits are passed over)."""
    rest = range(start, len(conditions))
    order = (
        ((READY, NOT_READY), (OPEN,)) if not skip_unavailable else ((READY,), (NOT_READY,), (OPEN,))
    )
    for want in order:
        for i in rest:
            if conditions[i] in want:
                return i
    return None


class Router:
    def __init__(
        self,
        routes: Routes | None = None,
        *,
        source: str = "none",
        version: str = "",
        settings: BreakerSettings | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.routes = routes or Routes()
        self.source = source  # "none", "file PATH" or "kv"
        self.version = version
        self.breakers = Breakers(settings)
        self.clock = clock
        self.reloads_ok = 0
        self.reloads_failed = 0
        self.last_error = ""
        self.resolved: dict[tuple[str, str], int] = {}
        self.fallbacks: dict[tuple[str, str, str], int] = {}

    # ---- the routes in force ------------------------------------------------------------

    def replace(self, routes: Routes, version: str) -> None:
        """New routes, in force for every request admitted from now on."""
        self.routes, self.version = routes, version
        self.reloads_ok += 1
        self.last_error = ""
        log.info(
            "routes loaded from %s (%s): %d aliases, default model %s",
            self.source,
            version or "-",
            len(routes.aliases),
            routes.default_model or "none",
        )

    def reject(self, error: str) -> None:
        """A reload that failed: one log line, a counter; the last good routes stay."""
        self.reloads_failed += 1
        self.last_error = error
        log.error("routes reload refused, keeping %s: %s", self.version or "none", error)

    def default_model(self, flag: str | None) -> str | None:
        return flag if flag is not None else self.routes.default_model

    # ---- what a key may use --------------------------------------------------------------

    def plan(self, name: str, principal: Principal, snapshot: CatalogSnapshot) -> Plan:
        """The hops for `name`, or the one 404 `model_not_found` (a forbidden model, an
        alias with no target the key may run, and a name nobody knows look the same)."""
        routes = self.routes
        chain = routes.chain(name)
        if chain is None:
            if principal.may_run(name) and snapshot.lookup(name) is not None:
                return Plan("", (name,))
            raise model_not_found(name)
        hops = tuple(m for m in chain if principal.may_run(m) and snapshot.lookup(m) is not None)
        if not hops:
            raise model_not_found(name)
        alias = routes.aliases[name]
        return Plan(name, hops, frozenset(alias.fallback_on), alias.hop_timeout)

    def may_use(self, principal: Principal, name: str) -> bool:
        """May the key name `name` at all (a model it may run, or an alias with a target
        it may run)? The catalog is not consulted."""
        chain = self.routes.chain(name)
        if chain is None:
            return principal.may_run(name)
        return any(principal.may_run(m) for m in chain)

    def usable_chain(self, principal: Principal, alias: str) -> tuple[str, ...]:
        return tuple(m for m in self.routes.chain(alias) or () if principal.may_run(m))

    # ---- hops ---------------------------------------------------------------------------

    def pick(self, plan: Plan, start: int, snapshot: CatalogSnapshot) -> tuple[int, str]:
        """(index of the hop to try, its kind: NORMAL; PROBE, the half-open circuit's one
        probe; LAST, a hop tried although its circuit is open, the last resort, whose
        success closes the circuit but which holds no probe slot). Hops passed over
        count as fallbacks for `unavailable`. ServiceUnavailable `model_unhealthy` when
        no worker would take any hop left (every ready worker's circuit open).

        A model named directly is a plan of one hop with no fallback: tried whatever
        this gateway's circuit says (nothing to fall back to, and a circuit opened by
        queue timeouts may only mean busy workers; refusing would leave them idle as
        they free up), refused only when no worker would take it."""
        now = self.clock()
        conds = [condition(m, snapshot, self.breakers, now) for m in plan.hops]
        skip = "unavailable" in plan.fallback_on
        i = pick_hop(conds, start, skip)
        if i is None:
            raise self._unhealthy(plan, start, now, snapshot)
        for j in range(start, i):
            self.fallback(plan.hops[j], plan.hops[i], "unavailable")
        if conds[i] == OPEN:
            kind = LAST  # its success closes the circuit; it holds no probe slot
        else:
            allowed, probe = self.breakers.try_pass(plan.hops[i], now)
            if not allowed:  # cannot happen: its condition said it was available
                raise self._unhealthy(plan, start, now, snapshot)
            kind = PROBE if probe else NORMAL
        if plan.alias and start == 0:
            k = (plan.alias, plan.hops[i])
            self.resolved[k] = self.resolved.get(k, 0) + 1
        return i, kind

    def _unhealthy(
        self, plan: Plan, start: int, now: float, snapshot: CatalogSnapshot
    ) -> ServiceUnavailable:
        """503 `model_unhealthy`, with Retry-After: when the first circuit may be probed
        (this gateway's, or the soonest of the workers')."""
        waits = []
        for m in plan.hops[start:]:
            if self.breakers.state(m, now) == breaker.OPEN:
                waits.append(self.breakers.get(m).reopen_at - now)
            waits += _worker_reopens(m, snapshot)
        retry = max(1.0, round(min(waits), 1)) if waits else 1.0
        what = (
            f"Every model of alias '{plan.alias}' is unhealthy (no worker takes requests)"
            if plan.alias
            else f"The model '{plan.hops[0]}' is unhealthy (every worker's circuit is open)"
        )
        return ServiceUnavailable(
            f"{what}; retry after {retry:g} s.",
            code="model_unhealthy",
            retry_after=retry,
        )

    def fallback(self, from_model: str, to_model: str, reason: str) -> None:
        k = (from_model, to_model, reason)
        self.fallbacks[k] = self.fallbacks.get(k, 0) + 1

    def succeeded(self, model: str, kind: str) -> None:
        """A hop answered: the probe's success, and a last resort's, close the circuit; a
        normal hop's resets the run of failures (one let through before the circuit
        opened changes nothing)."""
        self.breakers.success(model, kind != NORMAL)

    def failed(self, model: str, kind: str, error: str) -> None:
        """Only the probe's failure doubles the backoff; others count as failures."""
        self.breakers.failure(model, self.clock(), error, kind == PROBE)

    def abandoned(self, model: str, kind: str) -> None:
        """No verdict: only the probe frees the probe slot."""
        self.breakers.abandon(model, kind == PROBE)

    # ---- what operators see -------------------------------------------------------------

    def status(self, entry: ModelEntry) -> str:
        """The model's status for /v1/models: `unhealthy` when its circuit is open here or
        every ready worker's is; else the catalog's."""
        if not self.breakers.available(entry.id, self.clock()) or workers_open(entry):
            return UNHEALTHY
        return entry.status

    def alias_status(self, hops: Sequence[str], snapshot: CatalogSnapshot) -> str:
        """An alias's status: its best hop's (ready > loading > unhealthy > unavailable)."""
        order = ("ready", "loading", "draining", UNHEALTHY, "unavailable")
        best = "unavailable"
        for m in hops:
            entry = snapshot.lookup(m)
            st = "unavailable" if entry is None else self.status(entry)
            if order.index(st) < order.index(best):
                best = st
        return best

    def health(self, snapshot: CatalogSnapshot) -> dict[str, Any]:
        """`GET /v1/health`: per model, this gateway's circuit and each worker's."""
        now = self.clock()
        wall = time.time()
        models: dict[str, Any] = {}
        views = self.breakers.views(now)
        for model_id in sorted({*snapshot.models, *views}):
            entry = snapshot.lookup(model_id)
            v = views.get(model_id) or breaker.view(breaker.Circuit(), now)
            workers: dict[str, Any] = {}
            for wid in entry.workers if entry is not None else ():
                ann = snapshot.workers.get(wid)
                st = next((m for m in ann.models if m.id == model_id), None) if ann else None
                if st is None or ann is None:
                    continue
                workers[wid] = {
                    "state": st.circuit,
                    "worker_state": ann.state,
                    "failures": st.circuit_failures,
                    "last_error": st.circuit_error or None,
                    "reopen_in_s": st.circuit_reopen_in_s,
                    "reopens_at": _at(wall, st.circuit_reopen_in_s),
                }
            models[model_id] = {
                "status": "unavailable" if entry is None else self.status(entry),
                "state": v.state,
                "failures": v.failures,
                "last_error": v.last_error or None,
                "reopen_in_s": v.reopen_in_s,
                "reopens_at": _at(wall, v.reopen_in_s),
                "workers": workers,
            }
        return {
            "object": "health",
            "models": models,
            "routes": {
                "source": self.source,
                "version": self.version,
                "aliases": len(self.routes.aliases),
                "reloads_ok": self.reloads_ok,
                "reloads_failed": self.reloads_failed,
                "last_error": self.last_error or None,
            },
        }

    # ---- metrics ------------------------------------------------------------------------

    def read_resolved(self) -> list[tuple[int, dict[str, str]]]:
        return [(n, {"alias": a, "target": t}) for (a, t), n in list(self.resolved.items())]

    def read_fallbacks(self) -> list[tuple[int, dict[str, str]]]:
        return [
            (n, {"from_model": f, "to_model": t, "reason": r})
            for (f, t, r), n in list(self.fallbacks.items())
        ]

    def read_reloads(self) -> list[tuple[int, dict[str, str]]]:
        return [(self.reloads_ok, {"outcome": "ok"}), (self.reloads_failed, {"outcome": "failed"})]

    def read_circuits(self, snapshot: CatalogSnapshot) -> list[tuple[int, dict[str, str]]]:
        now = self.clock()
        ids = sorted({*snapshot.models, *self.breakers.views(now)})
        return [(breaker.STATES.index(self.breakers.state(m, now)), {"model": m}) for m in ids]

    @staticmethod
    def read_worker_circuits(snapshot: CatalogSnapshot) -> list[tuple[int, dict[str, str]]]:
        out = []
        for wid, ann in list(snapshot.workers.items()):
            for m in ann.models:
                state = m.circuit if m.circuit in breaker.STATES else breaker.OPEN
                out.append((breaker.STATES.index(state), {"model": m.id, "worker": wid}))
        return out


def _worker_reopens(model: str, snapshot: CatalogSnapshot) -> list[float]:
    """Seconds until each of the model's open workers may probe again."""
    out = []
    entry = snapshot.lookup(model)
    for wid in entry.workers if entry is not None else ():
        ann = snapshot.workers.get(wid)
        for m in ann.models if ann is not None else ():
            if m.id == model and m.circuit == breaker.OPEN:
                out.append(m.circuit_reopen_in_s)
    return out


def _at(wall: float, in_s: float) -> float | None:
    return round(wall + in_s, 3) if in_s > 0 else None


def observe_routing(tel: Any, router: Router, snapshot: Callable[[], CatalogSnapshot]) -> None:
    """The routing metrics, read at scrape time (`common.telemetry.Telemetry.observe`)."""
    tel.observe(
        "counter",
        "llmfleet.alias.resolved",
        "{request}",
        "Requests for an alias, by the target it resolved to first",
        router.read_resolved,
    )
    tel.observe(
        "counter",
        "llmfleet.fallback",
        "{fallback}",
        "Hops given up for the next one of an alias chain, by reason",
        router.read_fallbacks,
    )
    tel.observe(
        "gauge",
        "llmfleet.circuit.state",
        "1",
        "This gateway's circuit per model: 0 closed, 1 half_open, 2 open",
        lambda: router.read_circuits(snapshot()),
    )
    tel.observe(
        "gauge",
        "llmfleet.worker.circuit.state",
        "1",
        "Each worker's circuit per model, as it announces it: 0 closed, 1 half_open, 2 open",
        lambda: router.read_worker_circuits(snapshot()),
    )
    tel.observe(
        "counter",
        "llmfleet.routes.reloads",
        "{reload}",
        "Routes loads and reloads (file, SIGHUP, KV) by outcome: ok, failed",
        router.read_reloads,
    )
