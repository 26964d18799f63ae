"""`common.natsconn.Throttle`: a flood of discovers costs one answer per window, and a
discover that comes inside a window is still answered (at its end), never lost."""

from __future__ import annotations

import asyncio

from common.natsconn import Throttle


async def test_a_burst_is_answered_twice_and_a_late_call_once_more() -> None:
    answers: list[float] = []
    loop = asyncio.get_running_loop()

    async def answer() -> None:
        answers.append(loop.time())

    throttle = Throttle(every_s=0.1)
    await throttle.run(answer)  # the first: at once
    # a burst inside the window, handled one at a time as a subscription's callbacks are
    burst = [asyncio.ensure_future(throttle.run(answer)) for _ in range(200)]
    await asyncio.gather(*burst)
    assert len(answers) == 2  # one at once, one at the window's end for the whole burst
    assert answers[1] - answers[0] >= 0.09
    await asyncio.sleep(0.15)
    await throttle.run(answer)  # after the window: at once again
    assert len(answers) == 3
