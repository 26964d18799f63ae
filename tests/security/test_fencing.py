"""Attack 10: a lost worker comes back and keeps talking (fencing of deliveries).

`victim` (sim, first token after 4 s, 40 tokens) accepts a streaming HTTP request and is
then frozen (SIGSTOP) before its first token; `rescuer` (8 tokens) starts meanwhile. The
gateway gives up on the silent worker (no pong, the stall timeout), hands the delivery
back (-NAK), tells it to cancel, and serves the request from the rescuer. Then the victim
is thawed (SIGCONT): its delayed output must not reach the client. The client gets one
clean stream, exactly the rescuer's 8-token answer (no `stream_gap`, no mixed text; the
victim's first 8 words are the same as the rescuer's, so any extra delta would show), and
the victim receives the cancel: its job ends (counted cancelled) and it is idle again.
"""

from __future__ import annotations

import asyncio
import signal
import time

from tests.security.stack import (
    OneNodeHub,
    Stack,
    announcements,
    assert_unharmed,
    before,
    honest_chat,
    model_stats,
    sim_answer,
)

FENCE_MODEL = "fence-model"
STALL_TIMEOUT_S = 5.0  # the gateway's --stall-timeout default (gateway/settings.py)
RESCUE: dict[str, float] = {}  # seconds from the freeze to the rescued answer


async def test_a_thawed_worker_cannot_mix_into_the_rescued_stream(
    stack: Stack, hub: OneNodeHub
) -> None:
    victim = stack.worker(
        "victim", "--sim-ttft-ms", "4000", "--sim-tokens", "40", "--heartbeat", "0.25",
        model=FENCE_MODEL,
    )  # fmt: skip
    assert stack.gw is not None
    stack.gateway_fleet.wait_ready(stack.gw, (FENCE_MODEL,))
    was = before(stack)
    prompt = "please survive the freeze"

    async with stack.client() as c:
        answer = asyncio.create_task(honest_chat(c, prompt, model=FENCE_MODEL))
        deadline = time.monotonic() + 3
        while not model_stats((await announcements(hub, 0.2))["victim"], FENCE_MODEL).in_flight:
            assert time.monotonic() < deadline, "the victim never took the request"
        victim.popen.send_signal(signal.SIGSTOP)
        stopped_at = time.monotonic()
        try:
            stack.worker("rescuer", "--sim-tokens", "8", model=FENCE_MODEL)
            got = await asyncio.wait_for(answer, 30)
        finally:
            victim.popen.send_signal(signal.SIGCONT)
    RESCUE["seconds"] = time.monotonic() - stopped_at
    want = sim_answer(prompt, tokens=8)
    assert got.text == want, (got.text, want)
    assert (got.completion_tokens, got.finish_reason) == (8, "stop")
    assert want == sim_answer(prompt, tokens=40)[: len(want)]  # the victim would say more

    # The victim, thawed, got the cancel and is idle again at once. (Its sim tokens were
    # overdue, so the stale job may have run to its end before the cancel was read: that
    # output went to a fenced delivery, and the client above never saw it.)
    deadline = time.monotonic() + 3
    while True:
        stats = model_stats((await announcements(hub, 0.3))["victim"], FENCE_MODEL)
        if stats.in_flight == 0 and stats.cancelled >= 1:
            break
        assert time.monotonic() < deadline, stats
    rescuer = model_stats((await announcements(hub, 0.3))["rescuer"], FENCE_MODEL)
    assert rescuer.completed == 1
    # The victim's connection survived the freeze (thawed long before the server's pings
    # would drop it); every worker still serves.
    await assert_unharmed(stack, was)


def test_the_rescue_comes_soon_after_the_gateway_gives_up() -> None:
    """Measured by the test above: the gateway gives up after the stall timeout; handing
    the delivery back at once should let the rescuer start within a second or two."""
    assert RESCUE["seconds"] < STALL_TIMEOUT_S + 3.0, RESCUE
