"""`llmfleet routes check FILE | push FILE | show`: the routes file (control/routes.py).

`check` validates a file offline and prints each alias's flattened chain. `push`
validates it first (a bad file never reaches the broker), then stores the file's text
as it is, comments and all, under `routes` in LLMFLEET_KEYS, where every gateway with
`--routes kv` watches it (control/routes_watch.py). `show` prints the stored text
(stdout, so `llmfleet routes show > routes.yaml` round-trips) and its revision (stderr).
Errors: RoutesError (check), AdminError (push, show): one line.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import nats.js.errors
from rich.console import Console
from rich.table import Table
from rich.text import Text

from control.keyring import KEYS_STREAM
from control.routes import FALLBACK_REASONS, MAX_BYTES, Routes, RoutesError, describe, parse_routes
from control.routes_watch import ROUTES_SUBJECT
from control.store import (
    KEYS_BUCKET,
    ROUTES_KEY,
    BucketMissing,
    keys_config,
    open_bucket,
)
from llmfleet.adminconn import API_TIMEOUT_S, AdminError, Target, admin_session, console, utc_stamp

HEADROOM = 4096  # bytes of a message besides the file: its subject and headers


def load(path: str) -> tuple[bytes, Routes]:
    """The file's bytes and the routes they say; RoutesError naming `path`."""
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_BYTES + 1)
    except OSError as exc:
        raise RoutesError(path, exc.strerror or str(exc)) from None
    return raw, parse_routes(raw, path)


def routes_table(routes: Routes) -> Table:
    t = Table(title="aliases", title_justify="left")
    for col in ("alias", "description", "chain (flattened)", "fallback_on", "hop_timeout"):
        t.add_column(col)
    for name, description, chain, fallback_on, hop_timeout in describe(routes):
        reasons = "all" if set(fallback_on) == set(FALLBACK_REASONS) else ", ".join(fallback_on)
        t.add_row(
            Text(name),
            Text(description),
            Text(" -> ".join(chain)),
            Text(reasons or "none: never falls back"),
            f"{hop_timeout:g} s",
        )
    return t


def print_routes(c: Console, routes: Routes) -> None:
    """The aliases as a table, then the default model and the model list."""
    if routes.aliases:
        c.print(routes_table(routes))
    else:
        c.print("no aliases")
    dm = routes.default_model
    if dm is None:
        c.print("default model: none (a request must name its model)")
    else:
        kind = " (an alias)" if routes.chain(dm) is not None else ""
        c.print(Text(f"default model: {dm}{kind}"))
    if routes.models is not None:
        c.print(Text(f"models: {', '.join(routes.models) or 'none'}"))


def check(path: str) -> None:
    """`routes check FILE`: prints the routes; RoutesError if the file is not valid."""
    _, routes = load(path)
    c = console(sys.stdout)
    c.print(Text(f"{path}: ok", style="bold green"))
    print_routes(c, routes)


async def _push(
    js: Any, args: argparse.Namespace, max_payload: int, raw: bytes, routes: Routes
) -> None:
    if len(raw) + HEADROOM > max_payload:
        raise AdminError(
            f"{args.file}: {len(raw)} bytes is more than this server takes in one message "
            f"(max_payload {max_payload})"
        )
    kv = await open_bucket(js, keys_config(args.replicas), create=True)
    revision = await kv.put(ROUTES_KEY, raw)
    c = console(sys.stdout)
    c.print(
        Text(
            f"Pushed {args.file} to {KEYS_BUCKET} ({ROUTES_KEY}), revision {revision}: "
            f"{len(routes.aliases)} aliases. Gateways with --routes kv apply it within 2 s.",
            style="bold green",
        )
    )
    print_routes(c, routes)


async def _show(js: Any) -> None:
    try:
        await open_bucket(js, keys_config(), create=False)
        msg = await js.get_last_msg(KEYS_STREAM, ROUTES_SUBJECT)
    except (BucketMissing, nats.js.errors.NotFoundError):
        console(sys.stdout).print("no routes stored (store one with `llmfleet routes push FILE`)")
        return
    headers = msg.headers or {}
    err = console(sys.stderr)
    when = f", stored {utc_stamp(msg.time.timestamp())}" if msg.time is not None else ""
    if headers.get("KV-Operation") in ("DEL", "PURGE"):
        console(sys.stdout).print(f"no routes stored (deleted at revision {msg.seq}{when})")
        return
    text = msg.data or b""
    sys.stdout.write(text.decode("utf-8", errors="replace"))
    if text and not text.endswith(b"\n"):
        sys.stdout.write("\n")
    sys.stdout.flush()
    err.print(f"{KEYS_BUCKET} {ROUTES_KEY}: revision {msg.seq}{when}")
    if "Nats-Stream" in headers:
        err.print(
            Text(
                f"not written by an admin (republished from stream {headers['Nats-Stream']!r}): "
                "gateways refuse it and keep their last good routes",
                style="bold red",
            )
        )
        return
    try:
        parse_routes(text, f"revision {msg.seq}")
    except RoutesError as exc:
        err.print(Text(f"invalid, gateways keep their last good routes: {exc}", style="bold red"))


def _load(path: str) -> tuple[bytes, Routes]:
    try:
        return load(path)
    except RoutesError as exc:
        raise AdminError(str(exc)) from None


async def run_routes(args: argparse.Namespace, target: Target) -> None:
    """`llmfleet routes push FILE | show`; AdminError on any failure."""
    # A bad file is refused before any connection: KV never sees it.
    pushed = _load(args.file) if args.routes_command == "push" else None
    async with admin_session(target) as nc:
        js = nc.jetstream(timeout=API_TIMEOUT_S)
        if pushed is not None:
            await _push(js, args, nc.max_payload, *pushed)
        else:
            await _show(js)
