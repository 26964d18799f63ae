"""`llmfleet audit tail`: the last events of the audit stream LLMFLEET_AUDIT, oldest first,
then (`--follow`) every new one until Ctrl-C.

The subject carries no key or model, so filters (`--key`, `--model`, `--since`) apply
after decoding, and "the last N" is read backwards in chunks: each chunk [start, end] of
stream sequences is read forward by its own ephemeral pull consumer (no acks, in memory,
deleted after), each chunk further back a few times larger, until N events match or the
stream (or, with `--since`, the time) runs out. `--follow` then reads from the sequence
after the stream's last one at the start, so nothing is printed twice or missed.

JetStream API used (the admin role's rights in deploy/nats/accounts.conf):
`$JS.API.STREAM.INFO.LLMFLEET_AUDIT`, `$JS.API.CONSUMER.CREATE.LLMFLEET_AUDIT.<name>`,
`$JS.API.CONSUMER.MSG.NEXT.LLMFLEET_AUDIT.<name>`, `$JS.API.CONSUMER.DELETE.LLMFLEET_AUDIT.
<name>`; deliveries come to the admin inbox `_LLMFLEET.admin.>`. A message that is not
an AuditEvent is skipped and counted in a note on stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fnmatch
import secrets
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, NamedTuple

import msgspec
import nats.errors
import nats.js.errors
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from rich.table import Table
from rich.text import Text

from common import audit
from common.audit import AUDIT_STREAM, AuditEvent
from common.natsconn import NATS_ERRORS
from control.keys import model_matches, parse_duration
from llmfleet.adminconn import (
    API_TIMEOUT_S,
    AdminError,
    Target,
    admin_session,
    console,
    utc_stamp,
)

FETCH = 256  # messages per pull request
FIRST_CHUNK = 512  # sequences read first when filters are set
MAX_CHUNK = 65_536
SKEW_S = 60.0  # --since: how much later than its own time an event may have been stored
FOLLOW_WAIT_S = 5.0
CONSUMER_IDLE_S = 30.0  # the server deletes a tail's consumer this long after we vanish


class Filter(msgspec.Struct, frozen=True):
    """`--key` (a name or a glob), `--model` (the model asked or served, an id or a glob
    as in `keys --models`), `--since` (an event's `ts`, Unix seconds)."""

    key: str = ""
    model: str = ""
    since: float | None = None

    @property
    def narrows(self) -> bool:
        return bool(self.key or self.model or self.since is not None)

    def matches(self, ev: AuditEvent) -> bool:
        if self.key and not (ev.key == self.key or fnmatch.fnmatchcase(ev.key, self.key)):
            return False
        if self.model and not any(
            m and model_matches(self.model, m) for m in (ev.model, ev.served_model)
        ):
            return False
        return self.since is None or ev.ts >= self.since


class Stored(NamedTuple):
    seq: int
    stored_at: float  # the server's time, Unix seconds
    raw: bytes


class Event(NamedTuple):
    event: AuditEvent
    line: str  # the event as stored, on one line (`--json`)


def parse_since(value: str, now: float) -> float:
    """`--since`: a duration back from now (`10m`, `2h`, `7d`) or an ISO date/time (UTC
    unless it has an offset). ValueError otherwise."""
    try:
        return now - parse_duration(value)
    except ValueError:
        pass
    try:
        dt = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(
            f"--since: a duration (10m, 2h, 7d) or a date/time (2026-12-01T10:00): {value!r}"
        ) from None
    return (dt if dt.tzinfo else dt.replace(tzinfo=UTC)).timestamp()


class Decoder:
    """Decodes stored messages, counting those that are not AuditEvents."""

    def __init__(self) -> None:
        self.skipped = 0

    def __call__(self, m: Stored) -> Event | None:
        try:
            ev = audit.decode(m.raw)
        except (msgspec.DecodeError, msgspec.ValidationError):
            self.skipped += 1
            return None
        text = m.raw.decode(errors="replace")
        if "\n" in text or "\r" in text:  # valid JSON over several lines: make it one
            text = msgspec.json.encode(msgspec.json.decode(m.raw)).decode()
        return Event(ev, text)


# ---- reading the stream ----------------------------------------------------------------


async def _consumer(js: Any, start: int) -> tuple[Any, str, int]:
    """An ephemeral pull consumer from sequence `start`: (subscription, name, messages
    pending at its creation)."""
    name = f"audit-tail-{secrets.token_hex(8)}"
    config = ConsumerConfig(
        name=name,
        deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
        opt_start_seq=start,
        ack_policy=AckPolicy.NONE,
        inactive_threshold=CONSUMER_IDLE_S,
        mem_storage=True,
        num_replicas=1,
    )
    info = await js.add_consumer(AUDIT_STREAM, config=config)
    sub = await js.pull_subscribe_bind(consumer=name, stream=AUDIT_STREAM)
    return sub, name, int(info.num_pending or 0)


async def _drop(js: Any, sub: Any, name: str) -> None:
    with contextlib.suppress(*NATS_ERRORS):
        await sub.unsubscribe()
        await js.delete_consumer(AUDIT_STREAM, name)


def _stored(msg: Any) -> tuple[Stored, int]:
    md = msg.metadata
    return Stored(md.sequence.stream, md.timestamp.timestamp(), msg.data), md.num_pending


async def read_range(js: Any, start: int, end: int) -> list[Stored]:
    """The messages with sequences in [start, end], oldest first."""
    sub, name, pending = await _consumer(js, start)
    out: list[Stored] = []
    try:
        last = start - 1
        while pending > 0 and last < end:
            try:
                msgs = await sub.fetch(batch=min(FETCH, end - last), timeout=API_TIMEOUT_S)
            except nats.errors.TimeoutError:
                break  # nothing more (the rest was deleted meanwhile)
            for msg in msgs:
                m, pending = _stored(msg)
                last = m.seq
                if m.seq > end:
                    break
                out.append(m)
    finally:
        await _drop(js, sub, name)
    return out


async def last_events(
    js: Any, first: int, last: int, n: int, flt: Filter, decode: Decoder
) -> list[Event]:
    """The last `n` events in [first, last] that match `flt`, oldest first."""
    found: list[Event] = []
    end = last
    chunk = max(n, FIRST_CHUNK) if flt.narrows else n
    while n > 0 and end >= first and len(found) < n:
        start = max(first, end - chunk + 1)
        got = await read_range(js, start, end)
        found = [e for e in map(decode, got) if e is not None and flt.matches(e.event)] + found
        end = start - 1
        if flt.since is not None and got and got[0].stored_at < flt.since - SKEW_S:
            break  # everything further back was stored before --since
        chunk = min(chunk * 4, MAX_CHUNK)
    return found[-n:] if n > 0 else []


async def follow(
    js: Any,
    start: int,
    flt: Filter,
    decode: Decoder,
    emit: Callable[[list[Event]], None],
) -> None:
    """Emit every matching event from sequence `start` on, until cancelled. A lost
    consumer (the broker restarted) is made again from the next sequence."""
    while True:
        try:
            sub, name, _ = await _consumer(js, start)
        except NATS_ERRORS:
            await asyncio.sleep(1.0)
            continue
        try:
            while True:
                try:
                    msgs = await sub.fetch(batch=FETCH, timeout=FOLLOW_WAIT_S)
                except nats.errors.TimeoutError:
                    continue
                batch = []
                for msg in msgs:
                    m, _ = _stored(msg)
                    start = m.seq + 1
                    e = decode(m)
                    if e is not None and flt.matches(e.event):
                        batch.append(e)
                if batch:
                    emit(batch)
        except NATS_ERRORS:
            await asyncio.sleep(1.0)
        finally:
            await _drop(js, sub, name)


# ---- rendering ---------------------------------------------------------------------------

COLUMNS = (  # name, width, right-aligned: 197 characters in all, with the gaps
    ("time", 20, False),
    ("key", 16, False),
    ("route", 10, False),
    ("model", 18, False),
    ("served", 18, False),
    ("worker", 14, False),
    ("status", 24, False),
    ("tokens in/out", 13, True),
    ("ttft ms", 7, True),
    ("ms", 8, True),
    ("stream", 6, False),
    ("client", 21, False),
)


def event_table(events: list[Event], header: bool = True) -> Table:
    """Fixed widths: the rows of later tables (`--follow`) line up under the first."""
    t = Table(show_header=header, box=None, pad_edge=False, show_edge=False)
    for col, width, right in COLUMNS:
        t.add_column(
            col,
            width=width,
            no_wrap=True,
            overflow="ellipsis",
            justify="right" if right else "left",
        )
    for e in events:
        ev = e.event
        stamp = utc_stamp(ev.ts)
        status = f"{ev.status} {ev.error}".strip()
        t.add_row(
            *(
                Text(printable(x))
                for x in (
                    stamp,
                    ev.key,
                    ev.route,
                    ev.model,
                    ev.served_model if ev.served_model != ev.model else "=",
                    ev.worker,
                    status,
                    f"{ev.prompt_tokens}/{ev.completion_tokens}",
                    "-" if ev.ttft_ms is None else f"{ev.ttft_ms:.0f}",
                    f"{ev.duration_ms:.0f}",
                    "yes" if ev.stream else "",
                    ev.client,
                )
            ),
            style="red" if ev.status >= 500 else ("yellow" if ev.status >= 400 else None),
        )
    return t


def printable(text: str) -> str:
    """`text` with control characters (terminal escapes a client could put in a model
    name) shown as `\\xNN` instead of sent to the terminal."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in text)


# ---- the command -------------------------------------------------------------------------


async def run_audit(args: argparse.Namespace, target: Target) -> None:
    """`llmfleet audit tail [--follow] [--key] [--model] [--since] [-n N] [--json]`."""
    now = time.time()
    try:
        since = parse_since(args.since, now) if args.since else None
    except ValueError as exc:
        raise AdminError(str(exc)) from None
    flt = Filter(args.key or "", args.model or "", since)
    out = sys.stdout
    c = console(out)
    decode = Decoder()
    shown = {"header": False}

    def emit(events: list[Event]) -> None:
        if args.json:
            out.write("".join(e.line + "\n" for e in events))
        else:
            c.print(event_table(events, header=not shown["header"]))
            shown["header"] = True
        out.flush()

    def note() -> None:
        if decode.skipped:
            print(
                f"llmfleet audit: skipped {decode.skipped} malformed event(s) in {AUDIT_STREAM}",
                file=sys.stderr,
                flush=True,
            )
            decode.skipped = 0

    async with admin_session(target) as nc:
        js = nc.jetstream(timeout=API_TIMEOUT_S)
        try:
            info = await js.stream_info(AUDIT_STREAM)
        except nats.js.errors.NotFoundError:
            raise AdminError(
                f"the audit stream {AUDIT_STREAM} does not exist yet (a gateway or worker "
                "with --audit on creates it)"
            ) from None
        first, last = int(info.state.first_seq), int(info.state.last_seq)
        events = []
        if info.state.messages:
            events = await last_events(js, first, last, args.n, flt, decode)
        if events:
            emit(events)
        elif not args.follow and not args.json:
            c.print("no audit events" + (" match" if flt.narrows else ""))
        note()
        if args.follow:

            def emit_new(events: list[Event]) -> None:
                emit(events)
                note()

            try:
                await follow(js, last + 1, flt, decode, emit_new)
            finally:
                note()
