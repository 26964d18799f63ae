"""Attacks on aliases, fallback chains, circuit breakers and routes reloads (issue 15),
against real processes: nats-server (the module's broker; the deployed accounts.conf
for the forgery tests), `llmfleet` gateways and workers, the fake OpenAI upstream.

Each test is one attack, kept because it shows something; those that fail show a bug
(see the review report for the fix):

- Hostile routes files: a YAML merge-key bomb of a few hundred bytes freezes a gateway
  on SIGHUP (the 1 MiB and depth limits do not see it); a number too long for Python's
  int() escapes the "refused, counted, logged" path.
- Forged KV routes: a gateway role aims a stream's republish at `$KV.LLMFLEET_KEYS.routes`
  (permissions cannot stop it): every gateway started afterwards has no routes at all,
  and with `Nats-Rollup` the admin's entry is destroyed.
- Circuits: the half-open probe holds a recovered model hostage for its whole stream;
  a free count_tokens request (answered by the worker without the upstream) closes the
  circuit of a dead model; an alias whose fallback_on lacks `unavailable` answers 503
  once its first hop's circuit opens, though the next hop is healthy; draining one of
  two workers (a rolling restart) opens the model's circuit and every direct request
  gets 503 while the other worker is idle.
- Limits: a key holds more than its `--key-queue-share` (here: all) of a model's queue by
  naming an alias of it, so another key's request is refused 429.
- Audit: a request that fails on a worker loses `worker`/`served_model` in its event.
- Permissions (passing, pinned): no usable target is the 404 of a missing model on every
  front, byte for byte apart from the name; a 503 `model_unhealthy` names no target.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import nats.js.api as api
import pytest

from common.audit import AUDIT_STREAM, AuditSettings, decode, ensure_audit_stream, stream_config
from control.routes import Routes
from control.routes_watch import RoutesWatch
from control.store import KEYS_BUCKET, ROUTES_KEY, keys_config, open_bucket
from llmfleet.broker import EmbeddedNats
from tests.keyhelp import make_key
from tests.natshelp import connected
from tests.procs import Fleet, Gateway, health, until, upstream_process, write_routes
from tests.security.stack import OneNodeHub, actor

QUICK = ("--sim-ttft-ms", "5", "--sim-itl-ms", "1", "--sim-tokens", "3", "--max-concurrency", "8")
ROUTES = """
aliases:
  perm: {chain: [m-a, m-b], hop_timeout: 2}
  ua: {chain: [u-probe]}
  strict: {chain: [u-probe, m-a], fallback_on: [upstream_error]}
"""


def bearer(secret: str = "x") -> dict[str, str]:
    return {"authorization": f"Bearer {secret}"}


def chat(model: str, **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], **extra}


# ---- fixtures ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def routes_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_routes(tmp_path_factory, ROUTES)


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The fake OpenAI upstream, slow enough that a stream lasts ~4 s (40 x 100 ms)."""
    with upstream_process(
        tmp_path_factory.mktemp("upstream"), "--ttft-ms", "2", "--itl-ms", "100", "--tokens", "40"
    ) as url:
        yield url


@pytest.fixture(scope="module")
def gw(fleet: Fleet, routes_file: Path, upstream: str) -> Gateway:
    """One gateway with --routes FILE and a 1 s breaker backoff; sim workers for m-a and
    m-b, and an openai-engine worker for u-probe whose own circuit never opens (so only
    the gateway's circuit is under test)."""
    fleet.worker("--model", "m-a", "--model", "m-b", *QUICK)
    fleet.worker(
        "--engine", "openai", "--upstream", upstream + "/v1", "--model", "u-probe",
        "--worker-id", "w-probe", "--heartbeat", "0.2", "--max-concurrency", "8",
        "--breaker-failures", "1000", "--upstream-health-interval", "0",
    )  # fmt: skip
    return fleet.gateway(
        "--routes", str(routes_file), "--breaker-backoff", "1", "--breaker-backoff-max", "1",
        wait_models=("m-a", "m-b", "u-probe"),
    )  # fmt: skip


async def fail_upstream(url: str, status: int | None) -> None:
    async with httpx.AsyncClient() as c:
        r = await c.post(url + "/control", json={"fail": status})
        assert r.status_code == 200, r.text


# ---- hostile routes files (SIGHUP) ------------------------------------------------------


