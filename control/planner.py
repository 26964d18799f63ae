"""The fleet-wide swap planner (issue 16): which host loads, drains or unloads which model.

A pure function from a snapshot of the fleet to actions, in the style of llama-swap's
scheduler (`Swapper` decides, `Effects` act): no I/O, no clock of its own, no logging.
Host agents run it on the fleet state they all read from the broker and carry out only
the actions addressed to them (a KV lease per load keeps two agents from both acting on
one decision).

    Fleet ──plan(fleet, now, collate)──> [Unload, Drain, Load, ...]

Rules, in this order:
1. **TTL**: a ready replica idle for its model's `ttl_s` (0: never) with nothing waiting
   unloads, unless that leaves fewer than `min_replicas` or the model is persistent.
2. **Demand**, oldest waiting request first: a model with waiting requests and no ready or
   loading replica gets one; a model whose backlog exceeds what its replicas serve at once
   gets another, up to `max_replicas`. Its host is one that lists the model and has room;
   failing that, one where idle replicas can be evicted to make room.
3. **Eviction** never touches a persistent model or a replica that is loading or running
   requests (a busy one is first told to `Drain`: it takes no new requests, and unloads
   once idle). It prefers replicas whose model is served elsewhere, then those with
   nothing waiting, then the longest idle: the least the fleet loses.
4. **Collation** (`collate=True`): a loaded model with a backlog keeps serving it, so
   arrivals A B C A B C on a host that fits one model are served A A B B C C with 2
   swaps. A waiting model may take its place anyway once its oldest request has waited
   `max_wait_s` (starvation bound). Without collation the planner is first-come
   first-served: the oldest waiting request's model takes the host as soon as the loaded
   one drains, backlog or not (5 swaps for the same arrivals): the baseline to compare.

Memory is accounted per host: loading, ready and draining replicas occupy their model's
`memory_gb` until an `Unload` frees it (the planner counts its own unloads as freed).
"""

from __future__ import annotations

from collections.abc import Iterable

import msgspec

LOADING, READY, DRAINING = "loading", "ready", "draining"


class ModelSpec(msgspec.Struct, frozen=True):
    memory_gb: float
    max_concurrency: int = 1  # requests one replica runs at once
    persistent: bool = False  # never evicted, never unloaded by TTL
    ttl_s: float = 0.0  # unload after this long idle with nothing waiting (0: never)
    min_replicas: int = 0
    max_replicas: int = 1
    max_wait_s: float = 30.0  # collation's starvation bound


class Replica(msgspec.Struct, frozen=True):
    model: str
    state: str  # loading | ready | draining
    running: int = 0
    idle_since: float = 0.0  # when it last finished a request (or became ready)


class Host(msgspec.Struct, frozen=True):
    name: str
    capacity_gb: float
    serves: frozenset[str]  # the models its config can load
    replicas: tuple[Replica, ...] = ()


class Demand(msgspec.Struct, frozen=True):
    waiting: int = 0  # requests in the broker no replica has taken
    oldest_since: float = 0.0  # when the oldest of them arrived (the caller's clock)


class Fleet(msgspec.Struct, frozen=True):
    hosts: dict[str, Host]
    models: dict[str, ModelSpec]
    demand: dict[str, Demand] = {}


class Load(msgspec.Struct, frozen=True, tag="load"):
    host: str
    model: str


class Drain(msgspec.Struct, frozen=True, tag="drain"):
    """Take no new requests for the model on this host (it is to be evicted)."""

    host: str
    model: str


class Unload(msgspec.Struct, frozen=True, tag="unload"):
    host: str
    model: str
    reason: str  # ttl | swap


Action = Load | Drain | Unload


def plan(fleet: Fleet, now: float, *, collate: bool = True) -> list[Action]:
    """The actions the fleet should take now (pure; rules in the module docstring)."""
    p = _Planner(fleet, now, collate)
    p.expire_ttl()
    for model in _by_age(fleet.demand):
        p.serve(model)
    return p.actions


def _by_age(demand: dict[str, Demand]) -> list[str]:
    return sorted(
        (m for m, d in demand.items() if d.waiting > 0),
        key=lambda m: (
            demand[m].oldest_since,
            m,
        ),
    )


