"""What the Anthropic Messages and OpenAI Responses fronts add to a request, side by side
with `/v1/chat/completions` in one run.

    python -m bench.apis                           # about 3 minutes on 2 cores
    python -m bench.apis --smoke                   # under 20 s: the harness works
    python -m bench.apis --requests 4000 --out /tmp/apis.md

Every request of these routes is translated to a chat body, runs the chat path, and its
chat deltas are rendered again in the route's shape (gateway/fronts.py). One nats-server,
one sim worker (no token delay, 4 output tokens: engine time is negligible) and one
gateway (`--auth none --audit off`) on loopback. The configurations take turns on that
gateway, in rounds of a few dozen requests (A B C D E, then B C D E A, ...), so that
drift and noise on the machine hit every configuration alike:

    A  POST /v1/chat/completions                         the baseline
    B  POST /v1/messages                                 + Messages <-> chat translation
    C  POST /v1/responses, store: false                  + Responses <-> chat translation
    D  POST /v1/responses, store: true                   + the KV write before the last byte
    E  POST /v1/responses, store: false,                 + the KV read of the chain
       previous_response_id (a stored 1-turn response)

Non-streamed (latency to the last byte) and streamed (time to the first byte of content
and to the last byte), at concurrency 1 and 8, raw httpx (one keep-alive client for all
configurations: the client's cost is the same for all). Per configuration: p50 and p99,
the added ms and the ratio against A (pooled, and paired round by round); CPU time per
request of the gateway and of nats-server (/proc schedstat, during that configuration's
turns) and the messages the gateway sent to the broker per request (nats-server /connz).

Then, in this process and without any I/O, a micro-benchmark of the translation functions
alone (time.perf_counter over many iterations): microseconds per request of each front's
`parse`, of its renderer over a 4-token answer (streamed and not), and of the stored
response's write and read against an in-memory KV, each next to the chat front's own.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import os
import platform
import secrets
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import nats.js.errors

from bench.client import Sizes, add_sizes, apply_sizes, pct
from bench.governance import cpu_seconds, log, log_exits, scenario_head, stop_all
from bench.stack import Proc, wait_http
from common import protocol as p
from gateway.auth import ANONYMOUS
from gateway.front_messages import MessagesFront
from gateway.front_responses import ResponsesFront
from gateway.fronts import OPENAI_FRONTS
from gateway.responses_store import ResponseStore, part_bytes_for
from gateway.settings import Limits
from llmfleet.broker import EmbeddedNats, free_port

MODEL = "bench-model"
OUTPUT_TOKENS = 4  # the sim's answer (--sim-tokens)
MAX_TOKENS = 16  # above it: the answer ends naturally (finish "stop", Responses "completed")
GATEWAY_ID = "bench-apis"
PROMPT = "benchmark"


@dataclass
class Config:
    name: str
    title: str
    path: str
    first: bytes  # a stream's first content event contains this
    last: bytes  # ... and its last event this
    make: Callable[[bool, str], dict[str, Any]]  # (stream, previous id) -> request body
    payload: dict[bool, bytes] = field(default_factory=dict)


def _chat(stream: bool, prev: str) -> dict[str, Any]:
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": MAX_TOKENS,
        "stream": stream,
    }


def _messages(stream: bool, prev: str) -> dict[str, Any]:
    return {
        "model": MODEL,
        "max_tokens": MAX_TOKENS,
        "messages": [{"role": "user", "content": PROMPT}],
        "stream": stream,
    }


def _responses(store: bool, chained: bool) -> Callable[[bool, str], dict[str, Any]]:
    def make(stream: bool, prev: str) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": MODEL,
            "input": PROMPT,
            "max_output_tokens": MAX_TOKENS,
            "stream": stream,
            "store": store,
        }
        if chained:
            body["previous_response_id"] = prev
        return body

    return make


# The first event with content, and the last event, of each API's stream (the chat
# stream's first chunk has `"delta":{"role":"assistant","content":""`: no match).
_CHAT = (b'"delta":{"content":"', b"data: [DONE]")
_MSG = (b'"type":"text_delta"', b"event: message_stop")
_RESP = (b"event: response.output_text.delta", b"event: response.completed")


def configs() -> list[Config]:
    return [
        Config("A", "`POST /v1/chat/completions` (baseline)", "/v1/chat/completions", *_CHAT,
               _chat),
        Config("B", "`POST /v1/messages`", "/v1/messages", *_MSG, _messages),
        Config("C", "`POST /v1/responses`, `store: false`", "/v1/responses", *_RESP,
               _responses(False, False)),
        Config("D", "`POST /v1/responses`, `store: true` (a KV write before the last byte)",
               "/v1/responses", *_RESP, _responses(True, False)),
        Config("E", "`POST /v1/responses`, `store: false`, `previous_response_id` of a "
               "stored 1-turn response (a KV read)", "/v1/responses", *_RESP,
               _responses(False, True)),
    ]  # fmt: skip


@dataclass
class Cell:
    """One configuration in one scenario (mode x concurrency)."""

    lat: list[float] = field(default_factory=list)  # ms to the last byte
    first: list[float] = field(default_factory=list)  # ms to the first content (streamed)
    halves: tuple[list[float], list[float]] = field(default_factory=lambda: ([], []))
    turn_p50: list[float] = field(default_factory=list)  # ms, one per round
    turn_first_p50: list[float] = field(default_factory=list)
    errors: int = 0
    first_error: str = ""
    gw_cpu_s: float = 0.0  # the gateway process, during this configuration's turns
    broker_cpu_s: float = 0.0  # nats-server, the same
    msgs: int = 0
    requests: int = 0  # sent, including errors
    seconds: float = 0.0  # the length of this configuration's turns


# ---- load -------------------------------------------------------------------------------


async def one(http: httpx.AsyncClient, c: Config, stream: bool) -> tuple[float, float, str]:
    """(ms to the first content or NaN, ms to the last byte, '' or what went wrong)."""
    payload = c.payload[stream]
    t0 = time.perf_counter()
    if not stream:
        r = await http.post(c.path, content=payload)
        ms = (time.perf_counter() - t0) * 1000
        return float("nan"), ms, "" if r.status_code == 200 else f"{r.status_code} {r.text[:200]}"
    first = float("nan")
    async with http.stream("POST", c.path, content=payload) as r:
        tail = b""
        async for chunk in r.aiter_raw():
            tail = tail[-64:] + chunk
            if first != first and c.first in tail:  # NaN: not seen yet
                first = (time.perf_counter() - t0) * 1000
        ms = (time.perf_counter() - t0) * 1000
        if r.status_code != 200:
            return first, ms, f"{r.status_code} {tail[-300:].decode(errors='replace')}"
        if c.last not in tail[-2048:]:
            return first, ms, f"stream ended without {c.last!r}: {tail[-200:]!r}"
        if first != first:
            return first, ms, f"no content event {c.first!r} in the stream"
        return first, ms, ""


async def batch(
    http: httpx.AsyncClient, c: Config, stream: bool, conc: int, n: int, cell: Cell, half: int = 0
) -> None:
    """`n` requests, `conc` at a time (closed loop)."""
    left = n

    async def loop() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            first, ms, err = await one(http, c, stream)
            cell.requests += 1
            if err:
                cell.errors += 1
                cell.first_error = cell.first_error or err
                continue
            cell.lat.append(ms)
            cell.halves[half].append(ms)
            if stream:
                cell.first.append(first)

    await asyncio.gather(*(loop() for _ in range(conc)))


async def in_msgs(mon: httpx.AsyncClient, monitor: str) -> int:
    """Messages the gateway's connection has sent to the broker so far."""
    r = await mon.get(monitor + "/connz", params={"limit": 4096})
    for conn in r.json().get("connections", []):
        if conn.get("name") == f"llmfleet-gateway-{GATEWAY_ID}":
            return int(conn["in_msgs"])
    return 0


