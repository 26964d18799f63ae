"""The gateway's routing decisions (gateway/routing.py), without an event loop: which hops
a key's plan holds, which hop is tried next, why a hop failed, and the circuits."""

from __future__ import annotations

import json

import pytest

from common import protocol as p
from common.breaker import BreakerSettings
from common.errors import (
    FleetError,
    GatewayTimeout,
    InvalidRequest,
    ModelNotFound,
    RateLimited,
    ServiceUnavailable,
    UpstreamError,
)
from control.keys import KeyRecord
from control.routes import parse_routes
from gateway.auth import ANONYMOUS, Principal, model_not_found
from gateway.catalog import CatalogSnapshot, ModelEntry
from gateway.routing import (
    DOWN,
    LAST,
    NORMAL,
    NOT_READY,
    OPEN,
    PROBE,
    READY,
    Plan,
    Router,
    counts_against,
    for_hop,
    pick_hop,
    reason_of,
)
from gateway.validate import Parsed

CTX = "context_length_exceeded"
ROUTES = parse_routes(
    """
default_model: chat
aliases:
  chat:
    description: General chat
    chain: [big, small]
    hop_timeout: 2
  strict:
    chain: [big, small]
    fallback_on: [worker_lost]
  nested:
    chain: [chat, other]
""",
    "test.yaml",
)


def entry(model: str, *, ready: bool = True, workers: int = 1, open_workers: int = 0) -> ModelEntry:
    return ModelEntry(
        id=model,
        workers=tuple(f"w-{model}-{i}" for i in range(workers)),
        slots=4 * workers,
        in_flight=0,
        owned_by="llmfleet",
        created=1,
        simulated=True,
        description="",
        ready=ready,
        ready_workers=workers if ready else 0,
        open_workers=open_workers,
    )


def snap(*entries: ModelEntry) -> CatalogSnapshot:
    return CatalogSnapshot(models={e.id: e for e in entries}, workers={})


FLEET = snap(entry("big"), entry("small"), entry("other"))


def key(*models: str) -> Principal:
    return Principal("k", KeyRecord(name="k", secrets=(), models=models), admin=False)


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def router(clock: Clock | None = None) -> Router:
    return Router(
        ROUTES,
        source="test",
        settings=BreakerSettings(threshold=3, base_s=5.0, max_s=60.0),
        clock=clock or Clock(),
    )


# ---- plans: what the key may run, nothing else ----------------------------------------


def test_plan_keeps_only_the_targets_the_key_may_run_in_order() -> None:
    r = router()
    assert r.plan("chat", ANONYMOUS, FLEET).hops == ("big", "small")
    assert r.plan("chat", key("small"), FLEET).hops == ("small",)
    assert r.plan("nested", key("small", "other"), FLEET).hops == ("small", "other")
    plan = r.plan("chat", key("*"), FLEET)
    assert plan.alias == "chat"
    assert plan.hop_timeout_s == 2
    assert "unavailable" in plan.fallback_on


def test_no_usable_target_is_the_same_404_as_a_missing_model() -> None:
    r = router()
    with pytest.raises(ModelNotFound) as forbidden:
        r.plan("chat", key("other"), FLEET)
    with pytest.raises(ModelNotFound) as missing:
        r.plan("nope", ANONYMOUS, FLEET)
    assert forbidden.value.body() == model_not_found("chat").body()
    assert missing.value.body() == model_not_found("nope").body()
    # and the alias's targets are not served by anyone: 404 too
    with pytest.raises(ModelNotFound):
        r.plan("chat", ANONYMOUS, snap(entry("other")))


def test_a_direct_request_is_one_hop_without_fallback() -> None:
    r = router()
    plan = r.plan("big", key("big"), FLEET)
    assert plan == Plan("", ("big",))
    with pytest.raises(ModelNotFound):
        r.plan("big", key("small"), FLEET)  # the physical name obeys the key too


def test_naming_the_alias_in_a_key_grants_nothing() -> None:
    r = router()
    with pytest.raises(ModelNotFound):
        r.plan("chat", key("chat"), FLEET)
    assert not r.may_use(key("chat"), "chat")
    assert r.may_use(key("small"), "chat")
    assert r.usable_chain(key("small"), "nested") == ("small",)


# ---- which hop next -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("conds", "start", "skip", "want"),
    [
        ((READY, READY), 0, True, 0),
        ((OPEN, READY), 0, True, 1),
        ((NOT_READY, READY), 0, True, 1),  # a hop with no ready worker is passed over
        ((NOT_READY, OPEN), 0, True, 0),  # ... unless nothing better is left: it queues
        ((OPEN, NOT_READY), 0, True, 1),
        ((OPEN, OPEN), 0, True, 0),  # open circuits only: the first is tried after all
        ((DOWN, OPEN), 0, True, 1),
        ((DOWN, DOWN), 0, True, None),  # no worker would take any of them
        ((READY, READY), 1, True, 1),
        ((READY,), 1, True, None),
        ((NOT_READY, READY), 0, False, 0),  # no fallback on `unavailable`: tried as is
        ((OPEN, READY), 0, False, 1),  # ... but an open circuit is still passed over
        ((OPEN, NOT_READY), 0, False, 1),
        ((DOWN, OPEN), 0, False, 1),
        ((DOWN,), 0, False, None),
    ],
)
def test_pick_hop(conds: tuple[str, ...], start: int, skip: bool, want: int | None) -> None:
    assert pick_hop(conds, start, skip) == want


