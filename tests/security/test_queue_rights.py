"""Attack 4: forged acks and queue management by a batch producer.

While honest HTTP requests stream, `batch-etl` publishes `-NAK`, `+TERM`, `+ACK`, `+NXT`
and `+WPI` to plausible ack subjects (`$JS.ACK.LLMFLEET_REQUESTS.<consumer>.<delivered>.
<stream seq>.<consumer seq>.<ts>.<pending>` around the sequence numbers it sees in its own
PubAcks), deletes messages, purges the stream and deletes the consumer: NATS refuses each
as a permission violation, and every honest request runs exactly once (its answer whole,
no redelivery, the workers' completed counts grow by exactly the number of requests).
Also the JetStream headers a producer may set on its own messages: a rollup header would
purge other producers' queued requests if the stream allowed it; it does not.
"""

from __future__ import annotations

import asyncio
import json
import time

import nats.errors
import nats.js.errors
import pytest

from common import names
from tests.natshelp import request_headers
from tests.security.stack import (
    MODEL,
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
    read_stream,
)

CONSUMER = names.consumer_name(MODEL)
STREAM = names.REQUEST_STREAM


@pytest.fixture(scope="module")
def worker_flags() -> tuple[str, ...]:
    return ("--sim-itl-ms", "20")  # ~0.4 s streams: forged acks land while they run


async def _completed(hub: OneNodeHub) -> int:
    return sum(model_stats(a).completed for a in (await announcements(hub)).values())


async def test_forged_acks_deletes_and_purges_are_refused(stack: Stack, hub: OneNodeHub) -> None:
    was = before(stack)
    settled = await consumer_settled(hub)
    done_before = await _completed(hub)
    prompts = [f"honest request number {i} " + "pad " * i for i in range(8)]
    stop = asyncio.Event()
    forged: set[str] = set()

    async with actor(hub, "batch-etl", "acks") as a:
        # Where the stream is: its own request's PubAck says (and queues one more request,
        # answered to the attacker like any other).
        probe_reply = a.reply("probe")
        probe_sub = await a.nc.subscribe(probe_reply)
        probe = await a.js.publish(
            names.request_subject(MODEL, "batch-etl"),
            chat_body(),
            headers=request_headers(probe_reply),
        )
        base = int(probe.seq)

        async def forge() -> None:
            while not stop.is_set():
                ts = time.time_ns()
                for seq in range(base - 2, base + 24):
                    for delivered in (1, 2):
                        subject = f"$JS.ACK.{STREAM}.{CONSUMER}.{delivered}.{seq}.{seq}.{ts}.0"
                        for verb in (b"-NAK", b"+TERM", b"+ACK", b"+NXT", b"+WPI"):
                            await a.nc.publish(subject, verb)
                        forged.add(subject)
                    await a.nc.publish(
                        f"$JS.API.STREAM.MSG.DELETE.{STREAM}",
                        json.dumps({"seq": seq, "no_erase": True}).encode(),
                    )
                await a.nc.publish(f"$JS.API.STREAM.PURGE.{STREAM}", b"{}")
                await a.nc.publish(f"$JS.API.CONSUMER.DELETE.{STREAM}.{CONSUMER}", b"")
                await a.nc.flush()
                await asyncio.sleep(0.02)

        async with stack.client() as c:
            task = asyncio.create_task(forge())
            try:
                answers = await asyncio.gather(*(honest_chat(c, pr, 20) for pr in prompts))
            finally:
                stop.set()
                await task
        for prompt, got in zip(prompts, answers, strict=True):
            check_answer(got, prompt, 20)
        assert (await read_stream(probe_sub))[-1]["type"] == "done"

        sample = sorted(forged)[:3]
        await a.expect_denied(
            *sample,
            f"$JS.API.STREAM.MSG.DELETE.{STREAM}",
            f"$JS.API.STREAM.PURGE.{STREAM}",
            f"$JS.API.CONSUMER.DELETE.{STREAM}.{CONSUMER}",
        )
        assert a.nc.is_connected

    info = await consumer_settled(hub)
    assert info.num_redelivered == settled.num_redelivered  # nothing ran twice
    # Exactly the 8 honest requests and the attacker's own probe completed, each once.
    assert await _completed(hub) - done_before == 9
    await assert_unharmed(stack, was)


async def test_rollup_and_other_stream_headers_are_refused_by_the_stream(
    stack: Stack, hub: OneNodeHub
) -> None:
    """A rollup purges every message on a subject (`sub`) or the whole stream (`all`);
    the request stream does not allow rollups, so another producer's queued request (for a
    model no worker serves yet, so it waits) stays."""
    was = before(stack)
    waiting_model = "rollup-victim-model"
    async with actor(hub, "batch-evals", "victim") as victim:
        queued = await victim.js.publish(
            names.request_subject(waiting_model, "batch-evals"),
            chat_body(model=waiting_model),
            headers=request_headers(victim.reply()),
        )
    async with actor(hub, "batch-etl", "rollup") as a:
        subject = names.request_subject(waiting_model, "batch-etl")
        for extra in (
            {"Nats-Rollup": "all"},
            {"Nats-Rollup": "sub"},
            {"Nats-TTL": "1s"},
            {"Nats-Expected-Stream": "OTHER"},
            {"Nats-Expected-Last-Sequence": "1"},
        ):
            with pytest.raises(nats.js.errors.APIError):
                await a.js.publish(
                    subject, chat_body(), headers=request_headers(a.reply(), **extra)
                )
        # And the API way to purge (or delete) is a permission violation.
        with pytest.raises((nats.errors.Error, nats.js.errors.Error, TimeoutError)):
            await a.nc.jetstream(timeout=1).purge_stream(STREAM)
        await a.expect_denied(f"$JS.API.STREAM.PURGE.{STREAM}")
    async with actor(hub, "admin", "rollup") as admin:
        msg = await admin.js.get_msg(STREAM, seq=int(queued.seq))
        assert msg.subject == names.request_subject(waiting_model, "batch-evals")
    await assert_unharmed(stack, was)
