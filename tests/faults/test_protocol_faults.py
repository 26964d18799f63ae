"""A misbehaving worker, written with plain nats-py: the gateway must turn protocol faults
(a sequence gap, a worker that answers pings but sends nothing) into clear errors."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import nats

from common import names
from common import protocol as p
from common.queue import ensure_consumer, ensure_stream
from common.settings import QueueSettings
from tests.procs import Fleet
from tests.sse import sse_events

MODEL = "misbehaving-model"


@contextlib.asynccontextmanager
async def fake_worker(url: str, behaviour: str) -> AsyncIterator[None]:
    nc = await nats.connect(url)
    js = nc.jetstream()
    await ensure_stream(js, QueueSettings())
    await ensure_consumer(js, MODEL, QueueSettings())
    worker = "fake-worker"

    async def on_ctl(msg: Any) -> None:
        if isinstance(p.decode_control(msg.data), p.Ping) and msg.reply:
            await msg.respond(p.PONG)

    await nc.subscribe(names.control_subject(worker), cb=on_ctl)

    async def announce() -> None:
        a = p.WorkerAnnounce(
            worker=worker, host="test", version="0", state="ready", ttl_s=3.0,
            started_at=time.time(), models=[p.ModelStatus(id=MODEL, engine="fake",
                                                          max_concurrency=1)],
        )  # fmt: skip
        while True:
            await nc.publish(names.heartbeat_subject(worker), p.encode(a))
            await asyncio.sleep(0.5)

    async def serve() -> None:
        sub = await js.pull_subscribe_bind(names.consumer_name(MODEL), names.REQUEST_STREAM)
        while True:
            try:
                (msg,) = await sub.fetch(1, timeout=5)
            except nats.errors.TimeoutError:
                continue
            await msg.ack()
            reply = msg.headers[p.H_REPLY]
            rid = msg.headers[p.H_REQUEST_ID]
            send = [
                p.Accepted(seq=0, worker=worker, model=MODEL, request_id=rid),
                p.Delta(seq=1, choices=[p.ChoiceDelta(index=0, content="one")]),
            ]
            if behaviour == "gap":
                send.append(p.Delta(seq=3, choices=[p.ChoiceDelta(index=0, content=" three")]))
            for m in send:
                await nc.publish(reply, p.encode(m))
            # "silent": alive (answers pings) but never sends the rest

    tasks = [asyncio.create_task(announce()), asyncio.create_task(serve())]
    try:
        yield
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await nc.close()


async def _stream(base: str) -> tuple[list[dict[str, Any] | str], float]:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "stream": True}
    t0 = time.monotonic()
    async with httpx.AsyncClient(base_url=base, timeout=60) as http:
        async with http.stream("POST", "/chat/completions", json=body) as r:
            assert r.status_code == 200
            raw = await r.aread()
    return sse_events(raw), time.monotonic() - t0


async def test_sequence_gap_is_a_clear_error(fleet: Fleet) -> None:
    async with fake_worker(fleet.nats_url, "gap"):
        gw = await asyncio.to_thread(fleet.gateway, wait_models=(MODEL,))
        events, _ = await _stream(gw.base_url)
    assert events[-1] == "[DONE]"
    assert events[-2]["error"]["code"] == "stream_gap"  # type: ignore[index]
    text = "".join(
        e["choices"][0]["delta"].get("content", "")  # type: ignore[index,union-attr]
        for e in events[:-2]
        if isinstance(e, dict) and e.get("choices")
    )
    assert text == "one"  # what came before the gap, nothing after it


async def test_live_but_silent_worker_hits_the_stall_timeout(fleet: Fleet) -> None:
    async with fake_worker(fleet.nats_url, "silent"):
        gw = await asyncio.to_thread(fleet.gateway, "--stall-timeout", "2", wait_models=(MODEL,))
        events, took = await _stream(gw.base_url)
    assert events[-1] == "[DONE]"
    assert events[-2]["error"]["code"] == "worker_lost"  # type: ignore[index]
    assert took < 30  # bounded by the stall timeout, not by the client
