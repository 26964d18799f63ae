"""Minimal ASGI plumbing: read a bounded body, send JSON, errors, and SSE headers."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from common.errors import FleetError, PayloadTooLarge, envelope_bytes

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

JSON_HEADERS = [(b"content-type", b"application/json")]
SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]


def header(scope: Scope, name: bytes) -> str | None:
    for k, v in scope.get("headers", ()):
        if k == name:
            return bytes(v).decode("latin-1")
    return None


async def read_body(scope: Scope, receive: Receive, limit: int) -> bytes:
    """The whole request body; PayloadTooLarge as soon as it passes `limit` bytes."""
    declared = header(scope, b"content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"Request body of {declared} bytes exceeds the limit of {limit}.")
    chunks: list[bytes] = []
    size = 0
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            raise ClientGone
        chunk = msg.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"Request body exceeds the limit of {limit} bytes.")
        chunks.append(chunk)
        if not msg.get("more_body", False):
            return b"".join(chunks)


class ClientGone(Exception):
    """The HTTP client disconnected."""


async def send_json(
    send: Send, status: int, body: bytes, extra: list[tuple[bytes, bytes]] | None = None
) -> None:
    headers = [*JSON_HEADERS, (b"content-length", str(len(body)).encode())]
    if extra:
        headers.extend(extra)
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def error_headers(err: FleetError) -> list[tuple[bytes, bytes]]:
    """Retry-After, and the headers the error brings (a rate limit's x-ratelimit-*)."""
    out = list(err.headers)
    if err.retry_after is not None:
        out.append((b"retry-after", str(max(1, round(err.retry_after))).encode()))
    return out


Envelope = Callable[[FleetError], tuple[int, bytes]]
"""An API's error envelope: (the status its clients see, the body)."""


def openai_envelope(err: FleetError) -> tuple[int, bytes]:
    return err.status, envelope_bytes(err)


async def send_error(
    send: Send,
    err: FleetError,
    extra: list[tuple[bytes, bytes]] | None = None,
    envelope: Envelope = openai_envelope,
) -> None:
    status, body = envelope(err)
    await send_json(send, status, body, [*error_headers(err), *(extra or [])])
