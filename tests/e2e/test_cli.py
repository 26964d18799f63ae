"""The commands a newcomer runs: `llmfleet dev` and `llmfleet nats`, as real processes."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import nats
import openai

from llmfleet.broker import free_port, wait_for_port


def _spawn(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLMFLEET_")}
    with log.open("wb") as out:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(
            [sys.executable, "-m", "llmfleet", *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**env, "PYTHONUNBUFFERED": "1"},
        )


def test_dev_serves_and_stops_cleanly_on_ctrl_c(tmp_path: Path) -> None:
    port, nats_port = free_port(), free_port()
    log = tmp_path / "dev.log"
    proc = _spawn(["dev", "--port", str(port), "--nats-port", str(nats_port)], log)
    try:
        deadline = time.monotonic() + 20
        while "base URL" not in log.read_text():
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        text = log.read_text()
        assert f"http://127.0.0.1:{port}/v1" in text
        assert "curl" in text
        with openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x") as c:
            assert [m.id for m in c.models.list()] == ["sim-model"]
            r = c.chat.completions.create(
                model="sim-model", messages=[{"role": "user", "content": "hi"}], max_tokens=3
            )
            assert r.usage is not None and r.usage.completion_tokens == 3
        proc.send_signal(signal.SIGINT)
        assert proc.wait(20) == 0, log.read_text()
        assert "Traceback" not in log.read_text()
        with_port_closed = True
        try:
            httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1)
            with_port_closed = False
        except httpx.ConnectError:
            pass
        assert with_port_closed
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_nats_command_runs_jetstream_with_project_settings(tmp_path: Path) -> None:
    port = free_port()
    proc = _spawn(
        ["nats", "--port", str(port), "--store", str(tmp_path / "js")], tmp_path / "n.log"
    )
    try:
        wait_for_port("127.0.0.1", port, 30, proc)  # type: ignore[arg-type]

        async def check() -> tuple[int, int]:
            nc = await nats.connect(f"nats://127.0.0.1:{port}", connect_timeout=10)
            for _ in range(50):  # JetStream may still be starting right after the port opens
                try:
                    info = await nc.jetstream().account_info()
                    break
                except Exception:
                    await asyncio.sleep(0.2)
            max_payload = nc.max_payload
            await nc.close()
            return max_payload, info.limits.max_memory

        max_payload, _ = asyncio.run(check())
        assert max_payload == 8 * 1024 * 1024
        assert (tmp_path / "js").is_dir()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, (tmp_path / "n.log").read_text()[-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_sigterm_while_waiting_for_an_unreachable_broker(tmp_path: Path) -> None:
    dead = f"nats://127.0.0.1:{free_port()}"
    for role in (["gateway", "--port", str(free_port())], ["worker"]):
        proc = _spawn([role[0], "--nats", dead, *role[1:]], tmp_path / f"{role[0]}.log")
        time.sleep(1.5)
        assert proc.poll() is None  # still trying to connect
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 1
        log = (tmp_path / f"{role[0]}.log").read_text()
        assert "stopped before it was ready" in log and "Traceback" not in log
