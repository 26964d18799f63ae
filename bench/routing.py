"""What aliases, fallback chains and circuit breakers (issue 15) add to a request, side by
side with a gateway that has no routes, in one run.

    python -m bench.routing                        # about 4 minutes on 2 cores
    python -m bench.routing --smoke                # under 20 s: the harness works
    python -m bench.routing --requests 4000 --out /tmp/routing.md

One nats-server, one sim worker serving `m` (no token delay, 4 output tokens: engine time
is negligible), one worker serving `dead` (the `openai` engine in front of
tests/upstream_server.py, asked for its `error-500` model: every completion fails with a
502 `upstream_error`), and two gateways on loopback, both `--auth none --audit off`: G0
without `--routes`, G1 with a routes file of a few aliases and `--breaker-backoff 600
--breaker-backoff-max 600`. Before measuring, requests for `dead` are sent to G1 until
its circuit for `dead` is open (three failures in a row), and it stays open for the whole
run (checked in G1's `GET /v1/health` before and after; a run longer than 600 s would
see it half-open, and says so). The configurations take turns in rounds (A B C D, then
B C D A, ...) so that drift and noise hit them all alike:

    A  model `m` on G0 (no --routes)             the baseline
    B  model `m` on G1 (--routes FILE)           a direct model name with routes loaded
    C  alias `chat` on G1, chain [m]             + the plan of an alias, its body rewrite
    D  alias `fallback` on G1, chain [dead, m]   + skipping a hop whose circuit is open

Non-streamed (latency to the last byte) and streamed (time to the first byte of content
and to the last byte), at concurrency 1 and 8, raw httpx (one keep-alive client for all).
Every answer must be a 200 served by `m` (`x-llmfleet-model`), with `x-llmfleet-alias`
naming the alias for C and D and absent for A and B (a response hook checks every one).
Per configuration: p50 and p99, the added ms and the ratio against A (pooled, and paired
round by round); CPU time per request of the configuration's gateway and of nats-server
(/proc schedstat, during its turns); messages its gateway sent to the broker per request.

Then, in this process and without any I/O, a micro-benchmark of the routing functions
alone: `Router.plan` for a model and for an alias, `Router.pick` (with the open hop),
`for_hop` on a chat body, `reason_of`, and the breaker's `try_pass` / `on_success`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import shutil
import statistics
import sys
import tempfile
import time
import timeit
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import nats

from bench.apis import _CHAT, Cell, Config, _f, _sync, batch, machine, prepare, summary
from bench.apis import report as apis_report
from bench.client import Sizes, add_sizes, apply_sizes, pct
from bench.governance import Counters, log, log_exits, stop_all
from bench.stack import ROOT, Proc, Stack, wait_http
from common import breaker
from common.breaker import BreakerSettings, Circuit
from common.errors import GatewayTimeout, InvalidRequest, UpstreamError
from control.routes import parse_routes
from gateway.auth import ANONYMOUS
from gateway.catalog import CatalogSnapshot, ModelEntry
from gateway.fronts import OPENAI_FRONTS
from gateway.routing import Router, for_hop, reason_of
from gateway.settings import Limits
from llmfleet.broker import EmbeddedNats, free_port

SCENARIOS = [(stream, conc) for stream in (False, True) for conc in (1, 8)]
MODEL = "m"  # served by the sim worker
DEAD = "dead"  # served by a worker whose upstream fails every completion
OUTPUT_TOKENS = 4
MAX_TOKENS = 16  # above the sim's answer: it ends naturally
DOC = ROOT / "docs" / "benchmarks-routing.md"  # the report of the last full run
BACKOFF_S = 600  # G1's circuit for `dead` stays open through the run
ROUTES = f"""\
models: [{MODEL}, {DEAD}]
aliases:
  chat:
    description: one hop
    chain: [{MODEL}]
  fallback:
    description: the first hop's circuit is open
    chain: [{DEAD}, {MODEL}]
  code:
    chain: [{DEAD}, chat]
  small:
    chain: [{MODEL}, {DEAD}]
    hop_timeout: 5
