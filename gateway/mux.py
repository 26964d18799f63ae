"""One wildcard inbox subscription for every reply stream of this gateway.

`open()` registers a bounded queue under a fresh token (128 random bits: nobody can guess
another client's reply subject) and returns the reply subject
`_LLMFLEET.r.gateway.<gateway>.<token>`; the NATS callback only looks the token up and
enqueues the raw bytes (decoding happens in the request's own task). Each queue is bounded
in messages and in bytes. All of this runs on the one event loop with no await between
lookup and use, so the dict needs no lock.

A reply for a token that is gone (client left, queue timeout) that announces a worker
(`accepted`) makes the mux tell that worker to cancel: nobody will read that stream.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Awaitable, Callable

import msgspec

from common import names
from common import protocol as p
from common.bus import Bus, Msg, Subscription
from gateway.stats import GatewayCounters

log = logging.getLogger(__name__)


class ReplyQueue:
    """A queue of raw reply messages bounded in count and in bytes; overflow is recorded,
    not hidden (the request then ends with a 502)."""

    __slots__ = ("_queue", "bytes", "max_bytes", "overflowed", "subject", "token")

    def __init__(self, token: str, subject: str, maxsize: int, max_bytes: int) -> None:
        self.token = token
        self.subject = subject
        self._queue: asyncio.Queue[bytes] = asyncio.Queue(maxsize)
        self.bytes = 0
        self.max_bytes = max_bytes
        self.overflowed = False

    def put(self, data: bytes) -> bool:
        """Queue one message; False (and `overflowed`) if it does not fit."""
        if self.bytes + len(data) > self.max_bytes or self._queue.full():
            self.overflowed = True
            return False
        self._queue.put_nowait(data)
        self.bytes += len(data)
        return True

    async def get(self) -> bytes:
        data = await self._queue.get()
        self.bytes -= len(data)
        return data

    def get_nowait(self) -> bytes:
        data = self._queue.get_nowait()
        self.bytes -= len(data)
        return data

    def empty(self) -> bool:
        return self._queue.empty()


class ReplyMux:
    def __init__(
        self,
        nc: Bus,
        gateway_id: str,
        on_orphan_accepted: Callable[[p.Accepted], Awaitable[None]],
        counters: GatewayCounters,
        queue_size: int = 4096,
        queue_bytes: int = 16 * 1024 * 1024,
    ) -> None:
        self.counters = counters
        self._nc = nc
        self.prefix = names.gateway_reply_root(gateway_id)
        self._streams: dict[str, ReplyQueue] = {}
        self._queue_size = queue_size
        self._queue_bytes = queue_bytes
        self._on_orphan = on_orphan_accepted
        self._sub: Subscription | None = None

    async def start(self) -> None:
        self._sub = await self._nc.subscribe(
            self.prefix + ".*",
            cb=self._on_msg,
            pending_msgs_limit=1_000_000,
            pending_bytes_limit=512 * 1024 * 1024,
        )

    async def stop(self) -> None:
        if self._sub is not None:
            await self._sub.unsubscribe()

    def open(self) -> ReplyQueue:
        token = secrets.token_hex(16)
        rq = ReplyQueue(token, f"{self.prefix}.{token}", self._queue_size, self._queue_bytes)
        self._streams[token] = rq
        return rq

    def close(self, rq: ReplyQueue) -> None:
        self._streams.pop(rq.token, None)

    @property
    def open_streams(self) -> int:
        return len(self._streams)

    async def _on_msg(self, msg: Msg) -> None:
        token = msg.subject[len(self.prefix) + 1 :]
        rq = self._streams.get(token)
        if rq is not None:
            if not rq.put(msg.data):
                self.counters.overflows += 1
            return
        self.counters.orphans += 1
        if b'"accepted"' in msg.data:
            try:
                reply = p.decode_reply(msg.data)
            except msgspec.DecodeError:
                return
            if isinstance(reply, p.Accepted):
                await self._on_orphan(reply)
