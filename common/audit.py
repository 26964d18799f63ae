"""The audit trail: one `AuditEvent` per request, in the durable JetStream stream
`LLMFLEET_AUDIT` (file storage, `--audit-retention`).

Gateways publish `llmfleet.audit.gw.<gateway>` for every `/v1` request they answer (the
key's name, never its secret); workers publish `llmfleet.audit.wk.<worker>` for requests
that came straight over NATS, under the producer the request subject names (the identity
NATS permissions vouch for). Only gateways and workers may publish there (accounts.conf);
`llmfleet audit tail` reads it with admin credentials.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from typing import Any

import msgspec
import nats.js.errors
from nats.js import JetStreamContext
from nats.js.api import DiscardPolicy, RetentionPolicy, StorageType, StreamConfig

from common.natsconn import NATS_ERRORS

AUDIT_STREAM = "LLMFLEET_AUDIT"
AUDIT_SUBJECTS = "llmfleet.audit.>"
GATEWAY_AUDIT_PREFIX = "llmfleet.audit.gw."
WORKER_AUDIT_PREFIX = "llmfleet.audit.wk."
DAY_S = 86_400.0
DUPLICATE_WINDOW_S = 15.0

log = logging.getLogger(__name__)


class AuditEvent(msgspec.Struct, omit_defaults=True, kw_only=True):
    """One request, as it ended. `key` is the principal: a key's name (`--auth keys`),
    `api-key` / `anonymous` (the other auth modes) or `producer:<name>` (straight over
    NATS). Times are in ms; `ts` is the end, in seconds since the epoch."""

    ts: float
    request_id: str
    key: str
    route: str  # chat | completion | embedding | ...
    model: str = ""  # as asked
    served_model: str = ""  # as the worker named it
    worker: str = ""
    gateway: str = ""
    status: int = 200
    error: str = ""  # the error code, when status != 200 (or an error event mid-stream)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    ttft_ms: float | None = None
    duration_ms: float = 0.0
    stream: bool = False
    client: str = ""  # the client's address (host:port), or the producer for NATS requests


class AuditSettings(msgspec.Struct, frozen=True):
    retention_days: float = 30.0
    max_bytes: int = -1  # -1: no byte limit (the age limit applies)
    replicas: int = 1


_ENCODER = msgspec.json.Encoder()
_DECODER = msgspec.json.Decoder(AuditEvent)


MAX_FIELD_CHARS = 256  # client-chosen strings (a model name, a request id) are cut here


def encode(event: AuditEvent) -> bytes:
    """The event as stored: every string field at most MAX_FIELD_CHARS long, so that no
    request can make its event too big for the stream (a refused event must not stall
    the writer)."""
    return _ENCODER.encode(_bounded(event))


def _bounded(event: AuditEvent) -> AuditEvent:
    long = {
        f: v[:MAX_FIELD_CHARS]
        for f in event.__struct_fields__
        if isinstance(v := getattr(event, f), str) and len(v) > MAX_FIELD_CHARS
    }
    return msgspec.structs.replace(event, **long) if long else event


def decode(data: bytes) -> AuditEvent:
    """msgspec.ValidationError / DecodeError on anything that is not an AuditEvent."""
    return _DECODER.decode(data)


def stream_config(settings: AuditSettings) -> StreamConfig:
    return StreamConfig(
        name=AUDIT_STREAM,
        subjects=[AUDIT_SUBJECTS],
        description="llmfleet audit: one event per request",
        retention=RetentionPolicy.LIMITS,
        storage=StorageType.FILE,
        discard=DiscardPolicy.OLD,
        max_age=settings.retention_days * DAY_S,
        max_bytes=settings.max_bytes,
        max_msg_size=64 * 1024,
        num_replicas=settings.replicas,
        # Retries come within seconds (RETRIES x ACK_TIMEOUT_S): a short window keeps the
        # broker's table of seen message ids small at thousands of events a second.
        duplicate_window=DUPLICATE_WINDOW_S,
    )


async def ensure_audit_stream(js: JetStreamContext, settings: AuditSettings) -> None:
    """Create the audit stream, or bring an existing one to `settings` (retention)."""
    config = stream_config(settings)
    try:
        info = await js.stream_info(AUDIT_STREAM)
    except NATS_ERRORS:
        try:
            await js.add_stream(config)
            return
        except NATS_ERRORS:
            info = await js.stream_info(AUDIT_STREAM)  # another process created it first
    cur = info.config
    if (cur.max_age, cur.max_bytes, cur.duplicate_window) != (
        config.max_age,
        config.max_bytes,
        config.duplicate_window,
    ):
        await js.update_stream(config)


def now() -> float:
    return round(time.time(), 3)


def _permanent(result: object) -> bool:
    """A JetStream error answer about the message itself (too big, wrong stream), not
    about the broker's health (no stream leader, no responders, a timeout)."""
    return isinstance(result, nats.js.errors.APIError) and not isinstance(
        result, nats.js.errors.ServiceUnavailableError
    )


