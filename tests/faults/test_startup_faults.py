"""A worker that starts before JetStream answers (a cluster still electing its leader, a
leaf node not yet connected to its hub) waits for it instead of exiting."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import httpx

from llmfleet.broker import EmbeddedNats, find_binary, free_port, wait_for_port
from tests.procs import Fleet


def test_worker_waits_for_jetstream_then_serves(tmp_path: Path) -> None:
    port = free_port()
    # A broker without JetStream: every JetStream API request gets no responders.
    plain = subprocess.Popen(
        [find_binary(), "-a", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    fleet = Fleet(f"nats://127.0.0.1:{port}", tmp_path)
    try:
        wait_for_port("127.0.0.1", port, 10, plain)  # type: ignore[arg-type]
        w = fleet.worker("--model", "late-js", "--worker-id", "early-bird")
        deadline = time.monotonic() + 20
        while "JetStream is not answering" not in w.log():
            assert w.alive(), w.log()
            assert time.monotonic() < deadline, w.log()
            time.sleep(0.1)
        time.sleep(1.0)
        assert w.alive(), w.log()  # still waiting, not crashed
        plain.terminate()
        plain.wait(10)
        # The same address, now with JetStream: the worker reconnects and gets ready.
        with EmbeddedNats(port=port):
            gw = fleet.gateway(wait_models=("late-js",))
            r = httpx.post(
                gw.base_url + "/chat/completions",
                json={"model": "late-js", "messages": [{"role": "user", "content": "hi"}]},
                timeout=30,
            )
            assert r.status_code == 200, r.text
            assert r.headers["x-llmfleet-worker"] == "early-bird"
            fleet.stop_all()
        assert "Traceback" not in w.log()
    finally:
        fleet.stop_all()
        if plain.poll() is None:
            plain.kill()
            plain.wait()
