"""Request bodies passed by reference: the NATS object store for inputs over max_payload.

A NATS message (headers + payload) must fit the server's `max_payload` (1 MiB by default,
8 MiB with `llmfleet nats`); publishing more closes the connection for every stream on it.
A body that does not fit is stored in the producer's own object-store bucket,
`LLMFLEET_BODIES_<producer>`, and the request carries `Llmfleet-Body-Ref:
LLMFLEET_BODIES_<producer>/<name>` and an empty payload. Only that producer may write its
bucket (NATS permissions); workers only read, and only from the bucket of the producer the
request subject names, never following object-store links. The producer deletes a body
once its request is answered; the bucket's TTL removes anything left behind.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json

import nats.errors
import nats.js.errors
from nats.js import JetStreamContext
from nats.js.api import (
    ObjectInfo,
    ObjectMeta,
    ObjectMetaOptions,
    ObjectStoreConfig,
    StorageType,
)
from nats.js.object_store import ObjectStore

from common import names
from common.errors import InvalidRequest, ServiceUnavailable
from common.natsconn import NATS_ERRORS
from common.settings import BodySettings

MAX_BODY_BYTES = 256 * 1024 * 1024  # a bucket's size: no body can be larger
READ_BASE_S = 2.0
READ_BYTES_PER_S = 20e6
"""A body read may take READ_BASE_S plus its claimed size at this rate (256 MiB: ~15 s)."""


def bucket_config(settings: BodySettings) -> ObjectStoreConfig:
    return ObjectStoreConfig(
        description="llmfleet request bodies passed by reference",
        ttl=settings.ttl_s,
        max_bytes=settings.max_bytes,
        storage=StorageType.MEMORY,
        replicas=settings.replicas,
    )


class BodyStore:
    """A producer's own bucket: put and delete its bodies. Opened (created) lazily, once."""

    def __init__(
        self,
        js: JetStreamContext,
        settings: BodySettings | None = None,
        *,
        producer: str = names.GATEWAY_PRODUCER,
    ) -> None:
        self._js = js
        self.bucket = names.body_bucket(producer)
        self._settings = settings or BodySettings()
        self._obs: ObjectStore | None = None

    async def ensure(self) -> None:
        """Open the bucket, creating it (with `bucket_config`) unless it exists."""
        await self._store()

    async def _store(self) -> ObjectStore:
        if self._obs is None:
            try:
                self._obs = await self._js.object_store(self.bucket)
            except nats.js.errors.NotFoundError:
                self._obs = await self._js.create_object_store(
                    self.bucket, bucket_config(self._settings)
                )
        return self._obs

    async def put(self, name: str, body: bytes, max_payload: int) -> str:
        """Store `body` in chunks that fit `max_payload`; returns the `Llmfleet-Body-Ref`."""
        chunk = max(1024, min(128 * 1024, max_payload - 4096))
        meta = ObjectMeta(name=name, options=ObjectMetaOptions(max_chunk_size=chunk))
        try:
            await (await self._store()).put(name, body, meta=meta)
        except NATS_ERRORS as exc:
            raise ServiceUnavailable("Could not store the request body.") from exc
        return f"{self.bucket}/{name}"

    async def delete(self, ref: str) -> None:
        _, _, name = ref.partition("/")
        try:
            await (await self._store()).delete(name)
        except NATS_ERRORS:
            pass  # the bucket's TTL removes it


async def ensure_buckets(
    js: JetStreamContext, producers: tuple[str, ...], settings: BodySettings
) -> None:
    """Create the body bucket of every producer named (the gateway's `--producer-buckets`)
    unless it exists: with the shipped permissions producers may not create streams (a
    stream's config could capture or republish anyone's subjects), so a trusted role
    creates theirs, with exactly `bucket_config`."""
    for producer in producers:
        await BodyStore(js, settings, producer=names.check_producer(producer)).ensure()


class BodyReader:
    """A worker's read access to every producer's bucket (never created nor written here).

    Objects are read message by message with the JetStream API (`STREAM.MSG.GET`: the meta,
    then each chunk by sequence), not with nats-py's ordered consumer: a push consumer obeys
    control headers a producer can put on its own chunks (flow control, "consumer stalled"
    replies), which would make the worker publish where the producer says. Reading by
    sequence trusts nothing but the bytes, which the meta's SHA-256 digest checks. No link
    is ever followed, and the chunk count is checked before the read, whose time is bounded.
    """

    def __init__(self, js: JetStreamContext) -> None:
        self._js = js

    async def get(self, producer: str, ref: str) -> bytes:
        """The body `ref` names, which must be in `producer`'s own bucket; InvalidRequest
        for any other reference (another producer's bucket, a link, a missing or broken
        object), ServiceUnavailable when the broker cannot serve it."""
        bucket, _, name = ref.partition("/")
        if bucket != names.body_bucket(producer) or not name:
            raise InvalidRequest(
                f"Body references must name this producer's bucket "
                f"{names.body_bucket(producer)!r}: {ref[:300]!r}."
            )
        shown = ref[:300]
        try:
            info = await self._meta(bucket, name)
            if info.is_link():
                raise InvalidRequest("Body references may not be links.")
            size, chunks = int(info.size or 0), int(info.chunks or 0)
            if size > MAX_BODY_BYTES or (size and not chunks) or chunks > size:
                raise InvalidRequest(f"The referenced body {shown!r} is malformed.")
            async with asyncio.timeout(READ_BASE_S + size / READ_BYTES_PER_S):
                data = await self._chunks(bucket, str(info.nuid), chunks, size)
        except nats.js.errors.NotFoundError as exc:
            raise InvalidRequest(f"The referenced body {shown!r} does not exist.") from exc
        except TimeoutError as exc:  # before NATS_ERRORS, which holds TimeoutError too
            raise InvalidRequest(f"The referenced body {shown!r} could not be read.") from exc
        except NATS_ERRORS as exc:
            raise ServiceUnavailable("Could not read the request body.") from exc
        if size and _digest(data) != (info.digest or "").removeprefix("SHA-256="):
            raise InvalidRequest(f"The referenced body {shown!r} does not match its digest.")
        return data

    async def _meta(self, bucket: str, name: str) -> ObjectInfo:
        subject = f"$O.{bucket}.M.{base64.urlsafe_b64encode(name.encode()).decode()}"
        msg = await self._js.get_msg(f"OBJ_{bucket}", subject=subject)
        try:
            info: ObjectInfo = ObjectInfo.from_response(json.loads(msg.data or b""))
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise InvalidRequest("The referenced body's meta is unreadable.") from exc
        if info.deleted or not info.nuid:
            raise nats.js.errors.NotFoundError
        return info

    async def _chunks(self, bucket: str, nuid: str, chunks: int, size: int) -> bytes:
        stream, subject = f"OBJ_{bucket}", f"$O.{bucket}.C.{nuid}"
        parts: list[bytes] = []
        got, seq = 0, 0
        for _ in range(chunks):
            msg = await self._js.get_msg(stream, seq=seq + 1, subject=subject, next=True)
            seq = int(msg.seq or 0)
            got += len(msg.data or b"")
            if got > size:
                raise InvalidRequest("The referenced body is larger than its meta says.")
            parts.append(msg.data or b"")
        if got != size:
            raise InvalidRequest("The referenced body is incomplete.")
        return b"".join(parts)


def _digest(data: bytes) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(data).digest()).decode()
