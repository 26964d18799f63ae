"""While a worker's engine loads (here: its vLLM-like upstream is not up yet), the model is
listed as loading and requests wait in the broker instead of failing."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
from pathlib import Path

import httpx

from llmfleet.broker import free_port, wait_for_port
from tests.procs import Fleet

MODEL = "late-model"


async def test_requests_queue_while_the_model_loads(fleet: Fleet, tmp_path: Path) -> None:
    port = free_port()
    fleet.worker(
        "--engine", "openai", "--model", MODEL, "--upstream", f"http://127.0.0.1:{port}/v1",
    )  # fmt: skip
    gw = fleet.gateway(wait_models=(MODEL,))
    async with httpx.AsyncClient(base_url=gw.base_url, timeout=60) as http:
        listing = (await http.get("/models")).json()["data"]
        (entry,) = [m for m in listing if m["id"] == MODEL]
        assert entry["status"] == "loading"
        body = {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 2}
        pending = asyncio.create_task(http.post("/chat/completions", json=body))
        await asyncio.sleep(2.0)
        assert not pending.done()  # waiting in the queue, not failed
        script = Path(__file__).parents[1] / "upstream_server.py"
        with (tmp_path / "up.log").open("wb") as log:
            up = subprocess.Popen(
                [sys.executable, str(script), "--port", str(port)], stdout=log, stderr=log
            )
        try:
            wait_for_port("127.0.0.1", port, 15, up)  # type: ignore[arg-type]
            r = await asyncio.wait_for(pending, 30)
            assert r.status_code == 200
            assert r.json()["choices"][0]["message"]["content"] == "tok0 tok1"
            for _ in range(50):
                listing = (await http.get("/models")).json()["data"]
                if [m["status"] for m in listing if m["id"] == MODEL] == ["ready"]:
                    break
                await asyncio.sleep(0.1)
            assert [m["status"] for m in listing if m["id"] == MODEL] == ["ready"]
        finally:
            up.send_signal(signal.SIGTERM)
            up.wait(10)


def test_worker_whose_engine_cannot_start_exits_cleanly(fleet: Fleet) -> None:
    port = free_port()  # nothing ever listens here
    w = fleet.worker(
        "--engine", "openai", "--model", "never-model",
        "--upstream", f"http://127.0.0.1:{port}/v1", "--upstream-wait", "1",
    )  # fmt: skip
    assert w.popen.wait(30) == 1
    log = w.log()
    assert "engine failed to start" in log
    assert "Traceback" not in log
    assert "stopped" in log
