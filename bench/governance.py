"""What governance (issue 13) adds to a request: auth, limits and the audit event, side by
side with `--auth none` in one run.

    python -m bench.governance                     # about 3 minutes on 2 cores
    python -m bench.governance --smoke             # under 20 s: the harness works
    python -m bench.governance --requests 4000 --out /tmp/governance.md

One nats-server, one sim worker (no token delay, 4 output tokens: engine time is
negligible) and four gateways on loopback, all running at once:

    A  --auth none --audit off     the baseline
    B  --auth none                 + one audit event per request (LLMFLEET_AUDIT)
    C  --auth keys, unlimited key  + key lookup and model check
    D  --auth keys, limited key    + rpm, tpm, max-parallel and a token budget, all far
                                     above what the run uses: nothing is refused, and the
                                     lease path runs (the shared ledger in LLMFLEET_QUOTA
                                     is written only when a local lease runs dry)

Small chat completions, non-streamed (latency) and streamed (time to the last byte), at
concurrency 1 and 8, one keep-alive httpx client per gateway. The gateways take turns in
rounds of a few dozen requests (A B C D, then B C D A, ...) so that drift and noise on
the machine hit every configuration alike. Per configuration: p50 and p99, the added ms
and the ratio against A (pooled, and paired round by round); CPU time per request of the
gateway and of nats-server (/proc schedstat, during that configuration's turns);
messages the gateway sent to the broker per request (nats-server /connz `in_msgs` of its
connection); and writes to the quota ledger per request, by kind, for each key (the
`$KV.LLMFLEET_QUOTA.>` subjects, checked against the KV stream's last sequence).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import nats

from bench.client import Sizes, add_sizes, apply_sizes, pct
from bench.stack import Proc, wait_http
from control.keys import KeyRecord, Secret, hash_secret, new_secret
from control.store import QUOTA_BUCKET, KeyStore
from llmfleet.broker import EmbeddedNats, free_port

MODEL = "bench-model"
OUTPUT_TOKENS = 4
TARGET_MS = 0.3  # issue 13: at most 0.3 ms added at p50
# Far above anything the run does, so nothing is refused (a lease is 5 % of a limit).
LIMITED = {
    "rpm": 1_000_000,  # leases of 50,000 requests
    "tpm": 1_000_000_000,
    "max_parallel": 64,  # one slot per request in flight, held while in use
    "budget_tokens": 10**12,
    "budget_period": "total",
}


@dataclass
class Config:
    name: str
    title: str
    flags: list[str]
    key: str | None = None  # the key's name (C, D)
    secret: str | None = None
    proc: Proc | None = None
    url: str = ""
    gateway_id: str = ""


@dataclass
class Cell:
    """One configuration in one scenario (mode x concurrency)."""

    lat: list[float] = field(default_factory=list)  # ms
    halves: tuple[list[float], list[float]] = field(default_factory=lambda: ([], []))
    turn_p50: list[float] = field(default_factory=list)  # ms, one per round
    errors: int = 0
    first_error: str = ""
    gw_cpu_s: float = 0.0  # the gateway process, during its own turns
    broker_cpu_s: float = 0.0  # nats-server, during this configuration's turns
    msgs: int = 0
    requests: int = 0  # sent, including errors
    seconds: float = 0.0  # the length of this configuration's turns


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def configs() -> list[Config]:
    return [
        Config("A", "`--auth none --audit off` (baseline)", ["--auth", "none", "--audit", "off"]),
        Config("B", "`--auth none`, audit on", ["--auth", "none"]),
        Config("C", "`--auth keys`, unlimited key", ["--auth", "keys"], key="bench-unlimited"),
        Config("D", "`--auth keys`, limited key", ["--auth", "keys"], key="bench-limited"),
    ]


# ---- set-up -----------------------------------------------------------------------------


async def create_keys(nats_url: str, cfgs: list[Config]) -> None:
    nc = await nats.connect(nats_url)
    try:
        store = await KeyStore(nc.jetstream()).open()
        now = time.time()
        for c in cfgs:
            if c.key is None:
                continue
            c.secret = new_secret()
            limits: dict[str, Any] = LIMITED if c.name == "D" else {}
            await store.create(
                KeyRecord(
                    name=c.key,
                    secrets=(Secret(sha256=hash_secret(c.secret), created_at=now),),
                    models=("*",),
                    created_at=now,
                    updated_at=now,
                    description="bench.governance",
                    **limits,
                )
            )
    finally:
        await nc.close()


def start_gateway(c: Config, nats_url: str, logdir: Path) -> None:
    port = free_port()
    c.gateway_id = f"bench-{c.name.lower()}"
    c.proc = Proc(
        f"gateway-{c.name}",
        [sys.executable, "-m", "llmfleet", "--log-level", "warning", "gateway", "--nats",
         nats_url, "--port", str(port), "--gateway-id", c.gateway_id, *c.flags],
        logdir,
    )  # fmt: skip
    c.url = f"http://127.0.0.1:{port}"


def wait_ready(c: Config) -> None:
    assert c.proc is not None
    wait_http(c.url + "/readyz", 30, c.proc)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        r = httpx.get(c.url + "/v1/models", headers=_headers(c), timeout=2)
        if r.status_code == 200 and any(m["id"] == MODEL for m in r.json()["data"]):
            return
        time.sleep(0.1)
    raise TimeoutError(f"gateway {c.name} never listed {MODEL}; see {c.proc.log}")


def _headers(c: Config) -> dict[str, str]:
    h = {"content-type": "application/json"}
    if c.secret is not None:
        h["authorization"] = f"Bearer {c.secret}"
    return h


# ---- load -------------------------------------------------------------------------------


def body(stream: bool) -> bytes:
    return json.dumps(
        {
            "model": MODEL,
            "messages": [{"role": "user", "content": "benchmark"}],
            "max_tokens": OUTPUT_TOKENS,
            "stream": stream,
        }
    ).encode()


async def one(http: httpx.AsyncClient, payload: bytes, stream: bool) -> tuple[float, str]:
    """(ms to the last byte, '' or what went wrong)."""
    t0 = time.perf_counter()
    if not stream:
        r = await http.post("/v1/chat/completions", content=payload)
        ms = (time.perf_counter() - t0) * 1000
        return ms, "" if r.status_code == 200 else f"{r.status_code} {r.text[:200]}"
    async with http.stream("POST", "/v1/chat/completions", content=payload) as r:
        tail = b""
        async for chunk in r.aiter_raw():
            tail = (tail + chunk)[-64:]
        ms = (time.perf_counter() - t0) * 1000
        if r.status_code != 200:
            return ms, f"{r.status_code} {tail.decode(errors='replace')}"
        if b"[DONE]" not in tail:
            return ms, f"stream ended without [DONE]: {tail!r}"
        return ms, ""


async def batch(
    http: httpx.AsyncClient, stream: bool, conc: int, n: int, cell: Cell, half: int = 0
) -> None:
    """`n` requests, `conc` at a time (closed loop)."""
    payload = body(stream)
    left = n

    async def loop() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            ms, err = await one(http, payload, stream)
            cell.requests += 1
            if err:
                cell.errors += 1
                cell.first_error = cell.first_error or err
            else:
                cell.lat.append(ms)
                cell.halves[half].append(ms)

    await asyncio.gather(*(loop() for _ in range(conc)))


# ---- counters ---------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """CPU time of every thread of `pid` so far, in ns precision (schedstat)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            total += int((task / "schedstat").read_text().split()[0])
        except (OSError, IndexError, ValueError):
            continue  # a thread that just ended
    return total / 1e9


