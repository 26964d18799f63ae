"""Fuzz finding: a request that carries a `Status` header and an empty payload.

JetStream tells a pull consumer about its pull requests with header-only status messages
(`Status: 408` expired, `409` ...). A producer can put a `Status` header on its own request
too; the worker must still read that message as what its ack subject says it is, a
delivery, and terminate or answer it. `batch-etl` queues 32 such requests (empty payload,
valid headers otherwise) for the served model; then an honest client must still be
answered, and the model's queue must drain.
"""

from __future__ import annotations

from common import names
from tests.natshelp import request_headers
from tests.security.stack import (
    MODEL,
    OneNodeHub,
    Stack,
    actor,
    check_answer,
    consumer_settled,
    honest_chat,
)


async def test_a_status_header_on_a_request_does_not_stop_the_model(
    stack: Stack, hub: OneNodeHub
) -> None:
    async with actor(hub, "batch-etl", "status") as a:
        for status in ("408", "409", "503", "x") * 8:
            await a.js.publish(
                names.request_subject(MODEL, "batch-etl"),
                b"",
                headers=request_headers(a.reply(), Status=status),
            )
    async with stack.client() as c:
        got = await honest_chat(c, "anyone there", 3, extra_headers={"x-llmfleet-timeout": "5"})
    check_answer(got, "anyone there", 3)
    await consumer_settled(hub, timeout=8)
