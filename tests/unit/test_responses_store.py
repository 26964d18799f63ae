"""gateway/responses_store.py against a real nats-server: entries inline and in parts,
ownership, chains, deletes, the cache, the bucket's TTL and size cap (the oldest go)."""

from __future__ import annotations

import secrets
import time
from collections.abc import AsyncIterator
from typing import Any

import nats
import nats.js.api as api
import nats.js.errors
import pytest
from nats.aio.client import Client

from common.errors import InvalidRequest
from gateway.responses_store import (
    MAX_PARTS,
    RESPONSES_BUCKET,
    RESPONSES_STREAM,
    ResponseMissing,
    ResponseStore,
    ResponseStoreUnavailable,
    ResponseTooLarge,
    StoredResponse,
    part_bytes_for,
    stream_config,
)

TTL = 3600.0


@pytest.fixture(scope="module")
async def nc(nats_url: str) -> AsyncIterator[Client]:
    conn = await nats.connect(nats_url)
    try:
        yield conn
    finally:
        await conn.drain()


@pytest.fixture(scope="module")
async def store(nc: Client) -> ResponseStore:
    return await ResponseStore.open(nc.jetstream(), ttl_s=TTL, max_payload=nc.max_payload)


def fresh(store: ResponseStore, part_bytes: int | None = None) -> ResponseStore:
    """Another gateway's view of the same bucket (an empty cache)."""
    return ResponseStore(store.kv, part_bytes=part_bytes or store.part_bytes, ttl_s=TTL)


def rid() -> str:
    return "resp_" + secrets.token_hex(12)


def entry(
    owner: str = "alice",
    text: str = "hi",
    previous: str | None = None,
    response_id: str | None = None,
) -> StoredResponse:
    response_id = response_id or rid()
    return StoredResponse(
        id=response_id,
        owner=owner,
        created_at=int(time.time()),
        input=[
            {
                "id": "msg_1",
                "type": "message",
                "role": "user",
                "content": [{"type": "input_text", "text": text}],
            }
        ],
        output=[{"id": "msg_2", "type": "message", "role": "assistant", "content": []}],
        response={"id": response_id, "object": "response", "status": "completed"},
        previous_response_id=previous,
    )


async def keys(store: ResponseStore) -> set[str]:
    try:
        return set(await store.kv.keys())
    except nats.js.errors.NoKeysError:
        return set()


async def test_the_bucket_is_file_backed_with_the_ttl_and_drops_the_oldest(
    nc: Client, store: ResponseStore
) -> None:
    info = await nc.jetstream().stream_info(RESPONSES_STREAM)
    cfg = info.config
    assert cfg.storage == api.StorageType.FILE
    assert cfg.max_age == TTL
    assert cfg.discard == api.DiscardPolicy.OLD
    assert cfg.max_msgs_per_subject == 1
    assert cfg.subjects == [f"$KV.{RESPONSES_BUCKET}.>"]
    # Reopened with other settings: brought up to date, same bucket.
    again = await ResponseStore.open(nc.jetstream(), ttl_s=2 * TTL, max_bytes=64 * 1024 * 1024)
    cfg = (await nc.jetstream().stream_info(RESPONSES_STREAM)).config
    assert (cfg.max_age, cfg.max_bytes) == (2 * TTL, 64 * 1024 * 1024)
    await ResponseStore.open(nc.jetstream(), ttl_s=TTL)
    assert again.kv._stream == RESPONSES_STREAM


async def test_put_then_get_by_its_owner_only(store: ResponseStore) -> None:
    e = entry()
    await store.put(e)
    other = fresh(store)
    assert await other.get("alice", e.id) == e
    assert await other.get("bob", e.id) is None  # another principal's: missing
    assert await other.get("alice", rid()) is None
    for bad in ("", "resp.x", "resp_*", "resp_>", "a" * 300, "resp x"):
        assert await other.get("alice", bad) is None  # never a subject of its own


async def test_an_entry_over_one_value_is_split_into_parts(store: ResponseStore) -> None:
    small = fresh(store, part_bytes=2048)
    big = entry(text="y" * 10_000)
    await small.put(big)
    stored = await keys(store)
    parts = sorted(k for k in stored if k.startswith(big.id + "."))
    assert big.id in stored and len(parts) >= 5
    got = await fresh(store).get("alice", big.id)
    assert got == big
    assert await fresh(store).get("bob", big.id) is None
    assert await small.delete("alice", big.id)
    left = await keys(store)
    assert not any(k == big.id or k.startswith(big.id + ".") for k in left)


async def test_an_entry_whose_parts_are_gone_reads_as_missing(store: ResponseStore) -> None:
    small = fresh(store, part_bytes=1024)
    big = entry(text="z" * 5000)
    await small.put(big)
    await store.kv.delete(big.id + ".1")  # aged out before its head
    assert await fresh(store).get("alice", big.id) is None


async def test_a_damaged_head_reads_as_missing(store: ResponseStore) -> None:
    e = rid()
    await store.kv.put(e, b"not json")
    assert await fresh(store).get("alice", e) is None


async def test_too_many_parts_is_refused(store: ResponseStore) -> None:
    tiny = fresh(store, part_bytes=1024)
    with pytest.raises(ResponseTooLarge) as info:
        await tiny.put(entry(text="q" * (1024 * (MAX_PARTS + 1))))
    assert info.value.status == 413


