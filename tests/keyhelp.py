"""Virtual keys for end-to-end tests, written straight into `LLMFLEET_KEYS` (as the admin
CLI would), and the usage ledger read back from `LLMFLEET_QUOTA`.

Each helper opens its own connection: tests call them between requests, not on a hot path.
"""

from __future__ import annotations

import time
from typing import Any

import msgspec
import nats.js.errors

from control import ledger
from control.keys import KeyRecord, Secret, hash_secret, new_secret, period_id
from control.store import QUOTA_BUCKET, KeyStore
from tests.natshelp import connected


def _secret(secret: str, expires_at: float | None = None) -> Secret:
    return Secret(sha256=hash_secret(secret), created_at=time.time(), expires_at=expires_at)


async def make_key(nats_url: str, name: str, **fields: Any) -> str:
    """Create the key `name` with `fields` (KeyRecord's); returns its one secret."""
    secret = new_secret()
    now = time.time()
    record = KeyRecord(
        name=name, secrets=(_secret(secret),), created_at=now, updated_at=now, **fields
    )
    async with connected(nats_url) as nc:
        store = await KeyStore(nc.jetstream()).open()
        await store.create(record)
    return secret


async def update_key(nats_url: str, name: str, **fields: Any) -> KeyRecord:
    """Set `fields` on the stored key (compare-and-set); returns the new record."""
    async with connected(nats_url) as nc:
        store = await KeyStore(nc.jetstream()).open()
        return await store.update(
            name, lambda r: msgspec.structs.replace(r, updated_at=time.time(), **fields)
        )


async def revoke(nats_url: str, name: str) -> KeyRecord:
    return await update_key(nats_url, name, revoked_at=time.time())


async def rotate(nats_url: str, name: str, overlap_s: float) -> tuple[str, float]:
    """Add a new secret to `name`; its current secrets keep working `overlap_s` more.
    Returns the new secret and when the old ones stop working (Unix time)."""
    secret = new_secret()
    until = time.time() + overlap_s

    def change(r: KeyRecord) -> KeyRecord:
        old = tuple(
            msgspec.structs.replace(s, expires_at=until if s.expires_at is None else s.expires_at)
            for s in r.secrets
        )
        return msgspec.structs.replace(r, secrets=(*old, _secret(secret)), updated_at=time.time())

    async with connected(nats_url) as nc:
        store = await KeyStore(nc.jetstream()).open()
        await store.update(name, change)
    return secret, until


async def read_usage(nats_url: str, name: str, period: str = "total") -> ledger.Usage | None:
    """What the gateways recorded as `name`'s real usage in `period` (day, month, total)."""
    async with connected(nats_url) as nc:
        kv = await nc.jetstream().key_value(QUOTA_BUCKET)
        try:
            entry = await kv.get(ledger.usage_key(name, period_id(period, time.time())))
        except nats.js.errors.KeyNotFoundError:
            return None
        return ledger.USAGE_DECODER.decode(entry.value or b"{}")


async def read_ledger(nats_url: str, key: str) -> bytes | None:
    """The raw value of one entry in LLMFLEET_QUOTA (None: missing)."""
    async with connected(nats_url) as nc:
        kv = await nc.jetstream().key_value(QUOTA_BUCKET)
        try:
            return (await kv.get(key)).value
        except nats.js.errors.KeyNotFoundError:
            return None
