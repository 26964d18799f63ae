"""Attack 5: one producer floods one model's queue.

The gateway runs with `--max-queue 5` (at most 5 requests wait per model and producer,
i.e. per request subject) and `--queue-timeout 2`. `batch-etl` publishes requests for
`idle-model`, which no worker serves, until JetStream refuses (10077, "maximum messages per
subject exceeded"): exactly 5 are stored. Its flood fills only its own subject: an honest
HTTP request for the served model is answered, batch-etl's own requests for that model
still run, and the gateway's requests for `idle-model` (listed, a worker is loading it)
are queued, not refused: they end as 503 `queue_timeout` after the queue timeout, not 429.
"""

from __future__ import annotations

import asyncio
import time

import nats.js.errors
import openai
import pytest

from common import names
from common import protocol as p
from tests.natshelp import request_headers
from tests.security.stack import (
    MODEL,
    OneNodeHub,
    Stack,
    actor,
    assert_unharmed,
    before,
    chat_body,
    check_answer,
    honest_chat,
    read_stream,
)

IDLE = "idle-model"
MAX_QUEUE = 5


@pytest.fixture(scope="module")
def gateway_flags() -> tuple[str, ...]:
    return ("--max-queue", str(MAX_QUEUE), "--queue-timeout", "2")


async def _stored(hub: OneNodeHub, subject: str) -> int:
    async with actor(hub, "admin", "stored") as admin:
        info = await admin.js.stream_info(names.REQUEST_STREAM, subjects_filter=subject)
    return sum((info.state.subjects or {}).values())


async def _list_idle_model(hub: OneNodeHub) -> None:
    """`idle-model` in the gateway's catalog: a worker (the trusted worker role) says it is
    still loading it, so requests for it queue in the broker. It never pulls."""
    announce = p.WorkerAnnounce(
        worker="idle-loader",
        host="test",
        version="0",
        state="starting",
        ttl_s=60.0,
        started_at=time.time(),
        models=[p.ModelStatus(id=IDLE, engine="sim", max_concurrency=1, loaded=False)],
    )
    async with actor(hub, "worker", "idle-loader") as w:
        await w.nc.publish(names.heartbeat_subject("idle-loader"), p.encode(announce))
        await w.nc.flush()


async def test_one_producers_flood_fills_only_its_own_queue(stack: Stack, hub: OneNodeHub) -> None:
    was = before(stack)
    await _list_idle_model(hub)
    flooded = names.request_subject(IDLE, "batch-etl")
    async with actor(hub, "batch-etl", "flood") as a:
        stored = 0
        with pytest.raises(nats.js.errors.APIError) as refused:
            for _ in range(MAX_QUEUE + 50):
                await a.js.publish(
                    flooded, chat_body(model=IDLE), headers=request_headers(a.reply())
                )
                stored += 1
        assert refused.value.err_code == 10077
        assert "per subject" in (refused.value.description or "")
        assert stored == MAX_QUEUE
        assert await _stored(hub, flooded) == MAX_QUEUE

        # The producer's other queues are not full: its request for the served model runs.
        reply = a.reply()
        sub = await a.nc.subscribe(reply)
        await a.nc.flush()
        await a.js.publish(
            names.request_subject(MODEL, "batch-etl"),
            chat_body(),
            headers=request_headers(reply),
        )
        assert (await read_stream(sub))[-1]["type"] == "done"

    async with stack.client() as c:
        # An honest request for the served model: answered.
        check_answer(await honest_chat(c, "the flood is elsewhere", 6), "the flood is elsewhere", 6)

        # The gateway's own requests for the flooded model: queued (a subject of their
        # own), then given up after the queue timeout: 503 queue_timeout, never 429.
        async def idle_request() -> openai.APIStatusError:
            with pytest.raises(openai.APIStatusError) as err:
                await honest_chat(c, "waiting for idle", 3, model=IDLE, stream=False)
            return err.value

        started = time.monotonic()
        errors = await asyncio.gather(*(idle_request() for _ in range(3)))
        waited = time.monotonic() - started
    for e in errors:
        assert e.status_code == 503, e
        assert isinstance(e.body, dict) and e.body.get("code") == "queue_timeout", e.body
    assert waited >= 1.5  # they waited in the queue, not refused at once
    # The gateway took its given-up requests back out; batch-etl's flood is still there.
    assert await _stored(hub, names.request_subject(IDLE, names.GATEWAY_PRODUCER)) == 0
    assert await _stored(hub, flooded) == MAX_QUEUE
    await assert_unharmed(stack, was)
