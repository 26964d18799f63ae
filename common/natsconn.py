"""Connecting to NATS with the project's settings, and the nats-py pitfalls worked around.

`NATS_ERRORS` is the one list of exceptions a NATS or JetStream call raises when the broker
is unreachable, slow or refuses; each package translates them at its own seam (the gateway
in `gateway/dispatch.py`, the body store in `common/bodies.py`).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from common.bus import Bus
from common.errors import ServiceUnavailable

log = logging.getLogger(__name__)

NATS_ERRORS: tuple[type[Exception], ...] = (nats.errors.Error, nats.js.errors.Error, TimeoutError)
"""What a NATS or JetStream call raises when the broker cannot serve it."""


@contextlib.contextmanager
def broker_errors(what: str) -> Iterator[None]:
    """Translate a NATS or JetStream failure inside into `ServiceUnavailable` (503)."""
    try:
        yield
    except NATS_ERRORS as exc:
        raise ServiceUnavailable(
            f"{what}: the broker did not answer ({type(exc).__name__})"
        ) from exc


async def publish_best_effort(nc: Bus, subject: str, data: bytes) -> bool:
    """Publish if connected; a failure is not an error (announcements repeat)."""
    if not nc.is_connected:
        return False
    try:
        await nc.publish(subject, data)
    except NATS_ERRORS:
        return False
    return True


async def jetstream_ready(nc: Bus, js: Any) -> bool:
    """Connected, and JetStream answers (one API request)."""
    if not nc.is_connected:
        return False
    try:
        await js.account_info()
    except NATS_ERRORS:
        return False
    return True


PING_INTERVAL_S = 2
"""Client ping interval: a dead or frozen server is noticed within ~2 pings (4-6 s)
instead of nats-py's default of minutes."""
MAX_OUTSTANDING_PINGS = 2


class _RateLimitedLog:
    """Slow-consumer errors arrive once per dropped message: log at most once a second."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._last = 0.0
        self._suppressed = 0

    def __call__(self, exc: Exception) -> None:
        now = time.monotonic()
        if now - self._last < 1.0:
            self._suppressed += 1
            return
        log.warning(
            "nats error (%s): %s (%d similar suppressed)",
            self._name,
            type(exc).__name__,
            self._suppressed,
        )
        self._last = now
        self._suppressed = 0


async def connect(
    servers: str | list[str],
    *,
    name: str,
    inbox_prefix: str = "_INBOX",
    on_reconnect: Callable[[], Awaitable[None]] | None = None,
    on_disconnect: Callable[[], Awaitable[None]] | None = None,
    connect_timeout: float = 2.0,
) -> NATS:
    """Connect with lowered pings, endless reconnects and rate-limited error logging."""
    err_log = _RateLimitedLog(name)
    nc_box: list[NATS] = []  # the connection, once made (callbacks run before it exists)

    async def error_cb(exc: Exception) -> None:
        err_log(exc)

    async def reconnected_cb() -> None:
        log.info("nats reconnected (%s)", name)
        if on_reconnect is not None:
            try:
                await on_reconnect()
            except (nats.errors.Error, TimeoutError, OSError) as exc:
                log.warning("after reconnect (%s): %s", name, exc)

    async def disconnected_cb() -> None:
        if nc_box and (nc_box[0].is_closed or nc_box[0].is_draining):
            log.info("nats connection closed (%s)", name)
        else:
            log.warning("nats disconnected (%s)", name)
        if on_disconnect is not None:
            await on_disconnect()

    urls = [s.strip() for s in servers.split(",")] if isinstance(servers, str) else servers
    kwargs: dict[str, Any] = {
        "servers": urls,
        "name": name,
        "inbox_prefix": inbox_prefix,
        "ping_interval": PING_INTERVAL_S,
        "max_outstanding_pings": MAX_OUTSTANDING_PINGS,
        "max_reconnect_attempts": -1,
        "reconnect_time_wait": 0.5,
        "connect_timeout": connect_timeout,
        "error_cb": error_cb,
        "reconnected_cb": reconnected_cb,
        "disconnected_cb": disconnected_cb,
        "pending_size": 64 * 1024 * 1024,
    }
    nc: NATS = await nats.connect(**kwargs)
    nc_box.append(nc)
    return nc


async def flush(nc: Bus, wait_s: int = 5) -> None:
    """A flush that really flushes: nats-py's PING can overtake buffered SUB/PUB commands.
    (A bus with no client-side buffer, like the in-memory one, has nothing to flush.)"""
    flush_pending = getattr(nc, "_flush_pending", None)
    if flush_pending is None:
        return
    await flush_pending(force_flush=True)
    await nc.flush(timeout=wait_s)


def jetstream(nc: NATS, timeout: float = 5.0) -> JetStreamContext:
    return nc.jetstream(timeout=timeout)


def header_bytes(headers: dict[str, str]) -> int:
    """Bytes the NATS/1.0 header block takes on the wire (server counts it in max_payload)."""
    return 12 + sum(len(k) + len(v) + 4 for k, v in headers.items()) + 2


async def close(nc: NATS) -> None:
    """Drain if possible (delivers what is buffered), else just close; never raises."""
    try:
        await nc.drain()
    except (nats.errors.Error, TimeoutError, OSError, RuntimeError):
        with contextlib.suppress(nats.errors.Error, TimeoutError, OSError, RuntimeError):
            await nc.close()