"""
# G0 has no routes; G1 has the file and keeps an opened circuit open for BACKOFF_S
G1_FLAGS = ["--breaker-backoff", str(BACKOFF_S), "--breaker-backoff-max", str(BACKOFF_S)]
# config -> (its gateway, the model it names, the x-llmfleet-alias its answers carry)
SETUP = {"A": ("G0", MODEL, ""), "B": ("G1", MODEL, ""), "C": ("G1", "chat", "chat"),
         "D": ("G1", "fallback", "fallback")}  # fmt: skip
TITLES = {
    "A": f"model `{MODEL}` on G0, started without `--routes` (baseline)",
    "B": f"model `{MODEL}` on G1, started with `--routes FILE`: a direct model name",
    "C": f"alias `chat` on G1, chain `[{MODEL}]`: one hop (the plan, the body rewrite)",
    "D": f"alias `fallback` on G1, chain `[{DEAD}, {MODEL}]`, `{DEAD}`'s circuit open at "
    "G1: the open hop is skipped",
}


def _chat(model: str) -> Callable[[bool, str], dict[str, Any]]:
    def make(stream: bool, prev: str) -> dict[str, Any]:
        return {
            "model": model,
            "messages": [{"role": "user", "content": "benchmark"}],
            "max_tokens": MAX_TOKENS,
            "stream": stream,
        }

    return make


def configs() -> list[Config]:
    path = "/v1/chat/completions"  # made absolute (the config's gateway) once it runs
    return [Config(n, TITLES[n], path, *_CHAT, _chat(SETUP[n][1])) for n in SETUP]


class Check:
    """A response hook: the `x-llmfleet-model` and `x-llmfleet-alias` of every 200 answer,
    by configuration (told apart by the gateway's port and the body)."""

    def __init__(self) -> None:
        self.which: dict[tuple[int | None, bytes], str] = {}
        self.seen: dict[str, Counter[tuple[str, str]]] = {}

    def learn(self, cfgs: list[Config]) -> None:
        for c in cfgs:
            for payload in c.payload.values():
                self.which[(httpx.URL(c.path).port, payload)] = c.name
            self.seen[c.name] = Counter()

    async def __call__(self, r: httpx.Response) -> None:
        if r.status_code != 200 or r.request.url.path != "/v1/chat/completions":
            return
        name = self.which.get((r.request.url.port, r.request.content), "?")
        got = (r.headers.get("x-llmfleet-model", ""), r.headers.get("x-llmfleet-alias", ""))
        self.seen.setdefault(name, Counter())[got] += 1

    def problems(self) -> list[str]:
        out = [f"an answer of no configuration: {dict(c)}" for n, c in self.seen.items()
               if n not in SETUP]  # fmt: skip
        for name, seen in self.seen.items():
            want = (MODEL, SETUP[name][2]) if name in SETUP else None
            bad = {k: v for k, v in seen.items() if k != want}
            if bad:
                out.append(f"{name}: answers not served as (model, alias) {want}: {bad}")
        return out


# ---- the circuit of `dead` at G1 ------------------------------------------------------


async def dead_state(http: httpx.AsyncClient, g1: str) -> dict[str, Any]:
    r = await http.get(g1 + "/v1/health")
    r.raise_for_status()
    return dict(r.json()["models"].get(DEAD) or {})


async def open_dead(http: httpx.AsyncClient, g1: str) -> list[int]:
    """Requests for `dead` at G1 until its circuit there is open; their statuses."""
    statuses = []
    payload = json.dumps(_chat(DEAD)(False, "")).encode()
    for _ in range(10):
        r = await http.post(g1 + "/v1/chat/completions", content=payload)
        statuses.append(r.status_code)
        if (await dead_state(http, g1)).get("state") == breaker.OPEN:
            return statuses
    raise RuntimeError(f"G1's circuit for {DEAD} did not open: {statuses}")


def fallbacks(metrics: str) -> float:
    """`llmfleet_fallback_total` for dead -> m (unavailable) in G1's /metrics."""
    labels = (f'from_model="{DEAD}"', f'to_model="{MODEL}"', 'reason="unavailable"')
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in metrics.splitlines()
        if line.startswith("llmfleet_fallback_total{") and all(x in line for x in labels)
    )


