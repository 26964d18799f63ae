"""The gateway's copy of the keys: a KV watch on `LLMFLEET_KEYS`, applied as it arrives.

`Keyring.run()` is the one task that owns the copy: it reads every entry, then applies
each change the watch delivers (a revocation reaches a running gateway in milliseconds;
the promise is 2 s). When the watch fails (the broker restarted, the connection dropped)
it starts over with a fresh read. Request handlers only call the synchronous
`lookup()`, which reads the latest frozen maps: no read gates a mutation.

Until the first read is complete `ready` is unset and `lookup()` finds nothing: with
`--auth keys` a gateway that has not seen the keys admits no one (fail closed).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

import msgspec
from nats.js.api import DeliverPolicy

from common.natsconn import NATS_ERRORS
from control.keys import PRICES_DECODER, KeyRecord, PriceTable, hash_secret, live_hashes, usable
from control.store import (
    KEY_PREFIX,
    KEYS_BUCKET,
    PRICES_KEY,
    BucketMissing,
    StoreUnavailable,
    decode_record,
    keys_config,
    open_bucket,
)

log = logging.getLogger(__name__)

RETRY_S = 1.0
FORGED = b"\x00forged"  # a price entry that must not be read (never valid JSON)
KEYS_STREAM = "KV_" + KEYS_BUCKET
WATCH_PREFIX = f"$KV.{KEYS_BUCKET}."
WATCH_BUFFER = 4096  # changes in flight from the watch (the callback waits when full)
# A watch that went quiet without an error (it should not) is replaced by a fresh read
# this often, so no change can be missed for longer.
RESYNC_S = 30.0
_WATCH_ERRORS: tuple[type[Exception], ...] = (StoreUnavailable, *NATS_ERRORS)


class Keyring:
    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self.ready = asyncio.Event()
        self._records: dict[str, KeyRecord] = {}  # name -> record
        self._by_hash: dict[str, str] = {}  # sha256 -> name
        self.prices = PriceTable()
        # False while the price table's latest entry could not be trusted (forged or
        # malformed): cost budgets then refuse rather than count every request as free.
        self.prices_ok = True
        self.changes = 0  # entries applied (tests and metrics)
        self.forged = 0  # entries refused: not written by an admin
        self.restarts = 0
        self._restart = asyncio.Event()

    def restart(self) -> None:
        """Read everything again (called after a reconnect: a watch may have missed
        changes while the broker was away)."""
        self._restart.set()

    # ---- reads (request handlers) -------------------------------------------------------

    def lookup(self, secret: str) -> KeyRecord | None:
        """The usable key whose live secret this is, else None (unknown, expired,
        revoked, or a rotated-out secret past its overlap)."""
        if not secret:
            return None
        digest = hash_secret(secret)
        name = self._by_hash.get(digest)
        if name is None:
            return None
        record = self._records.get(name)
        now = self.clock()
        if record is None or not usable(record, now):
            return None
        if digest not in live_hashes(record, now):
            return None
        return record

    def record(self, name: str) -> KeyRecord | None:
        return self._records.get(name)

    @property
    def records_held(self) -> bool:
        return bool(self._records)

    @property
    def names(self) -> list[str]:
        return sorted(self._records)

    # ---- the owner ----------------------------------------------------------------------

    def apply(self, key: str, value: bytes | None) -> None:
        """One KV entry (None: deleted)."""
        self.changes += 1
        if key == PRICES_KEY:
            self._set_prices(self._prices(value))
        elif key.startswith(KEY_PREFIX):
            name = key[len(KEY_PREFIX) :]
            records = dict(self._records)
            record = self._record(key, value)
            if record is None:
                records.pop(name, None)
            else:
                records[name] = record
            self._replace(records)

    @staticmethod
    def _record(key: str, value: bytes | None) -> KeyRecord | None:
        """The key entry `key` holds; None when deleted, malformed or misnamed."""
        if not value:
            return None
        record = decode_record(value)
        if record is None or KEY_PREFIX + record.name != key:
            log.warning("ignoring a malformed key entry %s (treated as deleted)", key)
            return None
        return record

    def _set_prices(self, table: PriceTable | None) -> None:
        """A new price table; None (untrusted): the last good one stays, and cost budgets
        refuse until a good one comes."""
        self.prices_ok = table is not None
        self.prices = table or self.prices

    @staticmethod
    def _prices(value: bytes | None) -> PriceTable | None:
        if not value:
            return PriceTable()
        try:
            return PRICES_DECODER.decode(value)
        except msgspec.MsgspecError:
            log.warning("ignoring a malformed price table in %s", KEYS_BUCKET)
            return None

    def _replace(self, records: dict[str, KeyRecord]) -> None:
        by_hash = {s.sha256: r.name for r in records.values() for s in r.secrets}
        self._records, self._by_hash = records, by_hash

    async def run(self, js: Any, create: bool = False) -> None:
        """Watch the bucket until cancelled, starting over after any failure. Gateways
        may not create the bucket (the admin's `llmfleet keys create` does): while it is
        missing there are no keys, and every request is refused."""
        missing_logged = False
        while True:
            try:
                await self._watch(js, create)
                continue  # restart() or the periodic resync asked for a fresh read
            except asyncio.CancelledError:
                raise
            except BucketMissing:
                if self.records_held:  # the bucket went away: so did its keys
                    log.warning("%s was deleted: no keys are valid now", KEYS_BUCKET)
                    self._load({})
                if not missing_logged:
                    log.warning("no keys yet: %s is missing (llmfleet keys create)", KEYS_BUCKET)
                    missing_logged = True
            except _WATCH_ERRORS as exc:
                log.warning("keys watch failed (%s); starting over", exc)
            except Exception:
                log.exception("keys watch failed; starting over")
            self.restarts += 1
            await asyncio.sleep(RETRY_S)

    async def _watch(self, js: Any, create: bool) -> None:
        """One watch: the latest entry of every key, then every change, as raw stream
        messages (nats-py's KV watcher hides their headers, and the headers are how a
        forged entry is told apart, see `_entry`)."""
        try:
            await open_bucket(js, keys_config(), create)
        except BucketMissing:
            if not self.ready.is_set():
                self._load({})  # no bucket yet: no keys, nobody is admitted
            raise
        loop = asyncio.get_running_loop()
        changes: asyncio.Queue[tuple[str, bytes | None, int]] = asyncio.Queue(WATCH_BUFFER)

        async def on_msg(msg: Any) -> None:
            key, value = self._entry(msg)
            await changes.put((key, value, msg.metadata.num_pending))

        sub = await js.subscribe(
            WATCH_PREFIX + ">",
            stream=KEYS_STREAM,
            cb=on_msg,
            ordered_consumer=True,
            deliver_policy=DeliverPolicy.LAST_PER_SUBJECT,
            inactive_threshold=300.0,
        )
        try:
            info = await sub.consumer_info()
            initial = not (info.num_pending == 0 and sub.delivered == 0)
            fresh: dict[str, bytes | None] = {}
            if not initial:
                self._load(fresh)
            until = loop.time() + RESYNC_S
            while True:
                if self._restart.is_set():
                    self._restart.clear()
                    return
                if not initial and loop.time() > until:
                    return
                try:
                    async with asyncio.timeout(0.5):
                        key, value, pending = await changes.get()
                except TimeoutError:
                    continue  # idle: the watch stays open
                if initial:
                    fresh[key] = value
                    if pending == 0:
                        self._load(fresh)
                        initial = False
                else:
                    self.apply(key, value)
        finally:
            await sub.unsubscribe()

    def _entry(self, msg: Any) -> tuple[str, bytes | None]:
        """(key, value; None for a delete) of one stored message. An entry that came
        through another stream's republish (it carries `Nats-Stream`) was not written by
        an admin: a role that may configure any stream could aim a republish at this
        bucket, and the server stores it. It counts as a delete (fail closed)."""
        key = msg.subject[len(WATCH_PREFIX) :]
        headers = msg.headers or {}
        if "Nats-Stream" in headers:
            self.forged += 1
            log.warning(
                "ignoring %s: republished from stream %r, not written by an admin",
                key,
                headers.get("Nats-Stream"),
            )
            return key, (FORGED if key == PRICES_KEY else None)
        if headers.get("KV-Operation") in ("DEL", "PURGE"):
            return key, None
        return key, msg.data or None

    def _load(self, entries: dict[str, bytes | None]) -> None:
        """Replace the whole copy with a fresh read (after a restart: deletions that
        happened meanwhile take effect too)."""
        records: dict[str, KeyRecord] = {}
        for key, value in entries.items():
            record = self._record(key, value) if key.startswith(KEY_PREFIX) else None
            if record is not None:
                records[record.name] = record
        self._set_prices(self._prices(entries.get(PRICES_KEY)))
        self._replace(records)
        self.ready.set()
        log.info("keys loaded: %d", len(self._records))