class Counters:
    """What the broker and /proc say, read between turns (never while a batch runs)."""

    def __init__(self, nc: Any, monitor: str, cfgs: list[Config], broker_pid: int) -> None:
        self.nc = nc
        self.js = nc.jetstream()
        self.monitor = monitor
        self.cfgs = cfgs
        self.broker_pid = broker_pid
        self.writes: dict[str, dict[str, int]] = {}  # key -> kind (rpm, tpm, use...) -> n

    async def watch_ledger(self) -> None:
        """Count every write to LLMFLEET_QUOTA by key and kind (the KV's own subjects,
        `<key>.<kind>[.<period>]`, control/ledger.py)."""
        prefix = f"$KV.{QUOTA_BUCKET}."

        async def cb(msg: Any) -> None:
            key, _, rest = msg.subject[len(prefix) :].partition(".")
            kind = rest.split(".")[0] or "?"
            by_kind = self.writes.setdefault(key, {})
            by_kind[kind] = by_kind.get(kind, 0) + 1

        await self.nc.subscribe(prefix + ">", cb=cb)

    async def in_msgs(self, http: httpx.AsyncClient, name: str) -> int:
        """Messages the gateway's connection has sent to the broker so far."""
        r = await http.get(self.monitor + "/connz", params={"limit": 4096})
        gid = next(c.gateway_id for c in self.cfgs if c.name == name)
        for conn in r.json().get("connections", []):
            if conn.get("name") == f"llmfleet-gateway-{gid}":
                return int(conn["in_msgs"])
        return 0

    async def ledger_seq(self) -> int:
        info = await self.js.stream_info(f"KV_{QUOTA_BUCKET}")
        return int(info.state.last_seq)

    def cpu(self, name: str) -> tuple[float, float]:
        """(the gateway's, nats-server's) CPU seconds so far."""
        proc = next(c.proc for c in self.cfgs if c.name == name)
        assert proc is not None
        return cpu_seconds(proc.pid), cpu_seconds(self.broker_pid)


