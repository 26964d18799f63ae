"""`llmfleet dev` survives a worker crash, and nothing outlives its parent.

The dev stack runs as a real process (broker child, gateway in process, worker children);
its worker is killed with SIGILL (what native code with an instruction this CPU lacks
gets) and SIGKILL while a request waits; then the parent itself is SIGKILLed.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from llmfleet.broker import free_port, wait_for_port

ASK = [{"role": "user", "content": "Hello"}]


class Dev:
    def __init__(self, tmp: Path, *args: str) -> None:
        self.port, self.nats_port = free_port(), free_port()
        self.log_path = tmp / "dev.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("LLMFLEET_")}
        env["PYTHONUNBUFFERED"] = "1"
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "llmfleet",
                    "dev",
                    *args,
                    "--port",
                    str(self.port),
                    "--nats-port",
                    str(self.nats_port),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
            )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_log(self, pattern: str, timeout: float = 30.0, after: int = 0) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = re.compile(pattern).search(self.log(), after)
            if m:
                return m
            assert self.proc.poll() is None, f"llmfleet dev exited:\n{self.log()}"
            time.sleep(0.05)
        raise AssertionError(f"no {pattern!r} in the dev log:\n{self.log()}")

    def worker_pid(self, after: int = 0) -> tuple[int, int]:
        m = self.wait_log(r"started the worker for sim-model \(sim\) \(pid (\d+)\)", after=after)
        return int(m.group(1)), m.end()

    def client(self) -> openai.OpenAI:
        base = f"http://127.0.0.1:{self.port}/v1"
        return openai.OpenAI(base_url=base, api_key="x", max_retries=0, timeout=60)


def gone(pid: int) -> bool:
    """True once `pid` has exited (a zombie nobody reaped yet counts as exited)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return True
    return state in ("Z", "X")


def port_free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def within(seconds: float, check: object) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():  # type: ignore[operator]
            return True
        time.sleep(0.02)
    return bool(check())  # type: ignore[operator]


@pytest.fixture
def dev(tmp_path: Path) -> Iterator[Dev]:
    d = Dev(tmp_path, "--engine", "sim", "--sim-ttft-ms", "5", "--drain-grace", "2")
    try:
        d.wait_log(r"NATS:\s+nats://127\.0\.0\.1:\d+")  # the banner, once the model is ready
        yield d
    finally:
        if d.proc.poll() is None:
            d.proc.kill()
            d.proc.wait()


@pytest.mark.parametrize("sig", [signal.SIGILL, signal.SIGKILL])
def test_a_crashed_worker_is_restarted_and_its_queued_request_completes(
    dev: Dev, sig: signal.Signals
) -> None:
    assert f"NATS:     nats://127.0.0.1:{dev.nats_port}" in dev.log()
    pid, at = dev.worker_pid()
    with dev.client() as client:
        assert client.chat.completions.create(model="sim-model", messages=ASK).choices  # type: ignore[arg-type]
        os.kill(pid, sig)
        assert within(5, lambda: gone(pid))
        result: list[object] = []
        # sent while no worker runs: it waits in the broker for the restarted one
        t = threading.Thread(
            target=lambda: result.append(
                client.chat.completions.create(model="sim-model", messages=ASK, max_tokens=3)  # type: ignore[arg-type]
            )
        )
        t.start()
        line = dev.wait_log(
            rf"the worker for sim-model \(sim\) died \(signal {sig.name}[^\n]*\); restarting it",
            after=at,
        )
        new_pid, _ = dev.worker_pid(after=line.end())
        assert new_pid != pid
        t.join(30)
        assert result, "the queued request did not complete"
        assert result[0].usage.completion_tokens == 3  # type: ignore[attr-defined]
    assert httpx.get(f"http://127.0.0.1:{dev.port}/healthz").status_code == 200
    assert dev.proc.poll() is None  # the gateway never went down


def test_sigkill_of_the_parent_leaves_no_broker_or_worker(dev: Dev) -> None:
    pid, _ = dev.worker_pid()
    assert not port_free(dev.nats_port)
    dev.proc.kill()  # SIGKILL: no cleanup runs in the parent
    dev.proc.wait()
    assert within(2.0, lambda: port_free(dev.nats_port)), "the broker outlived its parent"
    assert within(2.0, lambda: gone(pid)), "the worker outlived its parent"


def test_ctrl_c_stops_everything(dev: Dev) -> None:
    pid, _ = dev.worker_pid()
    dev.proc.send_signal(signal.SIGINT)
    assert dev.proc.wait(30) == 0, dev.log()
    assert gone(pid) and port_free(dev.nats_port) and port_free(dev.port)
    assert "died" not in dev.log()  # a stop is not reported as a crash


def test_sigkill_of_llmfleet_nats_frees_its_port(tmp_path: Path) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLMFLEET_")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "llmfleet", "nats", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    wait_for_port("127.0.0.1", port, 15.0, proc)
    proc.kill()
    proc.wait()
    assert within(2.0, lambda: port_free(port)), "nats-server outlived `llmfleet nats`"
