"""Operators' view of a real fleet: `llmfleet status` (tables, --json, --watch), the worker
micro service (`$SRV.*`), expiry of a killed worker, and `llmfleet drain` of a live one."""

from __future__ import annotations

import asyncio
import io
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import httpx
import msgspec
import openai
import pytest

from common import names
from common import protocol as p
from llmfleet import status as statuscli
from llmfleet.fleetview import FleetView
from tests.natshelp import connected, publish_request, reply_subject, request_headers
from tests.procs import Fleet, Gateway


def _cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLMFLEET_")}
    return subprocess.run(
        [sys.executable, "-m", "llmfleet", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        check=False,
    )


async def _view(url: str, wait: float = 0.5) -> dict[str, Any]:
    out = io.StringIO()
    await statuscli.status(url, watch=False, interval=1, as_json=True, wait=wait, out=out)
    doc: dict[str, Any] = json.loads(out.getvalue())
    return doc


async def _until(url: str, pred: Callable[[dict[str, Any]], bool], timeout: float = 20) -> dict:
    deadline = time.monotonic() + timeout
    doc: dict[str, Any] = {}
    while time.monotonic() < deadline:
        doc = await _view(url, wait=0.3)
        if pred(doc):
            return doc
        await asyncio.sleep(0.3)
    raise AssertionError(f"status never matched; last: {json.dumps(doc, indent=1)}")


async def _stream(
    gw: Gateway, model: str, max_tokens: int, parts: list[str] | None = None
) -> tuple[list[str], str | None]:
    """Stream one chat completion through the SDK: the text parts (also appended to `parts`
    as they arrive) and the finish reason."""
    parts = [] if parts is None else parts
    finish = None
    async with openai.AsyncOpenAI(base_url=gw.base_url, api_key="x", max_retries=0) as c:
        s = await c.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": "hi"}],
            max_tokens=max_tokens,
            stream=True,
        )
        async for chunk in s:
            if chunk.choices:
                parts.append(chunk.choices[0].delta.content or "")
                finish = chunk.choices[0].finish_reason or finish
    return parts, finish