async def measure(
    broker: EmbeddedNats, monitor: str, cfgs: list[Config], args: argparse.Namespace
) -> dict[str, Any]:
    nc = await nats.connect(broker.url)
    assert broker.proc is not None
    counters = Counters(nc, monitor, cfgs, broker.proc.pid)
    await counters.watch_ledger()
    limits = httpx.Limits(max_connections=16, max_keepalive_connections=16)
    clients = {
        c.name: httpx.AsyncClient(base_url=c.url, headers=_headers(c), limits=limits, timeout=30.0)
        for c in cfgs
    }
    mon = httpx.AsyncClient(timeout=5.0)
    out: dict[str, Any] = {}
    try:
        log(f"warm-up: {args.warmup} requests per configuration, mode and concurrency")
        for stream in (False, True):
            for conc in (8, 1):
                for c in cfgs:
                    await batch(clients[c.name], stream, conc, args.warmup, Cell())
        for stream in (False, True):
            mode = "streamed" if stream else "non-streamed"
            for conc in (1, 8):
                per_round = args.batch * (2 if conc > 1 else 1)
                rounds = max(1, round(args.requests / per_round))
                cells = {c.name: Cell() for c in cfgs}
                seq0 = await counters.ledger_seq()
                counters.writes = {}
                t0 = time.perf_counter()
                for rnd in range(rounds):
                    k = rnd % len(cfgs)
                    for c in cfgs[k:] + cfgs[:k]:  # A B C D, B C D A, ...
                        cell = cells[c.name]
                        msgs0 = await counters.in_msgs(mon, c.name)
                        gw0, br0 = counters.cpu(c.name)
                        t = time.perf_counter()
                        before = len(cell.lat)
                        await batch(clients[c.name], stream, conc, per_round, cell, rnd % 2)
                        cell.seconds += time.perf_counter() - t
                        cell.turn_p50.append(pct(cell.lat[before:], 50))
                        gw1, br1 = counters.cpu(c.name)
                        cell.gw_cpu_s += gw1 - gw0
                        cell.broker_cpu_s += br1 - br0
                        cell.msgs += await counters.in_msgs(mon, c.name) - msgs0
                await asyncio.sleep(0.05)  # the last ledger writes' messages
                writes = await counters.ledger_seq() - seq0
                elapsed = time.perf_counter() - t0
                out[f"{mode}, concurrency {conc}"] = {
                    "cfgs": cfgs,
                    "cells": cells,
                    "ledger_writes": writes,
                    "ledger_by_key": {k: dict(v) for k, v in counters.writes.items()},
                    "seconds": elapsed,
                    "rounds": rounds,
                    "per_round": per_round,
                }
                a = cells["A"]
                log(
                    f"{mode} c={conc}: {rounds} rounds x {per_round} in {elapsed:.1f} s; p50 "
                    + ", ".join(
                        f"{n} {pct(x.lat, 50):.2f} ({pct(x.lat, 50) - pct(a.lat, 50):+.2f})"
                        for n, x in cells.items()
                    )
                    + f" ms; ledger writes {writes}"
                )
    finally:
        for http in clients.values():
            await http.aclose()
        await mon.aclose()
        await nc.close()
    return out


# ---- report -----------------------------------------------------------------------------


def _f(v: float, fmt: str = ".2f") -> str:
    return "n/a" if v != v else format(v, fmt)  # NaN