class _Planner:
    """One planning pass: the fleet as it will be after the actions decided so far."""

    def __init__(self, fleet: Fleet, now: float, collate: bool) -> None:
        self.fleet, self.now, self.collate = fleet, now, collate
        self.actions: list[Action] = []
        self.replicas = {h: list(host.replicas) for h, host in fleet.hosts.items()}

    # ---- state as planned so far --------------------------------------------------------

    def _spec(self, model: str) -> ModelSpec | None:
        return self.fleet.models.get(model)

    def _used(self, host: str) -> float:
        return sum(
            spec.memory_gb for r in self.replicas[host] if (spec := self._spec(r.model)) is not None
        )

    def _free(self, host: str) -> float:
        return self.fleet.hosts[host].capacity_gb - self._used(host)

    def _active(self, model: str) -> list[tuple[str, Replica]]:
        """Replicas that serve or will serve `model` (not draining)."""
        return [
            (h, r)
            for h, rs in self.replicas.items()
            for r in rs
            if r.model == model and r.state in (LOADING, READY)
        ]

    def _waiting(self, model: str) -> Demand:
        return self.fleet.demand.get(model) or Demand()

    def _remove(self, host: str, replica: Replica, reason: str) -> None:
        self.replicas[host].remove(replica)
        self.actions.append(Unload(host, replica.model, reason))

    def _drain(self, host: str, replica: Replica) -> None:
        i = self.replicas[host].index(replica)
        self.replicas[host][i] = msgspec.structs.replace(replica, state=DRAINING)
        self.actions.append(Drain(host, replica.model))

    # ---- rule 1: TTL --------------------------------------------------------------------

    def expire_ttl(self) -> None:
        for h, rs in self.replicas.items():
            for r in list(rs):
                spec = self._spec(r.model)
                if r.state == DRAINING and r.running == 0:
                    self._remove(h, r, "swap")  # drained earlier: its place is wanted
                    continue
                if spec is None or spec.persistent or spec.ttl_s <= 0 or r.state != READY:
                    continue
                idle = r.running == 0 and self._waiting(r.model).waiting == 0
                expired = idle and self.now - r.idle_since >= spec.ttl_s
                if expired and len(self._active(r.model)) > spec.min_replicas:
                    self._remove(h, r, "ttl")

    # ---- rule 2: demand -----------------------------------------------------------------

    def serve(self, model: str) -> None:
        spec = self._spec(model)
        if spec is None:
            return  # nobody can load it: requests wait for a host that lists it
        active = self._active(model)
        demand = self._waiting(model)
        if active and (
            len(active) >= spec.max_replicas or demand.waiting <= len(active) * spec.max_concurrency
        ):
            return
        hosts = [
            h
            for h, host in self.fleet.hosts.items()
            if model in host.serves and all(r.model != model for r in self.replicas[h])
        ]
        roomy = [h for h in hosts if self._free(h) >= spec.memory_gb]
        if roomy:
            host = max(roomy, key=lambda h: (self._free(h), h))
            self._load(host, model)
            return
        if active:
            return  # scaling out does not evict: it waits for room
        best = self._cheapest_eviction(model, spec, hosts)
        if best is None:
            return
        host, victims = best
        busy = False
        for r in victims:
            if r.running == 0:
                self._remove(host, r, "swap")
            else:
                busy = True
                if r.state != DRAINING:
                    self._drain(host, r)
        if not busy and self._free(host) >= spec.memory_gb:
            self._load(host, model)

    def _load(self, host: str, model: str) -> None:
        self.replicas[host].append(Replica(model, LOADING, idle_since=self.now))
        self.actions.append(Load(host, model))

    # ---- rule 3 and 4: what to evict ----------------------------------------------------

    def _evictable(self, replica: Replica, model: str, spec: ModelSpec) -> bool:
        """May `replica` make room for `model` (it will drain first if busy)?"""
        victim = self._spec(replica.model)
        if victim is None or victim.persistent or replica.state == LOADING:
            return False
        if replica.state == DRAINING:
            return True
        backlog = self._waiting(replica.model)
        if backlog.waiting == 0:
            return True
        if len(self._active(replica.model)) > 1:
            return True  # its model is served elsewhere too
        mine = self._waiting(model)
        if self.collate:  # its backlog first, unless the newcomer starves
            return self.now - mine.oldest_since >= spec.max_wait_s
        return mine.oldest_since < backlog.oldest_since  # first come, first served

    def _cost(self, host: str, replica: Replica) -> tuple[int, int, int, float]:
        elsewhere = len(self._active(replica.model)) > 1
        return (
            int(replica.running > 0),
            int(not elsewhere),
            int(self._waiting(replica.model).waiting > 0),
            replica.idle_since,
        )

    def _cheapest_eviction(
        self, model: str, spec: ModelSpec, hosts: Iterable[str]
    ) -> tuple[str, list[Replica]] | None:
        """The host and the replicas to evict there whose loss costs the fleet least."""
        best: tuple[tuple[int, ...], str, list[Replica]] | None = None
        for h in hosts:
            if self.fleet.hosts[h].capacity_gb < spec.memory_gb:
                continue
            candidates = sorted(
                (r for r in self.replicas[h] if self._evictable(r, model, spec)),
                key=lambda r: self._cost(h, r),
            )
            free, chosen = self._free(h), []
            for r in candidates:
                if free >= spec.memory_gb:
                    break
                chosen.append(r)
                victim = self._spec(r.model)
                free += victim.memory_gb if victim is not None else 0.0
            if free < spec.memory_gb:
                continue
            score = tuple(sum(c) for c in zip(*(self._cost(h, r)[:3] for r in chosen), strict=True))
            key = (*score, len(chosen)) if chosen else (0, 0, 0, 0)
            if best is None or key < best[0]:
                best = (key, h, chosen)
        return None if best is None else (best[1], best[2])