# ---- load -------------------------------------------------------------------------------


async def turn(http: httpx.AsyncClient, mon: httpx.AsyncClient, counters: Counters, c: Config,
               cell: Cell, stream: bool, conc: int, n: int, half: int) -> None:  # fmt: skip
    """One configuration's turn in a round, with its gateway's (and the broker's) CPU and
    the messages its gateway sent, measured around it."""
    sent0, (gw0, br0) = await counters.in_msgs(mon, c.name), counters.cpu(c.name)
    lat0, first0, t0 = len(cell.lat), len(cell.first), time.perf_counter()
    await batch(http, c, stream, conc, n, cell, half)
    cell.seconds += time.perf_counter() - t0
    gw1, br1 = counters.cpu(c.name)
    cell.gw_cpu_s, cell.broker_cpu_s = cell.gw_cpu_s + gw1 - gw0, cell.broker_cpu_s + br1 - br0
    cell.msgs += await counters.in_msgs(mon, c.name) - sent0
    cell.turn_p50.append(pct(cell.lat[lat0:], 50))
    cell.turn_first_p50.append(pct(cell.first[first0:], 50))


async def scenario(http: httpx.AsyncClient, mon: httpx.AsyncClient, counters: Counters,
                   cfgs: list[Config], stream: bool, conc: int, args: argparse.Namespace,
                   ) -> dict[str, Any]:  # fmt: skip
    """One mode and concurrency: the configurations take turns, round after round, each
    round starting one further along (A B C D, B C D A, ...)."""
    n = args.batch * (2 if conc > 1 else 1)
    cells = {c.name: Cell() for c in cfgs}
    rounds = max(2, round(args.requests / n))
    t0 = time.perf_counter()
    for rnd in range(rounds):
        k = rnd % len(cfgs)
        for c in cfgs[k:] + cfgs[:k]:
            await turn(http, mon, counters, c, cells[c.name], stream, conc, n, rnd % 2)
    seconds = time.perf_counter() - t0
    return {"stream": stream, "cells": cells, "seconds": seconds, "rounds": rounds,
            "per_round": n}  # fmt: skip


