"""Fuzz finding: a batch producer that speaks the NATS protocol itself.

nats-py checks and cleans the headers it sends; an attacker need not use it. Logged in as
`batch-etl` over a plain socket, it publishes (`HPUB`) requests whose header block is
malformed, and JetStream stores them as they are and delivers them to the workers, whose
nats-py client parses them. Malformed blocks that parse (an unknown preamble, lines
without a colon, bytes that are not UTF-8, odd inline statuses) are refused and
terminated like any unreadable request. Three blocks make nats-py raise in its read loop
(`NATS/1.0` without its CRLF, anything shorter, non-UTF-8 in the status line): with plain
nats-py the worker that got one stopped reading its connection until a stale-connection
reconnect (~5 s), and the request, never acked, came back after every ack wait, deafening
the model's workers in turn. llmfleet's client (`common/natsconn.py`) reads such a block as
no headers, so the message is refused and terminated like any other.
"""

from __future__ import annotations

import asyncio

from common import names
from tests.security.stack import (
    MODEL,
    OneNodeHub,
    Stack,
    actor,
    assert_unharmed,
    before,
    chat_body,
    consumer_settled,
    raw_publish,
)

SUBJECT = names.request_subject(MODEL, "batch-etl")
REPLY = "_LLMFLEET.r.batch-etl.raw"


def _block(*lines: bytes) -> bytes:
    return b"".join(line + b"\r\n" for line in lines) + b"\r\n"


SURVIVABLE = [
    _block(b"XXXX/1.0", b"Llmfleet-Reply: " + REPLY.encode()),
    _block(b"NATS/1.0", b"no colon here", b"Llmfleet-Reply " + REPLY.encode()),
    _block(b"NATS/1.0", b"Llmfleet-Reply: \xff\xfe"),
    _block(b"NATS/1.0", b"\xff\xfe: x", b"Llmfleet-Version: \xc3\x28"),
    _block(b"NATS/1.0 4"),
    _block(b"NATS/1.0 abc def", b"K: v"),
    _block(b"NATS/1.0 408 Request Timeout"),  # a pull status, on a request with a payload
    _block(b"NATS/1.0", b"Llmfleet-Reply: " + REPLY.encode(), b"Llmfleet-Reply: x y"),
    _block(b"NATS/1.0", b"Llmfleet-Reply: " + REPLY.encode() + b"\x00", b"Llmfleet-Op: chat"),
    _block(b"NATS/1.0", b"Llmfleet-Reply:", b": empty name", b"Llmfleet-Version: 2" * 400),
    b"NATS/1.0\r\nLlmfleet-Reply: " + REPLY.encode(),  # no blank line at the end
]
DEADLY = [b"NATS/1.0", b"N", _block(b"NATS/1.0 \xff\xfe")]


async def test_malformed_header_blocks_that_parse_are_terminated(
    stack: Stack, hub: OneNodeHub
) -> None:
    was = before(stack)
    settled = await consumer_settled(hub)
    seqs = [await raw_publish(hub, "batch-etl", SUBJECT, b, chat_body()) for b in SURVIVABLE]
    info = await consumer_settled(hub)
    assert info.delivered is not None and info.delivered.stream_seq >= max(seqs)
    assert info.num_redelivered == settled.num_redelivered
    await assert_unharmed(stack, was)


async def test_header_blocks_that_break_nats_py_do_not_deafen_a_worker(
    stack: Stack, hub: OneNodeHub
) -> None:
    was = before(stack)
    seqs: list[int] = []
    try:
        for block in DEADLY:
            seqs.append(await raw_publish(hub, "batch-etl", SUBJECT, block, chat_body()))
        await asyncio.sleep(1.0)
        await assert_unharmed(stack, was)  # a deaf worker answers no ping
    finally:
        # The gateway (trusted with deletes) takes the poison out, so the workers recover.
        async with actor(hub, "gateway", "cleanup") as g:
            for seq in seqs:
                try:
                    await g.js.delete_msg(names.REQUEST_STREAM, seq)
                except Exception:
                    pass  # terminated already (the fixed behaviour)