def merge_bomb(levels: int, fan: int = 10) -> str:
    """`x<k>: {<<: [*x<k-1> x fan]}`: PyYAML's flatten_mapping copies every merged pair
    into each level, fan**levels pairs, while the text grows by ~65 bytes per level."""
    lines = ["x0: &x0 {" + ", ".join(f"k{i}: 1" for i in range(fan)) + "}"]
    for lv in range(1, levels + 1):
        refs = ", ".join([f"*x{lv - 1}"] * fan)
        lines.append(f"x{lv}: &x{lv} {{<<: [{refs}]}}")
    return "\n".join([*lines, "aliases: {perm: {chain: [m-a]}}", ""])


async def test_a_few_hundred_bytes_of_yaml_merge_keys_do_not_freeze_the_gateway(
    gw: Gateway, routes_file: Path
) -> None:
    """Six levels of merge keys: ~500 bytes, ~10**6 pairs, seconds of CPU and ~200 MB in
    the gateway's event loop (the SIGHUP handler parses synchronously). Seven levels
    (~560 bytes) take ~100 s and 1.6 GB; eight would exhaust memory. The file is refused
    in the end (unknown fields), but nothing is answered meanwhile."""
    before = (await health(gw))["routes"]["reloads_failed"]
    bomb = merge_bomb(6)
    assert len(bomb) < 600
    try:
        routes_file.write_text(bomb)
        gw.popen.send_signal(signal.SIGHUP)
        await asyncio.sleep(0.2)  # the handler is running now
        t0 = time.monotonic()
        async with httpx.AsyncClient(timeout=60) as c:
            r = await c.get(gw.url + "/healthz")
        stalled = time.monotonic() - t0
        assert r.status_code == 200

        async def refused() -> bool:
            return (await health(gw))["routes"]["reloads_failed"] > before

        await until(refused, 60.0, "the bomb refused")
        assert gw.alive()
        assert stalled < 2.0, f"the gateway answered nothing for {stalled:.1f} s"
    finally:
        routes_file.write_text(ROUTES)
        gw.popen.send_signal(signal.SIGHUP)


async def test_an_overlong_number_is_refused_like_any_bad_routes_file(
    gw: Gateway, routes_file: Path
) -> None:
    """`hop_timeout: 999...` (5000 digits): yaml's int() raises ValueError (Python's
    4300-digit limit), not RoutesError, so the reload is neither refused nor counted nor
    logged as the contract says (and `llmfleet routes check` prints a traceback)."""
    before = (await health(gw))["routes"]["reloads_failed"]
    try:
        routes_file.write_text("aliases: {perm: {chain: [m-a], hop_timeout: " + "9" * 5000 + "}}\n")
        gw.popen.send_signal(signal.SIGHUP)

        async def refused() -> bool:
            return (await health(gw))["routes"]["reloads_failed"] > before

        await until(refused, 3.0, "the overlong number refused and counted")
        assert gw.alive()
    finally:
        routes_file.write_text(ROUTES)
        gw.popen.send_signal(signal.SIGHUP)


# ---- circuits -----------------------------------------------------------------------------


async def test_a_request_failed_by_its_worker_keeps_worker_and_served_model_in_its_audit(
    gw: Gateway, upstream: str, nats_url: str
) -> None:
    """Before issue 15 `_answer` recorded the worker in a `finally`; now `_try_hop` returns
    the reply stream only on success, so a request that a worker accepted and failed is
    audited (and access-logged) with no worker and no served model."""
    await fail_upstream(upstream, 500)
    try:
        async with httpx.AsyncClient(timeout=10) as c:
            r = await c.post(gw.base_url + "/chat/completions", json=chat("u-probe"))
    finally:
        await fail_upstream(upstream, None)
    assert r.status_code == 502, r.text
    assert r.headers.get("x-llmfleet-worker") is None  # fine: an error, no worker header
    rid = r.headers["x-request-id"]

    async def event() -> Any:
        async with connected(nats_url) as nc:
            js = nc.jetstream()
            state = (await js.stream_info(AUDIT_STREAM)).state
            for seq in range(state.first_seq, state.last_seq + 1):
                ev = decode((await js.get_msg(AUDIT_STREAM, seq)).data or b"{}")
                if ev.request_id == rid:
                    return ev
        return None

    ev = await until(event, 5.0, "the audit event")
    assert ev.status == 502
    assert (ev.worker, ev.served_model) == ("w-probe", "u-probe"), ev