@pytest.mark.parametrize(
    ("err", "from_worker", "reason", "counts"),
    [
        (ServiceUnavailable("q", code="queue_timeout"), False, "queue_timeout", True),
        (ServiceUnavailable("w", code="worker_lost"), True, "worker_lost", True),
        (UpstreamError("w", code="worker_lost"), True, "worker_lost", True),
        (UpstreamError("gap", code="stream_gap"), True, "upstream_error", True),
        (UpstreamError("upstream 500"), True, "upstream_error", True),
        (FleetError("internal", status=500), True, "upstream_error", True),
        (RateLimited("upstream 429"), True, "rate_limited", True),
        (RateLimited("queue full"), False, "rate_limited", False),  # back-pressure
        (RateLimited("key", code="rate_limit_exceeded"), False, None, False),
        (RateLimited("key", code="insufficient_quota"), False, None, False),
        (RateLimited("share", code="key_queue_full"), False, None, False),
        (
            InvalidRequest("long", code="context_length_exceeded"),
            True,
            "context_length_exceeded",
            False,
        ),
        (InvalidRequest("bad"), True, None, False),
        (GatewayTimeout("the client's deadline"), False, None, False),
        (ServiceUnavailable("broker down"), False, "unavailable", False),
        (ServiceUnavailable("cancelled", code="cancelled"), True, "worker_lost", True),
    ],
)
def test_reason_of(err: FleetError, from_worker: bool, reason: str | None, counts: bool) -> None:
    assert reason_of(err, from_worker) == reason
    assert counts_against(reason, from_worker) is counts


# ---- circuits -------------------------------------------------------------------------


def test_three_failures_open_the_model_and_chains_skip_it_at_once() -> None:
    clock = Clock()
    r = router(clock)
    plan = r.plan("chat", ANONYMOUS, FLEET)
    for _ in range(3):
        i, probe = r.pick(plan, 0, FLEET)
        assert (i, probe) == (0, NORMAL)
        r.failed("big", probe, "502 upstream_error: boom")
    assert r.breakers.state("big", clock()) == "open"
    assert r.status(FLEET.models["big"]) == "unhealthy"
    assert r.pick(plan, 0, FLEET) == (1, NORMAL)
    assert r.fallbacks[("big", "small", "unavailable")] == 1
    # a request naming the model itself is still tried (its workers may just be busy),
    # and its success would close the circuit
    assert r.pick(r.plan("big", ANONYMOUS, FLEET), 0, FLEET) == (0, LAST)
    # after the backoff: one probe, and only one
    clock.t += 5.0
    assert r.pick(plan, 0, FLEET) == (0, PROBE)
    assert r.pick(plan, 0, FLEET) == (1, NORMAL)  # the probe is out: others skip it
    r.succeeded("big", PROBE)
    assert r.breakers.state("big", clock()) == "closed"
    assert r.pick(plan, 0, FLEET) == (0, NORMAL)


def test_a_failed_probe_doubles_the_backoff_and_an_abandoned_one_frees_the_probe() -> None:
    clock = Clock()
    r = router(clock)
    for _ in range(3):
        r.failed("big", NORMAL, "x")
    clock.t += 5.0
    plan = r.plan("chat", ANONYMOUS, FLEET)
    assert r.pick(plan, 0, FLEET) == (0, PROBE)
    r.abandoned("big", PROBE)  # the client left: no verdict
    assert r.pick(plan, 0, FLEET) == (0, PROBE)
    r.failed("big", PROBE, "still down")
    view = r.health(FLEET)["models"]["big"]
    assert view["state"] == "open"
    assert view["reopen_in_s"] == 10.0
    assert view["last_error"] == "still down"
    assert view["reopens_at"] is not None


def test_a_model_whose_every_ready_worker_is_open_is_unhealthy() -> None:
    fleet = snap(entry("big", workers=2, open_workers=2), entry("small"))
    r = router()
    assert r.status(fleet.models["big"]) == "unhealthy"
    assert r.pick(r.plan("chat", ANONYMOUS, fleet), 0, fleet) == (1, NORMAL)
    half = snap(entry("big", workers=2, open_workers=1), entry("small"))
    assert r.pick(r.plan("chat", ANONYMOUS, half), 0, half) == (0, NORMAL)
    # nobody takes a request for it: asked directly, it fails at once
    with pytest.raises(ServiceUnavailable) as err:
        r.pick(r.plan("big", ANONYMOUS, fleet), 0, fleet)
    assert err.value.code == "model_unhealthy"
    assert err.value.retry_after == 1.0
    assert r.pick(r.plan("big", ANONYMOUS, half), 0, half) == (0, NORMAL)