async def measure(urls: dict[str, str], procs: dict[str, Proc], broker: EmbeddedNats,
                  monitor: str, cfgs: list[Config], args: argparse.Namespace,
                  ) -> dict[str, Any]:  # fmt: skip
    assert broker.proc is not None
    for c in cfgs:
        c.path = urls[SETUP[c.name][0]] + "/v1/chat/completions"
    gws = [SimpleNamespace(name=c.name, gateway_id=f"bench-routing-{SETUP[c.name][0].lower()}",
                           proc=procs[SETUP[c.name][0]]) for c in cfgs]  # fmt: skip
    nc = await nats.connect(broker.url)
    counters = Counters(nc, monitor, gws, broker.proc.pid)  # type: ignore[arg-type]
    check = Check()
    limits = httpx.Limits(max_connections=32, max_keepalive_connections=32)
    http = httpx.AsyncClient(headers={"content-type": "application/json"}, limits=limits,
                             timeout=30.0, event_hooks={"response": [check]})  # fmt: skip
    mon = httpx.AsyncClient(timeout=5.0)
    g1 = urls["G1"]
    out: dict[str, Any] = {"scenarios": {}}
    try:
        out["priming"] = await open_dead(http, g1)
        out["dead_before"] = await dead_state(http, g1)
        log(f"G1: {DEAD} answered {out['priming']}; its circuit: {out['dead_before']}")
        fb0 = fallbacks((await mon.get(g1 + "/metrics")).text)
        await prepare(http, cfgs)
        check.learn(cfgs)
        log(f"warm-up: {args.warmup} requests per configuration, mode and concurrency")
        for (stream, conc), c in itertools.product(SCENARIOS, cfgs):
            warm = Cell()
            await batch(http, c, stream, conc, args.warmup, warm)
            if warm.errors:
                raise RuntimeError(f"{c.name} fails in warm-up: {warm.first_error}")
        for stream, conc in SCENARIOS:
            res = await scenario(http, mon, counters, cfgs, stream, conc, args)
            name = f"{'streamed' if stream else 'non-streamed'}, concurrency {conc}"
            out["scenarios"][name] = res
            a50 = pct(res["cells"]["A"].lat, 50)
            log(f"{name}: {res['rounds']} rounds x {res['per_round']} in {res['seconds']:.1f} s;"
                " p50 " + ", ".join(f"{n} {pct(x.lat, 50):.2f} ({pct(x.lat, 50) - a50:+.2f})"
                                    for n, x in res["cells"].items()) + " ms")  # fmt: skip
        sent = sum(r["cells"]["D"].requests for r in out["scenarios"].values())
        sent += args.warmup * len(SCENARIOS)
        out["dead_after"] = await dead_state(http, g1)
        out["fallbacks"] = fallbacks((await mon.get(g1 + "/metrics")).text) - fb0
        out["d_requests"] = sent
        out["seen"] = {n: {f"{m or '-'} / {a or '-'}": k for (m, a), k in c.items()}
                       for n, c in check.seen.items()}  # fmt: skip
        out["problems"] = check.problems()
        if out["dead_after"].get("state") != breaker.OPEN:
            out["problems"].append(f"G1's circuit for {DEAD} closed: {out['dead_after']}")
        if sent and out["fallbacks"] != sent:
            out["problems"].append(f"{out['fallbacks']:.0f} fallbacks for {sent} D requests")
    finally:
        await http.aclose()
        await mon.aclose()
        await nc.close()
    return out


# ---- the micro-benchmark: routing alone, no I/O -----------------------------------------


def _entry(model: str) -> ModelEntry:
    return ModelEntry(id=model, workers=(f"w-{model}",), slots=64, in_flight=0,
                      owned_by="llmfleet", created=1, simulated=True, description="",
                      ready=True, ready_workers=1)  # fmt: skip


def closed_pass(bk: breaker.Breakers, now: float) -> None:
    bk.try_pass(MODEL, now)
    bk.success(MODEL)


