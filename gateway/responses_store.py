"""Stored responses (`POST /v1/responses` with `store`) in the KV bucket LLMFLEET_RESPONSES.

One entry per response (`StoredResponse`): its owner (the principal's name), its own
input items, its output items, its `previous_response_id` and the `response` object as
it was answered. A continuation walks the chain of `previous_response_id`s (at most
`MAX_CHAIN` entries). Keys:

    <id>        the head: the entry itself, or (an entry over one KV value) its owner and
                how many parts it has
    <id>.<n>    part n of a split entry

A KV value must fit the broker's `max_payload` (1 MiB by default), and an entry holds a
whole request's input (up to --max-body-bytes) and its answer, so big entries are split
into parts of `part_bytes`, at most `MAX_PARTS` (beyond: `ResponseTooLarge`, 413 - never
reached with the default limits). Parts are written first and the head last, so a reader
never sees half an entry; a delete removes the head first. An entry whose parts have gone
(aged out) reads as missing.

Ownership: another principal's entry reads exactly as a missing one. Entries are immutable,
so a small LRU (bounded in entries and bytes, each held no longer than the TTL) spares the
chain's re-reads each turn; the response a request names is always read from the bucket
(a delete on another gateway is seen at once; its ancestors may come from the cache).

The bucket: file storage, one value per key, TTL `--responses-ttl`, bytes capped by
`--responses-max-bytes`. Unlike NATS KV's default (writes fail once the bucket is full),
the oldest responses go first when it is full (a store of past answers, like the audit
stream): the stream is created here in KV's layout, not by `create_key_value`.

Errors: `ResponseStoreUnavailable` (503) when the broker fails or refuses us,
`ResponseTooLarge` (413); `ResponseMissing` for a chain with a missing link.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import msgspec
import nats.js.errors
from nats.js import JetStreamContext
from nats.js.api import DiscardPolicy, StorageType, StreamConfig
from nats.js.kv import KeyValue

from common.errors import InvalidRequest, PayloadTooLarge, ServiceUnavailable
from common.natsconn import NATS_ERRORS
from control.store import BucketMissing, StoreUnavailable

log = logging.getLogger(__name__)

RESPONSES_BUCKET = "LLMFLEET_RESPONSES"
RESPONSES_STREAM = "KV_" + RESPONSES_BUCKET
MAX_CHAIN = 1000  # responses one continuation may walk
MAX_PARTS = 256
CACHE_ENTRIES = 512
CACHE_BYTES = 64 * 1024 * 1024
PART_MARGIN = 1024  # bytes of max_payload left unused by a part

_ID = re.compile(r"[A-Za-z0-9_-]{1,200}\Z")  # one KV key token: no `.`, `*`, `>`


def _history_too_large() -> InvalidRequest:
    return InvalidRequest(
        "The conversation's stored history is larger than this gateway accepts in one "
        "request; start a new one.",
        param="previous_response_id",
        code="history_too_large",
    )


class StoredResponse(msgspec.Struct, kw_only=True, omit_defaults=True):
    id: str
    owner: str
    created_at: int
    input: list[dict[str, Any]]
    output: list[dict[str, Any]]
    response: dict[str, Any]
    previous_response_id: str | None = None


class _Head(msgspec.Struct, omit_defaults=True):
    owner: str
    entry: StoredResponse | None = None  # the entry inline
    parts: int = 0  # else: how many parts, and their total size
    size: int = 0


class ResponseStoreUnavailable(ServiceUnavailable):
    code = "response_store_unavailable"


class ResponseTooLarge(PayloadTooLarge):
    code = "response_too_large"


class ResponseMissing(Exception):
    """A response of a chain is not stored (never was, expired, deleted, or not the
    caller's)."""

    def __init__(self, response_id: str) -> None:
        super().__init__(response_id)
        self.response_id = response_id


_encode = msgspec.json.Encoder().encode
_head_decoder = msgspec.json.Decoder(_Head)
_entry_decoder = msgspec.json.Decoder(StoredResponse)


def stream_config(ttl_s: float, max_bytes: int = -1, replicas: int = 1) -> StreamConfig:
    """The bucket's stream: KV's layout (nats-py `create_key_value`), discarding the oldest
    entries when full."""
    return StreamConfig(
        name=RESPONSES_STREAM,
        description="llmfleet stored responses (/v1/responses)",
        subjects=[f"$KV.{RESPONSES_BUCKET}.>"],
        allow_rollup_hdrs=True,
        allow_direct=True,  # kv.get as a direct get: measured 20-50 µs less per read
        deny_delete=True,
        discard=DiscardPolicy.OLD,
        duplicate_window=min(120.0, ttl_s),
        max_age=ttl_s,
        max_bytes=max_bytes,
        max_consumers=-1,
        max_msg_size=-1,
        max_msgs=-1,
        max_msgs_per_subject=1,
        num_replicas=replicas,
        storage=StorageType.FILE,
    )


async def open_bucket(js: JetStreamContext, config: StreamConfig, create: bool) -> KeyValue:
    """The bucket, created if missing (and `create`), its TTL and size cap brought to
    `config`; StoreUnavailable (BucketMissing) else."""
    try:
        info = await js.stream_info(RESPONSES_STREAM)
    except nats.js.errors.NotFoundError:
        if not create:
            raise BucketMissing(f"the KV bucket {RESPONSES_BUCKET} does not exist") from None
        try:
            await js.add_stream(config)
        except NATS_ERRORS as exc:
            try:  # another gateway created it first
                await js.stream_info(RESPONSES_STREAM)
            except NATS_ERRORS:
                raise StoreUnavailable(
                    f"cannot create the KV bucket {RESPONSES_BUCKET}", exc
                ) from exc
    except NATS_ERRORS as exc:
        raise StoreUnavailable(f"cannot open the KV bucket {RESPONSES_BUCKET}", exc) from exc
    else:
        cur = info.config
        if (cur.max_age, cur.max_bytes, cur.discard) != (
            config.max_age,
            config.max_bytes,
            config.discard,
        ):
            try:
                await js.update_stream(config)
            except NATS_ERRORS as exc:
                log.warning("could not update the KV bucket %s: %s", RESPONSES_BUCKET, exc)
    try:
        return await js.key_value(RESPONSES_BUCKET)
    except NATS_ERRORS as exc:
        raise StoreUnavailable(f"cannot open the KV bucket {RESPONSES_BUCKET}", exc) from exc


def part_bytes_for(max_payload: int) -> int:
    """The largest part a KV value of the broker takes (a put has no headers)."""
    return max(1024, max_payload - PART_MARGIN)


class ResponseStore:
    """Stored responses over one KV bucket (`open` makes one). Every method raises
    ResponseStoreUnavailable when the broker fails."""

    def __init__(
        self,
        kv: KeyValue,
        *,
        part_bytes: int,
        ttl_s: float,
        cache_entries: int = CACHE_ENTRIES,
        cache_bytes: int = CACHE_BYTES,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.kv = kv
        self.part_bytes = part_bytes
        self.ttl_s = ttl_s
        self.cache_entries = cache_entries
        self.cache_bytes = cache_bytes
        self.clock = clock
        # id -> (entry, its size, when it leaves the bucket). Mutated only between awaits.
        self._cache: OrderedDict[str, tuple[StoredResponse, int, float]] = OrderedDict()
        self._cached_bytes = 0
        self.stored = 0
        self.failed = 0

    @classmethod
    async def open(
        cls,
        js: JetStreamContext,
        *,
        ttl_s: float,
        max_bytes: int = -1,
        replicas: int = 1,
        max_payload: int = 1024 * 1024,
        create: bool = True,
    ) -> ResponseStore:
        kv = await open_bucket(js, stream_config(ttl_s, max_bytes, replicas), create)
        return cls(kv, part_bytes=part_bytes_for(max_payload), ttl_s=ttl_s)

    # ---- writes ---------------------------------------------------------------------

    async def put(self, entry: StoredResponse) -> None:
        """Store `entry` (parts first, the head last)."""
        if not _ID.match(entry.id):
            raise ValueError(f"not a storable response id: {entry.id!r}")
        inline = _encode(_Head(owner=entry.owner, entry=entry))
        try:
            if len(inline) <= self.part_bytes:
                await self.kv.put(entry.id, inline)
                size = len(inline)
            else:
                size = await self._put_parts(entry)
        except NATS_ERRORS as exc:
            self.failed += 1
            raise ResponseStoreUnavailable(
                "The response could not be stored.", retry_after=2.0
            ) from exc
        self.stored += 1
        self._remember(entry, size)

    async def _put_parts(self, entry: StoredResponse) -> int:
        raw = _encode(entry)
        step = self.part_bytes
        parts = [raw[i : i + step] for i in range(0, len(raw), step)]
        if len(parts) > MAX_PARTS:
            raise ResponseTooLarge(
                f"The response is too large to store ({len(raw)} bytes; at most "
                f"{MAX_PARTS * step}).",
            )
        await asyncio.gather(*(self.kv.put(f"{entry.id}.{n}", b) for n, b in enumerate(parts)))
        await self.kv.put(
            entry.id, _encode(_Head(owner=entry.owner, parts=len(parts), size=len(raw)))
        )
        return len(raw)

    async def delete(self, owner: str, response_id: str) -> bool:
        """Delete the caller's response; False if there is none (or it is not theirs)."""
        head = await self._head(response_id)
        if head is None or head.owner != owner:
            return False
        self._forget(response_id)
        try:
            await self.kv.delete(response_id)
            if head.parts:
                await asyncio.gather(
                    *(self.kv.delete(f"{response_id}.{n}") for n in range(head.parts))
                )
        except NATS_ERRORS as exc:
            raise ResponseStoreUnavailable("The response could not be deleted.") from exc
        return True

    # ---- reads ----------------------------------------------------------------------

    async def get(self, owner: str, response_id: str) -> StoredResponse | None:
        """The caller's response, read from the bucket; None if missing or not theirs."""
        return (await self._get(owner, response_id, None))[0]

    async def _get(
        self, owner: str, response_id: str, budget: int | None
    ) -> tuple[StoredResponse | None, int]:
        """`get`, and the entry's stored size; an entry larger than `budget` is refused
        (`history_too_large`) before its parts are read."""
        head = await self._head(response_id)
        if head is None or head.owner != owner:
            return None, 0
        if budget is not None and head.size > budget:
            raise _history_too_large()
        entry = head.entry
        if entry is None:
            cached = self._cached(response_id)
            entry = cached if cached is not None else await self._parts(response_id, head)
            if entry is None:
                return None, 0
        if entry.owner != owner or entry.id != response_id:
            return None, 0
        self._remember(entry, head.size)
        return entry, head.size

    async def chain(
        self,
        owner: str,
        response_id: str,
        max_depth: int = MAX_CHAIN,
        max_bytes: int | None = None,
    ) -> list[StoredResponse]:
        """The response and those it continues, oldest first; ResponseMissing naming the
        first one not found (or not the caller's). The named one is read from the bucket,
        its ancestors from the cache when there. A history of more than `max_bytes` stored
        bytes is refused as it is walked (400 `history_too_large`): a tiny request must
        not make the gateway load gigabytes of history."""
        out: list[StoredResponse] = []
        left = max_bytes
        entry, size = await self._get(owner, response_id, left)
        while True:
            if entry is None:
                raise ResponseMissing(response_id)
            if left is not None:
                left -= size
                if left < 0:
                    raise _history_too_large()
            out.append(entry)
            prev = entry.previous_response_id
            if prev is None:
                break
            if len(out) >= max_depth:
                raise InvalidRequest(
                    f"The conversation is longer than {max_depth} responses; start a new one.",
                    param="previous_response_id",
                    code="conversation_too_long",
                )
            response_id = prev
            cached = self._cached(prev)
            entry = cached if cached is not None and cached.owner == owner else None
            if entry is not None:
                size = self._cache[prev][1]
            else:
                entry, size = await self._get(owner, prev, left)
        out.reverse()
        return out

    async def _head(self, response_id: str) -> _Head | None:
        if not _ID.match(response_id):
            return None
        raw = await self._read(response_id)
        if raw is None:
            return None
        try:
            head = _head_decoder.decode(raw)
        except msgspec.DecodeError:
            log.warning("stored response %s is damaged (its head); treated as missing", response_id)
            return None
        if head.entry is not None:
            head.size = len(raw)
        return head

    async def _parts(self, response_id: str, head: _Head) -> StoredResponse | None:
        if head.parts > MAX_PARTS:
            return None
        parts = await asyncio.gather(*(self._read(f"{response_id}.{n}") for n in range(head.parts)))
        if any(part is None for part in parts):
            return None  # aged out or discarded before its head
        raw = b"".join(part for part in parts if part is not None)
        try:
            return _entry_decoder.decode(raw)
        except msgspec.DecodeError:
            log.warning(
                "stored response %s is damaged (its parts); treated as missing", response_id
            )
            return None

    async def _read(self, key: str) -> bytes | None:
        try:
            entry = await self.kv.get(key)
        except nats.js.errors.KeyNotFoundError:
            return None
        except NATS_ERRORS as exc:
            raise ResponseStoreUnavailable(
                "Stored responses cannot be read right now.", retry_after=2.0
            ) from exc
        return entry.value or None

    # ---- the cache ------------------------------------------------------------------

    def _cached(self, response_id: str) -> StoredResponse | None:
        hit = self._cache.get(response_id)
        if hit is None:
            return None
        if hit[2] <= self.clock():
            self._forget(response_id)
            return None
        self._cache.move_to_end(response_id)
        return hit[0]

    def _remember(self, entry: StoredResponse, size: int) -> None:
        if size > self.cache_bytes // 4:
            return  # a few big entries would push out everything else
        self._forget(entry.id)
        self._cache[entry.id] = (entry, size, entry.created_at + self.ttl_s)
        self._cached_bytes += size
        while len(self._cache) > self.cache_entries or self._cached_bytes > self.cache_bytes:
            _, (_, old, _) = self._cache.popitem(last=False)
            self._cached_bytes -= old

    def _forget(self, response_id: str) -> None:
        hit = self._cache.pop(response_id, None)
        if hit is not None:
            self._cached_bytes -= hit[1]