async def _healed(c: httpx.AsyncClient, g: Gateway) -> None:
    """u-probe's circuit closed again (an earlier attack may have left it open): with the
    upstream healthy, the next probe after the backoff closes it."""

    async def closed() -> bool:
        if (await health(g))["models"].get("u-probe", {}).get("state", "closed") == "closed":
            return True
        await c.post(g.base_url + "/chat/completions", json=chat("u-probe", max_tokens=1))
        return False

    await until(closed, 10.0, "u-probe's circuit closed", interval=0.2)


async def _open_circuit(c: httpx.AsyncClient, g: Gateway, model: str) -> None:
    """Failing requests (named directly: those are always tried) until it is open."""

    async def opened() -> bool:
        if (await health(g))["models"][model]["state"] == "open":
            return True
        r = await c.post(g.base_url + "/chat/completions", json=chat(model))
        assert r.status_code == 502, r.text
        return False

    await until(opened, 10.0, f"the circuit of {model} open")


async def test_the_half_open_probe_does_not_hold_a_recovered_model_for_its_whole_stream(
    gw: Gateway, upstream: str
) -> None:
    """The upstream fails, the gateway's circuit for u-probe opens; the upstream recovers.
    The first request after the backoff is the probe. Its verdict used to wait for the
    end of its answer, so while it streamed (4 s here, up to --request-timeout, longer
    with a client reading slowly) chains kept passing the model over although it had
    answered: any client could hold the probe on purpose. The probe's first content now
    closes the circuit."""
    async with httpx.AsyncClient(timeout=10) as c:
        await _healed(c, gw)
        await fail_upstream(upstream, 500)
        try:
            await _open_circuit(c, gw, "u-probe")
            # through an alias of it alone: tried anyway (it may only be busy), and the
            # error names the model that failed, never anything the key may not run
            r = await c.post(gw.base_url + "/chat/completions", json=chat("ua"))
            assert r.status_code == 502, r.text
            assert r.headers["x-llmfleet-alias"] == "ua"
        finally:
            await fail_upstream(upstream, None)

        async def half_open() -> bool:
            return (await health(gw))["models"]["u-probe"]["state"] == "half_open"

        await until(half_open, 5.0, "half-open")
        async with c.stream(
            "POST", gw.base_url + "/chat/completions", json=chat("u-probe", stream=True)
        ) as probe:
            assert probe.status_code == 200
            async for line in probe.aiter_lines():
                if '"content"' in line:
                    break  # the model is answering: it is healthy again
            state = (await health(gw))["models"]["u-probe"]["state"]
            assert state == "closed", "the probe already streams, yet the circuit is " + state
            victim = await c.post(gw.base_url + "/chat/completions", json=chat("ua"))
            assert victim.status_code == 200, victim.text


async def test_a_free_count_tokens_request_does_not_close_the_circuit_of_a_dead_model(
    gw: Gateway, upstream: str
) -> None:
    """The upstream is dead; the circuit is half-open. Any client sends
    /v1/messages/count_tokens: the openai engine estimates it without the upstream (no
    /tokenize there, remembered), the worker answers 200, and the gateway takes that as
    the probe's success: the circuit closes on a model that cannot answer a single
    completion (the same with any 4xx the worker answers itself, e.g. the anthropic
    engine's "chat only" 400: `_hop_failed` counts every worker 4xx as the model
    answering). count_tokens is not even charged to the key."""
    async with httpx.AsyncClient(timeout=10) as c:
        await _healed(c, gw)
        tokens = {"model": "u-probe", "messages": [{"role": "user", "content": "hi"}]}
        r = await c.post(gw.base_url + "/messages/count_tokens", json=tokens)
        assert r.status_code == 200, r.text  # healthy: learns there is no /tokenize
        await fail_upstream(upstream, 500)
        try:
            await _open_circuit(c, gw, "u-probe")

            async def half_open() -> bool:
                return (await health(gw))["models"]["u-probe"]["state"] == "half_open"

            await until(half_open, 5.0, "half-open")
            r = await c.post(gw.base_url + "/messages/count_tokens", json=tokens)
            assert r.status_code == 200, r.text
            state = (await health(gw))["models"]["u-probe"]["state"]
            assert state != "closed", "a count_tokens estimate closed the dead model's circuit"
        finally:
            await fail_upstream(upstream, None)


