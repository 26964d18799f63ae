"""Attack: the wire ops issue 14 added, from a batch producer logged in with the shipped
accounts (`batch-etl`). A `count_tokens` request is served like any other (a prompt size,
no content); a body nested 5000 deep (chat or count_tokens) is a lone 400, not a worker
crash or a 500 with a traceback; the stack is unharmed afterwards."""

from __future__ import annotations

import json
from typing import Any

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
    read_stream,
)


async def _run(a: Actor, op: str, body: bytes) -> list[dict[str, Any]]:
    reply = a.reply()
    sub = await a.nc.subscribe(reply)
    await a.nc.flush()
    await a.js.publish(
        names.request_subject(MODEL, a.role), body, headers=request_headers(reply, op=op)
    )
    try:
        return await read_stream(sub)
    finally:
        await sub.unsubscribe()


async def test_count_tokens_and_hostile_nesting_from_a_producer(
    stack: Stack, hub: OneNodeHub
) -> None:
    was = before(stack)
    hello = {"model": MODEL, "messages": [{"role": "user", "content": "one two three"}]}
    deep = "[" * 5000 + "]" * 5000
    hostile = (
        f'{{"model": "{MODEL}", "messages": [{{"role": "user", "content": "x"}}],'
        f' "tools": [{{"x": {deep}}}]}}'
    ).encode()
    async with actor(hub, "batch-etl", "ops") as a:
        counted = await _run(a, "count_tokens", json.dumps(hello).encode())
        assert [m["type"] for m in counted] == ["accepted", "done"], counted
        assert counted[-1]["usage"]["prompt_tokens"] == 3  # sim counts words
        assert counted[-1]["usage"]["completion_tokens"] == 0
        for op in ("chat", "count_tokens"):
            msgs = await _run(a, op, hostile)
            assert msgs[-1]["type"] == "error" and msgs[-1]["status"] == 400, (op, msgs)
            assert "nested too deeply" in msgs[-1]["error"]["message"]
    await assert_unharmed(stack, was)
