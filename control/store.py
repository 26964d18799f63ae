"""The control layer's state in JetStream KV: keys and prices (`LLMFLEET_KEYS`), and the
fleet-wide quota ledgers and usage (`LLMFLEET_QUOTA`). Every write is compare-and-set on
the entry's revision, so two admins (or two gateways) never lose each other's change.

    ControlError
    ├── StoreUnavailable      the broker (or the bucket) cannot be reached, or denies us
    │   └── BucketMissing     the bucket does not exist
    ├── KeyExists             `keys create` of a name that is taken
    └── KeyMissing            no such key

Entries in LLMFLEET_KEYS:  k.<name> -> KeyRecord,  cfg.prices -> PriceTable,
                           routes -> the routes file's text (control/routes.py)
Entries in LLMFLEET_QUOTA: see control/ledger.py (`<key>.<dim>...`)
"""

from __future__ import annotations

from collections.abc import Callable

import msgspec
import nats.errors
import nats.js.errors
from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig, StorageType
from nats.js.kv import KeyValue

from common.natsconn import NATS_ERRORS
from control.keys import ENCODER, PRICES_DECODER, RECORD_DECODER, KeyRecord, PriceTable

KEYS_BUCKET = "LLMFLEET_KEYS"
QUOTA_BUCKET = "LLMFLEET_QUOTA"
KEY_PREFIX = "k."
PRICES_KEY = "cfg.prices"
ROUTES_KEY = "routes"  # the routes file's text, as pushed (control/routes.py)
CAS_TRIES = 50


class ControlError(Exception):
    pass


class StoreUnavailable(ControlError):
    def __init__(self, what: str, cause: BaseException | None = None) -> None:
        detail = f": {type(cause).__name__} {cause}".rstrip() if cause is not None else ""
        super().__init__(f"{what}{detail}")


class BucketMissing(StoreUnavailable):
    """The bucket does not exist (and we may not, or should not, create it)."""


class KeyExists(ControlError):
    def __init__(self, name: str) -> None:
        super().__init__(f"a key named {name!r} exists")
        self.name = name


class KeyMissing(ControlError):
    def __init__(self, name: str) -> None:
        super().__init__(f"no key named {name!r}")
        self.name = name


def _kv_config(bucket: str, description: str, history: int, replicas: int) -> KeyValueConfig:
    return KeyValueConfig(
        bucket=bucket,
        description=description,
        history=history,
        storage=StorageType.FILE,  # outlives a broker restart
        replicas=replicas,
    )


def keys_config(replicas: int = 1) -> KeyValueConfig:
    # History 5: a little to inspect after a change.
    return _kv_config(KEYS_BUCKET, "llmfleet virtual keys (hashes only) and prices", 5, replicas)


def quota_config(replicas: int = 1) -> KeyValueConfig:
    return _kv_config(
        QUOTA_BUCKET, "llmfleet fleet-wide rate limits, budgets and usage", 1, replicas
    )


async def open_bucket(js: JetStreamContext, config: KeyValueConfig, create: bool) -> KeyValue:
    """The bucket, created with `config` if missing and `create`; StoreUnavailable else.
    The admin's open of LLMFLEET_KEYS (`create`) also seals it (`_seal`)."""
    kv = await _open_bucket(js, config, create)
    if create and config.bucket == KEYS_BUCKET:
        await _seal(js, "KV_" + KEYS_BUCKET)
    return kv


async def _seal(js: JetStreamContext, stream: str) -> None:
    """No rollup headers on the keys bucket's stream. A `Nats-Rollup` message purges the
    entries before it; a role that may configure some stream could republish one into
    this bucket (the watches refuse the message itself, but the purge would already have
    erased the admin's keys, prices and routes). Nothing here purges: deletes are markers.
    Best effort: without the update right the bucket stays as it was."""
    try:
        info = await js.stream_info(stream)
        if info.config.allow_rollup_hdrs:
            info.config.allow_rollup_hdrs = False
            await js.update_stream(info.config)
    except NATS_ERRORS:
        pass


async def _open_bucket(js: JetStreamContext, config: KeyValueConfig, create: bool) -> KeyValue:
    try:
        return await js.key_value(config.bucket)
    except nats.js.errors.BucketNotFoundError:
        if not create:
            raise BucketMissing(f"the KV bucket {config.bucket} does not exist") from None
    except NATS_ERRORS as exc:
        raise StoreUnavailable(f"cannot open the KV bucket {config.bucket}", exc) from exc
    try:
        return await js.create_key_value(config)
    except NATS_ERRORS as exc:
        try:  # another process created it first
            return await js.key_value(config.bucket)
        except NATS_ERRORS:
            raise StoreUnavailable(f"cannot create the KV bucket {config.bucket}", exc) from exc


