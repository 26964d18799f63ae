"""The typed seam between llmfleet and NATS: what the gateway and workers call on the broker.

`Bus` is the part of a core NATS connection we use, `JetStream` the part of its JetStream
context; nats-py's `Client` and `JetStreamContext` satisfy them as they are (no wrapper, no
cost on the hot path), and `common.fakebus` is a small in-memory implementation for unit
tests of the decisions built on them (reply streams, pull credits, the catalog). Integration
tests use a real nats-server.

Errors: the real implementation raises nats-py's exceptions (`common.natsconn.NATS_ERRORS`,
and `nats.errors.NoRespondersError` from `request`); the fake raises the same types, so
the seams that translate them (gateway/dispatch.py, common/bodies.py) are tested as they are.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Protocol


class Msg(Protocol):
    """One message as a subscription callback receives it."""

    subject: str
    reply: str
    data: bytes
    headers: dict[str, str] | None

    async def respond(self, data: bytes) -> None: ...


class Subscription(Protocol):
    async def unsubscribe(self, limit: int = 0) -> None: ...


Callback = Callable[[Msg], Awaitable[None]]


class Publisher(Protocol):
    """Just publishing (what a job's reply writer needs; its unit tests record it)."""

    async def publish(
        self,
        subject: str,
        payload: bytes = b"",
        reply: str = "",
        headers: dict[str, str] | None = None,
    ) -> None: ...


class Bus(Publisher, Protocol):
    """Core NATS: publish, request/reply, subscribe (nats-py's `Client`)."""

    @property
    def is_connected(self) -> bool: ...

    @property
    def max_payload(self) -> int: ...

    async def request(
        self,
        subject: str,
        payload: bytes = b"",
        timeout: float = 0.5,
        old_style: bool = False,
        headers: dict[str, str] | None = None,
    ) -> Msg: ...

    async def flush(self, timeout: int = 10) -> None: ...

    async def subscribe(
        self,
        subject: str,
        queue: str = "",
        cb: Callback | None = None,
        future: object = None,
        max_msgs: int = 0,
        pending_msgs_limit: int = ...,
        pending_bytes_limit: int = ...,
    ) -> Subscription: ...


class PubAck(Protocol):
    stream: str
    seq: int
    duplicate: bool | None


class JetStream(Protocol):
    """The JetStream calls on the request path (nats-py's `JetStreamContext`)."""

    async def publish(
        self,
        subject: str,
        payload: bytes = b"",
        timeout: float | None = None,
        stream: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> PubAck: ...

    async def delete_msg(self, stream_name: str, seq: int) -> bool: ...
