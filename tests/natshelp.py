"""Plain nats-py helpers for tests that act as a batch producer or watch the fleet."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import nats
import nats.js
from nats.aio.client import Client

from common import names
from common import protocol as p


@asynccontextmanager
async def connected(url: str) -> AsyncIterator[Client]:
    nc = await nats.connect(url)
    try:
        yield nc
    finally:
        await nc.drain()


class Announcements:
    """Keeps the latest announcement of every worker."""

    def __init__(self) -> None:
        self.latest: dict[str, p.WorkerAnnounce] = {}
        self.changed = asyncio.Event()

    async def on_msg(self, msg: Any) -> None:
        a = p.decode_announce(msg.data)
        self.latest[a.worker] = a
        self.changed.set()

    def model(self, model_id: str) -> list[tuple[p.WorkerAnnounce, p.ModelStatus]]:
        return [(a, m) for a in self.latest.values() for m in a.models if m.id == model_id]

    async def wait_for(self, pred: Any, timeout: float = 10.0) -> None:
        async with asyncio.timeout(timeout):
            while not pred(self):
                self.changed.clear()
                await self.changed.wait()


@asynccontextmanager
async def watch_announcements(nc: Client) -> AsyncIterator[Announcements]:
    ann = Announcements()
    sub = await nc.subscribe(names.HEARTBEAT_PREFIX + "*", cb=ann.on_msg)
    await nc.publish(names.DISCOVER_SUBJECT, b"")
    try:
        yield ann
    finally:
        await sub.unsubscribe()


PRODUCER = "test"
"""The producer name tests publish under (no auth: any name works on a dev broker)."""


def reply_subject(name: str, producer: str = PRODUCER) -> str:
    """A reply subject in `producer`'s reply space, the only place workers answer it."""
    return f"{names.reply_space(producer)}.{name}"


def request_headers(
    reply: str, op: str = "chat", request_id: str | None = None, **extra: str
) -> dict[str, str]:
    rid = request_id or secrets.token_hex(8)
    return {
        p.H_VERSION: p.PROTOCOL_VERSION,
        p.H_OP: op,
        p.H_REQUEST_ID: rid,
        p.H_MSG_ID: rid,
        p.H_REPLY: reply,
        **extra,
    }


async def publish_request(
    js: nats.js.JetStreamContext,
    model: str,
    body: bytes,
    headers: dict[str, str],
    producer: str = PRODUCER,
) -> int:
    ack = await js.publish(names.request_subject(model, producer), body, headers=headers)
    return int(ack.seq)