async def prepare(http: httpx.AsyncClient, cfgs: list[Config]) -> str:
    """The stored 1-turn response E continues; every configuration's bodies."""
    prev = ""
    if any(c.name == "E" for c in cfgs):
        r = await http.post(
            "/v1/responses", content=json.dumps(_responses(True, False)(False, "")).encode()
        )
        r.raise_for_status()
        prev = r.json()["id"]
    for c in cfgs:
        c.payload = {s: json.dumps(c.make(s, prev)).encode() for s in (False, True)}
    return prev


async def measure(
    url: str, monitor: str, gateway_pid: int, broker_pid: int, cfgs: list[Config],
    args: argparse.Namespace,
) -> dict[str, Any]:  # fmt: skip
    limits = httpx.Limits(max_connections=16, max_keepalive_connections=16)
    http = httpx.AsyncClient(
        base_url=url, headers={"content-type": "application/json"}, limits=limits, timeout=30.0
    )
    mon = httpx.AsyncClient(timeout=5.0)
    out: dict[str, Any] = {}
    try:
        prev = await prepare(http, cfgs)
        if prev:
            log(f"E continues {prev}")
        log(f"warm-up: {args.warmup} requests per configuration, mode and concurrency")
        for stream in (False, True):
            for conc in (8, 1):
                for c in cfgs:
                    warm = Cell()
                    await batch(http, c, stream, conc, args.warmup, warm)
                    if warm.errors:
                        raise RuntimeError(f"{c.name} fails in warm-up: {warm.first_error}")
        for stream in (False, True):
            mode = "streamed" if stream else "non-streamed"
            for conc in (1, 8):
                per_round = args.batch * (2 if conc > 1 else 1)
                rounds = max(2, round(args.requests / per_round))
                cells = {c.name: Cell() for c in cfgs}
                t0 = time.perf_counter()
                for rnd in range(rounds):
                    k = rnd % len(cfgs)
                    for c in cfgs[k:] + cfgs[:k]:  # A B C D E, B C D E A, ...
                        cell = cells[c.name]
                        msgs0 = await in_msgs(mon, monitor)
                        gw0, br0 = cpu_seconds(gateway_pid), cpu_seconds(broker_pid)
                        t = time.perf_counter()
                        before, before_first = len(cell.lat), len(cell.first)
                        await batch(http, c, stream, conc, per_round, cell, rnd % 2)
                        cell.seconds += time.perf_counter() - t
                        cell.gw_cpu_s += cpu_seconds(gateway_pid) - gw0
                        cell.broker_cpu_s += cpu_seconds(broker_pid) - br0
                        cell.msgs += await in_msgs(mon, monitor) - msgs0
                        cell.turn_p50.append(pct(cell.lat[before:], 50))
                        cell.turn_first_p50.append(pct(cell.first[before_first:], 50))
                elapsed = time.perf_counter() - t0
                out[f"{mode}, concurrency {conc}"] = {
                    "stream": stream,
                    "cells": cells,
                    "seconds": elapsed,
                    "rounds": rounds,
                    "per_round": per_round,
                }
                a = cells[cfgs[0].name]
                log(
                    f"{mode} c={conc}: {rounds} rounds x {per_round} in {elapsed:.1f} s; p50 "
                    + ", ".join(
                        f"{n} {pct(x.lat, 50):.2f} ({pct(x.lat, 50) - pct(a.lat, 50):+.2f})"
                        for n, x in cells.items()
                    )
                    + " ms"
                )
    finally:
        await http.aclose()
        await mon.aclose()
    return out