async def test_an_alias_without_unavailable_still_falls_back_past_an_open_circuit(
    gw: Gateway, upstream: str
) -> None:
    """`strict: [u-probe, m-a], fallback_on: [upstream_error]`: while u-probe fails, each
    request falls back to m-a (good); after 3 the circuit opens, and from then on
    `pick_hop(..., skip_unavailable=False)` returns None for an open first hop, so the
    alias answers 503 model_unhealthy although m-a is healthy (docs/routing.md: 503 only
    "when every hop left has an open circuit"). The breaker makes the alias less
    available than no breaker at all."""
    async with httpx.AsyncClient(timeout=10) as c:
        await _healed(c, gw)
        await fail_upstream(upstream, 500)
        try:
            for _ in range(3):
                r = await c.post(gw.base_url + "/chat/completions", json=chat("strict"))
                assert r.status_code == 200 and r.headers["x-llmfleet-model"] == "m-a", r.text

            async def opened() -> bool:
                return (await health(gw))["models"]["u-probe"]["state"] == "open"

            await until(opened, 5.0, "u-probe's circuit open")
            r = await c.post(gw.base_url + "/chat/completions", json=chat("strict"))
            assert r.status_code == 200, f"m-a is healthy, yet: {r.text}"
            assert r.headers["x-llmfleet-model"] == "m-a"
        finally:
            await fail_upstream(upstream, None)


async def test_draining_one_of_two_workers_does_not_make_the_model_unhealthy(
    fleet: Fleet, gw: Gateway
) -> None:
    """A rolling restart: worker A runs 3 streams, worker B is idle; A gets SIGTERM and,
    after its --drain-grace, cancels them (code `cancelled`, read as `worker_lost`). That
    opens the model's circuit at the gateway (3 in a row), and every direct request for
    the model gets 503 model_unhealthy although B is ready and idle. (Any kill of one
    worker with 3 streams in flight does the same.)"""
    model = "m-drain"
    slow = ("--sim-ttft-ms", "5", "--sim-itl-ms", "100", "--sim-tokens", "40")
    a = fleet.worker("--model", model, "--worker-id", "wd-a", "--drain-grace", "0.3", *slow)

    def served(n: int) -> Any:
        async def pred() -> bool:
            async with httpx.AsyncClient() as c:
                doc = (await c.get(gw.base_url + "/models", headers=bearer())).json()
            return any(
                m["id"] == model and m["workers"] >= n and m["status"] == "ready"
                for m in doc["data"]
            )

        return pred

    await until(served(1), 20.0, "worker A ready")
    async with httpx.AsyncClient(timeout=20) as c:
        streams = []
        async with contextlib.AsyncExitStack() as stack:
            for _ in range(3):
                s = await stack.enter_async_context(
                    c.stream("POST", gw.base_url + "/chat/completions",
                             json=chat(model, stream=True))
                )  # fmt: skip
                assert s.status_code == 200 and s.headers["x-llmfleet-worker"] == "wd-a"
                streams.append(s)
            fleet.worker("--model", model, "--worker-id", "wd-b", *QUICK)
            await until(served(2), 20.0, "worker B ready")
            a.popen.send_signal(signal.SIGTERM)
            for s in streams:  # each ends with an error event
                async for _ in s.aiter_lines():
                    pass
        assert a.popen.wait(10) == 0
        r = await c.post(gw.base_url + "/chat/completions", json=chat(model, max_tokens=1))
        assert r.status_code == 200, f"worker B is idle and ready, yet: {r.text}"
        assert r.headers["x-llmfleet-worker"] == "wd-b"


# ---- limits -------------------------------------------------------------------------------


