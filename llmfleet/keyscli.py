"""`llmfleet keys` (create, list, show, update, revoke, rotate): virtual keys in the KV
bucket LLMFLEET_KEYS, written compare-and-set through `control.store.KeyStore`.

A secret is printed once, when it is made (`create`, `rotate`); only its SHA-256 is
stored, and no command prints a hash. What a command changes is decided by plain
functions (`new_record`, `apply_edit`, `rotated`, `revoked`) over a `KeyEdit` read from
the flags; `--json` prints `KeyView` documents (every field present, times as Unix
seconds). `llmfleet usage` and `llmfleet prices` live in llmfleet/usagecli.py. Errors:
AdminError (llmfleet/adminconn.py), one line.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import msgspec
from rich.table import Table
from rich.text import Text

from control.keys import KeyRecord, Secret, hash_secret, new_secret, usable
from control.store import BucketMissing, KeyMissing, KeyStore, StoreUnavailable
from llmfleet.adminconn import (
    API_TIMEOUT_S,
    AdminError,
    Target,
    admin_session,
    console,
    print_json,
    when,
)
from llmfleet.adminflags import LIMITS

MAX_SECRETS = 8  # live secrets per key: rotations with long overlaps keep at most this many


class KeyEdit(msgspec.Struct, frozen=True, kw_only=True):
    """What `keys create` or `keys update` asks for; None (or empty): leave as it is."""

    models: tuple[str, ...] | None = None
    add_models: tuple[str, ...] = ()
    remove_models: tuple[str, ...] = ()
    rpm: int | None = None
    tpm: int | None = None
    max_parallel: int | None = None
    budget_tokens: int | None = None
    budget_cost: float | None = None
    budget_period: str | None = None
    expires_at: float | None = None
    no_expires: bool = False
    admin: bool | None = None
    description: str | None = None
    clear: tuple[str, ...] = ()  # names in LIMITS


class SecretView(msgspec.Struct, frozen=True):
    created_at: float
    expires_at: float | None


class KeyView(msgspec.Struct, frozen=True, kw_only=True):
    """A key as `--json` prints it: its record without hashes, and its state."""

    name: str
    state: str  # active | expired | revoked
    models: tuple[str, ...]
    admin: bool
    rpm: int | None
    tpm: int | None
    max_parallel: int | None
    budget_tokens: int | None
    budget_cost: float | None
    budget_period: str
    expires_at: float | None
    revoked_at: float | None
    created_at: float
    updated_at: float
    description: str
    secrets: tuple[SecretView, ...]


class NewSecret(KeyView, frozen=True, kw_only=True):
    """`keys create --json` / `keys rotate --json`: the key's view and its new secret
    (shown this once)."""

    secret: str


# ---- decisions (pure) ------------------------------------------------------------------


def state(record: KeyRecord, now: float) -> str:
    if record.revoked_at is not None and record.revoked_at <= now:
        return "revoked"
    return "active" if usable(record, now) else "expired"


def view(record: KeyRecord, now: float) -> KeyView:
    return KeyView(
        name=record.name,
        state=state(record, now),
        models=record.models,
        admin=record.admin,
        rpm=record.rpm,
        tpm=record.tpm,
        max_parallel=record.max_parallel,
        budget_tokens=record.budget_tokens,
        budget_cost=record.budget_cost,
        budget_period=record.budget_period,
        expires_at=record.expires_at,
        revoked_at=record.revoked_at,
        created_at=record.created_at,
        updated_at=record.updated_at,
        description=record.description,
        secrets=tuple(SecretView(s.created_at, s.expires_at) for s in record.secrets),
    )


def apply_edit(record: KeyRecord, edit: KeyEdit, now: float) -> KeyRecord:
    """`record` with `edit` applied and `updated_at` = now. ValueError: a limit both set and
    cleared."""
    models = record.models if edit.models is None else edit.models
    models = (*models, *(m for m in edit.add_models if m not in models))
    models = tuple(m for m in models if m not in edit.remove_models)
    changes: dict[str, Any] = {"models": models, "updated_at": now}
    for flag in LIMITS:
        field = flag.replace("-", "_")
        value = getattr(edit, field)
        if flag in edit.clear:
            if value is not None:
                raise ValueError(f"--{flag} and --clear {flag} contradict each other")
            changes[field] = None
        elif value is not None:
            changes[field] = value
    for field in ("budget_period", "admin", "description", "expires_at"):
        value = getattr(edit, field)
        if value is not None:
            changes[field] = value
    if edit.no_expires:
        if edit.expires_at is not None:
            raise ValueError("--expires and --no-expires contradict each other")
        changes["expires_at"] = None
    return msgspec.structs.replace(record, **changes)


def new_record(name: str, secret: str, edit: KeyEdit, now: float) -> KeyRecord:
    base = KeyRecord(
        name=name,
        secrets=(Secret(sha256=hash_secret(secret), created_at=now),),
        created_at=now,
        updated_at=now,
    )
    return apply_edit(base, edit, now)


def rotated(record: KeyRecord, secret: str, overlap_s: float, now: float) -> KeyRecord:
    """A new secret; the old ones work `overlap_s` more at most (one that expires sooner
    keeps its expiry; an expired one is dropped), the newest MAX_SECRETS kept."""
    until = now + overlap_s
    old = [
        msgspec.structs.replace(
            s, expires_at=until if s.expires_at is None else min(s.expires_at, until)
        )
        for s in record.secrets
    ]
    live = [s for s in old if s.expires_at is not None and s.expires_at > now]
    fresh = Secret(sha256=hash_secret(secret), created_at=now)
    kept = (*live[-(MAX_SECRETS - 1) :], fresh)
    return msgspec.structs.replace(record, secrets=kept, updated_at=now)


def revoked(record: KeyRecord, now: float) -> KeyRecord:
    """Revoked from now on (an earlier revocation stands)."""
    if record.revoked_at is not None and record.revoked_at <= now:
        return record
    return msgspec.structs.replace(record, revoked_at=now, updated_at=now)


def edit_from(args: argparse.Namespace) -> KeyEdit:
    """The KeyEdit the flags of `keys create` / `keys update` ask for."""
    return KeyEdit(
        models=getattr(args, "models", None),
        add_models=getattr(args, "add_models", None) or (),
        remove_models=getattr(args, "remove_models", None) or (),
        rpm=args.rpm,
        tpm=args.tpm,
        max_parallel=args.max_parallel,
        budget_tokens=args.budget_tokens,
        budget_cost=args.budget_cost,
        budget_period=args.budget_period,
        expires_at=args.expires,
        no_expires=getattr(args, "no_expires", False),
        admin=args.admin,
        description=args.description,
        clear=tuple(getattr(args, "clear", None) or ()),
    )


# ---- rendering ---------------------------------------------------------------------------


def _num(n: int) -> str:
    for unit, size in (("M", 1_000_000), ("k", 1_000)):
        if n >= size and n % (size // 10) == 0:
            return f"{n / size:g}{unit}"
    return f"{n:,}"


def limits_text(r: KeyRecord) -> str:
    parts = []
    if r.rpm is not None:
        parts.append(f"{_num(r.rpm)} rpm")
    if r.tpm is not None:
        parts.append(f"{_num(r.tpm)} tpm")
    if r.max_parallel is not None:
        parts.append(f"{r.max_parallel} parallel")
    if r.budget_tokens is not None:
        parts.append(f"{_num(r.budget_tokens)} tokens/{r.budget_period}")
    if r.budget_cost is not None:
        parts.append(f"{r.budget_cost:g} cost/{r.budget_period}")
    return ", ".join(parts) or "unlimited"


def models_text(r: KeyRecord) -> Text:
    if not r.models:
        return Text("none: runs no model until --models is set", style="yellow")
    if "*" in r.models:
        return Text("* (every model)" + "".join(f", {m}" for m in r.models if m != "*"))
    return Text(", ".join(r.models))


_STATE_STYLE = {"active": "green", "expired": "yellow", "revoked": "red"}


def details(r: KeyRecord, now: float) -> Table:
    """One key, field by field (never a hash)."""
    t = Table(show_header=False, box=None, pad_edge=False)
    t.add_column(style="bold")
    t.add_column()
    st = state(r, now)
    t.add_row("key", r.name)
    t.add_row("state", Text(st, style=_STATE_STYLE[st]))
    t.add_row("models", models_text(r))
    t.add_row("limits", limits_text(r))
    t.add_row("admin", "yes (may read /stats and /v1/health)" if r.admin else "no")
    t.add_row("expires", when(r.expires_at, now))
    if r.revoked_at is not None:
        t.add_row("revoked", when(r.revoked_at, now))
    t.add_row("created", when(r.created_at, now))
    t.add_row("updated", when(r.updated_at, now))
    if r.description:
        t.add_row("description", Text(r.description))
    for i, s in enumerate(r.secrets, 1):
        t.add_row(
            f"secret {i}", f"made {when(s.created_at, now)}, expires {when(s.expires_at, now)}"
        )
    return t


def key_table(records: list[KeyRecord], now: float) -> Table:
    t = Table(title="keys", title_justify="left")
    for col in ("name", "models", "limits", "admin", "state", "expires", "created"):
        t.add_column(col)
    for r in records:
        st = state(r, now)
        t.add_row(
            r.name,
            models_text(r),
            limits_text(r),
            "yes" if r.admin else "",
            Text(st, style=_STATE_STYLE[st]),
            when(r.expires_at, now, short=True),
            when(r.created_at, now, short=True),
        )
    return t


def _print_secret(record: KeyRecord, secret: str, as_json: bool, headline: str) -> None:
    now = time.time()
    if as_json:
        doc = msgspec.structs.asdict(view(record, now))
        print_json(NewSecret(secret=secret, **doc))
        return
    c = console(sys.stdout)
    c.print(Text(headline, style="bold green"))
    c.print("The secret, shown this once (only its SHA-256 is stored):\n")
    c.print(Text(f"    {secret}\n", style="bold"), soft_wrap=True)
    c.print(details(record, now))


# ---- commands ----------------------------------------------------------------------------


def bucket_missing(exc: StoreUnavailable) -> bool:
    """Whether `open_bucket(create=False)` failed because the bucket does not exist."""
    return isinstance(exc, BucketMissing)


async def open_store(js: Any, create: bool, replicas: int = 1) -> KeyStore | None:
    """The key store; None when the bucket does not exist and `create` is false."""
    try:
        return await KeyStore(js, replicas).open(create=create)
    except StoreUnavailable as exc:
        if not create and bucket_missing(exc):
            return None
        raise


async def _existing(js: Any, name: str) -> KeyStore:
    store = await open_store(js, create=False)
    if store is None:
        raise KeyMissing(name)
    return store


async def _list(js: Any, args: argparse.Namespace, now: float) -> None:
    store = await open_store(js, create=False)
    records = await store.list() if store is not None else []
    if args.json:
        print_json({"keys": [view(r, now) for r in records]})
    elif not records:
        console(sys.stdout).print("no keys (make one with `llmfleet keys create NAME`)")
    else:
        console(sys.stdout).print(key_table(records, now))


async def _create(js: Any, args: argparse.Namespace, now: float) -> None:
    store = await open_store(js, create=True, replicas=args.replicas)
    assert store is not None
    secret = new_secret()
    record = new_record(args.name, secret, edit_from(args), now)  # no --clear: no ValueError
    await store.create(record)
    _print_secret(record, secret, args.json, f"Created key {record.name}.")


async def _show(js: Any, args: argparse.Namespace, now: float) -> None:
    record = await (await _existing(js, args.name)).get(args.name)
    _report(record, args.json, now, "")


async def _update(js: Any, args: argparse.Namespace, now: float) -> None:
    store = await _existing(js, args.name)
    edit = edit_from(args)
    try:
        record = await store.update(args.name, lambda r: apply_edit(r, edit, now))
    except ValueError as exc:
        raise AdminError(str(exc)) from None
    _report(record, args.json, now, f"Updated key {args.name}.")


async def _revoke(js: Any, args: argparse.Namespace, now: float) -> None:
    store = await _existing(js, args.name)
    before = await store.get(args.name)
    record = await store.update(args.name, lambda r: revoked(r, now))
    if before.revoked_at is not None and not args.json:
        console(sys.stdout).print(
            f"key {args.name} was already revoked, at {when(before.revoked_at, now)}"
        )
        return
    _report(record, args.json, now, f"Revoked key {args.name}: it now gets 401.")


async def _rotate(js: Any, args: argparse.Namespace, now: float) -> None:
    store = await _existing(js, args.name)
    if state(await store.get(args.name), now) == "revoked":
        raise AdminError(f"key {args.name!r} is revoked: make a new one instead")
    secret = new_secret()
    record = await store.update(args.name, lambda r: rotated(r, secret, args.overlap, now))
    until = "now" if args.overlap <= 0 else when(now + args.overlap, now)
    head = f"Rotated key {args.name}: its old secrets stop working {until}."
    _print_secret(record, secret, args.json, head)


def _report(record: KeyRecord, as_json: bool, now: float, headline: str) -> None:
    if as_json:
        print_json(view(record, now))
        return
    c = console(sys.stdout)
    if headline:
        c.print(Text(headline, style="bold green"))
    c.print(details(record, now))


ACTIONS = {
    "list": _list,
    "create": _create,
    "show": _show,
    "update": _update,
    "revoke": _revoke,
    "rotate": _rotate,
}


async def run_keys(args: argparse.Namespace, target: Target) -> None:
    """`llmfleet keys ACTION ...`; AdminError on any failure."""
    async with admin_session(target) as nc:
        js = nc.jetstream(timeout=API_TIMEOUT_S)
        await ACTIONS[args.keys_command](js, args, time.time())
