"""Run llmfleet gateways and workers as real processes for end-to-end tests."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from llmfleet.broker import free_port, wait_for_port


class Proc:
    def __init__(self, args: list[str], log_path: Path) -> None:
        self.args = args
        self.log_path = log_path
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env = {k: v for k, v in env.items() if not k.startswith("LLMFLEET_")}
        self._log = log_path.open("wb")
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "llmfleet", "--log-level", "info", *args],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        if self.popen.poll() is None:
            self.popen.send_signal(sig)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        self._log.close()
        return self.popen.returncode


class Gateway(Proc):
    def __init__(self, args: list[str], log_path: Path, port: int) -> None:
        super().__init__(args, log_path)
        self.api_key = args[args.index("--api-key") + 1] if "--api-key" in args else "none"
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.base_url = self.url + "/v1"


class Fleet:
    def __init__(self, nats_url: str, workdir: Path) -> None:
        self.nats_url = nats_url
        self.workdir = workdir
        self.procs: list[Proc] = []
        self._n = 0

    def _log_path(self, kind: str) -> Path:
        self._n += 1
        return self.workdir / f"{self._n:02d}-{kind}.log"

    def gateway(
        self, *extra: str, wait_models: tuple[str, ...] = (), key: str | None = None
    ) -> Gateway:
        """A gateway process; `key`: the secret it checks readiness with (--auth keys)."""
        port = free_port()
        gw = Gateway(
            ["gateway", "--nats", self.nats_url, "--port", str(port), *extra],
            self._log_path("gateway"),
            port,
        )
        if key is not None:
            gw.api_key = key
        self.procs.append(gw)
        self.wait_ready(gw, wait_models)
        return gw

    def worker(self, *extra: str) -> Proc:
        w = Proc(["worker", "--nats", self.nats_url, *extra], self._log_path("worker"))
        self.procs.append(w)
        return w

    def wait_ready(self, gw: Gateway, models: tuple[str, ...] = (), timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            if not gw.alive():
                raise RuntimeError(f"gateway exited:\n{gw.log()}")
            try:
                r = httpx.get(gw.url + "/readyz", timeout=1.0)
                if r.status_code == 200:
                    auth = {"authorization": f"Bearer {gw.api_key}"}
                    listing = httpx.get(gw.base_url + "/models", headers=auth).json()
                    ids = {m["id"] for m in listing["data"]}
                    if set(models) <= ids:
                        return
                    last = f"models so far: {sorted(ids)}"
            except httpx.HTTPError as exc:
                last = repr(exc)
            time.sleep(0.05)
        raise TimeoutError(f"gateway not ready with {models}: {last}\n{gw.log()}")

    def stop_all(self) -> None:
        for p in reversed(self.procs):
            p.stop()
        self.procs.clear()


def write_routes(factory: Any, text: str) -> Path:
    """A routes file (`--routes`) with `text`, in a fresh temporary folder of `factory`."""
    path = factory.mktemp("routes") / "routes.yaml"
    path.write_text(text)
    return path


@contextmanager
def upstream_process(workdir: Path, *flags: str) -> Iterator[str]:
    """`tests/upstream_server.py` as a real process; yields its base URL (without /v1)."""
    port = free_port()
    script = Path(__file__).parent / "upstream_server.py"
    with (workdir / "upstream.log").open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, str(script), "--port", str(port), *flags],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_for_port("127.0.0.1", port, 15.0, proc)  # type: ignore[arg-type]
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)


async def until(pred: Any, timeout: float, what: str, interval: float = 0.05) -> Any:
    """Poll the coroutine function `pred` until it returns something true (returned), for
    at most `timeout` seconds (a stated bound: AssertionError naming `what` after it)."""
    deadline = time.monotonic() + timeout
    while True:
        got = await pred()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        await asyncio.sleep(interval)


async def health(gw: Gateway, key: str = "x") -> Any:
    """`GET /v1/health` of a gateway (as `key`), which must answer 200."""
    async with httpx.AsyncClient() as c:
        r = await c.get(gw.base_url + "/health", headers={"authorization": f"Bearer {key}"})
    assert r.status_code == 200, r.text
    return r.json()
