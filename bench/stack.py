"""Start and stop the processes a benchmark compares: the upstream test server, a NATS
broker, llmfleet gateway + workers, and (optionally) a LiteLLM proxy. All on loopback."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from llmfleet.broker import EmbeddedNats, free_port

ROOT = Path(__file__).resolve().parents[1]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


class Proc:
    def __init__(self, name: str, args: list[str], logdir: Path, env: dict[str, str] | None = None):
        self.name = name
        self.log = logdir / f"{name}.log"
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        with self.log.open("wb") as out:
            self.popen = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=full_env)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(20)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()


def wait_http(url: str, timeout: float, proc: Proc, ok: int = 200) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.popen.poll() is not None:
            raise RuntimeError(f"{proc.name} exited; see {proc.log}")
        try:
            if httpx.get(url, timeout=1.0).status_code == ok:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{proc.name} not ready at {url}; see {proc.log}")


class Stack:
    """Everything one benchmark run needs; `close()` stops it all."""

    def __init__(self, ttft_ms: float, itl_ms: float, tokens: int) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="llmfleet-bench-"))
        self.ttft_ms, self.itl_ms, self.tokens = ttft_ms, itl_ms, tokens
        self.procs: list[Proc] = []
        self.nats: EmbeddedNats | None = None
        self.urls: dict[str, str] = {}
        self.gateway: Proc | None = None
        self.workers: dict[str, Proc] = {}

    def _llmfleet(self, name: str, *args: str) -> Proc:
        p = Proc(
            name, [sys.executable, "-m", "llmfleet", "--log-level", "warning", *args], self.tmp
        )
        self.procs.append(p)
        return p

    def start_upstream(self) -> str:
        port = free_port()
        p = Proc(
            "upstream",
            [sys.executable, str(ROOT / "tests" / "upstream_server.py"), "--port", str(port),
             "--ttft-ms", str(self.ttft_ms), "--itl-ms", str(self.itl_ms),
             "--tokens", str(self.tokens), "--model", "bench-model"],
            self.tmp,
        )  # fmt: skip
        self.procs.append(p)
        wait_http(f"http://127.0.0.1:{port}/v1/models", 20, p)
        self.urls["direct"] = f"http://127.0.0.1:{port}/v1"
        return self.urls["direct"]

    def start_fleet(self, max_concurrency: int = 512, queue_timeout: float = 60.0) -> None:
        self.nats = EmbeddedNats(store_dir=str(self.tmp / "nats")).start()
        upstream = self.urls["direct"]
        self.workers["openai"] = self._llmfleet(
            "worker-openai", "worker", "--nats", self.nats.url, "--engine", "openai",
            "--model", "fleet-openai", "--upstream", upstream, "--upstream-model", "bench-model",
            "--max-concurrency", str(max_concurrency),
        )  # fmt: skip
        self.workers["sim"] = self._llmfleet(
            "worker-sim", "worker", "--nats", self.nats.url, "--engine", "sim",
            "--model", "fleet-sim", "--max-concurrency", str(max_concurrency),
            "--sim-ttft-ms", str(self.ttft_ms), "--sim-itl-ms", str(self.itl_ms),
            "--sim-tokens", str(self.tokens),
        )  # fmt: skip
        port = free_port()
        self.gateway = self._llmfleet(
            "gateway", "gateway", "--nats", self.nats.url, "--port", str(port),
            "--queue-timeout", str(queue_timeout),
        )  # fmt: skip
        base = f"http://127.0.0.1:{port}/v1"
        wait_http(f"http://127.0.0.1:{port}/readyz", 30, self.gateway)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            ids = {m["id"] for m in httpx.get(base + "/models").json()["data"]}
            if {"fleet-openai", "fleet-sim"} <= ids:
                break
            time.sleep(0.1)
        self.urls["llmfleet-openai"] = base
        self.urls["llmfleet-sim"] = base

    def start_litellm(self, litellm_bin: str) -> bool:
        """A LiteLLM proxy with its standard config, pointing at the same upstream."""
        if not shutil.which(litellm_bin) and not Path(litellm_bin).exists():
            return False
        port = free_port()
        config = self.tmp / "litellm.yaml"
        config.write_text(
            "model_list:\n"
            "  - model_name: litellm-model\n"
            "    litellm_params:\n"
            "      model: openai/bench-model\n"
            f"      api_base: {self.urls['direct']}\n"
            "      api_key: unused\n"
            "litellm_settings:\n"
            "  telemetry: false\n"
        )
        env = {
            "LITELLM_MASTER_KEY": "sk-bench",
            "LITELLM_LOCAL_MODEL_COST_MAP": "True",
            "LITELLM_LOG": "ERROR",
        }
        p = Proc(
            "litellm",
            [litellm_bin, "--config", str(config), "--port", str(port), "--num_workers", "1"],
            self.tmp,
            env,
        )
        self.procs.append(p)
        try:
            wait_http(f"http://127.0.0.1:{port}/health/liveliness", 120, p)
        except (TimeoutError, RuntimeError):
            return False
        self.urls["litellm"] = f"http://127.0.0.1:{port}/v1"
        self.litellm = p
        return True

    def close(self) -> None:
        for p in reversed(self.procs):
            p.stop()
        if self.nats is not None:
            self.nats.stop()
        shutil.rmtree(self.tmp, ignore_errors=True)


MODEL_FOR = {
    "direct": "bench-model",
    "llmfleet-openai": "fleet-openai",
    "llmfleet-sim": "fleet-sim",
    "litellm": "litellm-model",
}