async def test_an_alias_gives_a_key_no_more_than_its_share_of_a_models_queue(
    tmp_path: Path,
) -> None:
    """docs/governance.md: "One key cannot hold a model's whole queue" (--key-queue-share
    of --max-queue, per model). The share is counted per name asked (`enter_queue(p,
    parsed.model)`), so naming the model and an alias of it doubles it (N aliases: N+1
    times): here the key holds the whole queue, and another key is refused 429."""
    with EmbeddedNats() as srv:  # its own broker: --max-queue is the stream's, not ours
        f = Fleet(srv.url, tmp_path)
        try:
            k = await make_key(srv.url, "greedy", models=("*",))
            v = await make_key(srv.url, "victim", models=("*",))
            admin = await make_key(srv.url, "admin", models=("*",), admin=True)
            routes = tmp_path / "q.yaml"
            routes.write_text("aliases: {qa: {chain: [qm]}}\n")
            f.worker("--model", "qm", "--max-concurrency", "1", "--sim-ttft-ms", "8000")
            g = f.gateway(
                "--auth", "keys", "--routes", str(routes),
                "--max-queue", "4", "--key-queue-share", "0.5",  # 2 waiting per key
                wait_models=("qm",), key=admin,
            )  # fmt: skip
            async with httpx.AsyncClient(timeout=30) as c:

                def post(secret: str, model: str, timeout: float = 20) -> Any:
                    headers = {**bearer(secret), "x-llmfleet-timeout": str(timeout)}
                    return c.post(g.base_url + "/chat/completions", json=chat(model),
                                  headers=headers)  # fmt: skip

                held = [asyncio.create_task(post(k, "qm"))]  # runs (the one slot)
                await asyncio.sleep(1.0)
                held += [asyncio.create_task(post(k, "qm")) for _ in range(2)]  # its share
                await asyncio.sleep(0.5)
                over = await post(k, "qm")
                assert over.status_code == 429, over.text
                assert over.json()["error"]["code"] == "key_queue_full"
                # within its share, the other key still gets in (it waits, then times out)
                fair = await post(v, "qm", timeout=0.3)
                assert fair.status_code == 504, fair.text
                held.append(asyncio.create_task(post(k, "qa")))  # the same queue, by alias
                await asyncio.sleep(0.5)
                assert not any(t.done() for t in held[:3])  # still running / waiting
                other = await post(v, "qm", timeout=0.5)
                for t in held:
                    t.cancel()
                await asyncio.gather(*held, return_exceptions=True)
            assert other.status_code != 429, (
                "another key is refused: the greedy key holds the whole queue through an "
                "alias: " + other.text
            )
        finally:
            f.stop_all()


# ---- permissions (pinned: these pass) ------------------------------------------------------


@pytest.fixture(scope="module")
async def keyed(fleet: Fleet, routes_file: Path, gw: Gateway) -> tuple[Gateway, dict[str, str]]:
    url = fleet.nats_url
    keys = {
        "neither": await make_key(url, "neither", models=("unrelated",)),
        "admin": await make_key(url, "admin", models=("*",), admin=True),
    }
    g = fleet.gateway(
        "--auth", "keys", "--routes", str(routes_file), wait_models=("m-a",), key=keys["admin"]
    )
    return g, keys


FRONTS = {
    "/chat/completions": chat,
    "/completions": lambda m: {"model": m, "prompt": "hi"},
    "/embeddings": lambda m: {"model": m, "input": "hi"},
    "/messages": lambda m: {**chat(m), "max_tokens": 4},
    "/messages/count_tokens": chat,
    "/responses": lambda m: {"model": m, "input": "hi"},
}
VARYING = {"x-request-id", "date", "content-length"}


async def test_no_usable_target_is_the_404_of_a_missing_model_on_every_front(
    keyed: tuple[Gateway, dict[str, str]],
) -> None:
    g, keys = keyed
    async with httpx.AsyncClient(timeout=10) as c:

        async def answer(path: str, model: str, method: str = "POST") -> tuple[Any, ...]:
            if method == "POST":
                r = await c.post(g.base_url + path, json=FRONTS[path](model),
                                 headers=bearer(keys["neither"]))  # fmt: skip
            else:
                r = await c.get(g.base_url + path + model, headers=bearer(keys["neither"]))
            headers = sorted((k, v) for k, v in r.headers.items() if k not in VARYING)
            return r.status_code, headers, r.text.replace(model, "M")

        for path in FRONTS:
            alias, missing = await answer(path, "perm"), await answer(path, "no-such")
            assert alias == missing, (path, alias, missing)
            assert alias[0] == 404, (path, alias)
        alias, missing = (
            await answer("/models/", "perm", "GET"),
            await answer("/models/", "no-such", "GET"),
        )
        assert alias == missing and alias[0] == 404


