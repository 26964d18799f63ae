"""Load generators and measurements (asyncio + httpx, one process per call).

Times are taken at the client with time.perf_counter(); a "token" is one word of the
deterministic test output, so chunks that carry several coalesced tokens are counted
correctly.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import time
from dataclasses import dataclass, field

import httpx

from worker.engines.httppool import ShardedClient


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    k = min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))
    return s[k]


@dataclass
class StreamResult:
    ttft: float  # seconds to the first content token
    itl: float  # mean seconds between tokens after the first
    tokens: int
    ok: bool
    token_delays: list[float] = field(default_factory=list)  # lateness vs the schedule


def _chat_body(model: str, max_tokens: int, stream: bool) -> dict[str, object]:
    body: dict[str, object] = {
        "model": model,
        "messages": [{"role": "user", "content": "benchmark"}],
        "max_tokens": max_tokens,
        "stream": stream,
    }
    return body


async def one_stream(
    pool: ShardedClient, url: str, model: str, max_tokens: int, itl_s: float | None = None
) -> StreamResult:
    http = pool.client()
    t0 = time.perf_counter()
    first: float | None = None
    last = t0
    tokens = 0
    delays: list[float] = []
    ok = False
    async with http.stream(
        "POST", url + "/chat/completions", json=_chat_body(model, max_tokens, True)
    ) as r:
        if r.status_code != 200:
            await r.aread()
            return StreamResult(float("nan"), float("nan"), 0, False)
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                ok = True
                break
            chunk = json.loads(data)
            if "error" in chunk:
                break
            choices = chunk.get("choices") or []
            text = choices[0]["delta"].get("content") if choices else None
            if not text:
                continue
            now = time.perf_counter()
            n = len(text.split())
            if first is None:
                first = now
            if itl_s is not None:
                for k in range(n):
                    delays.append(now - (tokens + k) * itl_s)  # arrival minus schedule
            tokens += n
            last = now
    if first is None:
        return StreamResult(float("nan"), float("nan"), tokens, False)
    if delays:  # lateness against the stream's own best-aligned token (>= 0)
        base = min(delays)
        delays = [d - base for d in delays]
    itl = (last - first) / (tokens - 1) if tokens > 1 else 0.0
    return StreamResult(first - t0, itl, tokens, ok and tokens == max_tokens, delays)


async def latency_run(
    url: str, model: str, concurrency: int, requests: int, max_tokens: int
) -> list[StreamResult]:
    """`requests` streaming requests, `concurrency` at a time (closed loop)."""
    results: list[StreamResult] = []
    async with ShardedClient(concurrency, timeout=60, headers=_auth()) as http:
        remaining = requests

        async def loop() -> None:
            nonlocal remaining
            while remaining > 0:
                remaining -= 1
                results.append(await one_stream(http, url, model, max_tokens))

        # warm up connections and caches
        await asyncio.gather(*(one_stream(http, url, model, 2) for _ in range(concurrency)))
        await asyncio.gather(*(loop() for _ in range(concurrency)))
    return results


def _auth() -> dict[str, str]:
    return {"authorization": "Bearer sk-bench"}


async def throughput_run(
    url: str, model: str, concurrency: int, seconds: float, max_tokens: int = 1
) -> tuple[float, list[float], int]:
    """Non-streaming, closed loop: (req/s, latencies, errors)."""
    body = json.dumps(_chat_body(model, max_tokens, False)).encode()
    lat: list[float] = []
    errors = 0
    headers = {**_auth(), "content-type": "application/json"}
    async with ShardedClient(concurrency, timeout=60, headers=headers) as pool:
        for _ in range(concurrency):
            await pool.client().post(url + "/chat/completions", content=body)
        end = time.perf_counter() + seconds

        async def loop() -> None:
            nonlocal errors
            http = pool.client()
            while time.perf_counter() < end:
                t = time.perf_counter()
                r = await http.post(url + "/chat/completions", content=body)
                if r.status_code == 200:
                    lat.append(time.perf_counter() - t)
                else:
                    errors += 1

        t0 = time.perf_counter()
        await asyncio.gather(*(loop() for _ in range(concurrency)))
        elapsed = time.perf_counter() - t0
    return len(lat) / elapsed, lat, errors


async def capacity_run(
    url: str, model: str, streams: int, seconds: float, max_tokens: int, itl_s: float
) -> tuple[list[StreamResult], float]:
    """`streams` concurrent paced streams, restarted as they end, for `seconds`."""
    results: list[StreamResult] = []
    async with ShardedClient(streams, timeout=120, headers=_auth()) as http:
        end = time.perf_counter() + seconds

        async def loop(i: int) -> None:
            await asyncio.sleep(i * 0.002)  # spread the starts
            while time.perf_counter() < end:
                results.append(await one_stream(http, url, model, max_tokens, itl_s))

        t0 = time.perf_counter()
        await asyncio.gather(*(loop(i) for i in range(streams)))
        elapsed = time.perf_counter() - t0
    return results, elapsed


async def open_idle_streams(host: str, port: int, model: str, count: int) -> list[socket.socket]:
    """Open `count` streaming requests that stay open (the model answers much later)."""
    body = json.dumps(_chat_body(model, 4, True)).encode()
    req = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    socks = []
    loop = asyncio.get_running_loop()
    for _ in range(count):
        s = socket.socket()
        s.setblocking(False)
        await loop.sock_connect(s, (host, port))
        await loop.sock_sendall(s, req)
        socks.append(s)
    return socks


async def overload_run(url: str, model: str, rate: float, seconds: float) -> dict[str, float]:
    """Open loop at `rate` req/s for `seconds`; every request is accounted for."""
    body = json.dumps(_chat_body(model, 4, False)).encode()
    outcomes: dict[str, int] = {"completed": 0, "rejected": 0, "failed": 0}
    waits: list[float] = []
    why: dict[str, int] = {}  # failures by status code or exception name
    tasks = []
    headers = {**_auth(), "content-type": "application/json"}
    async with ShardedClient(4096, timeout=120, headers=headers) as pool:

        async def fire() -> None:
            t = time.perf_counter()
            try:
                r = await pool.client().post(url + "/chat/completions", content=body)
            except httpx.HTTPError as exc:
                outcomes["failed"] += 1
                why[type(exc).__name__] = why.get(type(exc).__name__, 0) + 1
                return
            if r.status_code == 200:
                outcomes["completed"] += 1
                waits.append(time.perf_counter() - t)
            elif r.status_code in (429, 503):
                outcomes["rejected"] += 1
            else:
                outcomes["failed"] += 1
                key = f"{r.status_code} {r.text[:120]}"
                why[key] = why.get(key, 0) + 1

        t0 = time.perf_counter()
        n = int(rate * seconds)
        for i in range(n):
            delay = t0 + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(fire()))
        await asyncio.gather(*tasks)
    sent = len(tasks)
    accounted = outcomes["completed"] + outcomes["rejected"] + outcomes["failed"]
    return {
        "sent": sent,
        **outcomes,
        "lost": sent - accounted,
        "latency_p50_s": pct(waits, 50),
        "latency_p99_s": pct(waits, 99),
        "failures": why,  # type: ignore[dict-item]
    }


# A side-by-side bench's sizes: (flag, default, default with --smoke, what it sizes).
Sizes = tuple[tuple[str, int, int, str], ...]


def add_sizes(ap: argparse.ArgumentParser, sizes: Sizes) -> None:
    """The sizing flags, plus --smoke (a tiny run that proves the harness) and --json."""
    for flag, full, smoke, what in sizes:
        ap.add_argument(flag, type=int, help=f"{what} (default {full}; --smoke {smoke})")
    ap.add_argument("--smoke", action="store_true", help="a tiny run (< 20 s): numbers appear")
    ap.add_argument("--json", help="also write the numbers (JSON) to this file")


def apply_sizes(args: argparse.Namespace, sizes: Sizes) -> None:
    """Fill each sizing flag left unset with its default (the --smoke one under --smoke)."""
    for flag, full, smoke, _ in sizes:
        dest = flag[2:].replace("-", "_")
        if getattr(args, dest) is None:
            setattr(args, dest, smoke if args.smoke else full)
