"""Aliases, fallback chains and circuit breakers at the gateway (issue 15), against real
processes: nats-server, gateways started with `--routes`, sim workers, the official
`openai` SDK.

- Killing the chain's first model's workers under load: every request completes (through
  the second model once the first is gone), with `x-llmfleet-alias`, `x-llmfleet-model`
  and every chunk's `model` naming the model that served it, no text twice; the circuit
  opens; restarted workers close it through the half-open probe and traffic returns.
- A key that may run only the second target is served by it, the first never tried
  (worker counts); a key that may run neither gets the 404 of a model that does not exist.
- SIGHUP with a broken file keeps the old routes, with a good one takes the new; a cycle
  or an unknown target stops the start with one clear line.
- `/v1/aliases` and `/v1/models` show a key only what it may use; `/v1/health` is for
  admin keys; the metrics are exported.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

from tests.keyhelp import make_key
from tests.natshelp import connected, watch_announcements
from tests.procs import Fleet, Gateway, Proc, health, until, write_routes

FIRST, SECOND = "r-first", "r-second"
P_FIRST, P_SECOND = "p-first", "p-second"
ROUTES = f"""
default_model: chat
aliases:
  chat:
    description: chat with a fallback
    chain: [{FIRST}, {SECOND}]
    hop_timeout: 2
  perm:
    chain: [{P_FIRST}, {P_SECOND}]
    hop_timeout: 2
  nested:
    chain: [perm, chat]
