"""Run the benchmark suite side by side in one run and write results, tables and plots.

    python -m bench.run                 # everything (about 10 minutes on 2 cores)
    python -m bench.run --smoke         # a few seconds: checks the harness produces numbers
    python -m bench.run --only latency,throughput --repeats 5

Paths compared against the same upstream test server (fixed TTFT and inter-token delay):
direct, llmfleet with the `openai` engine, llmfleet with the `sim` engine (same timings,
no second HTTP hop), and a LiteLLM proxy when `litellm` is installed (`make bench` does).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import nats

from bench import client
from bench.stack import MODEL_FOR, ROOT, Proc, Stack, cpu_seconds, rss_kb, wait_http
from common import protocol as p
from llmfleet.broker import free_port

PHASES = ("latency", "throughput", "capacity", "memory", "overload")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def summarize(results: list[client.StreamResult]) -> dict[str, float]:
    good = [r for r in results if r.ok]
    ttft = [r.ttft * 1000 for r in good]
    itl = [r.itl * 1000 for r in good]
    return {
        "n": len(results),
        "errors": len(results) - len(good),
        "ttft_p50_ms": client.pct(ttft, 50),
        "ttft_p99_ms": client.pct(ttft, 99),
        "itl_p50_ms": client.pct(itl, 50),
        "itl_p99_ms": client.pct(itl, 99),
    }


def phase_latency(stack: Stack, paths: list[str], repeats: int, smoke: bool) -> dict[str, Any]:
    out: dict[str, Any] = {}
    levels = [1, 8] if smoke else [1, 8, 64]
    for conc in levels:
        requests = 10 if smoke else max(50, conc * 10)
        for rep in range(repeats):
            for path in paths:  # interleaved, so drift hits every path alike
                res = asyncio.run(
                    client.latency_run(stack.urls[path], MODEL_FOR[path], conc, requests, 16)
                )
                out.setdefault(f"c{conc}", {}).setdefault(path, []).append(summarize(res))
                s = out[f"c{conc}"][path][-1]
                log(
                    f"latency c={conc} rep={rep} {path}: ttft p50 {s['ttft_p50_ms']:.2f} "
                    f"p99 {s['ttft_p99_ms']:.2f} ms, itl p50 {s['itl_p50_ms']:.2f} ms"
                )
    return out


def wrk_available() -> bool:
    return shutil.which("wrk") is not None


def wrk_run(url: str, model: str, conc: int, seconds: int) -> tuple[float, float, int]:
    script = Path("/tmp/llmfleet-bench-wrk.lua")
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "b"}],
                       "max_tokens": 1})  # fmt: skip
    script.write_text(
        'wrk.method = "POST"\n'
        f"wrk.body = '{body}'\n"
        'wrk.headers["Content-Type"] = "application/json"\n'
        'wrk.headers["Authorization"] = "Bearer sk-bench"\n'
    )
    threads = min(2, conc)
    cmd = ["wrk", f"-t{threads}", f"-c{conc}", f"-d{seconds}s", "--latency", "-s", str(script),
           url + "/chat/completions"]  # fmt: skip
    text = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    rps = float(text.split("Requests/sec:")[1].split()[0])
    p99 = _wrk_ms(text.split(" 99%")[1].split()[0])
    non2xx = int(text.split("Non-2xx or 3xx responses:")[1].split()[0]) if "Non-2xx" in text else 0
    return rps, p99, non2xx


def _wrk_ms(v: str) -> float:
    for unit, f in (("us", 0.001), ("ms", 1.0), ("s", 1000.0)):
        if v.endswith(unit):
            return float(v[: -len(unit)]) * f
    return float(v)


def phase_throughput(stack: Stack, paths: list[str], smoke: bool) -> dict[str, Any]:
    out: dict[str, Any] = {"tool": "wrk" if wrk_available() and not smoke else "httpx"}
    levels = [8] if smoke else [16, 64, 256]
    seconds = 2 if smoke else 6
    procs = {"gateway": stack.gateway, "worker": stack.workers.get("openai")}
    for conc in levels:
        for path in paths:
            cpu0 = {k: cpu_seconds(v.pid) for k, v in procs.items() if v is not None}
            if out["tool"] == "wrk":
                rps, p99, errors = wrk_run(stack.urls[path], MODEL_FOR[path], conc, seconds)
                done = int(rps * seconds)
            else:
                rps, lat, errors = asyncio.run(
                    client.throughput_run(stack.urls[path], MODEL_FOR[path], conc, seconds)
                )
                p99 = client.pct(lat, 99) * 1000
                done = len(lat)
            row: dict[str, float] = {"rps": rps, "p99_ms": p99, "errors": errors}
            if path.startswith("llmfleet") and done:
                worker = stack.workers["openai" if path == "llmfleet-openai" else "sim"]
                row["gateway_cpu_ms_per_req"] = (
                    (cpu_seconds(stack.gateway.pid) - cpu0["gateway"]) * 1000 / done  # type: ignore[union-attr]
                )
                if path == "llmfleet-openai":
                    row["worker_cpu_ms_per_req"] = (
                        (cpu_seconds(worker.pid) - cpu0["worker"]) * 1000 / done
                    )
            out.setdefault(f"c{conc}", {})[path] = row
            log(f"throughput c={conc} {path}: {rps:.0f} req/s, p99 {p99:.1f} ms, errors {errors}")
    return out


def phase_capacity(stack: Stack, smoke: bool, big: bool) -> dict[str, Any]:
    """One gateway, sim worker at 50 tokens/s per stream, N concurrent streams."""
    out: dict[str, Any] = {}
    levels = [50] if smoke else ([100, 250, 500, 1000, 2000] if big else [100, 250, 500, 1000])
    seconds = 3 if smoke else 8
    model = "fleet-sim50"
    for n in levels:
        cpu0 = cpu_seconds(stack.gateway.pid)  # type: ignore[union-attr]
        res, elapsed = asyncio.run(
            client.capacity_run(stack.urls["llmfleet-sim"], model, n, seconds, 100, 0.020)
        )
        delays = [d * 1000 for r in res for d in r.token_delays]
        tokens = sum(r.tokens for r in res)
        row = {
            "streams": n,
            "completed_streams": sum(1 for r in res if r.ok),
            "broken_streams": sum(1 for r in res if not r.ok),
            "tokens_per_s": tokens / elapsed,
            "token_delay_p50_ms": client.pct(delays, 50),
            "token_delay_p99_ms": client.pct(delays, 99),
            "late_tokens_pct": 100 * sum(1 for d in delays if d > 50) / max(1, len(delays)),
            "gateway_cpu_pct": 100
            * (cpu_seconds(stack.gateway.pid) - cpu0)  # type: ignore[union-attr]
            / elapsed,
        }
        out[str(n)] = row
        log(
            f"capacity {n} streams: {row['tokens_per_s']:.0f} tok/s, delay p99 "
            f"{row['token_delay_p99_ms']:.1f} ms, late {row['late_tokens_pct']:.1f}%, "
            f"broken {row['broken_streams']}"
        )
    return out


def phase_memory(stack: Stack, smoke: bool) -> dict[str, Any]:
    gw = stack.gateway
    assert gw is not None
    port = int(stack.urls["llmfleet-sim"].split(":")[2].split("/")[0])
    out: dict[str, Any] = {}
    for n in [100] if smoke else [1000, 5000]:

        async def hold(n: int = n) -> tuple[int, int]:
            before = rss_kb(gw.pid)
            socks = await client.open_idle_streams("127.0.0.1", port, "fleet-idle", n)
            await asyncio.sleep(3.0 if n > 1000 else 1.5)
            during = rss_kb(gw.pid)
            for s in socks:
                s.close()
            await asyncio.sleep(2.0)
            return before, during

        before, during = asyncio.run(hold())
        out[str(n)] = {
            "rss_before_mb": before / 1024,
            "rss_with_streams_mb": during / 1024,
            "kb_per_stream": (during - before) / n,
        }
        log(f"memory {n} idle streams: {(during - before) / n:.1f} KB per stream")
    return out


async def _completed(nats_url: str, model: str) -> int:
    nc = await nats.connect(nats_url)
    got: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    async def cb(msg: Any) -> None:
        a = p.decode_announce(msg.data)
        if any(m.id == model for m in a.models) and not got.done():
            got.set_result(a.completed)

    await nc.subscribe("llmfleet.hb.*", cb=cb)
    await nc.publish("llmfleet.discover", b"")
    try:
        return await asyncio.wait_for(got, 10)
    finally:
        await nc.close()


def phase_overload(stack: Stack, smoke: bool) -> dict[str, Any]:
    """2 slots x ~100 ms requests = ~20 req/s capacity; offered 4x that, open loop (a
    small fleet, so that the load generator itself is not what saturates 2 cores)."""
    assert stack.nats is not None
    port = free_port()
    gw = Proc(
        "gateway-overload",
        [sys.executable, "-m", "llmfleet", "--log-level", "warning", "gateway", "--nats",
         stack.nats.url, "--port", str(port), "--queue-timeout", "2", "--max-queue", "1000"],
        stack.tmp,
    )  # fmt: skip
    stack.procs.append(gw)
    wait_http(f"http://127.0.0.1:{port}/readyz", 30, gw)
    url = f"http://127.0.0.1:{port}/v1"
    time.sleep(1.0)
    # measure capacity first (closed loop at 4x the slots), then offer 4x that
    cap, _, _ = asyncio.run(
        client.throughput_run(url, "fleet-over", 8, 2 if smoke else 5, max_tokens=4)
    )
    before = asyncio.run(_completed(stack.nats.url, "fleet-over"))
    seconds = 3 if smoke else 30
    res = asyncio.run(client.overload_run(url, "fleet-over", 4 * cap, seconds))
    time.sleep(3.0)
    after = asyncio.run(_completed(stack.nats.url, "fleet-over"))
    res["capacity_rps"] = cap
    res["offered_rps"] = 4 * cap
    res["worker_completed"] = after - before
    res["duplicated_or_unseen"] = (after - before) - res["completed"]
    log(f"overload: {res}")
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="a few seconds, small numbers")
    ap.add_argument("--only", default=",".join(PHASES), help="comma separated phases")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--ttft-ms", type=float, default=20.0)
    ap.add_argument("--itl-ms", type=float, default=5.0)
    ap.add_argument("--litellm", default=str(Path(sys.executable).parent / "litellm"))
    ap.add_argument("--no-litellm", action="store_true")
    ap.add_argument("--big", action="store_true", help="capacity up to 2000 streams")
    ap.add_argument(
        "--out",
        default=str(ROOT / "bench" / "results"),
        help="results directory; only the default one also rewrites docs/benchmarks-results.md",
    )
    ap.add_argument(
        "--merge", action="store_true", help="update only these phases in the latest results"
    )
    args = ap.parse_args(argv)
    phases = [x for x in args.only.split(",") if x]
    stack = Stack(args.ttft_ms, args.itl_ms, tokens=16)
    results: dict[str, Any] = {
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": f"{platform.machine()}, {__import__('os').cpu_count()} cores, "
        f"Python {platform.python_version()}",
        "upstream": {"ttft_ms": args.ttft_ms, "itl_ms": args.itl_ms},
        "smoke": args.smoke,
    }
    try:
        stack.start_upstream()
        stack.start_fleet()
        extra = [
            ("fleet-sim50", ["--sim-ttft-ms", "20", "--sim-itl-ms", "20", "--sim-tokens", "100",
                             "--max-concurrency", "3000"]),
            ("fleet-idle", ["--sim-ttft-ms", "600000", "--max-concurrency", "6000"]),
            ("fleet-over", ["--sim-ttft-ms", "60", "--sim-itl-ms", "10", "--sim-tokens", "4",
                            "--max-concurrency", "2"]),
        ]  # fmt: skip
        assert stack.nats is not None
        for model, flags in extra:
            stack.workers[model] = stack._llmfleet(
                f"worker-{model}", "worker", "--nats", stack.nats.url, "--model", model, *flags
            )
        time.sleep(2.0)
        paths = ["direct", "llmfleet-openai", "llmfleet-sim"]
        if not args.no_litellm and not args.smoke and stack.start_litellm(args.litellm):
            paths.append("litellm")
            log("litellm proxy started")
        elif not args.no_litellm and not args.smoke:
            log("litellm not available: comparing without it")
        results["paths"] = paths
        if "latency" in phases:
            results["latency"] = phase_latency(
                stack, paths, 1 if args.smoke else args.repeats, args.smoke
            )
        if "throughput" in phases:
            results["throughput"] = phase_throughput(stack, paths, args.smoke)
        if "capacity" in phases:
            results["capacity"] = phase_capacity(stack, args.smoke, args.big)
        if "memory" in phases:
            results["memory"] = phase_memory(stack, args.smoke)
        if "overload" in phases:
            results["overload"] = phase_overload(stack, args.smoke)
    finally:
        stack.close()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = "smoke.json" if args.smoke else "latest.json"
    if args.merge and (out / name).exists():
        merged = json.loads((out / name).read_text())
        merged.update({k: v for k, v in results.items() if k in PHASES})
        results = merged
    (out / name).write_text(json.dumps(results, indent=2))
    log(f"wrote {out / name}")
    # The published tables and plots come from the default results only: a run with its
    # own --out (an A/B comparison, say) leaves docs/ alone.
    if not args.smoke and out.resolve() == (ROOT / "bench" / "results").resolve():
        from bench.report import write_report  # noqa: PLC0415

        write_report(results, ROOT / "docs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