def test_a_direct_success_closes_an_open_circuit() -> None:
    clock = Clock()
    r = router(clock)
    for _ in range(3):
        r.failed("big", NORMAL, "504 queue_timeout: busy")
    assert r.breakers.state("big", clock()) == "open"
    r.succeeded("big", LAST)  # a hop tried past its open circuit answered
    assert r.breakers.state("big", clock()) == "closed"
    for _ in range(3):
        r.failed("big", NORMAL, "x")
    # a chain with nothing else left tries it anyway (it may only have been busy)
    assert r.pick(Plan("chat", ("big",), frozenset({"unavailable"})), 0, FLEET) == (0, LAST)


def test_alias_without_unavailable_does_not_skip() -> None:
    r = router()
    fleet = snap(entry("big", ready=False), entry("small"))
    plan = r.plan("strict", ANONYMOUS, fleet)
    assert r.pick(plan, 0, fleet) == (0, NORMAL)  # tried, though it has no ready worker


def test_health_lists_workers_circuits_from_announcements() -> None:
    ann = p.WorkerAnnounce(
        worker="w1",
        host="h",
        version="x",
        state="ready",
        ttl_s=3.0,
        started_at=0.0,
        models=[
            p.ModelStatus(
                id="big",
                engine="openai",
                max_concurrency=4,
                circuit="open",
                circuit_failures=3,
                circuit_error="502 upstream_error",
                circuit_reopen_in_s=4.5,
            )
        ],
    )
    e = entry("big")
    fleet = CatalogSnapshot(
        models={"big": ModelEntry(**{**_fields(e), "workers": ("w1",)})}, workers={"w1": ann}
    )
    doc = router().health(fleet)
    w = doc["models"]["big"]["workers"]["w1"]
    assert w["state"] == "open"
    assert w["failures"] == 3
    assert w["last_error"] == "502 upstream_error"
    assert w["reopen_in_s"] == 4.5
    assert doc["routes"]["aliases"] == 3
    assert router().read_worker_circuits(fleet) == [(2, {"model": "big", "worker": "w1"})]


def _fields(e: ModelEntry) -> dict[str, object]:
    import msgspec  # noqa: PLC0415

    return msgspec.structs.asdict(e)


def test_reloads_keep_the_last_good_routes() -> None:
    r = router()
    r.reject("bad.yaml: alias 'x': cycle x -> x")
    assert r.routes is ROUTES
    assert (r.reloads_ok, r.reloads_failed) == (0, 1)
    r.replace(parse_routes("aliases: {a: {chain: [big]}}", "new"), "v2")
    assert r.routes.chain("a") == ("big",)
    assert r.routes.chain("chat") is None
    assert r.default_model(None) is None
    assert r.default_model("flag-wins") == "flag-wins"
    assert r.read_reloads() == [(1, {"outcome": "ok"}), (1, {"outcome": "failed"})]


def test_for_hop_names_the_hop_model_in_the_body() -> None:
    parsed = Parsed("chat", "chat", True, False, 1, b'{"model":"chat","messages":[]}')
    hop = for_hop(parsed, "small")
    assert hop.model == "small"
    assert json.loads(hop.body) == {"model": "small", "messages": []}


def test_a_last_resort_hop_never_frees_or_doubles_the_real_probe() -> None:
    """Half-open with its probe out, a request tried past the circuit (LAST) that ends
    without a verdict must not free the probe slot, and concurrent failures must not
    double the backoff once each (hostile review)."""
    clock = Clock()
    r = router(clock)
    for _ in range(3):
        r.failed("big", NORMAL, "x")
    clock.t += 5.0
    alias = r.plan("chat", ANONYMOUS, FLEET)
    assert r.pick(alias, 0, FLEET) == (0, PROBE)
    direct = r.plan("big", ANONYMOUS, FLEET)
    assert r.pick(direct, 0, FLEET) == (0, LAST)  # the probe is out: tried, not probing
    r.abandoned("big", LAST)
    assert r.pick(alias, 0, FLEET) == (1, NORMAL)  # still only one probe out
    r.failed("big", LAST, "x")  # a failure while half-open re-opens it, once
    assert r.breakers.get("big").trips == 2
    r.failed("big", LAST, "x")  # and more of them while it is open change nothing
    r.failed("big", LAST, "x")
    assert r.breakers.get("big").trips == 2


def test_for_hop_keeps_values_validation_never_read() -> None:
    parsed = Parsed("chat", "chat", False, False, 1, b'{"model":"chat","metadata":{"x":1e400}}')
    hop = for_hop(parsed, "small")
    assert hop.body == b'{"model":"small","metadata":{"x":1e400}}'