"""
# the first model is slow to its first token (so a kill lands before it) and quick after
FIRST_WORKER = (
    "--model", FIRST, "--max-concurrency", "2",
    "--sim-ttft-ms", "300", "--sim-itl-ms", "1", "--sim-tokens", "3",
)  # fmt: skip
QUICK = ("--sim-ttft-ms", "5", "--sim-itl-ms", "1", "--sim-tokens", "3", "--max-concurrency", "8")
BREAKER = ("--breaker-backoff", "1", "--breaker-backoff-max", "2")


def bearer(secret: str) -> dict[str, str]:
    return {"authorization": f"Bearer {secret}"}


@pytest.fixture(scope="module")
def routes_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_routes(tmp_path_factory, ROUTES)


@pytest.fixture(scope="module")
def first_workers(fleet: Fleet) -> list[Proc]:
    return [fleet.worker(*FIRST_WORKER) for _ in range(2)]


@pytest.fixture(scope="module")
def gw(fleet: Fleet, routes_file: Path, first_workers: list[Proc]) -> Gateway:
    fleet.worker("--model", SECOND, *QUICK)
    fleet.worker("--model", P_FIRST, "--model", P_SECOND, *QUICK)
    return fleet.gateway(
        "--routes", str(routes_file), *BREAKER,
        wait_models=(FIRST, SECOND, P_FIRST, P_SECOND),
    )  # fmt: skip


@pytest.fixture(scope="module")
async def keys(nats_url: str) -> dict[str, str]:
    return {
        "second-only": await make_key(nats_url, "second-only", models=(P_SECOND,)),
        "neither": await make_key(nats_url, "neither", models=("unrelated",)),
        "alias-name": await make_key(nats_url, "alias-name", models=("perm", "chat")),
        "all": await make_key(nats_url, "all", models=("*",)),
        "admin": await make_key(nats_url, "admin", models=("*",), admin=True),
    }


@pytest.fixture(scope="module")
def keyed(fleet: Fleet, routes_file: Path, gw: Gateway, keys: dict[str, str]) -> Gateway:
    return fleet.gateway(
        "--auth", "keys", "--routes", str(routes_file),
        wait_models=(P_FIRST, P_SECOND), key=keys["admin"],
    )  # fmt: skip


class Answer:
    def __init__(self, i: int, stream: bool) -> None:
        self.i, self.stream = i, stream
        self.headers: httpx.Headers | None = None
        self.text = ""
        self.chunk_models: set[str] = set()
        self.error: str | None = None
        self.code: str | None = None
        self.started_at = time.monotonic()

    @property
    def model(self) -> str:
        assert self.headers is not None
        return self.headers.get("x-llmfleet-model", "")


async def ask(client: openai.AsyncOpenAI, i: int, stream: bool, model: str = "chat") -> Answer:
    a = Answer(i, stream)
    messages = [{"role": "user", "content": f"request number {i}"}]
    try:
        if stream:
            raw = await client.chat.completions.with_raw_response.create(
                model=model, messages=messages, stream=True
            )
            a.headers = raw.headers
            async for chunk in raw.parse():
                a.chunk_models.add(chunk.model)
                for c in chunk.choices:
                    a.text += c.delta.content or ""
        else:
            raw = await client.chat.completions.with_raw_response.create(
                model=model, messages=messages
            )
            a.headers = raw.headers
            done = raw.parse()
            a.chunk_models.add(done.model)
            a.text = done.choices[0].message.content or ""
    except openai.APIError as exc:
        a.error = f"{type(exc).__name__}: {exc}"
        a.code = getattr(exc, "code", None)
    return a


async def expected_text(gw: Gateway, i: int) -> str:
    """What the sim says to request i (the same on every model and run)."""
    async with openai.AsyncOpenAI(base_url=gw.base_url, api_key="x") as client:
        a = await ask(client, i, False, SECOND)
    assert a.error is None, a.error
    return a.text


async def test_killing_the_first_models_workers_falls_back_and_the_probe_brings_it_back(
    gw: Gateway, fleet: Fleet, first_workers: list[Proc]
) -> None:
    n, killed_at = 48, 0.0
    async with openai.AsyncOpenAI(base_url=gw.base_url, api_key="x", max_retries=0) as client:
        sem = asyncio.Semaphore(8)

        async def one(i: int) -> Answer:
            async with sem:
                return await ask(client, i, stream=i % 2 == 0)

        async def killer() -> None:
            nonlocal killed_at
            await asyncio.sleep(0.8)  # under load: both first workers busy, a backlog queued
            for w in first_workers:
                w.popen.kill()
            killed_at = time.monotonic()

        answers, _ = await asyncio.gather(asyncio.gather(*(one(i) for i in range(n))), killer())
    by_model: dict[str, int] = {}
    for a in answers:
        if a.error is not None:
            # only a stream that was mid-answer on a killed worker may fail (after its
            # first byte nothing falls back): at most one per slot of the killed workers
            assert a.stream and a.headers is not None and a.model == FIRST, (a.i, a.error)
            continue
        assert a.headers is not None
        assert a.headers["x-llmfleet-alias"] == "chat"
        assert a.model in (FIRST, SECOND)
        assert a.chunk_models == {a.model}, (a.i, a.chunk_models)
        by_model[a.model] = by_model.get(a.model, 0) + 1
        if a.started_at > killed_at + 0.01:
            assert a.model == SECOND, a.i
    failed = [a for a in answers if a.error is not None]
    assert len(failed) <= 4
    assert by_model.get(SECOND, 0) >= n // 2
    for a in answers[:: n // 6]:  # nothing reached a client twice
        if a.error is None:
            assert a.text == await expected_text(gw, a.i), a.i

    doc = await health(gw)
    first = doc["models"][FIRST]
    assert first["failures"] >= 3
    assert first["state"] in ("open", "half_open")  # opened; only a good probe closes it
    assert first["last_error"]
    async with httpx.AsyncClient() as c:
        metrics = (await c.get(gw.url + "/metrics")).text
    assert f'llmfleet_fallback_total{{from_model="{FIRST}",reason=' in metrics
    assert 'llmfleet_alias_resolved_total{alias="chat"' in metrics
    assert f'llmfleet_circuit_state{{model="{FIRST}"}}' in metrics

    # the workers come back: the half-open probe closes the circuit, traffic returns
    for _ in range(2):
        fleet.worker(*FIRST_WORKER)
    async with openai.AsyncOpenAI(base_url=gw.base_url, api_key="x", max_retries=0) as client:

        async def served_by_first() -> bool:
            a = await ask(client, 1000, stream=False)
            assert a.error is None, a.error
            return a.model == FIRST

        await until(served_by_first, 30.0, "a chain request served by the restarted model")
        assert (await health(gw))["models"][FIRST]["state"] == "closed"
        later = await asyncio.gather(*(ask(client, 2000 + i, i % 2 == 0) for i in range(4)))
    assert [a.model for a in later] == [FIRST] * 4


async def test_a_key_that_may_run_only_the_second_target_never_tries_the_first(
    keyed: Gateway, fleet: Fleet, keys: dict[str, str]
) -> None:
    async with connected(fleet.nats_url) as nc, watch_announcements(nc) as ann:
        await ann.wait_for(lambda a: a.model(P_FIRST) and a.model(P_SECOND))

        def completed(model: str) -> int:
            return sum(m.completed for _, m in ann.model(model))

        before = completed(P_FIRST), completed(P_SECOND)
        async with openai.AsyncOpenAI(
            base_url=keyed.base_url, api_key=keys["second-only"], max_retries=0
        ) as client:
            answers = [await ask(client, i, i % 2 == 0, "perm") for i in range(6)]
            nested = await ask(client, 99, False, "nested")  # perm's, then chat's targets
        for a in [*answers, nested]:
            assert a.error is None, a.error
            assert a.model == P_SECOND
            assert a.chunk_models == {P_SECOND}
        assert nested.headers is not None
        assert nested.headers["x-llmfleet-alias"] == "nested"
        await ann.wait_for(lambda a: completed(P_SECOND) >= before[1] + 7)
        assert completed(P_FIRST) == before[0]  # never tried


async def test_a_key_that_may_run_no_target_gets_the_404_of_a_missing_model(
    keyed: Gateway, keys: dict[str, str]
) -> None:
    async with httpx.AsyncClient() as c:
        for key in ("neither", "alias-name"):  # naming the alias in a key grants nothing
            got = {}
            for model in ("perm", "no-such-model"):
                r = await c.post(
                    keyed.base_url + "/chat/completions",
                    headers=bearer(keys[key]),
                    json={"model": model, "messages": [{"role": "user", "content": "hi"}]},
                )
                assert r.status_code == 404
                body = r.json()
                body["error"]["message"] = body["error"]["message"].replace(model, "M")
                got[model] = (body, "x-llmfleet-alias" in r.headers)
            assert got["perm"] == got["no-such-model"]
            assert got["perm"][0]["error"]["code"] == "model_not_found"
            # no default model either: `chat` names targets it may not run
            r = await c.post(
                keyed.base_url + "/chat/completions",
                headers=bearer(keys[key]),
                json={"messages": [{"role": "user", "content": "hi"}]},
            )
            assert r.status_code == 400, r.text
            assert "chat" not in r.text


async def test_aliases_models_and_health_show_a_key_only_what_it_may_use(
    keyed: Gateway, keys: dict[str, str]
) -> None:
    async with httpx.AsyncClient() as c:

        async def get(path: str, key: str) -> httpx.Response:
            return await c.get(keyed.base_url + path, headers=bearer(keys[key]))

        doc = (await get("/aliases", "second-only")).json()
        assert [(a["id"], a["chain"]) for a in doc["data"]] == [
            ("perm", [P_SECOND]),
            ("nested", [P_SECOND]),
        ]
        assert doc["default_model"] is None
        assert (await get("/aliases", "neither")).json()["data"] == []
        everything = (await get("/aliases", "all")).json()
        assert {a["id"] for a in everything["data"]} == {"chat", "perm", "nested"}
        assert everything["default_model"] == "chat"
        nested = next(a for a in everything["data"] if a["id"] == "nested")
        assert nested["chain"] == [P_FIRST, P_SECOND, FIRST, SECOND]

        models = {m["id"]: m for m in (await get("/models", "second-only")).json()["data"]}
        assert set(models) == {P_SECOND, "perm", "nested"}
        assert models["perm"]["alias_for"] == [P_SECOND]
        assert models["perm"]["status"] == "ready"
        assert (await get("/models/perm", "second-only")).json()["alias_for"] == [P_SECOND]
        assert (await get("/models/perm", "neither")).status_code == 404
        assert (await get("/models/chat", "second-only")).status_code == 404

        assert (await get("/health", "all")).status_code == 403
        doc = (await get("/health", "admin")).json()
        assert doc["models"][P_FIRST]["state"] == "closed"
        assert doc["routes"]["aliases"] == 3


async def test_sighup_keeps_the_last_good_routes_and_takes_a_good_new_file(
    fleet: Fleet, gw: Gateway, tmp_path: Path
) -> None:
    path = tmp_path / "hup.yaml"
    path.write_text(f"aliases:\n  hup-a: {{chain: [{P_FIRST}]}}\n")
    g = fleet.gateway("--routes", str(path), wait_models=(P_FIRST,))
    async with openai.AsyncOpenAI(base_url=g.base_url, api_key="x", max_retries=0) as client:
        assert (await ask(client, 1, False, "hup-a")).model == P_FIRST

        path.write_text("aliases:\n  hup-a: {chain: [hup-a]}\n")  # a cycle
        g.popen.send_signal(signal.SIGHUP)

        async def refused() -> bool:
            return (await health(g))["routes"]["reloads_failed"] == 1

        await until(refused, 5.0, "the broken file refused")
        routes = (await health(g))["routes"]
        assert "cycle" in routes["last_error"]
        assert (await ask(client, 2, True, "hup-a")).model == P_FIRST  # still served
        assert g.alive()
        assert "routes reload refused" in g.log()

        path.write_text(f"aliases:\n  hup-b: {{chain: [{P_SECOND}]}}\n")
        g.popen.send_signal(signal.SIGHUP)

        async def taken() -> bool:
            a = await ask(client, 3, False, "hup-b")
            return a.error is None and a.model == P_SECOND

        await until(taken, 5.0, "the new file in force")
        gone = await ask(client, 4, False, "hup-a")
        assert gone.error is not None and "NotFound" in gone.error
    async with httpx.AsyncClient() as c:
        metrics = (await c.get(g.url + "/metrics")).text
    assert 'llmfleet_routes_reloads_total{outcome="failed"} 1.0' in metrics
    assert 'llmfleet_routes_reloads_total{outcome="ok"} 2.0' in metrics


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("aliases:\n  a: {chain: [b]}\n  b: {chain: [a]}\n", "cycle"),
        ("models: [m1]\naliases:\n  a: {chain: [m1, m2]}\n", "unknown target 'm2'"),
    ],
)
def test_a_bad_routes_file_stops_the_start_with_one_clear_line(
    nats_url: str, tmp_path: Path, text: str, says: str
) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    done = subprocess.run(
        [sys.executable, "-m", "llmfleet", "gateway", "--nats", nats_url, "--port", "0",
         "--routes", str(path)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode != 0
    assert says in done.stderr
    assert "Traceback" not in done.stderr


def push(nats_url: str, path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "llmfleet", "routes", "push", str(path), "--nats", nats_url],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


async def test_routes_push_reaches_every_kv_gateway_within_2s_keeping_the_last_good(
    fleet: Fleet, gw: Gateway, nats_url: str, tmp_path: Path
) -> None:
    kv_gateways = [fleet.gateway("--routes", "kv", wait_models=(P_FIRST,)) for _ in range(2)]

    async def aliases(g: Gateway) -> set[str]:
        async with httpx.AsyncClient() as c:
            r = await c.get(g.base_url + "/aliases", headers=bearer("x"))
        return {a["id"] for a in r.json()["data"]}

    async def everywhere(want: set[str]) -> None:
        start = time.monotonic()

        async def seen() -> bool:
            return all([await aliases(g) == want for g in kv_gateways])

        await until(seen, 2.0, f"{want} on both gateways")
        assert time.monotonic() - start <= 2.0 + 0.5  # the contract, plus one poll

    first = tmp_path / "a.yaml"
    first.write_text(f"aliases:\n  kv-a: {{chain: [{P_FIRST}]}}\n")
    assert push(nats_url, first).returncode == 0
    await everywhere({"kv-a"})
    async with openai.AsyncOpenAI(base_url=kv_gateways[1].base_url, api_key="x") as client:
        assert (await ask(client, 1, True, "kv-a")).model == P_FIRST

    bad = tmp_path / "bad.yaml"
    bad.write_text("aliases:\n  kv-a: {chain: [kv-b]}\n  kv-b: {chain: [kv-a]}\n")
    refused = push(nats_url, bad)
    assert refused.returncode != 0
    assert "cycle" in refused.stderr
    # an entry written around the CLI's check: every gateway refuses it, keeps the last good
    async with connected(nats_url) as nc:
        kv = await nc.jetstream().key_value("LLMFLEET_KEYS")
        await kv.put("routes", b"aliases: {kv-z: {chain: [kv-z]}}")

    async def refused_everywhere() -> bool:
        return all([(await health(g))["routes"]["reloads_failed"] >= 1 for g in kv_gateways])

    await until(refused_everywhere, 2.0, "the forged entry refused on both")
    assert all([await aliases(g) == {"kv-a"} for g in kv_gateways])

    second = tmp_path / "b.yaml"
    second.write_text(f"aliases:\n  kv-b: {{chain: [{P_SECOND}]}}\n")
    assert push(nats_url, second).returncode == 0
    await everywhere({"kv-b"})
    async with openai.AsyncOpenAI(base_url=kv_gateways[0].base_url, api_key="x") as client:
        assert (await ask(client, 2, False, "kv-b")).model == P_SECOND
    for g in kv_gateways:
        g.stop()


async def test_an_upstream_answering_500_opens_the_worker_and_model_circuits_and_falls_back(
    fleet: Fleet, gw: Gateway, tmp_path: Path
) -> None:
    """The openai engine against the fake upstream, made to answer 500: the chain serves
    every request from its second model, the gateway's circuit for the first opens after
    3 failures, the worker's own circuit opens too (it stops pulling), and from then on
    the first model is skipped at once: no further request reaches the upstream."""
    from tests.e2e.test_worker_circuit import Upstream  # noqa: PLC0415

    upstream = Upstream(tmp_path)
    upstream.start()
    try:
        fleet.worker(
            "--engine", "openai", "--upstream", upstream.url + "/v1", "--model", "u-first",
            "--worker-id", "w-upstream", "--heartbeat", "0.2", "--breaker-backoff", "30",
            "--upstream-health-interval", "0",
        )  # fmt: skip
        path = tmp_path / "up.yaml"
        path.write_text(f"aliases:\n  up: {{chain: [u-first, {SECOND}], hop_timeout: 5}}\n")
        g = fleet.gateway("--routes", str(path), wait_models=("u-first", SECOND))
        async with openai.AsyncOpenAI(base_url=g.base_url, api_key="x", max_retries=0) as client:
            assert (await ask(client, 1, False, "up")).model == "u-first"  # healthy first
            await upstream.control(500)
            answers = [await ask(client, 10 + i, i % 2 == 0, "up") for i in range(4)]
            for a in answers:
                assert a.error is None, a.error
                assert a.model == SECOND
                assert a.chunk_models == {SECOND}

            async def both_open() -> dict | None:
                doc = await health(g)
                m = doc["models"]["u-first"]
                w = m["workers"].get("w-upstream", {})
                return doc if m["state"] == "open" and w.get("state") == "open" else None

            doc = await until(both_open, 10.0, "the model's and the worker's circuits open")
            first = doc["models"]["u-first"]
            assert first["status"] == "unhealthy"
            assert first["failures"] >= 3
            assert "upstream_error" in first["last_error"]
            assert first["reopen_in_s"] > 0
            worker = first["workers"]["w-upstream"]
            assert worker["failures"] >= 3
            assert worker["last_error"]
            assert "127.0.0.1" not in worker["last_error"]  # no upstream address leaks

            seen = await upstream.requests()
            skipped = [await ask(client, 20 + i, i % 2 == 0, "up") for i in range(4)]
            assert [a.model for a in skipped] == [SECOND] * 4
            assert all(a.error is None for a in skipped)
            assert await upstream.requests() == seen  # never tried while open
            direct = await ask(client, 30, False, "u-first")
            assert direct.code == "model_unhealthy", direct.error
        async with httpx.AsyncClient() as c:
            metrics = (await c.get(g.url + "/metrics")).text
        assert 'llmfleet_circuit_state{model="u-first"} 2.0' in metrics
        assert 'llmfleet_worker_circuit_state{model="u-first",worker="w-upstream"} 2.0' in metrics
        assert (
            'llmfleet_fallback_total{from_model="u-first",reason="upstream_error",'
            f'to_model="{SECOND}"}}' in metrics
        )
    finally:
        upstream.kill()
