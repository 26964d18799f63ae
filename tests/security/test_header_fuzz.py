"""Fuzz: hostile headers and bodies published straight onto the request subjects.

`batch-etl` publishes generated messages to `llmfleet.req.<model>.batch-etl` through
JetStream: random header names and the protocol's own (`Llmfleet-*`, `Nats-*`, trace
context, and `Status`, which JetStream uses for its own notices) with hostile values (huge, unicode,
control characters, negative or huge timeouts, body references into any bucket, foreign
reply subjects, unknown versions and ops), on top of a valid request or none, with valid,
junk or binary bodies (header blocks nats-py cannot build: test_raw_protocol.py). Meanwhile an
honest client streams through the gateway without pause. The honest streams are
unaffected (every one complete and exact), every worker process is alive at the end with
the same broker connection it started with, answers a ping and serves, and the model's
queue drains (nothing stuck un-acked). A message nats-py refuses to build, or a publish
JetStream refuses, is the attacker's own failure; if the broker closes the attacker's
connection, the attacker reconnects, and the fleet does not notice.

Also a finding of this fuzzing, pinned down: a timeout header of Unicode digits (the
worker terminated such a request without an answer; fixed since).
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections import Counter
from typing import Any

import nats.errors
import nats.js.errors
import openai
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common import names
from common import protocol as p
from tests.natshelp import request_headers
from tests.security.stack import (
    API_KEY,
    MODEL,
    Actor,
    OneNodeHub,
    Stack,
    actor,
    assert_unharmed,
    before,
    chat_body,
    consumer_settled,
    read_stream,
    sim_answer,
)

PROTOCOL_HEADERS = [
    "Status", p.H_VERSION, p.H_OP, p.H_REQUEST_ID, p.H_REPLY, p.H_QUEUE_TIMEOUT, p.H_TIMEOUT,
    p.H_TRACEPARENT, p.H_MSG_ID, p.H_BODY_REF, "tracestate", "Description",
    "Nats-Rollup", "Nats-TTL", "Nats-Expected-Stream", "Nats-Expected-Last-Sequence",
    "Nats-Expected-Last-Subject-Sequence", "Nats-Expected-Last-Msg-Id", "Nats-Schedule",
    "Nats-Counter-Incr", "Nats-Batch-Id", "Nats-Batch-Sequence", "Nats-Batch-Commit",
    "Nats-Marker-Reason", "Nats-Stream", "Nats-Sequence", "Nats-Time-Stamp", "Nats-Subject",
    "Nats-Last-Sequence", "llmfleet-reply", "LLMFLEET-VERSION",
]  # fmt: skip
HOSTILE = [
    "", " ", "-1", "0", "1", "2", "3", "999999999999999", "9" * 16, "1e9", "NaN", "inf",
    "\u00b2", "\u0663\u0664", "\uff11\uff12", " 5", "5 ", "0x10", "1_000", "chat",
    "completion", "embedding", "CHAT", "all", "sub", "1s", "+TERM", "-NAK",
    "$JS.API.STREAM.NAMES", "x y", "*", ">",
    "_LLMFLEET.r.batch-etl.fuzz", "_LLMFLEET.r.batch-etl.fuzz.*", "_LLMFLEET.r.batch-etl.>",
    "_LLMFLEET.r.gateway.x.y", "_LLMFLEET.r.batch-evals.x", "_LLMFLEET.r.batch-etl..x",
    "LLMFLEET_BODIES_batch-etl/x", "LLMFLEET_BODIES_batch-etl/", "LLMFLEET_BODIES_gateway/x",
    "LLMFLEET_BODIES_batch-etl/../LLMFLEET_BODIES_gateway/x", "/", "LLMFLEET_BODIES_",
    "00-" + "0" * 32 + "-" + "0" * 16 + "-01", "00-" + "f" * 32 + "-" + "f" * 16 + "-ff",
    "\u202e", "\ufeff", "\x00", "a\tb", "a\x7fb", "é" * 40, "\U0001f600",
]  # fmt: skip

header_names = st.one_of(
    st.sampled_from(PROTOCOL_HEADERS),
    st.text(
        st.characters(min_codepoint=33, max_codepoint=126, exclude_characters=":"),
        min_size=1,
        max_size=24,
    ),
)
junk_names = st.one_of(  # mostly none; else a name nats-py refuses to send (its own error)
    st.none(), st.none(), st.none(), st.text(min_size=1, max_size=8)
)
header_values = st.one_of(
    st.sampled_from(HOSTILE),
    st.integers(min_value=-(10**20), max_value=10**20).map(str),
    st.text(max_size=30),
    st.text(st.characters(max_codepoint=0x1F), max_size=6),  # control characters
    st.integers(min_value=300, max_value=100_000).map(lambda n: "x" * n),  # huge
)
json_junk = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=12),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=8,
)
bodies = st.one_of(
    st.just(chat_body("fuzz", 2)),
    st.builds(lambda t: chat_body(t, 2), st.text(max_size=40)),
    st.binary(max_size=200),
    json_junk.map(lambda v: json.dumps(v).encode()),
    st.just(b""),
    st.just(json.dumps({"model": MODEL, "prompt": "x", "input": "y"}).encode()),
)


class _Attacker:
    """batch-etl on a private event loop (the test is synchronous, for hypothesis)."""

    def __init__(self, hub: OneNodeHub, loop: asyncio.AbstractEventLoop) -> None:
        self.hub = hub
        self.loop = loop
        self.actor: Actor | None = None
        self.reconnects = 0
        self.published = 0
        self.refused = 0
        self.why: Counter[str] = Counter()

    def publish(self, model: str, body: bytes, headers: dict[str, str]) -> None:
        self.loop.run_until_complete(self._publish(model, body, headers))

    async def _publish(self, model: str, body: bytes, headers: dict[str, str]) -> None:
        if self.actor is None or not self.actor.nc.is_connected:
            if self.actor is not None:
                await self.actor.close()
                self.reconnects += 1
            self.actor = await Actor(self.hub, "batch-etl", f"fuzz-{self.reconnects}").connect()
        try:
            await self.actor.nc.jetstream(timeout=1.0).publish(
                names.request_subject(model, "batch-etl"), body, headers=headers
            )
            self.published += 1
        except (
            nats.errors.Error,
            nats.js.errors.Error,
            TimeoutError,
            ValueError,
            UnicodeError,
        ) as exc:  # nats-py would not build it, or the broker refused it
            self.refused += 1
            self.why[type(exc).__name__ + ":" + str(exc)[:40]] += 1

    def close(self) -> None:
        if self.actor is not None:
            self.loop.run_until_complete(self.actor.close())


def _healthy_streams(stack: Stack, stop: threading.Event, out: dict[str, Any]) -> None:
    """Honest streaming chats, one after another, until `stop`: each must be exact."""
    assert stack.gw is not None
    done = 0
    try:
        with openai.OpenAI(base_url=stack.gw.base_url, api_key=API_KEY, max_retries=0) as c:
            while not stop.is_set():
                prompt = f"healthy stream number {done} " + "go " * (done % 5)
                stream = c.chat.completions.create(
                    model=MODEL,
                    messages=[{"role": "user", "content": prompt}],
                    max_tokens=6,
                    stream=True,
                    stream_options={"include_usage": True},
                )
                parts: list[str] = []
                usage = None
                for chunk in stream:
                    usage = chunk.usage or usage
                    parts.extend(ch.delta.content or "" for ch in chunk.choices)
                assert "".join(parts) == sim_answer(prompt, 6), (prompt, parts)
                assert usage is not None and usage.completion_tokens == 6
                done += 1
    except BaseException as exc:
        out["error"] = exc
    out["done"] = done


def test_fuzzed_request_headers_never_hurt_the_fleet_or_a_stream(
    stack: Stack, hub: OneNodeHub
) -> None:
    was = before(stack)
    stop = threading.Event()
    healthy: dict[str, Any] = {}
    thread = threading.Thread(target=_healthy_streams, args=(stack, stop, healthy))
    loop = asyncio.new_event_loop()
    attacker = _Attacker(hub, loop)
    thread.start()
    try:

        @settings(
            max_examples=300,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            derandomize=True,  # the same 300 cases every run
        )
        @given(
            base=st.booleans(),
            overrides=st.dictionaries(header_names, header_values, max_size=6),
            junk=junk_names,
            body=bodies,
            model=st.sampled_from([MODEL, MODEL, MODEL, "fuzz-unserved"]),
        )
        def attack(
            base: bool, overrides: dict[str, str], junk: str | None, body: bytes, model: str
        ) -> None:
            headers = request_headers("_LLMFLEET.r.batch-etl.fuzz") if base else {}
            headers.update(overrides)
            if junk is not None:
                headers[junk] = "x"
            attacker.publish(model, body, headers)

        attack()
    finally:
        stop.set()
        thread.join(60)
        attacker.close()
        loop.close()
    assert "error" not in healthy, healthy
    assert healthy["done"] > 0
    # The fixed cases store 101 of 300 on a quiet machine; a loaded one (the full suite on
    # 2 cores) times a few 1 s publishes out: enough must still reach the broker.
    assert attacker.published > 75, (attacker.published, attacker.refused, attacker.why)
    print(
        f"fuzz: {attacker.published} stored, {attacker.refused} refused, "
        f"{attacker.reconnects} reconnects, {healthy['done']} healthy streams",
        attacker.why.most_common(8),
    )
    loop2 = asyncio.new_event_loop()
    try:
        loop2.run_until_complete(consumer_settled(hub, timeout=20))
        loop2.run_until_complete(assert_unharmed(stack, was))
    finally:
        loop2.close()


async def test_a_timeout_of_unicode_digits_is_answered(stack: Stack, hub: OneNodeHub) -> None:
    """`"\u00b2".isdigit()` is true but `int("\u00b2")` raises: such a header reads as
    absent (found by this fuzzing: the worker used to terminate the request unanswered)."""
    async with actor(hub, "batch-etl", "digits") as a:
        for header in (p.H_QUEUE_TIMEOUT, p.H_TIMEOUT):
            reply = a.reply()
            sub = await a.nc.subscribe(reply)
            await a.nc.flush()
            await a.js.publish(
                names.request_subject(MODEL, "batch-etl"),
                chat_body(),
                headers=request_headers(reply, **{header: "\u00b2"}),
            )
            msgs = await read_stream(sub, timeout=3)
            assert msgs[-1]["type"] in ("done", "error"), msgs