# ---- the micro-benchmark: translation alone, no I/O -------------------------------------


def _sync(coro: Coroutine[Any, Any, Any]) -> Any:
    """Run a coroutine that never really waits (the fronts' `parse`/`completed` against an
    in-memory KV) without an event loop."""
    try:
        coro.send(None)
    except StopIteration as stop:
        return stop.value
    coro.close()
    raise RuntimeError("the coroutine waited on something")


class MemoryKV:
    """The part of nats.js.kv.KeyValue the response store uses, in a dict."""

    def __init__(self) -> None:
        self.data: dict[str, bytes] = {}

    async def put(self, key: str, value: bytes) -> int:
        self.data[key] = value
        return len(self.data)

    async def get(self, key: str) -> Any:
        if key not in self.data:
            raise nats.js.errors.KeyNotFoundError
        return SimpleNamespace(value=self.data[key])

    async def delete(self, key: str) -> bool:
        return self.data.pop(key, None) is not None


def _find(name: str, *modules: str) -> Callable[..., Any]:
    """`name` from the first of `modules` that has it (the translation code moves between
    modules as it is reorganized; the benchmark times whichever is there)."""
    for mod in modules:
        try:
            fn = getattr(importlib.import_module(mod), name, None)
        except ImportError:
            continue
        if fn is not None:
            return fn  # type: ignore[no-any-return]
    raise LookupError(f"{name} is in none of {modules}")


ANTHROPIC = ("common.apis.anthropic_request", "common.apis.anthropic")
RESPONSES = ("common.apis.responses", "common.apis.responses_chat")