# ---- forged routes in KV (the deployed accounts.conf) -------------------------------------


async def _admin_routes(hub: OneNodeHub, text: bytes) -> None:
    """What `llmfleet routes push` stores, as the admin; the audit stream a gateway makes."""
    async with actor(hub, "admin", "push") as a, actor(hub, "gateway", "setup") as g:
        kv = await open_bucket(a.js, keys_config(), create=True)  # as the admin CLIs do
        await kv.put(ROUTES_KEY, text)
        await ensure_audit_stream(g.js, AuditSettings())


async def _republish_into_routes(hub: OneNodeHub, headers: dict[str, str] | None = None) -> None:
    """As the gateway role (STREAM.UPDATE of LLMFLEET_AUDIT is one of its rights): aim a
    republish at the routes entry, publish once, put the stream back."""
    async with actor(hub, "gateway", "forge") as g:
        config = stream_config(AuditSettings())
        config.allow_rollup_hdrs = True
        config.republish = api.RePublish(
            src="llmfleet.audit.gw.forge", dest=f"$KV.{KEYS_BUCKET}.{ROUTES_KEY}"
        )
        try:
            await g.js.update_stream(config)
            await g.js.publish("llmfleet.audit.gw.forge", b"aliases: {}", headers=headers)
        finally:
            await g.js.update_stream(stream_config(AuditSettings()))
        assert g.errors == []  # nothing the server refused


async def _fresh_watch(hub: OneNodeHub) -> list[tuple[str, Any]]:
    """What a gateway started now (`--routes kv`) gets from its watch."""
    seen: list[tuple[str, Any]] = []
    async with actor(hub, "gateway", "watch") as g:
        w = RoutesWatch(
            lambda r, v: seen.append(("apply", r)), lambda e: seen.append(("reject", e))
        )
        task = asyncio.create_task(w.run(g.js))
        try:
            async with asyncio.timeout(5):
                await w.ready.wait()
            await asyncio.sleep(0.2)
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    return seen


async def test_a_republished_routes_entry_does_not_take_the_routes_from_new_gateways(
    hub: OneNodeHub,
) -> None:
    """The watch refuses an entry carrying `Nats-Stream` (good), but it reads only the
    last message of the key: after one republished message, every gateway started (or
    restarted) later sees only the forgery, refuses it, and serves no aliases at all,
    though the admin's entry is still in the bucket's history."""
    await _admin_routes(hub, b"aliases: {chat: {chain: [m1, m2]}}\n")
    assert [k for k, _ in await _fresh_watch(hub)] == ["apply"]
    await _republish_into_routes(hub)
    seen = await _fresh_watch(hub)
    applied = [r for k, r in seen if k == "apply"]
    assert applied and isinstance(applied[-1], Routes) and "chat" in applied[-1].aliases, seen


async def test_a_republished_rollup_does_not_erase_the_admins_routes(hub: OneNodeHub) -> None:
    """With `Nats-Rollup: sub` on the republished message (the gateway may allow rollups
    on the stream it updates), the KV stream purges every earlier revision of the key:
    the admin's routes are gone from the broker, not merely hidden (`all` would purge
    every key and price in LLMFLEET_KEYS the same way)."""
    await _admin_routes(hub, b"aliases: {chat: {chain: [m1, m2]}}\n")
    await _republish_into_routes(hub, {"Nats-Rollup": "sub"})
    async with actor(hub, "admin", "check") as a:
        info = await a.js.stream_info(f"KV_{KEYS_BUCKET}", subjects_filter=">")
        kv = await a.js.key_value(KEYS_BUCKET)
        history = await kv.history(ROUTES_KEY)
    assert any(b"chat" in (e.value or b"") for e in history), (info.state, history)


def test_no_broader_allow_hands_out_the_routes_subject() -> None:
    """Sanity of the premise above: no role but admin may publish the routes entry, so
    the republish is the way around permissions (tests/deploy matrix style)."""
    from tests.deploy.test_control_rights import ROLES, allowed, role_rights  # noqa: PLC0415

    rights = role_rights()
    writers = {r for r in ROLES if allowed(rights[r], "publish", f"$KV.{KEYS_BUCKET}.{ROUTES_KEY}")}
    assert writers == {"admin"}
