"""Broker faults: a node of a real 3-node cluster killed, restarted and frozen (SIGSTOP)
under load, and a lone broker restarted. Every request must end as a complete answer or a
clear error (never a hang, a silent truncation or duplicated text), and the fleet recovers."""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from llmfleet.broker import EmbeddedNats
from tests.cluster import NatsCluster
from tests.procs import Fleet, Gateway
from tests.sse import sse_events, sse_text

MODEL = "clustered-model"
TOKENS = 15


@pytest.fixture(scope="module")
def cluster() -> Iterator[NatsCluster]:
    c = NatsCluster(3).start()
    try:
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="module")
def cfleet(cluster: NatsCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    f = Fleet(cluster.urls, tmp_path_factory.mktemp("cfleet"))
    try:
        yield f
    finally:
        f.stop_all()


ERROR_CODES: Counter[str] = Counter()


def classify(status: int, raw: bytes) -> str:
    if status != 200:
        err = json.loads(raw).get("error", {})
        ERROR_CODES[f"{status} {err.get('code')}"] += 1
        return "error" if {"message", "type", "param", "code"} <= set(err) else "bad"
    events = sse_events(raw)
    if not events or events[-1] != "[DONE]":
        return "bad"  # truncated without an end
    last = events[-2] if len(events) > 1 else {}
    if isinstance(last, dict) and "error" in last:
        ERROR_CODES[f"sse {last['error'].get('code')}"] += 1
        return "error"
    return "ok" if len(sse_text(events).split()) == TOKENS else "bad"


async def run_load(
    gw: Gateway,
    stop: asyncio.Event,
    tally: Counter[str],
    per_phase: dict[str, Counter[str]],
    phase: list[str],
) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "stream": True}
    async with httpx.AsyncClient(base_url=gw.base_url, timeout=30) as http:
        while not stop.is_set():
            current = phase[0]
            try:
                async with http.stream("POST", "/chat/completions", json=body) as r:
                    raw = await r.aread()
                    outcome = classify(r.status_code, raw)
            except httpx.HTTPError:
                outcome = "bad"  # includes a 30 s hang
            tally[outcome] += 1
            per_phase.setdefault(current, Counter())[outcome] += 1


async def test_cluster_node_killed_and_frozen_under_load(
    cluster: NatsCluster, cfleet: Fleet
) -> None:
    worker_args = (
        "--model", MODEL, "--max-concurrency", "4", "--stream-replicas", "3",
        "--sim-ttft-ms", "10", "--sim-itl-ms", "20", "--sim-tokens", str(TOKENS),
    )  # fmt: skip
    cfleet.worker(*worker_args)
    cfleet.worker(*worker_args)
    gw = cfleet.gateway("--stream-replicas", "3", "--queue-timeout", "20", wait_models=(MODEL,))
    tally: Counter[str] = Counter()
    per_phase: dict[str, Counter[str]] = {}
    phase = ["baseline"]
    stop = asyncio.Event()
    loaders = [asyncio.create_task(run_load(gw, stop, tally, per_phase, phase)) for _ in range(8)]
    t0 = time.monotonic()
    await asyncio.sleep(1.5)
    phase[0] = "node0 killed"
    cluster.kill(0)
    await asyncio.sleep(3.0)
    phase[0] = "node0 restarted"
    await asyncio.to_thread(cluster.restart, 0)
    await asyncio.sleep(3.0)
    phase[0] = "node1 frozen"
    cluster.freeze(1)
    await asyncio.sleep(6.0)
    phase[0] = "node1 thawed"
    cluster.thaw(1)
    await asyncio.sleep(4.0)
    stop.set()
    await asyncio.gather(*loaders)
    phase[0] = "after the faults"
    stop.clear()
    after = [asyncio.create_task(run_load(gw, stop, tally, per_phase, phase)) for _ in range(2)]
    await asyncio.sleep(3.0)
    stop.set()
    await asyncio.gather(*after)
    print(f"\n{time.monotonic() - t0:.1f}s: {dict(tally)} errors: {dict(ERROR_CODES)}")
    for name, c in per_phase.items():
        print(f"  {name:16s} {dict(c)}")
    assert tally["bad"] == 0, per_phase  # no hang, no silent truncation, no duplicated text
    assert per_phase["baseline"]["ok"] > 0
    assert per_phase["after the faults"]["ok"] > 0
    assert per_phase["after the faults"]["error"] == 0  # the fleet healed


async def test_readyz_follows_the_broker_and_the_fleet_recovers_after_restart(
    tmp_path: Path,
) -> None:
    server = EmbeddedNats(store_dir=str(tmp_path / "js")).start()
    fleet = Fleet(server.url, tmp_path)
    try:
        fleet.worker("--model", "m1", "--sim-ttft-ms", "1", "--sim-itl-ms", "1")
        gw = fleet.gateway(wait_models=("m1",))
        body = {"model": "m1", "messages": [{"role": "user", "content": "x"}], "max_tokens": 2}
        async with httpx.AsyncClient(base_url=gw.base_url, timeout=30) as http:
            assert (await http.get(gw.url + "/readyz")).status_code == 200
            server.stop()
            for _ in range(100):
                if (await http.get(gw.url + "/readyz")).status_code == 503:
                    break
                await asyncio.sleep(0.1)
            assert (await http.get(gw.url + "/readyz")).status_code == 503
            r = await http.post("/chat/completions", json=body)
            assert r.status_code == 503 and r.headers["retry-after"]
            server.start()  # same port; the memory stream is gone and must be re-created
            for _ in range(150):
                if (await http.get(gw.url + "/readyz")).status_code == 200:
                    break
                await asyncio.sleep(0.1)
            assert (await http.get(gw.url + "/readyz")).status_code == 200
            for _ in range(100):
                r = await http.post("/chat/completions", json=body)
                if r.status_code == 200:
                    break
                await asyncio.sleep(0.1)
            assert r.status_code == 200, r.text
            assert len(r.json()["choices"][0]["message"]["content"].split()) == 2
    finally:
        fleet.stop_all()
        server.stop()