def micro_cases() -> list[tuple[str, str, Callable[[], object]]]:
    """(group, name, one request's work). Groups: request (body -> the chat `Parsed`),
    streamed reply (renderer: start, 4 one-token deltas, finish), non-streamed reply
    (renderer: 4 collects, body), store (Responses only)."""
    limits = Limits()
    rid = secrets.token_hex(12)
    created = int(time.time())
    words = ["fleet", " with", " workers", " care"][:OUTPUT_TOKENS]
    deltas = [
        p.Delta(
            seq=i,
            choices=[
                p.ChoiceDelta(
                    index=0, content=w, finish_reason="stop" if i == len(words) - 1 else None
                )
            ],
            tokens=i + 1,
        )
        for i, w in enumerate(words)
    ]
    usage = p.Usage(prompt_tokens=1, completion_tokens=OUTPUT_TOKENS, total_tokens=5)
    store = ResponseStore(MemoryKV(), part_bytes=part_bytes_for(1024 * 1024), ttl_s=3600.0)  # type: ignore[arg-type]

    def body(make: Callable[[bool, str], dict[str, Any]], stream: bool, prev: str = "") -> bytes:
        return json.dumps(make(stream, prev)).encode()

    chat = OPENAI_FRONTS["chat"]
    messages = MessagesFront()

    def responses_parse(raw: bytes, with_store: bool = False) -> Callable[[], object]:
        return lambda: _sync(
            ResponsesFront(store if with_store else None).parse(raw, limits, None, ANONYMOUS)
        )

    # a stored 1-turn response, and one front per kind of reply, already parsed
    def parsed(front: Any, raw: bytes) -> Any:
        return _sync(front.parse(raw, limits, None, ANONYMOUS))

    first = ResponsesFront(store)
    r_stored = parsed(first, body(_responses(True, False), False))
    renderer = first.renderer(r_stored, rid, created)
    for d in deltas:
        renderer.collect(d)
    renderer.body(usage)
    _sync(first.completed(renderer, usage))
    prev = renderer.stream.id  # type: ignore[attr-defined]

    # (front, parsed) per API and mode; a Responses front keeps its request (one per call)
    fronts: dict[str, dict[bool, tuple[Any, Any]]] = {}
    for key, make in (
        ("chat", _chat),
        ("messages", _messages),
        ("responses", _responses(False, False)),
    ):
        fronts[key] = {}
        for s in (False, True):
            f = {"chat": chat, "messages": messages}.get(key) or ResponsesFront(None)
            fronts[key][s] = (f, parsed(f, body(make, s)))

    def streamed(key: str) -> Callable[[], object]:
        front, pz = fronts[key][True]

        def run() -> object:
            r = front.renderer(pz, rid, created)
            out = [r.start(1)]
            out += [r.delta(d) for d in deltas]
            out.append(r.finish(usage))
            return out

        return run

    def collected(key: str) -> Callable[[], object]:
        front, pz = fronts[key][False]

        def run() -> object:
            r = front.renderer(pz, rid, created)
            for d in deltas:
                r.collect(d)
            return r.body(usage)

        return run

    stored_front = ResponsesFront(store)
    stored_parsed = parsed(stored_front, body(_responses(True, False), False))

    def store_write() -> object:
        r = stored_front.renderer(stored_parsed, secrets.token_hex(12), created)
        for d in deltas:
            r.collect(d)
        r.body(usage)
        return _sync(stored_front.completed(r, usage))

    chat_raw = body(_chat, False)
    msg_raw = body(_messages, False)
    resp_raw = body(_responses(False, False), False)
    decode_request = _find("decode_request", *RESPONSES)
    normalize_input = _find("normalize_input", *RESPONSES)
    responses_to_chat = _find("responses_to_chat", *RESPONSES[::-1])
    resp_req = decode_request(resp_raw)
    resp_items = normalize_input(resp_req.input, rid)
    decode_messages = _find("decode_messages", *ANTHROPIC)
    messages_to_chat = _find("messages_to_chat", *ANTHROPIC)
    msg_req = decode_messages(msg_raw)

    return [
        ("request", "A chat: `OpenAIFront.parse` (validate.parse)",
         lambda: _sync(chat.parse(chat_raw, limits, None, ANONYMOUS))),
        ("request", "B messages: `MessagesFront.parse`",
         lambda: _sync(messages.parse(msg_raw, limits, None, ANONYMOUS))),
        ("request", "  of which `decode_messages`",
         lambda: decode_messages(msg_raw)),
        ("request", "  of which `messages_to_chat`",
         lambda: messages_to_chat(msg_req)),
        ("request", "C responses: `ResponsesFront.parse`", responses_parse(resp_raw)),
        ("request", "  of which `decode_request`",
         lambda: decode_request(resp_raw)),
        ("request", "  of which `normalize_input`",
         lambda: normalize_input(resp_req.input, rid)),
        ("request", "  of which `responses_to_chat`",
         lambda: responses_to_chat(resp_req, resp_items)),
        ("request", "E responses + previous_response_id: `ResponsesFront.parse` "
         "(in-memory KV: `ResponseStore.chain`)",
         responses_parse(body(_responses(False, True), False, prev), with_store=True)),
        ("streamed", "A chat: `OpenAIRenderer` (render.StreamRenderer)", streamed("chat")),
        ("streamed", "B messages: `MessagesRenderer` (MessageStream)",
         streamed("messages")),
        ("streamed", "C responses: `ResponsesRenderer` (ResponseStream)",
         streamed("responses")),
        ("collected", "A chat: `OpenAIRenderer` (render.Assembler)", collected("chat")),
        ("collected", "B messages: `MessagesRenderer` (MessageStream, frames off)",
         collected("messages")),
        ("collected", "C responses: `ResponsesRenderer` (ResponseStream, emit off)",
         collected("responses")),
        ("store", "D responses, store: renderer + `ResponsesFront.completed` "
         "(in-memory KV: `ResponseStore.put`)", store_write),
    ]  # fmt: skip


