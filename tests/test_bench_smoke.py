"""The benchmark harness itself works: a few-second smoke run produces numbers for every
phase. (Tests never assert on speed; `make bench` measures it.)"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

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
