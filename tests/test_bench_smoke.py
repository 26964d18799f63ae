"""The benchmark harness itself works: a few-second smoke run produces numbers for every
phase. (Tests never assert on speed; `make bench` measures it.)"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest


@pytest.mark.timeout(300)
def test_bench_smoke_produces_numbers(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "bench.run", "--smoke", "--no-litellm", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((tmp_path / "smoke.json").read_text())
    for level in ("c1", "c8"):
        for path in ("direct", "llmfleet-openai", "llmfleet-sim"):
            (row,) = res["latency"][level][path]
            assert row["errors"] == 0
            assert math.isfinite(row["ttft_p50_ms"]) and row["ttft_p50_ms"] > 0
    assert all(r["rps"] > 0 for r in res["throughput"]["c8"].values())
    (cap,) = res["capacity"].values()
    assert cap["broken_streams"] == 0 and cap["tokens_per_s"] > 0
    assert next(iter(res["memory"].values()))["kb_per_stream"] > 0
    over = res["overload"]
    assert over["lost"] == 0 and over["duplicated_or_unseen"] == 0
    assert over["completed"] > 0


@pytest.mark.timeout(120)
def test_bench_apis_smoke_produces_numbers(tmp_path: Path) -> None:
    """bench/apis.py: every API configuration answers, and each report cell has numbers."""
    res = _smoke("bench.apis", tmp_path, "ABCDE")
    # the stored response costs the broker a write (D) and a continuation a read (E)
    c1 = res["http"]["non-streamed, concurrency 1"]["configs"]
    assert c1["D"]["broker_msgs_per_req"] > c1["C"]["broker_msgs_per_req"]
    assert c1["E"]["broker_msgs_per_req"] > c1["C"]["broker_msgs_per_req"]
    assert all(r["us"] > 0 for r in res["micro"])


@pytest.mark.timeout(120)
def test_bench_routing_smoke_produces_numbers(tmp_path: Path) -> None:
    """bench/routing.py: every configuration answers, served by `m` (C and D through their
    alias), `dead`'s circuit stays open at G1, and each report cell has numbers."""
    res = _smoke("bench.routing", tmp_path, "ABCD")
    checks = res["checks"]
    assert checks["problems"] == []
    assert checks["dead_before"]["state"] == checks["dead_after"]["state"] == "open"
    assert checks["seen"]["C"] == {"m / chat": checks["seen"]["A"]["m / -"]}
    assert checks["fallbacks"] == checks["d_requests"] > 0
    assert all(r["us"] > 0 for r in res["micro"])


def _smoke(module: str, tmp_path: Path, configs: str) -> Any:
    """`python -m <module> --smoke`: it succeeds, every scenario has every configuration,
    each with answers and finite numbers; its JSON results."""
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", module, "--smoke", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert set(res["http"]) == {
        f"{mode}, concurrency {c}" for mode in ("non-streamed", "streamed") for c in (1, 8)
    }
    for scenario in res["http"].values():
        assert set(scenario["configs"]) == set(configs)
        for row in scenario["configs"].values():
            assert row["errors"] == 0 and row["n"] > 0
            assert math.isfinite(row["p50_ms"]) and row["p50_ms"] > 0
            assert row["gateway_cpu_us_per_req"] > 0
            if scenario["stream"]:
                assert 0 < row["first_p50_ms"] <= row["p99_ms"]
    return res
