"""Request bodies passed by reference: the NATS object store for inputs over max_payload.

A NATS message (headers + payload) must fit the server's `max_payload` (1 MiB by default,
8 MiB with `llmfleet nats`); publishing more closes the connection for every stream on it.
A body that does not fit is stored in the object-store bucket `LLMFLEET_BODIES` under the
request id, and the request carries `Llmfleet-Body-Ref: LLMFLEET_BODIES/<name>` and an
empty payload. The worker reads it from there and deletes it when done; the bucket's TTL
removes anything left behind.
"""

from __future__ import annotations

import nats.errors
import nats.js.errors
from nats.js import JetStreamContext
from nats.js.api import ObjectMeta, ObjectMetaOptions, ObjectStoreConfig, StorageType
from nats.js.object_store import ObjectStore

from common.errors import InvalidRequest, ServiceUnavailable
from common.natsconn import NATS_ERRORS
from common.settings import BodySettings

BUCKET = "LLMFLEET_BODIES"


class BodyStore:
    """Put, get and delete request bodies by reference. Opened lazily, once."""

    def __init__(self, js: JetStreamContext, settings: BodySettings | None = None) -> None:
        self._js = js
        self._settings = settings or BodySettings()
        self._obs: ObjectStore | None = None

    async def _store(self) -> ObjectStore:
        if self._obs is None:
            try:
                self._obs = await self._js.object_store(BUCKET)
            except nats.js.errors.NotFoundError:
                s = self._settings
                self._obs = await self._js.create_object_store(
                    BUCKET,
                    ObjectStoreConfig(
                        description="llmfleet request bodies passed by reference",
                        ttl=s.ttl_s,
                        max_bytes=s.max_bytes,
                        storage=StorageType.MEMORY,
                        replicas=s.replicas,
                    ),
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
        return f"{BUCKET}/{name}"

    async def get(self, ref: str) -> bytes:
        bucket, _, name = ref.partition("/")
        if bucket != BUCKET or not name:
            raise InvalidRequest(f"Unknown body reference {ref!r}.")
        try:
            result = await (await self._store()).get(name)
        except nats.js.errors.NotFoundError as exc:
            raise InvalidRequest(f"The referenced body {ref!r} does not exist.") from exc
        except NATS_ERRORS as exc:
            raise ServiceUnavailable("Could not read the request body.") from exc
        return bytes(result.data or b"")

    async def delete(self, ref: str) -> None:
        _, _, name = ref.partition("/")
        try:
            await (await self._store()).delete(name)
        except NATS_ERRORS:
            pass  # the bucket's TTL removes it