async def test_delete_is_for_the_owner_and_is_seen_by_every_store(store: ResponseStore) -> None:
    e = entry()
    await store.put(e)
    assert await store.get("alice", e.id) is not None  # cached here now
    other = fresh(store)
    assert not await other.delete("bob", e.id)
    assert await other.get("alice", e.id) is not None
    assert await other.delete("alice", e.id)
    assert not await other.delete("alice", e.id)
    assert await store.get("alice", e.id) is None  # the named response is never cached


async def test_chain_walks_oldest_first_and_checks_every_link(store: ResponseStore) -> None:
    a = entry(text="one")
    b = entry(text="two", previous=a.id)
    c = entry(text="three", previous=b.id)
    for e in (a, b, c):
        await store.put(e)
    assert [e.id for e in await fresh(store).chain("alice", c.id)] == [a.id, b.id, c.id]
    assert [e.id for e in await store.chain("alice", a.id)] == [a.id]
    with pytest.raises(ResponseMissing) as missing:
        await fresh(store).chain("bob", c.id)
    assert missing.value.response_id == c.id
    # A missing link (deleted, expired) breaks the chain where it is.
    await fresh(store).delete("alice", b.id)
    with pytest.raises(ResponseMissing) as missing:
        await fresh(store).chain("alice", c.id)
    assert missing.value.response_id == b.id
    # Another owner's link reads as missing too.
    d = entry(owner="bob", previous=a.id)
    await store.put(d)
    with pytest.raises(ResponseMissing) as missing:
        await fresh(store).chain("bob", d.id)
    assert missing.value.response_id == a.id


async def test_chain_is_bounded(store: ResponseStore) -> None:
    prev = None
    for _ in range(4):
        e = entry(previous=prev)
        await store.put(e)
        prev = e.id
    assert prev is not None
    assert len(await store.chain("alice", prev, max_depth=4)) == 4
    with pytest.raises(InvalidRequest) as info:
        await store.chain("alice", prev, max_depth=3)
    assert info.value.param == "previous_response_id"


async def test_chain_is_bounded_in_bytes_as_it_is_walked(store: ResponseStore) -> None:
    prev = None
    for _ in range(4):
        e = entry(text="x" * 10_000, previous=prev)
        await store.put(e)
        prev = e.id
    assert prev is not None
    for s in (store, fresh(store)):  # ancestors from the cache, and from the bucket
        assert len(await s.chain("alice", prev, max_bytes=100_000)) == 4
        with pytest.raises(InvalidRequest) as info:
            await s.chain("alice", prev, max_bytes=25_000)
        assert info.value.code == "history_too_large"
        with pytest.raises(InvalidRequest):  # the named entry alone is over the budget
            await s.chain("alice", prev, max_bytes=5_000)


class CountingKV:
    """The store's KV, counting the reads that reach the broker."""

    def __init__(self, kv: Any) -> None:
        self.kv = kv
        self.reads: list[str] = []

    async def get(self, key: str) -> Any:
        self.reads.append(key)
        return await self.kv.get(key)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.kv, name)


async def test_ancestors_come_from_the_cache(store: ResponseStore) -> None:
    counting = CountingKV(store.kv)
    s = ResponseStore(counting, part_bytes=store.part_bytes, ttl_s=TTL)  # type: ignore[arg-type]
    a = entry()
    b = entry(previous=a.id)
    await s.put(a)
    await s.put(b)
    assert [e.id for e in await s.chain("alice", b.id)] == [a.id, b.id]
    assert counting.reads == [b.id]  # the named one fresh, its ancestor cached


async def test_the_cache_is_bounded_and_expires(store: ResponseStore) -> None:
    now = [time.time()]
    s = ResponseStore(store.kv, part_bytes=store.part_bytes, ttl_s=60, cache_entries=2)
    s.clock = lambda: now[0]
    es = [entry() for _ in range(3)]
    for e in es:
        await s.put(e)
    assert list(s._cache) == [es[1].id, es[2].id]
    assert s._cached(es[2].id) is not None
    now[0] += 120
    assert s._cached(es[2].id) is None
    big = ResponseStore(store.kv, part_bytes=store.part_bytes, ttl_s=60, cache_bytes=4096)
    await big.put(entry(text="b" * 2000))
    assert not big._cache  # bigger than a quarter of the cache: not kept


async def test_a_full_bucket_drops_its_oldest_responses(nc: Client, store: ResponseStore) -> None:
    js = nc.jetstream()
    await js.update_stream(stream_config(TTL, max_bytes=64 * 1024))
    try:
        kv = await js.key_value(RESPONSES_BUCKET)
        s = ResponseStore(kv, part_bytes=part_bytes_for(nc.max_payload), ttl_s=TTL)
        written = []
        for _ in range(40):  # ~80 KiB into a 64 KiB bucket: every put succeeds
            e = entry(text="w" * 2000)
            await s.put(e)
            written.append(e.id)
        reader = ResponseStore(kv, part_bytes=s.part_bytes, ttl_s=TTL)
        assert await reader.get("alice", written[0]) is None
        assert await reader.get("alice", written[-1]) is not None
    finally:
        await js.update_stream(stream_config(TTL))  # the module's other tests: no cap


async def test_a_broker_failure_is_a_503(nats_url: str, store: ResponseStore) -> None:
    conn = await nats.connect(nats_url)
    s = await ResponseStore.open(conn.jetstream(timeout=0.5), ttl_s=TTL)
    await conn.close()
    with pytest.raises(ResponseStoreUnavailable) as info:
        await s.get("alice", rid())
    assert info.value.status == 503
    with pytest.raises(ResponseStoreUnavailable):
        await s.put(entry())
    assert s.failed == 1