def summary(results: dict[str, Any]) -> dict[str, Any]:
    """The numbers of the report, as plain data (`--json`)."""
    out: dict[str, Any] = {}
    for scenario, res in results.items():
        cells: dict[str, Cell] = res["cells"]
        a = cells["A"]
        a50, a99 = pct(a.lat, 50), pct(a.lat, 99)
        rows = {}
        keys = {c.name: c.key for c in res["cfgs"]}
        for name, x in cells.items():
            n = max(1, x.requests)
            p50, p99 = pct(x.lat, 50), pct(x.lat, 99)
            paired = [t - ta for t, ta in zip(x.turn_p50, a.turn_p50, strict=True)]
            writes = res["ledger_by_key"].get(keys[name] or "", {})
            rows[name] = {
                "n": len(x.lat),
                "errors": x.errors,
                "p50_ms": p50,
                "p99_ms": p99,
                "added_p50_ms": p50 - a50,
                # the median, over rounds, of (this turn's p50 - A's turn's p50): drift
                # between rounds cancels out
                "added_p50_paired_ms": pct(paired, 50),
                "added_p99_ms": p99 - a99,
                "ratio_p50": p50 / a50,
                "ratio_p99": p99 / a99,
                # the same configuration, even rounds against odd rounds: the noise floor
                "halves_p50_ms": [pct(h, 50) for h in x.halves],
                "gateway_cpu_us_per_req": x.gw_cpu_s / n * 1e6,
                "broker_cpu_us_per_req": x.broker_cpu_s / n * 1e6,
                "broker_msgs_per_req": x.msgs / n,
                "req_per_s": x.requests / x.seconds if x.seconds else float("nan"),
                "ledger_writes": writes,  # by kind, this configuration's key
                "ledger_writes_per_req": sum(writes.values()) / n,
            }
        out[scenario] = {
            "rounds": res["rounds"],
            "per_round": res["per_round"],
            "seconds": res["seconds"],
            "configs": rows,
            "ledger_writes": res["ledger_writes"],  # all keys (the stream's sequence)
        }
    return out