class AuditUnavailable(Exception):
    """The audit stream could not take an event (with `--audit-required`, the request
    fails)."""


class AuditStats(msgspec.Struct, frozen=True):
    written: int
    failed: int  # publishes that got no PubAck (each retried, up to RETRIES times)
    dropped: int  # events given up on: the queue was full, or every retry failed
    queued: int


class AuditWriter:
    """Writes audit events to `subject` (in LLMFLEET_AUDIT) off the request path.

    `submit()` never blocks: the event goes into a bounded queue, and `run()` (one task)
    publishes batches with publish_async and waits for their PubAcks; a failed batch is
    retried (the request id is the `Nats-Msg-Id`, so a retry never duplicates an event),
    then dropped. `write()` is the synchronous path of `--audit-required`: it returns once
    the broker has stored the event, or raises AuditUnavailable. Every failure is counted
    (`stats()`) and logged, at most once per 10 s."""

    BATCH = 256
    RETRIES = 3
    ACK_TIMEOUT_S = 2.0

    def __init__(self, js: Any, subject: str, max_queue: int = 16_384) -> None:
        self._js = js
        self.subject = subject
        self._queue: deque[tuple[AuditEvent, str, int]] = deque()  # event, unique, tries
        self._max_queue = max_queue
        self._wake = asyncio.Event()
        self._written = self._failed = self._dropped = 0
        self._last_log = 0.0
        self.healthy = True  # the last publish was acknowledged

    def stats(self) -> AuditStats:
        return AuditStats(self._written, self._failed, self._dropped, len(self._queue))

    def submit(self, event: AuditEvent, unique: str) -> bool:
        """Queue `event`; `unique` names it among this writer's events (the gateway's
        random request id, a worker's delivery): with the writer's subject it is the
        `Nats-Msg-Id`, so a retry never duplicates an event, and no producer's choice of
        request id can make the stream drop someone else's event as a duplicate."""
        if len(self._queue) >= self._max_queue:
            self._dropped += 1
            self._complain("audit queue full: event dropped")
            return False
        self._queue.append((event, unique, 0))
        self._wake.set()
        return True

    def _msg_id(self, unique: str) -> str:
        return f"{self.subject}.{unique}"

    async def write(self, event: AuditEvent, unique: str) -> None:
        try:
            async with asyncio.timeout(self.ACK_TIMEOUT_S):
                await self._js.publish(
                    self.subject, encode(event), headers={"Nats-Msg-Id": self._msg_id(unique)}
                )
        except NATS_ERRORS as exc:  # TimeoutError included
            self._failed += 1
            self.healthy = False
            self._complain(f"audit event not written: {exc!r}")
            raise AuditUnavailable(str(exc)) from exc
        self._written += 1
        self.healthy = True

    async def run(self) -> None:
        """Publish queued events until cancelled; then try once to flush what is left."""
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                while self._queue:
                    await self._publish_batch()
        finally:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(self.ACK_TIMEOUT_S):
                    while self._queue:
                        await asyncio.shield(self._publish_batch())

    async def _publish_batch(self) -> None:
        batch = [self._queue.popleft() for _ in range(min(self.BATCH, len(self._queue)))]
        futures: list[Any] = []
        try:
            for event, unique, _ in batch:
                hdr = {"Nats-Msg-Id": self._msg_id(unique)}
                futures.append(
                    await self._js.publish_async(self.subject, encode(event), headers=hdr)
                )
            async with asyncio.timeout(self.ACK_TIMEOUT_S):
                results = await asyncio.gather(*futures, return_exceptions=True)
        except NATS_ERRORS as exc:  # TimeoutError included
            results = [exc] * len(batch)
            for f in futures:
                f.cancel()
        results = list(results) + [TimeoutError()] * (len(batch) - len(results))
        refused = [b for b, r in zip(batch, results, strict=True) if _permanent(r)]
        failed = [
            (ev, unique, tries)
            for (ev, unique, tries), r in zip(batch, results, strict=True)
            if isinstance(r, BaseException) and not _permanent(r)
        ]
        self._written += len(batch) - len(failed) - len(refused)
        if refused:  # the stream refused these events themselves: retrying cannot help
            self._dropped += len(refused)
            self._complain(f"{len(refused)} audit events refused by the stream: dropped")
        if not failed:
            self.healthy = True
            return
        self.healthy = False
        self._failed += len(failed)
        self._complain(f"{len(failed)} audit events not written (will retry)")
        retry = [(ev, u, tries + 1) for ev, u, tries in failed if tries + 1 < self.RETRIES]
        self._dropped += len(failed) - len(retry)
        self._queue.extendleft(reversed(retry))
        await asyncio.sleep(0.5 if retry else 0)

    def _complain(self, what: str) -> None:
        now = time.monotonic()
        if now - self._last_log >= 10.0:
            self._last_log = now
            log.warning(
                "%s (written %d, failed %d, dropped %d)",
                what,
                self._written,
                self._failed,
                self._dropped,
            )