def micro_cases() -> list[tuple[str, str, Callable[[], object]]]:
    """(group, name, what one request does of it), on the routers of G0 (no routes) and
    G1 (the bench's routes; `dead`'s circuit open)."""
    snap = CatalogSnapshot(models={m: _entry(m) for m in (MODEL, DEAD)}, workers={})
    g0 = Router(settings=BreakerSettings(base_s=BACKOFF_S, max_s=BACKOFF_S))
    g1 = Router(parse_routes(ROUTES, "bench"), settings=g0.breakers.settings)
    for _ in range(3):
        g1.failed(DEAD, False, "502 upstream_error: simulated upstream failure")
    assert g1.breakers.state(DEAD, g1.clock()) == breaker.OPEN
    plans = {n: (g0 if n == "A" else g1).plan(SETUP[n][1], ANONYMOUS, snap) for n in SETUP}
    chat, limits = OPENAI_FRONTS["chat"], Limits()
    raw = json.dumps(_chat("chat")(False, "")).encode()
    parsed = _sync(chat.parse(raw, limits, None, ANONYMOUS))
    bk, now = g1.breakers, g1.clock()
    errors = [("upstream 502, from a worker", UpstreamError("upstream failed"), True),
              ("queue timeout", GatewayTimeout("no worker", code="queue_timeout"), False),
              ("400, the caller's own", InvalidRequest("bad"), True)]  # fmt: skip
    return [
        ("plan", "A model `m`, no routes (G0)", lambda: g0.plan(MODEL, ANONYMOUS, snap)),
        ("plan", "B model `m`, routes loaded (G1)", lambda: g1.plan(MODEL, ANONYMOUS, snap)),
        ("plan", "C alias `chat` [m]", lambda: g1.plan("chat", ANONYMOUS, snap)),
        ("plan", "D alias `fallback` [dead, m]", lambda: g1.plan("fallback", ANONYMOUS, snap)),
        ("pick", "A model `m` (G0)", lambda: g0.pick(plans["A"], 0, snap)),
        ("pick", "B model `m` (G1)", lambda: g1.pick(plans["B"], 0, snap)),
        ("pick", "C alias `chat`", lambda: g1.pick(plans["C"], 0, snap)),
        ("pick", "D alias `fallback`: skips `dead` (open), counts the fallback",
         lambda: g1.pick(plans["D"], 0, snap)),
        ("hop", "C, D `for_hop`: the body rewritten to name `m`",
         lambda: for_hop(parsed, MODEL)),
        ("hop", "  for scale: the chat front's `parse` of the same body",
         lambda: _sync(chat.parse(raw, limits, None, ANONYMOUS))),
        ("verdict", "A-D `Router.succeeded` (closed circuit)", lambda: g1.succeeded(MODEL, False)),
        *(("reason", f"`reason_of`: {what}", lambda e=e, w=w: reason_of(e, w))
          for what, e, w in errors),
        ("breaker", "`Breakers.try_pass` + `success`, closed", lambda: closed_pass(bk, now)),
        ("breaker", "`Breakers.try_pass`, open", lambda: bk.try_pass(DEAD, now)),
        ("breaker", "pure `try_pass` + `on_success`, closed",
         lambda: breaker.on_success(breaker.try_pass(Circuit(), now)[2])),
    ]  # fmt: skip