def report(data: dict[str, Any], cfgs: list[Config], args: argparse.Namespace) -> str:
    lines = [
        "# Governance overhead (`python -m bench.governance`)",
        "",
        f"Run of {time.strftime('%Y-%m-%d %H:%M')}, {platform.machine()}, "
        f"{os.cpu_count()} cores, Python {platform.python_version()}"
        f"{', SMOKE (tiny samples)' if args.smoke else ''}. One nats-server, one sim worker "
        f"({OUTPUT_TOKENS} output tokens, no token delay) and four gateways on loopback, all "
        "running at once; the gateways take turns in rounds (A B C D, B C D A, ...).",
        "",
        "| config | what |",
        "|---|---|",
        *(f"| {c.name} | {c.title} |" for c in cfgs),
        "",
        "Latency: at the client, to the last byte, ms. Added: minus A's in the same scenario;"
        " paired: the median over rounds of (the turn's p50 minus A's turn's p50 in the same "
        "round); ratio: over A's. Noise: the largest gap between one configuration's p50 in "
        "even and in odd rounds. CPU: user + system time per request of the gateway process, "
        "and of nats-server during that configuration's turns. Broker msgs: messages the "
        "gateway's connection sent to nats-server per request (publishes, JetStream API and "
        "KV calls; its heartbeats included). Ledger writes: writes to `LLMFLEET_QUOTA` by the"
        " configuration's key, per request (leases and their returns, max-parallel holds, "
        "usage; see control/quota.py).",
        "",
    ]
    verdict = []
    for scenario, res in data.items():
        rows = res["configs"]
        head, noise = scenario_head(scenario, res)
        lines += [
            *head,
            "| config | n | errors | p50 ms | p99 ms | added p50 | paired | added p99 "
            "| ratio p50 | ratio p99 | gateway CPU us/req | broker CPU us/req "
            "| broker msgs/req | ledger writes/req |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for c in cfgs:
            r = rows[c.name]
            ledger = f"{r['ledger_writes_per_req']:.4f}" if c.key else "-"
            lines.append(
                f"| {c.name} | {r['n']} | {r['errors']} | {_f(r['p50_ms'])} | "
                f"{_f(r['p99_ms'])} | {_f(r['added_p50_ms'], '+.3f')} | "
                f"{_f(r['added_p50_paired_ms'], '+.3f')} | "
                f"{_f(r['added_p99_ms'], '+.3f')} | {_f(r['ratio_p50'], '.3f')} | "
                f"{_f(r['ratio_p99'], '.3f')} | {r['gateway_cpu_us_per_req']:.0f} | "
                f"{r['broker_cpu_us_per_req']:.0f} | {r['broker_msgs_per_req']:.3f} | {ledger} |"
            )
        kinds = [
            f"{c.name} " + (", ".join(f"{k} {n}" for k, n in sorted(w.items())) or "none")
            for c in cfgs
            if c.key is not None
            for w in [rows[c.name]["ledger_writes"]]
        ]
        lines += [
            "",
            f"Ledger writes by kind: {'; '.join(kinds)} "
            f"({res['ledger_writes'] / res['seconds']:.1f}/s in all).",
            "",
        ]
        worst = max(rows[n]["added_p50_ms"] for n in ("B", "C", "D"))
        verdict.append(
            f"- {scenario}: largest added p50 {worst:+.3f} ms "
            f"({'within' if worst <= TARGET_MS else 'over'} the {TARGET_MS} ms target; "
            f"noise +-{noise:.3f} ms)"
        )
    lines += [f"## Against the target (added p50 <= {TARGET_MS} ms)", "", *verdict, ""]
    return "\n".join(lines)


# ---- main -------------------------------------------------------------------------------


def log_exits(procs: list[Proc]) -> None:
    """After a failed run: the log tail of every process that exited."""
    for p in procs:
        if p.popen.poll() is not None:
            tail = p.log.read_text()[-2000:]
            log(f"{p.name} exited ({p.popen.returncode}); log tail:\n{tail}")


def stop_all(procs: list[Proc], timeout: float = 20.0) -> None:
    """SIGTERM to every process at once, then wait (each drains on its own)."""
    for p in procs:
        if p.popen.poll() is None:
            p.popen.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for p in procs:
        try:
            p.popen.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log(f"{p.name} did not stop within {timeout:.0f} s: killed")
            p.popen.kill()
            p.popen.wait()


SIZES: Sizes = (
    ("--requests", 2500, 60, "measured requests per configuration and scenario"),
    ("--batch", 50, 10, "requests per turn at concurrency 1 (twice that at 8)"),
    ("--warmup", 100, 16, "warm-up requests"),
)


def scenario_head(scenario: str, res: dict[str, Any]) -> tuple[list[str], float]:
    """A scenario's report heading (its rounds, time and p50 noise), and that noise: the
    largest gap between one configuration's p50 in even and in odd rounds."""
    rows = res["configs"].values()
    noise = max(abs(r["halves_p50_ms"][0] - r["halves_p50_ms"][1]) for r in rows)
    return [
        f"## {scenario}",
        "",
        f"{res['rounds']} rounds x {res['per_round']} requests per configuration, "
        f"{res['seconds']:.1f} s; p50 noise +-{noise:.3f} ms.",
        "",
    ], noise


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_sizes(ap, SIZES)
    ap.add_argument("--out", help="also write the report (markdown) to this file")
    args = ap.parse_args(argv)
    apply_sizes(args, SIZES)

    tmp = Path(tempfile.mkdtemp(prefix="llmfleet-bench-gov-"))
    monitor_port = free_port()
    broker = EmbeddedNats(store_dir=str(tmp / "nats"), http_port=monitor_port)
    cfgs = configs()
    procs: list[Proc] = []
    t_start = time.perf_counter()
    try:
        broker.start()
        log(f"nats-server at {broker.url}")
        worker = Proc(
            "worker",
            [sys.executable, "-m", "llmfleet", "--log-level", "warning", "worker", "--nats",
             broker.url, "--engine", "sim", "--model", MODEL, "--max-concurrency", "64",
             "--sim-ttft-ms", "0", "--sim-itl-ms", "0", "--sim-tokens", str(OUTPUT_TOKENS),
             # the worker audits only requests straight over NATS (none here); gateways
             # audit theirs, which is what B, C and D measure
             "--audit", "off"],
            tmp,
        )  # fmt: skip
        procs.append(worker)
        asyncio.run(create_keys(broker.url, cfgs))
        for c in cfgs:
            start_gateway(c, broker.url, tmp)
            assert c.proc is not None
            procs.append(c.proc)
        for c in cfgs:
            wait_ready(c)
        log("stack ready: " + ", ".join(f"{c.name} {c.url}" for c in cfgs))
        results = asyncio.run(measure(broker, f"http://127.0.0.1:{monitor_port}", cfgs, args))
    except BaseException:
        log_exits(procs)
        raise
    finally:
        stop_all(procs)
        broker.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    data = summary(results)
    text = report(data, cfgs, args)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
        log(f"wrote {args.out}")
    if args.json:
        Path(args.json).write_text(json.dumps(data, indent=2))
        log(f"wrote {args.json}")
    log(f"done in {time.perf_counter() - t_start:.0f} s")
    bad = sum(cell.errors for res in results.values() for cell in res["cells"].values())
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