def micro(iters: int, repeats: int) -> list[dict[str, Any]]:
    """µs per call of each case: the median over `repeats` runs of `iters` calls (and the
    fastest run)."""
    rows = []
    for group, name, fn in micro_cases():
        for _ in range(max(50, iters // 20)):  # warm
            fn()
        runs = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            for _ in range(iters):
                fn()
            runs.append((time.perf_counter() - t0) / iters * 1e6)
        rows.append(
            {"group": group, "name": name, "us": statistics.median(runs), "min_us": min(runs)}
        )
    return rows


# ---- report -----------------------------------------------------------------------------


def _f(v: float, fmt: str = ".2f") -> str:
    return "n/a" if v != v else format(v, fmt)  # NaN


def summary(results: dict[str, Any], base: str) -> dict[str, Any]:
    """The numbers of the report, as plain data (`--json`)."""
    out: dict[str, Any] = {}
    for scenario, res in results.items():
        cells: dict[str, Cell] = res["cells"]
        a = cells[base]
        a_n = max(1, a.requests)
        rows = {}
        for name, x in cells.items():
            n = max(1, x.requests)
            row: dict[str, Any] = {"n": len(x.lat), "errors": x.errors}
            if x.first_error:
                row["first_error"] = x.first_error
            pairs = [("", x.lat, a.lat, x.turn_p50, a.turn_p50)]
            if res["stream"]:
                pairs.append(("first_", x.first, a.first, x.turn_first_p50, a.turn_first_p50))
            for pre, lat, alat, turns, aturns in pairs:
                p50, p99, a50, a99 = pct(lat, 50), pct(lat, 99), pct(alat, 50), pct(alat, 99)
                paired = [t - ta for t, ta in zip(turns, aturns, strict=True)]
                row |= {
                    f"{pre}p50_ms": p50,
                    f"{pre}p99_ms": p99,
                    f"{pre}added_p50_ms": p50 - a50,
                    # the median over rounds of (this turn's p50 - A's turn's p50): drift
                    # between rounds cancels out
                    f"{pre}added_p50_paired_ms": pct(paired, 50),
                    f"{pre}added_p99_ms": p99 - a99,
                    f"{pre}ratio_p50": p50 / a50,
                    f"{pre}ratio_p99": p99 / a99,
                }
            gw = x.gw_cpu_s / n * 1e6
            row |= {
                # the same configuration, even rounds against odd rounds: the noise floor
                "halves_p50_ms": [pct(h, 50) for h in x.halves],
                "gateway_cpu_us_per_req": gw,
                "added_gateway_cpu_us_per_req": gw - a.gw_cpu_s / a_n * 1e6,
                "broker_cpu_us_per_req": x.broker_cpu_s / n * 1e6,
                "broker_msgs_per_req": x.msgs / n,
                "req_per_s": x.requests / x.seconds if x.seconds else float("nan"),
            }
            rows[name] = row
        out[scenario] = {
            "stream": res["stream"],
            "rounds": res["rounds"],
            "per_round": res["per_round"],
            "seconds": res["seconds"],
            "configs": rows,
        }
    return out


def machine() -> str:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (
        f"{platform.machine()}, {os.cpu_count()} cores{f' ({cpu})' if cpu else ''}, "
        f"Linux {platform.release()}, Python {platform.python_version()}"
    )


MICRO_TITLES = {
    "request": "Request: the body to the chat `Parsed` (what the gateway publishes)",
    "streamed": f"Streamed reply: renderer, `start`, {OUTPUT_TOKENS} one-token deltas, `finish`",
    "collected": f"Non-streamed reply: renderer, {OUTPUT_TOKENS} `collect`s, `body`",
    "store": "The stored response (Responses, `store: true`)",
}


def micro_report(rows: list[dict[str, Any]], iters: int, repeats: int) -> list[str]:
    lines = [
        "## Translation alone (in-process micro-benchmark)",
        "",
        f"Microseconds per request on one core, no I/O: the median of {repeats} runs of "
        f"{iters} calls (and the fastest run); ratio and added: against the chat front's "
        "own step (the A row of the group; the store row: against C's non-streamed "
        "renderer, so it is the store alone). The store and chain rows use an in-memory "
        "KV: what the gateway's CPU spends on the entry, not the broker round trip.",
        "",
    ]
    for group, title in MICRO_TITLES.items():
        grp = [r for r in rows if r["group"] == group]
        if not grp:
            continue
        # the store row against the same renderer without it (C, non-streamed)
        against = "collected" if group == "store" else group
        prefix = "C " if group == "store" else "A "
        base = next(
            (r["us"] for r in rows if r["group"] == against and r["name"].startswith(prefix)),
            float("nan"),
        )
        lines += [f"### {title}", "", "| step | µs | fastest | added | ratio |"]
        lines.append("|---|---|---|---|---|")
        for r in grp:
            sub = r["name"].startswith("  ")
            added = "" if sub else _f(r["us"] - base, "+.1f")
            ratio = "" if sub else _f(r["us"] / base, ".2f")
            name = ("&nbsp;&nbsp;" + r["name"].strip()) if sub else r["name"]
            lines.append(f"| {name} | {r['us']:.1f} | {r['min_us']:.1f} | {added} | {ratio} |")
        lines.append("")
    totals = micro_totals(rows)
    if totals:
        lines += [
            "Per non-streamed request in all (request + reply; D: + the store write): "
            + "; ".join(f"{k} {v:.1f} µs" for k, v in totals.items())
            + ".",
            "",
        ]
    return lines


def micro_totals(rows: list[dict[str, Any]]) -> dict[str, float]:
    def us(prefix: str, group: str) -> float:
        return next(
            (r["us"] for r in rows if r["group"] == group and r["name"].startswith(prefix)),
            float("nan"),
        )

    if not rows:
        return {}
    collected = {k: us(k + " ", "collected") for k in "ABC"}
    return {
        "A": us("A ", "request") + collected["A"],
        "B": us("B ", "request") + collected["B"],
        "C": us("C ", "request") + collected["C"],
        "D": us("C ", "request") + us("D ", "store"),  # its renderer is in the store row
        "E": us("E ", "request") + collected["C"],
    }


def report(
    data: dict[str, Any], micro_rows: list[dict[str, Any]], cfgs: list[Config],
    args: argparse.Namespace, argv: list[str],
) -> str:  # fmt: skip
    command = " ".join(["python -m bench.apis", *argv])
    lines = [
        "# API translation overhead (`python -m bench.apis`)",
        "",
        f"Run of {time.strftime('%Y-%m-%d %H:%M')}, {machine()}"
        f"{', SMOKE (tiny samples)' if args.smoke else ''}.",
        "",
        f"Command: `{command}`",
        "",
    ]
    if data:
        lines += [
            "One nats-server, one sim worker (`--sim-ttft-ms 0 --sim-itl-ms 0 --sim-tokens "
            f"{OUTPUT_TOKENS}`: {OUTPUT_TOKENS} output tokens, no token delay) and one "
            "gateway (`--auth none --audit off`) on loopback; the configurations take turns "
            "on that gateway in rounds (A B C D E, B C D E A, ...), through one keep-alive "
            f"httpx client. `max_tokens` {MAX_TOKENS}: every answer ends naturally.",
            "",
            "| config | what |",
            "|---|---|",
            *(f"| {c.name} | {c.title} |" for c in cfgs),
            "",
            "Latency: at the client, ms; streamed: to the first byte of content (the "
            "event carrying the first text) and to the last byte. Added: minus A's in the "
            "same scenario; paired: the median over rounds of (the turn's p50 minus A's "
            "turn's p50 in the same round); ratio: over A's. Noise: the largest gap "
            "between one configuration's p50 in even and in odd rounds. CPU: user + "
            "system time per request of the gateway process, and of nats-server, during "
            "that configuration's turns. Broker msgs: messages the gateway's connection "
            "sent to nats-server per request (the request's publish, KV reads and writes, "
            "heartbeats).",
            "",
        ]
    for scenario, res in data.items():
        rows = res["configs"]
        head_lines, _ = scenario_head(scenario, res)
        lines += head_lines
        head = "| config | n | errors "
        sep = "|---|---|---"
        if res["stream"]:
            head += "| first p50 ms | first p99 ms | first added p50 | first paired "
            sep += "|---|---|---|---"
        head += (
            "| p50 ms | p99 ms | added p50 | paired | added p99 | ratio p50 | ratio p99 "
            "| gateway CPU us/req | added CPU us | broker CPU us/req | broker msgs/req |"
        )
        sep += "|---|---|---|---|---|---|---|---|---|---|---|"
        lines += [head, sep]
        for c in cfgs:
            r = rows[c.name]
            cols = [c.name, str(r["n"]), str(r["errors"])]
            if res["stream"]:
                cols += [_f(r["first_p50_ms"]), _f(r["first_p99_ms"]),
                         _f(r["first_added_p50_ms"], "+.3f"),
                         _f(r["first_added_p50_paired_ms"], "+.3f")]  # fmt: skip
            cols += [
                _f(r["p50_ms"]), _f(r["p99_ms"]), _f(r["added_p50_ms"], "+.3f"),
                _f(r["added_p50_paired_ms"], "+.3f"), _f(r["added_p99_ms"], "+.3f"),
                _f(r["ratio_p50"], ".3f"), _f(r["ratio_p99"], ".3f"),
                f"{r['gateway_cpu_us_per_req']:.0f}",
                _f(r["added_gateway_cpu_us_per_req"], "+.0f"),
                f"{r['broker_cpu_us_per_req']:.0f}", f"{r['broker_msgs_per_req']:.3f}",
            ]  # fmt: skip
            lines.append("| " + " | ".join(cols) + " |")
        errs = [f"{n}: {r['first_error']}" for n, r in rows.items() if r.get("first_error")]
        lines += ["", *(f"First error, {e}" for e in errs), ""] if errs else [""]
    if data:
        lines += [
            "## Summary: added p50, paired (ms), and gateway CPU per request (µs)",
            "",
            "| scenario | A p50 ms | "
            + " | ".join(f"{c.name} added" for c in cfgs[1:])
            + " | gateway CPU µs "
            + " / ".join(c.name for c in cfgs)
            + " |",
            "|---|---|" + "---|" * (len(cfgs) - 1) + "---|",
        ]
        base = cfgs[0].name
        for scenario, res in data.items():
            rows = res["configs"]
            pre = "first_" if res["stream"] else ""
            cells = []
            for c in cfgs[1:]:
                r = rows[c.name]
                cell = _f(r["added_p50_paired_ms"], "+.2f")
                if res["stream"]:
                    cell = f"{_f(r['first_added_p50_paired_ms'], '+.2f')} / {cell}"
                cells.append(cell)
            a = rows[base]
            a_lat = f"{_f(a['p50_ms'])} (p99 {_f(a['p99_ms'])})"
            if res["stream"]:
                a_lat = f"first {_f(a[pre + 'p50_ms'])} (p99 {_f(a[pre + 'p99_ms'])}), last {a_lat}"
            cpu = " / ".join(f"{rows[c.name]['gateway_cpu_us_per_req']:.0f}" for c in cfgs)
            lines.append(f"| {scenario} | {a_lat} | " + " | ".join(cells) + f" | {cpu} |")
        lines += ["", "Streamed cells: first content / last byte.", ""]
    if micro_rows:
        lines += micro_report(micro_rows, args.micro_iters, args.micro_repeats)
    return "\n".join(lines)


# ---- main -------------------------------------------------------------------------------


def run_http(cfgs: list[Config], args: argparse.Namespace) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="llmfleet-bench-apis-"))
    monitor_port = free_port()
    broker = EmbeddedNats(store_dir=str(tmp / "nats"), http_port=monitor_port)
    procs: list[Proc] = []
    try:
        broker.start()
        assert broker.proc is not None
        log(f"nats-server at {broker.url}")
        procs.append(
            Proc(
                "worker",
                [sys.executable, "-m", "llmfleet", "--log-level", "warning", "worker", "--nats",
                 broker.url, "--engine", "sim", "--model", MODEL, "--max-concurrency", "64",
                 "--sim-ttft-ms", "0", "--sim-itl-ms", "0", "--sim-tokens", str(OUTPUT_TOKENS),
                 "--audit", "off"],
                tmp,
            )
        )  # fmt: skip
        port = free_port()
        gateway = Proc(
            "gateway",
            [sys.executable, "-m", "llmfleet", "--log-level", "warning", "gateway", "--nats",
             broker.url, "--port", str(port), "--gateway-id", GATEWAY_ID, "--auth", "none",
             "--audit", "off", "--responses-store", "on"],
            tmp,
        )  # fmt: skip
        procs.append(gateway)
        url = f"http://127.0.0.1:{port}"
        wait_http(url + "/readyz", 30, gateway)
        deadline = time.monotonic() + 30
        while not any(m["id"] == MODEL for m in httpx.get(url + "/v1/models").json()["data"]):
            if time.monotonic() > deadline:
                raise TimeoutError(f"the gateway never listed {MODEL}; see {gateway.log}")
            time.sleep(0.1)
        log(f"stack ready: gateway {url}")
        return asyncio.run(
            measure(
                url, f"http://127.0.0.1:{monitor_port}", gateway.pid, broker.proc.pid, cfgs, args
            )
        )
    except BaseException:
        log_exits(procs)
        raise
    finally:
        stop_all(procs)
        broker.stop()
        shutil.rmtree(tmp, ignore_errors=True)


