"""A worker and a gateway starting side by side both create the request stream: the one
that loses the race (JetStream: "stream name already in use with a different
configuration") reads the stream instead, and a gateway then applies its own limits.
Seen once as a gateway that exited at start (a clean-clone run of the suite)."""

from __future__ import annotations

import asyncio

from common import names
from common.queue import ensure_stream
from common.settings import QueueSettings
from tests.natshelp import connected


async def test_racing_creators_of_the_request_stream_both_succeed(nats_url: str) -> None:
    async with connected(nats_url) as nc:
        js = nc.jetstream()
        for _ in range(5):
            if await _exists(js):
                await js.delete_stream(names.REQUEST_STREAM)
            worker, gateway = QueueSettings(), QueueSettings(max_per_model=4)
            await asyncio.gather(ensure_stream(js, worker), ensure_stream(js, gateway, update=True))
            info = await js.stream_info(names.REQUEST_STREAM)
            # the gateway owns queue policy: its limit holds whoever created the stream
            assert info.config.max_msgs_per_subject in (4, 10_000)
            await ensure_stream(js, gateway, update=True)
            assert (await js.stream_info(names.REQUEST_STREAM)).config.max_msgs_per_subject == 4


async def _exists(js: object) -> bool:
    try:
        await js.stream_info(names.REQUEST_STREAM)  # type: ignore[attr-defined]
    except Exception:
        return False
    return True
