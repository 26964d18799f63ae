"""Attacks 1 and 2: a batch producer (`batch-etl`) names a reply subject it does not own.

1. `Llmfleet-Reply` with a space (`x y`, which a naive `PUB` would split into a subject and
   a reply), a JetStream API subject (`$JS.API.STREAM.NAMES`), and the gateway's reply
   space: workers refuse to answer (the request is terminated, not redelivered forever),
   nothing is published there, and no worker connection is dropped.
2. Reply hijack: a spray of requests whose reply subjects lie in the gateway's reply root
   (guessed tokens, wildcards, its inbox), while honest HTTP clients stream: each client
   gets exactly its own answer, and the attacker cannot publish the gateway's requests.
"""

from __future__ import annotations

import asyncio
import secrets

import nats.errors
import nats.js.errors
import pytest

from common import names
from tests.natshelp import request_headers
from tests.security.stack import (
    MODEL,
    Actor,
    OneNodeHub,
    Stack,
    actor,
    assert_unharmed,
    before,
    chat_body,
    check_answer,
    consumer_settled,
    honest_chat,
    read_stream,
)


async def _stored(hub: OneNodeHub, subject: str) -> int:
    """Messages the request stream holds on `subject` (read as the operator)."""
    async with actor(hub, "admin", "stored") as admin:
        info = await admin.js.stream_info(names.REQUEST_STREAM, subjects_filter=subject)
    return sum((info.state.subjects or {}).values())


async def _publish(a: Actor, reply: str, model: str = MODEL) -> int:
    ack = await a.js.publish(
        names.request_subject(model, a.role), chat_body(), headers=request_headers(reply)
    )
    return int(ack.seq)


async def test_unusable_reply_subjects_are_terminated_and_never_answered(
    stack: Stack, hub: OneNodeHub
) -> None:
    was = before(stack)
    gw_space = names.gateway_reply_root(stack.gateway_id)
    stolen = f"{gw_space}.{secrets.token_hex(16)}"
    hostile = [
        "x y",
        "$JS.API.STREAM.NAMES",
        stolen,
        f"{gw_space}.x y",
        f"{gw_space}.i.x",
        names.reply_space("batch-evals") + ".x",
        # Its own space, but unusable: a space, no token, wildcards, an empty token, too long.
        "_LLMFLEET.r.batch-etl.h x",
        "_LLMFLEET.r.batch-etl",
        "_LLMFLEET.r.batch-etl.h.*",
        "_LLMFLEET.r.batch-etl.h.>",
        "_LLMFLEET.r.batch-etl.h..x",
        "_LLMFLEET.r.batch-etl.h." + "x" * 300,
    ]
    settled = await consumer_settled(hub)
    async with (
        actor(hub, "gateway", "spy") as spy,  # the gateway role, which may read its space
        actor(hub, "batch-etl", "reply") as a,
    ):
        watch_gw = await spy.nc.subscribe(stolen)
        watch_x = await spy.nc.subscribe(f"{gw_space}.x")  # what `x y` would split into
        watch_own = await a.nc.subscribe(names.reply_space("batch-etl") + ".h.>")
        ok_reply = a.reply("ok")
        ok_sub = await a.nc.subscribe(ok_reply)
        await spy.nc.flush()
        await a.nc.flush()
        seqs = [await _publish(a, reply) for reply in hostile]

        # A request with its own, valid reply subject is served meanwhile: the workers that
        # terminated the others are still pulling.
        ok_seq = await _publish(a, ok_reply)
        kinds = [m["type"] for m in await read_stream(ok_sub)]
        assert kinds[0] == "accepted" and kinds[-1] == "done" and "delta" in kinds

        info = await consumer_settled(hub)
        for sub in (watch_gw, watch_x, watch_own):
            with pytest.raises(nats.errors.TimeoutError):
                await sub.next_msg(timeout=0.3)
    # Every hostile request was delivered once and terminated: none waits, none is held
    # un-acked, none was redelivered, none is left in the stream.
    assert info.delivered is not None and info.delivered.stream_seq >= max([*seqs, ok_seq])
    assert info.num_redelivered == settled.num_redelivered
    assert await _stored(hub, names.request_subject(MODEL, "batch-etl")) == 0
    await assert_unharmed(stack, was)


async def test_reply_hijack_spray_reaches_no_honest_stream(stack: Stack, hub: OneNodeHub) -> None:
    was = before(stack)
    root = names.gateway_reply_root(stack.gateway_id)
    # Distinct prompts of distinct lengths: each answer (text and usage) is unique to its
    # prompt, so an answer delivered to the wrong client cannot pass for the right one.
    prompts = [" ".join(f"client{n} word{i}" for i in range(n + 1)) for n in range(8)]
    stop = asyncio.Event()
    sprayed = [0]

    async def spray(a: Actor) -> None:
        n = 0
        while not stop.is_set():
            for tail in (str(n), secrets.token_hex(16), "*", ">", f"i.{n}", f"{n}.x"):
                try:
                    await _publish(a, f"{root}.{tail}")
                    sprayed[0] += 1
                except (nats.errors.Error, nats.js.errors.Error, TimeoutError):
                    pass  # the attacker's own failure
            n += 1

    async with actor(hub, "batch-etl", "hijack") as a, stack.client() as c:
        task = asyncio.create_task(spray(a))
        try:
            rounds = 0  # rounds of eight concurrent streams, at least 2, while 100 land
            while rounds < 2 or sprayed[0] < 100:
                answers = await asyncio.gather(*(honest_chat(c, pr, 12) for pr in prompts))
                for prompt, got in zip(prompts, answers, strict=True):
                    check_answer(got, prompt, 12)
                rounds += 1
                assert rounds < 30, sprayed
        finally:
            stop.set()
            await task

        # Nor can the attacker publish as the gateway: its request subjects, its replies.
        gw_request = names.request_subject(MODEL, names.GATEWAY_PRODUCER)
        with pytest.raises((nats.errors.Error, nats.js.errors.Error, TimeoutError)):
            await a.nc.jetstream(timeout=1).publish(
                gw_request, chat_body(), headers=request_headers(a.reply())
            )
        await a.nc.publish(f"{root}.{secrets.token_hex(16)}", b'{"type":"done"}')
        await a.nc.subscribe(root + ".*")
        await a.nc.flush()
        await a.expect_denied(gw_request, f"{root}.*")
        assert a.nc.is_connected  # a violation is refused, not a reason to hang up

    await consumer_settled(hub)
    await assert_unharmed(stack, was)