async def cas(
    kv: KeyValue,
    key: str,
    change: Callable[[bytes | None], bytes | None],
    tries: int = CAS_TRIES,
) -> bytes | None:
    """Read `key`, write `change(value)` if the entry is unchanged since the read (None
    value: missing; None result: write nothing), retrying on a concurrent write. Returns
    what was written (or the value left unchanged)."""
    for _ in range(tries):
        try:
            entry = await kv.get(key)
            value, revision = entry.value, entry.revision
        except nats.js.errors.KeyNotFoundError:
            value, revision = None, None
        new = change(value)
        if new is None:
            return value
        try:
            if revision is None:
                await kv.create(key, new)
            else:
                await kv.update(key, new, last=revision)
            return new
        except (nats.js.errors.KeyWrongLastSequenceError, nats.js.errors.BadRequestError):
            continue  # someone wrote in between: read again
        except nats.js.errors.APIError as exc:
            if exc.err_code == 10071:  # wrong last sequence
                continue
            raise
    raise StoreUnavailable(f"{key}: too many concurrent writers")


class KeyStore:
    """Admin-side access to LLMFLEET_KEYS (the CLI). `open()` first."""

    def __init__(self, js: JetStreamContext, replicas: int = 1) -> None:
        self._js = js
        self._replicas = replicas
        self._kv: KeyValue | None = None

    async def open(self, create: bool = True) -> KeyStore:
        self._kv = await open_bucket(self._js, keys_config(self._replicas), create)
        return self

    @property
    def kv(self) -> KeyValue:
        assert self._kv is not None, "KeyStore.open() first"
        return self._kv

    async def get(self, name: str) -> KeyRecord:
        try:
            entry = await self.kv.get(KEY_PREFIX + name)
        except nats.js.errors.KeyNotFoundError:
            raise KeyMissing(name) from None
        except NATS_ERRORS as exc:
            raise StoreUnavailable("cannot read keys", exc) from exc
        assert entry.value is not None
        return RECORD_DECODER.decode(entry.value)

    async def create(self, record: KeyRecord) -> None:
        try:
            await self.kv.create(KEY_PREFIX + record.name, ENCODER.encode(record))
        except (nats.js.errors.KeyWrongLastSequenceError, nats.js.errors.BadRequestError):
            raise KeyExists(record.name) from None
        except nats.js.errors.APIError as exc:
            if exc.err_code == 10071:
                raise KeyExists(record.name) from None
            raise StoreUnavailable("cannot write keys", exc) from exc
        except NATS_ERRORS as exc:
            raise StoreUnavailable("cannot write keys", exc) from exc

    async def update(self, name: str, change: Callable[[KeyRecord], KeyRecord]) -> KeyRecord:
        """Apply `change` to the stored record, compare-and-set; KeyMissing if none."""
        out: dict[str, KeyRecord] = {}

        def step(raw: bytes | None) -> bytes | None:
            if raw is None:
                raise KeyMissing(name)
            out["new"] = change(RECORD_DECODER.decode(raw))
            return ENCODER.encode(out["new"])

        try:
            await cas(self.kv, KEY_PREFIX + name, step)
        except NATS_ERRORS as exc:
            raise StoreUnavailable("cannot write keys", exc) from exc
        return out["new"]

    async def list(self) -> list[KeyRecord]:
        try:
            names = await self.kv.keys()
        except nats.js.errors.NoKeysError:
            return []
        except NATS_ERRORS as exc:
            raise StoreUnavailable("cannot list keys", exc) from exc
        records = []
        for key in sorted(names):
            if key.startswith(KEY_PREFIX):
                try:
                    records.append(await self.get(key[len(KEY_PREFIX) :]))
                except KeyMissing:
                    continue  # deleted meanwhile
        return records

    async def prices(self) -> PriceTable:
        try:
            entry = await self.kv.get(PRICES_KEY)
        except nats.js.errors.KeyNotFoundError:
            return PriceTable()
        except NATS_ERRORS as exc:
            raise StoreUnavailable("cannot read prices", exc) from exc
        return PRICES_DECODER.decode(entry.value or b"{}")

    async def update_prices(self, change: Callable[[PriceTable], PriceTable]) -> PriceTable:
        out: dict[str, PriceTable] = {}

        def step(raw: bytes | None) -> bytes:
            out["new"] = change(PRICES_DECODER.decode(raw) if raw else PriceTable())
            return ENCODER.encode(out["new"])

        try:
            await cas(self.kv, PRICES_KEY, step)
        except NATS_ERRORS as exc:
            raise StoreUnavailable("cannot write prices", exc) from exc
        return out["new"]


def decode_record(raw: bytes) -> KeyRecord | None:
    """A stored KeyRecord, or None if the entry is not one (never raises)."""
    try:
        return RECORD_DECODER.decode(raw)
    except (msgspec.ValidationError, msgspec.DecodeError):
        return None