def _workers(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {w["worker"]: w for w in doc["workers"]}


def _models(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {m["model"]: m for m in doc["models"]}


@pytest.fixture(scope="module")
def gw(fleet: Fleet) -> Gateway:
    fleet.worker("--worker-id", "gpu-a", "--model", "st-a", "--model", "st-b",
                 "--max-concurrency", "3")  # fmt: skip
    fleet.worker("--worker-id", "gpu-b", "--model", "st-a", "--max-concurrency", "2")
    return fleet.gateway(wait_models=("st-a", "st-b"))


async def test_status_json_counts_workers_slots_requests_and_queues(
    gw: Gateway, nats_url: str
) -> None:
    doc = await _until(nats_url, lambda d: {"gpu-a", "gpu-b"} <= set(_workers(d)))
    a = _workers(doc)["gpu-a"]
    assert (a["engine"], a["state"], a["models"]) == ("sim", "ready", ["st-a", "st-b"])
    assert (a["slots_used"], a["slots_total"]) == (0, 6)
    assert a["version"] and a["host"] and a["uptime_s"] > 0
    st_a = _models(doc)["st-a"]
    assert (st_a["status"], st_a["workers"], st_a["slots_total"]) == ("ready", 2, 5)
    gws = {g["gateway"]: g for g in doc["gateways"]}
    assert len(gws) == 1, doc["gateways"]
    (g,) = gws.values()
    assert g["state"] == "ready" and g["listen"] == f"127.0.0.1:{gw.port}"
    assert g["workers"] >= 2 and g["version"] and g["uptime_s"] > 0

    async with openai.AsyncOpenAI(base_url=gw.base_url, api_key="x") as client:
        await asyncio.gather(
            *(
                client.chat.completions.create(
                    model="st-a", messages=[{"role": "user", "content": "hi"}], max_tokens=5
                )
                for _ in range(12)
            )
        )
    # Counters arrive with the next heartbeat; rates need two heartbeats.
    doc = await _until(
        nats_url,
        lambda d: _models(d)["st-a"]["completed"] == 12 and _models(d)["st-a"]["tokens_per_s"] > 0,
    )
    st_a = _models(doc)["st-a"]
    assert st_a["errors"] == 0
    doc = await _until(nats_url, lambda d: d["gateways"][0]["requests"] >= 12)
    assert doc["gateways"][0]["server_errors"] == 0
    assert st_a["req_per_s"] > 0
    assert sum(w["completed"] for w in doc["workers"]) == 12

    # Requests for a model nobody serves wait in the broker and show up as its queue.
    async with connected(nats_url) as nc:
        js = nc.jetstream()
        body = json.dumps({"model": "orphan/m:1", "messages": [{"role": "user", "content": "x"}]})
        for _ in range(5):
            await publish_request(
                js, "orphan/m:1", body.encode(), request_headers(reply_subject("none"))
            )
    await asyncio.sleep(0.2)
    orphan = _models(await _view(nats_url))["orphan/m:1"]
    assert (orphan["status"], orphan["workers"], orphan["queued"]) == ("unavailable", 0, 5)
    assert orphan["oldest_wait_s"] > 0


def test_status_tables_and_watch_from_the_cli(gw: Gateway, nats_url: str) -> None:
    r = _cli("status", "--nats", nats_url)
    assert r.returncode == 0, r.stderr
    for text in ("models", "workers", "gateways", "queued", "oldest wait", "st-a", "gpu-b"):
        assert text in r.stdout, r.stdout

    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "llmfleet",
            "status",
            "--nats",
            nats_url,
            "--watch",
            "--interval",
            "0.2",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(3.0)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    assert out.count("gpu-b") >= 2, out  # refreshed: several whole frames on a pipe


def test_status_reports_an_unreachable_broker() -> None:
    r = _cli("status", "--nats", "nats://admin:hunter2@127.0.0.1:1", timeout=30)
    assert r.returncode == 1
    assert "cannot reach the NATS server at nats://127.0.0.1:1" in r.stderr
    assert "hunter2" not in r.stderr  # the password never reaches the terminal
    assert "Traceback" not in r.stderr


async def test_workers_are_a_nats_micro_service(gw: Gateway, nats_url: str) -> None:
    async with connected(nats_url) as nc:
        inbox = nc.new_inbox()
        got: list[dict[str, Any]] = []

        async def on_msg(msg: Any) -> None:
            got.append(json.loads(msg.data))

        sub = await nc.subscribe(inbox, cb=on_msg)
        await nc.publish(f"$SRV.PING.{names.SERVICE_NAME}", b"", reply=inbox)
        await asyncio.sleep(0.5)
        await sub.unsubscribe()
        by_worker = {g["metadata"]["worker"]: g for g in got}
        assert {"gpu-a", "gpu-b"} <= set(by_worker)
        assert by_worker["gpu-a"]["metadata"]["models"] == "st-a,st-b"
        assert by_worker["gpu-a"]["type"] == "io.nats.micro.v1.ping_response"

        sid = by_worker["gpu-b"]["id"]
        info = json.loads((await nc.request(f"$SRV.INFO.{names.SERVICE_NAME}.{sid}", b"")).data)
        subjects = {e["name"]: e["subject"] for e in info["endpoints"]}
        assert subjects == {
            "status": "llmfleet.ctl.gpu-b.status",
            "drain": "llmfleet.ctl.gpu-b.drain",
        }
        stats = json.loads((await nc.request(f"$SRV.STATS.{names.SERVICE_NAME}.{sid}", b"")).data)
        data = next(e["data"] for e in stats["endpoints"] if e["name"] == "status")
        assert data["worker"] == "gpu-b" and data["state"] == "ready"

        reply = await nc.request(names.service_subject("gpu-a", "status"), b"", timeout=2)
        a = p.decode_announce(reply.data)
        assert a.worker == "gpu-a"
        assert [m.id for m in a.models] == ["st-a", "st-b"]


async def test_a_killed_worker_leaves_the_status(fleet: Fleet, gw: Gateway, nats_url: str) -> None:
    w = fleet.worker("--worker-id", "gpu-doomed", "--model", "st-a", "--heartbeat", "0.5")
    await _until(nats_url, lambda d: "gpu-doomed" in _workers(d))
    w.stop(signal.SIGKILL)
    doc = await _until(nats_url, lambda d: "gpu-doomed" not in _workers(d))
    assert {"gpu-a", "gpu-b"} <= set(_workers(doc))


async def test_drain_lets_the_running_stream_finish_and_the_worker_exit(
    fleet: Fleet, gw: Gateway, nats_url: str
) -> None:
    w = fleet.worker(
        "--worker-id", "gpu-drain", "--model", "st-d", "--sim-itl-ms", "120", "--sim-tokens", "60"
    )
    fleet.wait_ready(gw, ("st-d",))
    await _until(nats_url, lambda d: _workers(d).get("gpu-drain", {}).get("state") == "ready")

    running = asyncio.create_task(_stream(gw, "st-d", 40))
    await _until(nats_url, lambda d: _workers(d).get("gpu-drain", {}).get("slots_used") == 1)
    loop = asyncio.get_running_loop()
    drained = await loop.run_in_executor(
        None, lambda: _cli("drain", "--nats", nats_url, "gpu-dr", "--wait")
    )
    assert drained.returncode == 0, drained.stderr
    assert "gpu-drain is draining: 1 request(s) in flight" in drained.stderr
    assert "has stopped" in drained.stderr
    parts, finish = await running
    assert finish == "length" and len("".join(parts).split()) >= 30
    assert w.popen.wait(20) == 0
    doc = await _view(nats_url)
    assert "gpu-drain" not in _workers(doc)
    r = httpx.get(gw.base_url + "/models/st-d")
    assert r.json()["status"] in ("unavailable", "draining"), r.text

    missing = _cli("drain", "--nats", nats_url, "no-such-worker")
    assert missing.returncode == 1
    assert "no single live worker matches 'no-such-worker'" in missing.stderr
    ambiguous = _cli("drain", "--nats", nats_url, "gpu-")
    assert ambiguous.returncode == 1, ambiguous.stderr


def test_status_view_round_trips_as_json() -> None:
    view = FleetView(models=[], workers=[], queue_error="x")
    assert msgspec.json.decode(statuscli.to_json(view))["queue_error"] == "x"


async def test_drain_grace_ends_a_long_stream_with_a_clear_error(
    fleet: Fleet, gw: Gateway, nats_url: str
) -> None:
    w = fleet.worker(
        "--worker-id", "gpu-grace", "--model", "st-g", "--drain-grace", "1",
        "--sim-itl-ms", "200", "--sim-tokens", "200",
    )  # fmt: skip
    fleet.wait_ready(gw, ("st-g",))
    await _until(nats_url, lambda d: _workers(d).get("gpu-grace", {}).get("state") == "ready")
    got: list[str] = []
    running = asyncio.create_task(_stream(gw, "st-g", 200, got))
    await _until(nats_url, lambda d: _workers(d).get("gpu-grace", {}).get("slots_used") == 1)
    loop = asyncio.get_running_loop()
    drained = await loop.run_in_executor(
        None, lambda: _cli("drain", "--nats", nats_url, "gpu-grace", "--wait")
    )
    assert drained.returncode == 0, drained.stderr
    # The grace (1 s) ran out long before the 200 tokens (40 s): the stream ends with the
    # OpenAI-shaped error event, not a silent cut.
    with pytest.raises(openai.APIError, match="cancelled"):
        await running
    assert 0 < len(got) < 200
    assert w.popen.wait(20) == 0


async def test_a_stopped_gateway_leaves_the_status_at_once(
    fleet: Fleet, gw: Gateway, nats_url: str
) -> None:
    extra = fleet.gateway()
    doc = await _until(nats_url, lambda d: len(d["gateways"]) == 2)
    listens = {g["listen"] for g in doc["gateways"]}
    assert f"127.0.0.1:{extra.port}" in listens
    assert extra.stop() == 0
    doc = await _view(nats_url)  # no TTL wait: it announced `stopped`
    assert [g["listen"] for g in doc["gateways"]] == [f"127.0.0.1:{gw.port}"]


def test_bad_ids_are_refused_with_a_clear_message() -> None:
    for role, flag in (("gateway", "--gateway-id"), ("worker", "--worker-id")):
        r = _cli(role, "--nats", "nats://127.0.0.1:1", flag, "a.b", timeout=30)
        assert r.returncode == 1
        assert f"{role} id must match" in r.stderr
        assert "Traceback" not in r.stderr
