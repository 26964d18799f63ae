"""Attack 8: a worker whose wall clock runs two minutes ahead.

Queue timeouts count from the broker's timestamp of the request; a worker that compared
that timestamp with its own clock would find every request 120 s old, past the default 60 s
queue timeout, and answer it 504 (and drain the whole queue doing so). The worker measures
waits on its estimate of the broker's clock instead (consumer-info `ts` probes and delivery
timestamps). `fast-w` runs under tests/security/fastclock.py (time.time and time.time_ns
moved +120 s; `faketime` is not available), next to the healthy `true-w`:
40 requests through the gateway with the default queue timeout are all answered, none with
504 deadline_exceeded, and both workers take a share.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import openai

from tests.security.stack import (
    Answer,
    OneNodeHub,
    Stack,
    announcements,
    assert_unharmed,
    before,
    check_answer,
    honest_chat,
    model_stats,
)

CLOCK_MODEL = "clock-model"
SKEW_S = 120.0


async def test_a_worker_two_minutes_ahead_serves_fresh_requests(
    stack: Stack, hub: OneNodeHub
) -> None:
    flags = ("--max-concurrency", "4", "--sim-itl-ms", "10")
    stack.worker("true-w", *flags, model=CLOCK_MODEL)
    stack.fast_clock_worker("fast-w", SKEW_S, *flags, model=CLOCK_MODEL)
    assert stack.gw is not None
    stack.gateway_fleet.wait_ready(stack.gw, (CLOCK_MODEL,))
    deadline = time.monotonic() + 15
    while {"true-w", "fast-w"} - set(anns := await announcements(hub, wait=0.5)):
        assert time.monotonic() < deadline, "the workers never announced"
    # The launcher works: the fast worker's own clock says it started two minutes from now.
    assert anns["fast-w"].started_at - time.time() > SKEW_S - 10
    assert abs(anns["true-w"].started_at - time.time()) < 10
    was = before(stack)

    prompts = [f"what time is it {i}" for i in range(40)]

    async def ask(c: openai.AsyncOpenAI, prompt: str) -> Answer | openai.APIStatusError:
        try:
            return await honest_chat(c, prompt, 8, stream=False, model=CLOCK_MODEL)
        except openai.APIStatusError as exc:
            return exc

    async with stack.client() as c:
        results = await asyncio.gather(*(ask(c, pr) for pr in prompts))
    refused = [(r.status_code, r.body) for r in results if isinstance(r, openai.APIStatusError)]
    assert refused == [], refused
    answers = [r for r in results if isinstance(r, Answer)]
    for prompt, got in zip(prompts, answers, strict=True):
        check_answer(got, prompt, 8)
    share = Counter(a.worker for a in answers)
    assert share["fast-w"] > 0 and share["true-w"] > 0, share
    anns = await announcements(hub)
    assert model_stats(anns["fast-w"], CLOCK_MODEL).failed == 0
    await assert_unharmed(stack, was)