def micro(iters: int, repeats: int) -> list[dict[str, Any]]:
    """µs per call: the median of `repeats` runs of `iters` calls (and the fastest)."""
    log(f"micro-benchmark: {repeats} x {iters} calls each")
    rows = []
    for group, name, fn in micro_cases():
        timeit.repeat(fn, number=max(50, iters // 20), repeat=1)  # warm
        runs = [t / iters * 1e6 for t in timeit.repeat(fn, number=iters, repeat=repeats)]
        rows.append({"group": group, "name": name, "us": statistics.median(runs),
                     "min_us": min(runs)})  # fmt: skip
        log(f"  {rows[-1]['us']:7.2f} us  {group}: {name.strip()}")
    return rows


def micro_totals(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Per request, what routing does of the above: plan + pick + verdict (C, D: + the
    body rewrite)."""
    us = {(r["group"], r["name"][0]): r["us"] for r in rows}
    if not us:
        return {}
    verdict = us[("verdict", "A")]
    return {n: us[("plan", n)] + us[("pick", n)] + verdict + (us[("hop", "C")] if n in "CD" else 0)
            for n in SETUP}  # fmt: skip


# ---- report -----------------------------------------------------------------------------


def report(run: dict[str, Any], data: dict[str, Any], rows: list[dict[str, Any]],
           cfgs: list[Config], args: argparse.Namespace, argv: list[str]) -> str:  # fmt: skip
    lines = [
        "# Aliases, fallback and circuit breakers (`python -m bench.routing`)",
        "",
        f"Run of {time.strftime('%Y-%m-%d %H:%M')}, {machine()}"
        f"{', SMOKE (tiny samples)' if args.smoke else ''}.",
        "",
        f"Command: `{' '.join(['python -m bench.routing', *argv])}`",
        "",
    ]
    if data:
        lines += [
            "One nats-server; one sim worker serving `m` (`--sim-ttft-ms 0 --sim-itl-ms 0 "
            f"--sim-tokens {OUTPUT_TOKENS}`); one worker serving `dead` (`--engine openai` "
            "before tests/upstream_server.py, `--upstream-model error-500`: every "
            "completion fails, 502 `upstream_error`; its health probe off, "
            "`--upstream-health-interval 0`, and `--breaker-failures 1000`, so that the "
            "circuit that opens is the gateway's); two gateways, `--auth none --audit off`: "
            "G0 without `--routes`, G1 with `--routes FILE` (below) and `--breaker-backoff "
            f"{BACKOFF_S} --breaker-backoff-max {BACKOFF_S}`. The configurations take turns "
            "in rounds (A B C D, B C D A, ...), through one keep-alive httpx client. "
            f"`max_tokens` {MAX_TOKENS}: every answer ends naturally.",
            "",
            "| config | what |",
            "|---|---|",
            *(f"| {c.name} | {c.title} |" for c in cfgs),
            "",
            "G1's routes file:",
            "",
            "```yaml",
            ROUTES.rstrip(),
            "```",
            "",
            "Latency: at the client, ms; streamed: to the first byte of content and to "
            "the last byte. Added: minus A's in the same scenario; paired: the median over "
            "rounds of (the turn's p50 minus A's turn's p50 in the same round); ratio: "
            "over A's. Noise: the largest gap between one configuration's p50 in even and "
            "in odd rounds. CPU: user + system time per request of the configuration's "
            "gateway (G0 for A, G1 for B, C, D), and of nats-server, during its turns. "
            "Broker msgs: messages that gateway's connection sent to nats-server per "
            "request.",
            "",
            *checks(run),
            "",
        ]
    # the scenario tables and the summary: bench.apis's, from the same numbers
    tables = apis_report(data, [], cfgs, args, argv).split("\n## ", 1)
    if data and len(tables) == 2:
        lines += ["## " + tables[1].rstrip(), "", *noise_lines(data), ""]
    if rows:
        lines += micro_report(rows, args)
    return "\n".join(lines)


def checks(run: dict[str, Any]) -> list[str]:
    out = [
        "Checks:",
        "",
        f"- G1's circuit for `{DEAD}`: opened by {len(run['priming'])} requests (answered "
        f"{', '.join(map(str, run['priming']))}); before the run "
        f"`{_circuit(run['dead_before'])}`, after it `{_circuit(run['dead_after'])}`.",
        f"- `llmfleet_fallback_total{{from_model=\"{DEAD}\",to_model=\"{MODEL}\","
        f"reason=\"unavailable\"}}` at G1 rose by {run['fallbacks']:.0f} for "
        f"{run['d_requests']} D requests (warm-up included): every D request skipped "
        f"`{DEAD}`.",
        "- Every answer a 200 served as (`x-llmfleet-model` / `x-llmfleet-alias`), warm-up "
        "included: " + "; ".join(
            f"{n} " + ", ".join(f"{k} x{v}" for k, v in seen.items())
            for n, seen in run["seen"].items()
        ) + ".",
    ]  # fmt: skip
    out += [f"- **Problem**: {p}" for p in run["problems"]]
    return out


def _circuit(v: dict[str, Any]) -> str:
    keys = ("state", "failures", "reopen_in_s", "status")
    return ", ".join(f"{k} {v.get(k)}" for k in keys)


def noise_lines(data: dict[str, Any]) -> list[str]:
    """Per scenario: which added p50s (paired) stand out of the noise."""
    out = ["Against the noise (paired added p50 against the scenario's p50 noise):", ""]
    for scenario, res in data.items():
        rows = res["configs"]
        noise = max(abs(r["halves_p50_ms"][0] - r["halves_p50_ms"][1]) for r in rows.values())
        pre = "first_" if res["stream"] else ""
        said = []
        for name, r in rows.items():
            if name == "A":
                continue
            v = r[pre + "added_p50_paired_ms"]
            said.append(f"{name} {_f(v, '+.3f')} ({'within' if abs(v) <= noise else 'above'})")
        what = "first content" if res["stream"] else "last byte"
        out.append(f"- {scenario} ({what}, noise ±{noise:.3f} ms): " + ", ".join(said))
    return out


MICRO_TITLES = {
    "plan": "`Router.plan`: the hops a key may run (G0: no routes; G1: the bench's)",
    "pick": "`Router.pick`: the hop to try and its circuit's pass",
    "hop": "`for_hop`: the body a hop of an alias sends",
    "verdict": "The verdict on the hop",
    "reason": "`reason_of`: why a hop failed (only on a failure)",
    "breaker": "`common.breaker`",
}


def micro_report(rows: list[dict[str, Any]], args: argparse.Namespace) -> list[str]:
    lines = [
        "## Routing alone (in-process micro-benchmark)",
        "",
        f"Microseconds per call on one core, no I/O: the median of {args.micro_repeats} "
        f"runs of {args.micro_iters} calls (and the fastest run). The catalog is a "
        f"snapshot with `{MODEL}` and `{DEAD}` ready; G1's router has `{DEAD}`'s circuit "
        "open. The chat body is the bench's (one user message).",
        "",
    ]
    for group, title in MICRO_TITLES.items():
        grp = [r for r in rows if r["group"] == group]
        lines += [f"### {title}", "", "| call | µs | fastest |", "|---|---|---|"]
        for r in grp:
            name = r["name"]
            if name.startswith("  "):
                name = "&nbsp;&nbsp;" + name.strip()
            lines.append(f"| {name} | {r['us']:.2f} | {r['min_us']:.2f} |")
        lines.append("")
    totals = micro_totals(rows)
    base = totals.get("A", float("nan"))
    lines += [
        "Per request, plan + pick + verdict (C and D: + `for_hop`): "
        + "; ".join(f"{n} {v:.2f} µs" + (f" ({v - base:+.2f})" if n != "A" else "")
                    for n, v in totals.items()) + ".",
        "",
    ]  # fmt: skip
    return lines


# ---- main -------------------------------------------------------------------------------


def run_http(cfgs: list[Config], args: argparse.Namespace) -> dict[str, Any]:
    with contextlib.ExitStack() as stack:  # unwound in reverse: processes first
        tmp = Path(tempfile.mkdtemp(prefix="llmfleet-bench-routing-"))
        stack.callback(shutil.rmtree, tmp, ignore_errors=True)
        monitor_port = free_port()
        broker = EmbeddedNats(store_dir=str(tmp / "nats"), http_port=monitor_port).start()
        stack.callback(broker.stop)
        log(f"nats-server at {broker.url}")
        upstream = Stack(0, 0, OUTPUT_TOKENS)  # tests/upstream_server.py, for `dead`
        stack.callback(upstream.close)
        up = upstream.start_upstream()
        procs: list[Proc] = []
        stack.callback(stop_all, procs)
        try:
            urls, gws = start_fleet(broker.url, up, tmp, procs)
            monitor = f"http://127.0.0.1:{monitor_port}"
            return asyncio.run(measure(urls, gws, broker, monitor, cfgs, args))
        except BaseException:
            log_exits(procs)
            raise
    raise AssertionError("unreachable")


def start_fleet(
    nats_url: str, upstream: str, tmp: Path, procs: list[Proc]
) -> tuple[dict[str, str], dict[str, Proc]]:
    """The two workers and the two gateways, once both gateways list both models ready."""
    fleet = [sys.executable, "-m", "llmfleet", "--log-level", "warning"]
    procs += [
        Proc("worker-m", [*fleet, "worker", "--nats", nats_url, "--engine", "sim",
                          "--model", MODEL, "--max-concurrency", "64", "--sim-ttft-ms", "0",
                          "--sim-itl-ms", "0", "--sim-tokens", str(OUTPUT_TOKENS),
                          "--audit", "off"], tmp),
        # its own circuit never opens (--breaker-failures): the one that opens is G1's
        Proc("worker-dead", [*fleet, "worker", "--nats", nats_url, "--engine", "openai",
                             "--model", DEAD, "--upstream", upstream, "--upstream-model",
                             "error-500", "--upstream-health-interval", "0",
                             "--breaker-failures", "1000", "--audit", "off"], tmp),
    ]  # fmt: skip
    routes = tmp / "routes.yaml"
    routes.write_text(ROUTES)
    gws: dict[str, Proc] = {}
    urls: dict[str, str] = {}
    for name in ("G0", "G1"):
        port = free_port()
        extra = ["--routes", str(routes), *G1_FLAGS] if name == "G1" else []
        gws[name] = Proc(
            f"gateway-{name}",
            [*fleet, "gateway", "--nats", nats_url, "--port", str(port), "--gateway-id",
             f"bench-routing-{name.lower()}", "--auth", "none", "--audit", "off", *extra],
            tmp,
        )  # fmt: skip
        procs.append(gws[name])
        urls[name] = f"http://127.0.0.1:{port}"
    for name, url in urls.items():
        wait_http(url + "/readyz", 30, gws[name])
        deadline = time.monotonic() + 30
        while not {MODEL, DEAD} <= {m["id"] for m in httpx.get(url + "/v1/models").json()["data"]
                                    if m.get("status") == "ready"}:  # fmt: skip
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{name} never listed {MODEL}, {DEAD} ready; see {gws[name].log}"
                )
            time.sleep(0.1)
    log("stack ready: " + ", ".join(f"{n} {u}" for n, u in urls.items()))
    return urls, gws


SIZES: Sizes = (
    ("--requests", 5000, 20, "measured requests per configuration and scenario"),
    ("--batch", 40, 5, "requests per turn at concurrency 1 (twice that at 8)"),
    ("--warmup", 50, 5, "warm-up requests per configuration, mode and concurrency"),
    ("--micro-iters", 20000, 300, "calls per micro-benchmark run"),
    ("--micro-repeats", 5, 3, "micro-benchmark runs per call"),
)


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_sizes(ap, SIZES)
    ap.add_argument("--only", choices=("http", "micro"), help="only the HTTP part, or only "
                    "the micro-benchmark")  # fmt: skip
    ap.add_argument("--out", help=f"write the report (markdown) here (default "
                    f"{DOC.relative_to(ROOT)}; with --smoke: nowhere)")  # fmt: skip
    args = ap.parse_args(argv)
    apply_sizes(args, SIZES)
    if args.out is None and not args.smoke:
        args.out = str(DOC)
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    cfgs = configs()

    t_start = time.perf_counter()
    rows = micro(args.micro_iters, args.micro_repeats) if args.only != "http" else []
    run = run_http(cfgs, args) if args.only != "micro" else {"scenarios": {}, "problems": []}
    data = summary(run["scenarios"], "A")
    text = report(run, data, rows, cfgs, args, argv)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
        log(f"wrote {args.out}")
    if args.json:
        keep = {k: v for k, v in run.items() if k != "scenarios"}
        out = {"http": data, "checks": keep, "micro": rows, "micro_totals_us": micro_totals(rows)}
        Path(args.json).write_text(json.dumps(out, indent=2))
        log(f"wrote {args.json}")
    for problem in run["problems"]:
        log(f"PROBLEM: {problem}")
    log(f"done in {time.perf_counter() - t_start:.0f} s")
    bad = sum(cell.errors for res in run["scenarios"].values() for cell in res["cells"].values())
    return 1 if bad or run["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