SIZES: Sizes = (
    ("--requests", 5000, 20, "measured requests per configuration and scenario"),
    ("--batch", 40, 5, "requests per turn at concurrency 1 (twice that at 8)"),
    ("--warmup", 50, 5, "warm-up requests per configuration, mode and concurrency"),
    ("--micro-iters", 20000, 300, "calls per micro-benchmark run"),
    ("--micro-repeats", 5, 3, "micro-benchmark runs per step"),
)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_sizes(ap, SIZES)
    ap.add_argument("--configs", default="ABCDE", help="which configurations (default ABCDE; "
                    "A is always in: the baseline)")  # fmt: skip
    ap.add_argument("--only", choices=("http", "micro"), help="only the HTTP part or the "
                    "micro-benchmark")  # fmt: skip
    ap.add_argument("--out", help="also write the report (markdown) to this file")
    args = ap.parse_args(argv)
    apply_sizes(args, SIZES)
    wanted = set(args.configs.upper()) | {"A"}
    cfgs = [c for c in configs() if c.name in wanted]

    t_start = time.perf_counter()
    micro_rows: list[dict[str, Any]] = []
    if args.only != "http":
        log(f"micro-benchmark: {args.micro_repeats} x {args.micro_iters} calls per step")
        micro_rows = micro(args.micro_iters, args.micro_repeats)
        for r in micro_rows:
            log(f"  {r['us']:7.1f} us  {r['group']}: {r['name'].strip()}")
    results: dict[str, Any] = {}
    if args.only != "micro":
        results = run_http(cfgs, args)
    data = summary(results, cfgs[0].name)
    text = report(data, micro_rows, cfgs, args, argv)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
        log(f"wrote {args.out}")
    if args.json:
        out = {"http": data, "micro": micro_rows, "micro_totals_us": micro_totals(micro_rows)}
        Path(args.json).write_text(json.dumps(out, indent=2))
        log(f"wrote {args.json}")
    log(f"done in {time.perf_counter() - t_start:.0f} s")
    bad = sum(cell.errors for res in results.values() for cell in res["cells"].values())
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
