"""A gateway's `--routes kv`: the routes file in `LLMFLEET_KEYS` (key `routes`), watched.

`RoutesWatch.run()` is the one task that reads the entry: an ordered push consumer on
`$KV.LLMFLEET_KEYS.routes` (last per subject), the same watch as the keyring's
(control/keyring.py), so a gateway needs no right it does not already hold. Each entry is
handed to the caller once, in revision order:

    a valid entry                          apply(routes, "kv rev 7")
    a delete or purge                      apply(Routes(), "kv rev 8 (deleted)")
    an entry that does not parse           reject("LLMFLEET_KEYS.routes rev 9: alias ...")
    a forged entry (it carries             reject(...): it came through another stream's
      `Nats-Stream`)                         republish, not from an admin

A fresh read replays the revisions the bucket keeps (history 5) and starts from the
newest good one an admin wrote, so a forged or broken newest entry cannot take the
routes away from a gateway that starts after it.
    no entry, no bucket                    nothing (or apply(Routes(), "kv: none") when
                                             routes from KV were in force)

On reject the caller keeps the routes it has (the last good ones). After a failure the
watch starts over with a fresh read a second later, after `restart()` at once, and every
30 s regardless; an entry already handed over is not handed over again. `ready` is set
once the first read is complete, whether or not an entry exists. A change reaches the
callback in milliseconds (the promise is 2 s). Parsing runs in a thread: a 1 MiB file
does not stall the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

from nats.js.api import DeliverPolicy

from common.natsconn import NATS_ERRORS
from control.keyring import KEYS_STREAM, RESYNC_S, RETRY_S, WATCH_PREFIX
from control.routes import Routes, RoutesError, parse_routes
from control.store import (
    KEYS_BUCKET,
    ROUTES_KEY,
    BucketMissing,
    StoreUnavailable,
    keys_config,
    open_bucket,
)

log = logging.getLogger(__name__)

ROUTES_SUBJECT = WATCH_PREFIX + ROUTES_KEY  # $KV.LLMFLEET_KEYS.routes
WATCH_BUFFER = 16  # entries in flight from the watch (the callback waits when full)
_WATCH_ERRORS: tuple[type[Exception], ...] = (StoreUnavailable, *NATS_ERRORS)


class RoutesWatch:
    """Follows the routes entry; `apply(routes, version)` and `reject(error_line)` are
    called from `run()`'s task only, one at a time (module docstring)."""

    def __init__(self, apply: Callable[[Routes, str], None], reject: Callable[[str], None]) -> None:
        self._apply = apply
        self._reject = reject
        self.ready = asyncio.Event()
        self.version = ""  # the last entry handed over ("kv rev 7"), applied or not
        self.applied = 0
        self.rejected = 0
        self.forged = 0  # of the rejected: not written by an admin
        self.restarts = 0
        self._seen: tuple[int, bytes, str, str] | None = None  # the entry last applied
        self._refused: set[tuple[int, bytes, str, str]] = set()  # entries refused so far
        self._forging = False  # the last entry handled was forged (later ones: counted only)
        self._holding = False  # routes from KV are in force (not empty)
        self._restart = asyncio.Event()

    def restart(self) -> None:
        """Read the entry again now (after a reconnect: the watch may have missed a
        change while the broker was away)."""
        self._restart.set()

    async def run(self, js: Any) -> None:
        """Watch until cancelled, starting over after any failure. Gateways may not create
        the bucket: while it is missing there are no routes from KV."""
        missing_logged = False
        while True:
            try:
                await self._watch(js)
                missing_logged = False
                continue  # restart() or the periodic resync asked for a fresh read
            except asyncio.CancelledError:
                raise
            except BucketMissing:
                self._absent()
                self.ready.set()
                if not missing_logged:
                    log.warning(
                        "no routes in KV yet: %s is missing (llmfleet routes push)", KEYS_BUCKET
                    )
                    missing_logged = True
            except _WATCH_ERRORS as exc:
                log.warning("routes watch failed (%s); starting over", exc)
            except Exception:
                log.exception("routes watch failed; starting over")
            self.restarts += 1
            with contextlib.suppress(TimeoutError):  # a restart() cuts the pause short
                async with asyncio.timeout(RETRY_S):
                    await self._restart.wait()
            self._restart.clear()

    async def _watch(self, js: Any) -> None:
        """One watch: the latest message of the key, then each new one, as raw stream
        messages (their headers tell a forged entry and a delete apart)."""
        await open_bucket(js, keys_config(), create=False)
        loop = asyncio.get_running_loop()
        msgs: asyncio.Queue[Any] = asyncio.Queue(WATCH_BUFFER)

        async def on_msg(msg: Any) -> None:
            await msgs.put(msg)

        sub = await js.subscribe(
            ROUTES_SUBJECT,
            stream=KEYS_STREAM,
            cb=on_msg,
            ordered_consumer=True,
            # Every revision kept (history 5), not the last alone: when the newest is a
            # forgery, the newest an admin wrote is the one in force.
            deliver_policy=DeliverPolicy.ALL,
            inactive_threshold=300.0,
        )
        try:
            info = await sub.consumer_info()
            # The server's count, not the client's: a message already sent but not yet
            # read here must not be taken for "no entry" (routes would blink off).
            sent = info.delivered.consumer_seq if info.delivered is not None else 0
            replaying = bool(info.num_pending or sent)
            if not replaying:
                self._absent()
                self.ready.set()
            backlog: list[Any] = []  # the revisions kept, oldest first (history 5)
            until = loop.time() + RESYNC_S
            while True:
                if self._restart.is_set():
                    self._restart.clear()
                    return
                if loop.time() > until:
                    return
                try:
                    async with asyncio.timeout(0.5):
                        msg = await msgs.get()
                except TimeoutError:
                    continue  # idle: the watch stays open
                if replaying:
                    backlog.append(msg)
                    if msg.metadata.num_pending:
                        continue
                    replaying = False
                    # From the newest admin-written entry that is good, on: it is applied,
                    # and the newer ones (forged, invalid) are refused and counted.
                    start = len(backlog) - 1
                    for i in range(len(backlog) - 1, -1, -1):
                        if await self._usable(backlog[i]):
                            start = i
                            break
                    for m in backlog[start:]:
                        await self._handle(m)
                    self.ready.set()
                    continue
                await self._handle(msg)
                self.ready.set()
        finally:
            await sub.unsubscribe()

    async def _usable(self, msg: Any) -> bool:
        """Written by an admin (not republished) and a delete or a valid routes file."""
        headers = msg.headers or {}
        if "Nats-Stream" in headers:
            return False
        seen = (
            int(msg.metadata.sequence.stream),
            bytes(msg.data or b""),
            headers.get("KV-Operation", ""),
            "",
        )
        if seen == self._seen or seen in self._refused:  # known from an earlier read
            return seen == self._seen
        if headers.get("KV-Operation") in ("DEL", "PURGE"):
            return True
        try:
            await asyncio.to_thread(parse_routes, bytes(msg.data or b""))
        except Exception:
            return False
        return True

    async def _handle(self, msg: Any) -> None:
        rev = int(msg.metadata.sequence.stream)
        headers = msg.headers or {}
        data = bytes(msg.data or b"")
        seen = (rev, data, headers.get("KV-Operation", ""), headers.get("Nats-Stream", ""))
        if seen == self._seen or seen in self._refused:
            return  # a fresh read delivers the entries already handed over
        if len(self._refused) > 64:
            self._refused.clear()
        self.version = version = f"kv rev {rev}"
        source = f"{KEYS_BUCKET}.{ROUTES_KEY} rev {rev}"
        if "Nats-Stream" in headers:
            # A role that may configure any stream could aim a republish at this key, and
            # the server stores it; an admin's write never carries this header.
            self._refused.add(seen)
            self.forged += 1
            if self._forging:  # a republish fires per message: one refusal per run of them
                return
            self._forging = True
            self.rejected += 1
            self._reject(
                f"{source}: republished from stream {headers['Nats-Stream']!r}, "
                "not written by an admin"
            )
            return
        self._forging = False
        if headers.get("KV-Operation") in ("DEL", "PURGE"):
            self._seen = seen  # not the revision alone: a bucket made anew counts from 1
            self._set(Routes(), f"{version} (deleted)")
            return
        try:
            routes = await asyncio.to_thread(parse_routes, data, source)
        except RoutesError as exc:
            self._refused.add(seen)
            self.rejected += 1
            self._reject(str(exc))
            return
        except Exception as exc:  # a parser bug must not stop the watch or skip the count
            self._refused.add(seen)
            self.rejected += 1
            self._reject(f"{source}: unreadable ({type(exc).__name__})")
            return
        self._seen = seen
        self._set(routes, version)

    def _set(self, routes: Routes, version: str) -> None:
        self.applied += 1
        self._holding = routes != Routes()
        self._apply(routes, version)

    def _absent(self) -> None:
        """No entry (never written, or the bucket is gone): routes from KV that were in
        force are dropped; else nothing changes."""
        self._seen = None
        if self._holding:
            self._set(Routes(), "kv: none")
