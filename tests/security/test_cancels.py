"""Attacks 6 and 7: cancels and request ids, which a producer chooses itself.

6. Cancel flood: while honest HTTP requests run on worker `cancel-w`, `batch-etl` sends it
   thousands of cancels on `llmfleet.cancel.cancel-w.batch-etl` (random ids, malformed
   ones, and the honest requests' own ids and deliveries, learned from `x-request-id`) and
   tries `llmfleet.cancel.cancel-w.gateway` (a permission violation). Every honest request
   completes in full: a worker cancels only the jobs of the producer the subject names.
   Then SIGTERM drains the worker, which exits cleanly within its grace.
7. Request-id reuse: `batch-etl` queues 10 requests with one request id (different
   `Nats-Msg-Id`s, so none is deduplicated) for a 2-slot worker, and `batch-evals` cancels
   that id under its own name: never more than 2 run at once (jobs are keyed by delivery),
   and all 10 complete.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import signal
import time
from typing import Any

from common import names
from common import protocol as p
from tests.security.stack import (
    OneNodeHub,
    Stack,
    actor,
    announcements,
    assert_unharmed,
    before,
    chat_body,
    check_answer,
    consumer_settled,
    honest_chat,
    model_stats,
)

CANCEL_MODEL = "cancel-model"
REUSE_MODEL = "reuse-model"
GRACE_S = 5.0


async def test_cancel_flood_cancels_nothing_of_another_producer(
    stack: Stack, hub: OneNodeHub
) -> None:
    worker = stack.worker(
        "cancel-w", "--sim-itl-ms", "20", "--drain-grace", str(GRACE_S), model=CANCEL_MODEL
    )
    stack.gateway_fleet.wait_ready(stack.gw, (CANCEL_MODEL,))  # type: ignore[arg-type]
    was = before(stack)
    rids: list[str] = []
    stop = asyncio.Event()
    sent = [0]
    subject = names.cancel_subject("cancel-w", "batch-etl")

    async with actor(hub, "batch-etl", "cancels") as a:

        async def flood() -> None:
            junk = [b"", b"{", b'{"type":"cancel"}', b'{"type":"cancel","request_id":1}',
                    b'{"type":"ping"}', b"\xff" * 64, b'{"type":"cancel","request_id":"' +
                    b"x" * 10_000 + b'"}']  # fmt: skip
            while not stop.is_set():
                for _ in range(50):
                    rid = secrets.token_hex(12)
                    await a.nc.publish(subject, p.encode(p.Cancel(request_id=rid)))
                    sent[0] += 1
                for rid in list(rids):  # the honest requests' own ids, every delivery form
                    for delivery in ("", "1.1", "2.1", "3.1"):
                        await a.nc.publish(
                            subject, p.encode(p.Cancel(request_id=rid, delivery=delivery))
                        )
                        sent[0] += 1
                for data in junk:
                    await a.nc.publish(subject, data)
                await a.nc.flush()
                await asyncio.sleep(0.002)

        prompts = [f"keep streaming please {i} " + "x " * i for i in range(4)]
        async with stack.client() as c:
            task = asyncio.create_task(flood())
            try:
                for _ in range(2):
                    answers = await asyncio.gather(
                        *(
                            honest_chat(c, pr, 30, model=CANCEL_MODEL, on_start=rids.append)
                            for pr in prompts
                        )
                    )
                    for prompt, got in zip(prompts, answers, strict=True):
                        check_answer(got, prompt, 30)
                        assert got.finish_reason == "length"
            finally:
                stop.set()
                await task
        assert sent[0] >= 2000 and len(rids) == 8

        # The gateway's name is not batch-etl's to use.
        gw_subject = names.cancel_subject("cancel-w", names.GATEWAY_PRODUCER)
        await a.nc.publish(gw_subject, p.encode(p.Cancel(request_id=rids[-1])))
        await a.nc.flush()
        await a.expect_denied(gw_subject)

    stats = model_stats((await announcements(hub))["cancel-w"], CANCEL_MODEL)
    assert (stats.completed, stats.failed, stats.cancelled) == (8, 0, 0)
    await assert_unharmed(stack, was)

    # SIGTERM: a request in flight finishes, then the worker leaves within its grace.
    async with stack.client() as c:
        started = asyncio.Event()
        last = asyncio.create_task(
            honest_chat(c, "the last one", 30, model=CANCEL_MODEL, on_start=lambda _: started.set())
        )
        await started.wait()
        t0 = time.monotonic()
        worker.popen.send_signal(signal.SIGTERM)
        check_answer(await last, "the last one", 30)
    rc = await asyncio.to_thread(worker.popen.wait, GRACE_S + 5)
    assert rc == 0, worker.log()[-2000:]
    assert time.monotonic() - t0 < GRACE_S + 3
    stack.retire("cancel-w")


async def test_request_id_reuse_never_exceeds_the_slots(stack: Stack, hub: OneNodeHub) -> None:
    stack.worker(
        "reuse-w", "--max-concurrency", "2", "--sim-ttft-ms", "150", "--sim-itl-ms", "10",
        model=REUSE_MODEL,
    )  # fmt: skip
    stack.gateway_fleet.wait_ready(stack.gw, (REUSE_MODEL,))  # type: ignore[arg-type]
    was = before(stack)
    rid = "same-" + secrets.token_hex(4)
    async with actor(hub, "batch-etl", "reuse") as a, actor(hub, "batch-evals", "reuse") as other:
        reply = a.reply("reuse")  # all ten answer on one subject, told apart by delivery
        sub = await a.nc.subscribe(reply)
        await a.nc.flush()
        subject = names.request_subject(REUSE_MODEL, "batch-etl")
        for i in range(10):
            headers = {
                p.H_VERSION: p.PROTOCOL_VERSION,
                p.H_OP: "chat",
                p.H_REQUEST_ID: rid,
                p.H_MSG_ID: f"{rid}-{i}",
                p.H_REPLY: reply,
            }
            await a.js.publish(subject, chat_body(f"reuse {i}", 4, REUSE_MODEL), headers=headers)
        # Another producer cancelling the same id under its own name touches none of them.
        for _ in range(20):
            await other.nc.publish(
                names.cancel_subject("reuse-w", "batch-evals"), p.encode(p.Cancel(request_id=rid))
            )
        await other.nc.flush()

        running: set[str] = set()
        peak = 0
        finished: dict[str, str] = {}
        while len(finished) < 10:
            m: dict[str, Any] = json.loads((await sub.next_msg(timeout=10)).data)
            delivery = m.get("delivery", "")
            if m["type"] == "accepted":
                assert m["request_id"] == rid
                running.add(delivery)
                peak = max(peak, len(running))
            elif m["type"] in ("done", "error"):
                running.discard(delivery)
                finished[delivery] = m["type"]
    assert peak == 2
    assert set(finished.values()) == {"done"}, finished
    ann = (await announcements(hub))["reuse-w"]
    assert ann.peak_in_flight == 2
    assert model_stats(ann, REUSE_MODEL).completed == 10
    await consumer_settled(hub, REUSE_MODEL)
    await assert_unharmed(stack, was)
