"""A worker's circuit breaker per model, end to end: a real nats-server, a real worker
process (`--engine openai`) and the fake OpenAI upstream (tests/upstream_server.py) as a
process that the test makes fail (`POST /control`) or kills. The test is a batch producer
on NATS (no gateway) and reads the worker's announcements (`llmfleet.hb.<worker>`)."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from common import protocol as p
from llmfleet.broker import free_port, wait_for_port
from tests.natshelp import (
    Announcements,
    connected,
    publish_request,
    reply_subject,
    request_headers,
    watch_announcements,
)
from tests.procs import Fleet

FAST = ("--heartbeat", "0.2", "--max-concurrency", "2", "--drain-grace", "1")


class Upstream:
    """tests/upstream_server.py as a process on a fixed port, so it can be killed and
    started again where the worker expects it."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._log = workdir / f"upstream-{self.port}.log"
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        script = Path(__file__).parents[1] / "upstream_server.py"
        with self._log.open("ab") as log:
            self._proc = subprocess.Popen(
                [sys.executable, str(script), "--port", str(self.port), "--ttft-ms", "2",
                 "--itl-ms", "1", "--tokens", "3"],
                stdout=log,
                stderr=subprocess.STDOUT,
            )  # fmt: skip
        wait_for_port("127.0.0.1", self.port, 15.0, self._proc)

    def kill(self) -> None:
        if self._proc is not None:
            self._proc.send_signal(signal.SIGKILL)
            self._proc.wait(10)
            self._proc = None

    async def control(self, fail: int | None) -> None:
        async with httpx.AsyncClient() as c:
            r = await c.post(self.url + "/control", json={"fail": fail})
            assert r.status_code == 200 and r.json() == {"fail": fail}

    async def requests(self) -> int:
        async with httpx.AsyncClient() as c:
            return int((await c.get(self.url + "/stats")).json()["requests"])


def model_status(ann: Announcements, worker: str, model: str) -> p.ModelStatus | None:
    a = ann.latest.get(worker)
    if a is None or a.state != "ready":
        return None
    return next((m for m in a.models if m.id == model), None)


def circuit_is(worker: str, model: str, state: str) -> Any:
    def pred(ann: Announcements) -> bool:
        m = model_status(ann, worker, model)
        return m is not None and m.circuit == state

    return pred


class Replies:
    """One request's reply stream, collected from before it is published."""

    def __init__(self) -> None:
        self.items: list[p.Reply] = []
        self.finished = asyncio.Event()

    async def on_msg(self, msg: Any) -> None:
        r = p.decode_reply(msg.data)
        self.items.append(r)
        if isinstance(r, (p.Done, p.Error)):
            self.finished.set()


async def send(nc: Any, model: str, name: str) -> Replies:
    """Publish one chat request as the test producer; its replies arrive in the result."""
    replies = Replies()
    await nc.subscribe(reply_subject(name), cb=replies.on_msg)
    await nc.flush()
    body = json.dumps(
        {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    ).encode()
    await publish_request(nc.jetstream(), model, body, request_headers(reply_subject(name)))
    return replies


async def answered(replies: Replies, timeout: float = 10.0) -> list[p.Reply]:
    async with asyncio.timeout(timeout):
        await replies.finished.wait()
    return replies.items


async def test_upstream_errors_open_the_circuit_and_a_probe_closes_it(
    fleet: Fleet, tmp_path: Path
) -> None:
    model, wid, backoff = "circuit-500", "circuit-500-w", 2.0
    up = Upstream(tmp_path)
    up.start()
    worker = fleet.worker(
        "--engine", "openai", "--upstream", up.url + "/v1", "--model", model,
        "--worker-id", wid, *FAST, "--breaker-backoff", str(backoff),
        "--breaker-backoff-max", "4", "--upstream-health-interval", "0",
    )  # fmt: skip
    try:
        async with connected(fleet.nats_url) as nc, watch_announcements(nc) as ann:
            await ann.wait_for(circuit_is(wid, model, "closed"), timeout=30)
            await up.control(500)
            for i in range(3):
                replies = await answered(await send(nc, model, f"c500.{i}"))
                assert isinstance(replies[0], p.Accepted)
                assert isinstance(replies[-1], p.Error) and replies[-1].status == 502
            await ann.wait_for(circuit_is(wid, model, "open"), timeout=5)
            m = model_status(ann, wid, model)
            assert m is not None and m.circuit_failures == 3
            assert m.circuit_error == "502 upstream_error"
            assert 0 < m.circuit_reopen_in_s <= backoff

            # while open the worker takes no request: it waits in the broker
            held = await send(nc, model, "c500.held")
            await asyncio.sleep(0.5)
            assert held.items == [] and await up.requests() == 3
            await up.control(None)  # the upstream recovers; the backoff passes
            t0 = time.monotonic()
            replies = await answered(held, timeout=backoff + 8)
            assert isinstance(replies[0], p.Accepted) and isinstance(replies[-1], p.Done)
            assert time.monotonic() - t0 < backoff + 5
            assert await up.requests() == 4  # the three failures and the probe
            await ann.wait_for(circuit_is(wid, model, "closed"), timeout=5)
            m = model_status(ann, wid, model)
            assert m is not None and m.circuit_failures == 0 and m.circuit_reopen_in_s == 0
    finally:
        worker.stop()
        up.kill()


async def test_a_dead_upstream_opens_the_circuit_before_any_request(
    fleet: Fleet, tmp_path: Path
) -> None:
    model, wid = "circuit-dead", "circuit-dead-w"
    up = Upstream(tmp_path)
    up.start()
    worker = fleet.worker(
        "--engine", "openai", "--upstream", up.url + "/v1", "--model", model,
        "--worker-id", wid, *FAST, "--upstream-health-interval", "0.2",
        "--breaker-backoff", "0.5", "--breaker-backoff-max", "1",
    )  # fmt: skip
    try:
        async with connected(fleet.nats_url) as nc, watch_announcements(nc) as ann:
            await ann.wait_for(circuit_is(wid, model, "closed"), timeout=30)
            up.kill()  # connection refused from now on; no request is sent
            t0 = time.monotonic()
            await ann.wait_for(circuit_is(wid, model, "open"), timeout=10)
            assert time.monotonic() - t0 < 5
            m = model_status(ann, wid, model)
            assert m is not None and m.failed == 0 and m.completed == 0
            assert m.circuit_error == "health probe: connection refused"
            assert "127.0.0.1" not in m.circuit_error and str(up.port) not in m.circuit_error

            up.start()  # back where it was: the next request probes and closes the circuit
            replies = await answered(await send(nc, model, "dead.after"), timeout=15)
            assert isinstance(replies[-1], p.Done)
            await ann.wait_for(circuit_is(wid, model, "closed"), timeout=5)
    finally:
        worker.stop()
        up.kill()
