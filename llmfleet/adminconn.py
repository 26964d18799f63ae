"""The admin commands' NATS connection (`llmfleet keys`, `usage`, `prices`, `audit`).

These commands log in as the admin role (`--nats nats://admin:PASSWORD@host:4222`, or
`--creds FILE`) and must end with one line that says what went wrong, never a traceback:

    AdminError                 the one line the CLI prints (exit status 1)
      raised for: an unreachable broker, refused credentials, a permission the account
      lacks, a missing file, and every ControlError (KeyExists, KeyMissing, ...)

nats-py reports a refused login or a permission violation only to its error callback
(the login is retried, the request times out); `admin_session` watches that callback and
ends the command at once with the server's words instead of waiting out a timeout.

Output helpers shared by these commands (`console`, `print_json`, `when`) sit below.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl
import sys
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import msgspec
import nats.errors
from rich.console import Console

from common import names
from common.natsconn import NATS_ERRORS, TLSRequiredError, discard, open_client, redact_url
from control.store import ControlError

CONNECT_WAIT_S = 3.0
API_TIMEOUT_S = 5.0


class AdminError(Exception):
    """What an admin command could not do, as the one line the CLI prints."""


class Target(msgspec.Struct, frozen=True):
    """Where and as whom to connect: `--nats` (URLs, maybe with user:password), `--creds`,
    and the TLS context of `--nats-ca/--nats-cert/--nats-key`."""

    url: str
    creds: str = ""
    tls: ssl.SSLContext | None = None


def target(url: str, creds: str = "", tls: ssl.SSLContext | None = None) -> Target:
    """A Target; AdminError if `creds` names no file."""
    if creds and not os.path.isfile(creds):
        raise AdminError(f"--creds {creds}: no such file")
    return Target(url, creds, tls)


def _refusal(exc: Exception) -> str | None:
    """The server's refusal in an error-callback exception, or None for other errors."""
    text = str(exc).removeprefix("nats: ").strip().strip("'")
    low = text.lower()
    if "authorization violation" in low or "authentication" in low:
        return "the server refused the credentials (authorization violation)"
    if "permissions violation" in low:
        return f"permission denied ({text}): does this user have the admin role?"
    return None


@contextlib.asynccontextmanager
async def admin_session(target: Target) -> AsyncIterator[Any]:
    """A connected client (inbox `_LLMFLEET.admin`, as the admin role's rights name it).

    Raises AdminError if no server answers within CONNECT_WAIT_S, if the login is refused,
    and, from inside the block, as soon as the server reports a permission violation (the
    block is cancelled). Other exceptions of the block pass through."""
    refused: list[str] = []
    scope: asyncio.Timeout | None = None

    async def on_error(exc: Exception) -> None:
        why = _refusal(exc)
        if why is None:
            return
        refused.append(why)
        if scope is not None:  # end the command now, not when its request times out
            scope.reschedule(asyncio.get_running_loop().time())

    where = redact_url(target.url)
    options: dict[str, Any] = {
        "name": "llmfleet-admin",
        "inbox_prefix": names.ADMIN_INBOX_PREFIX,
        "connect_timeout": 2,
        "max_reconnect_attempts": -1,
        "reconnect_time_wait": 0.5,
        "error_cb": on_error,
    }
    if target.creds:
        options["user_credentials"] = target.creds
    urls = [u.strip() for u in target.url.split(",") if u.strip()]
    try:
        async with asyncio.timeout(CONNECT_WAIT_S) as scope:
            nc = await open_client(urls, tls=target.tls, **options)
    except TLSRequiredError as exc:
        raise AdminError(str(exc).removeprefix("nats: ")) from None
    except (TimeoutError, OSError, nats.errors.Error) as exc:
        if refused:
            raise AdminError(f"{where}: {refused[-1]}") from None
        raise AdminError(f"cannot reach the NATS server at {where}") from exc
    try:
        async with asyncio.timeout(None) as scope:
            yield nc
    except TimeoutError:
        if scope.expired() and refused:
            raise AdminError(refused[-1]) from None
        raise AdminError(f"the NATS server at {where} did not answer in time") from None
    except ControlError as exc:
        raise AdminError(str(exc)) from None
    except NATS_ERRORS as exc:
        if refused:
            raise AdminError(refused[-1]) from None
        raise AdminError(f"NATS: {type(exc).__name__} {exc}".strip()) from None
    finally:
        await discard(nc)


# ---- output ------------------------------------------------------------------------------

_ENCODER = msgspec.json.Encoder()


def console(out: Any) -> Console:
    """A terminal gets its own width; a pipe or file gets wide lines, not wrapped cells."""
    isatty = getattr(out, "isatty", None)
    return Console(file=out, width=None if isatty is not None and isatty() else 200)


def print_json(doc: Any, out: Any = None) -> None:
    """One JSON document on one line (`--json`)."""
    out = out or sys.stdout
    out.write(_ENCODER.encode(doc).decode() + "\n")
    out.flush()


def when(t: float | None, now: float, short: bool = False) -> str:
    """A Unix time in UTC (`2026-12-02 10:00Z`), and how far from now unless `short`."""
    if t is None:
        return "never"
    stamp = utc_stamp(t)
    if short:
        return stamp
    delta = t - now
    if abs(delta) < 1:
        return f"{stamp} (now)"
    return f"{stamp} (in {span(delta)})" if delta >= 0 else f"{stamp} ({span(-delta)} ago)"


def utc_stamp(t: float) -> str:
    """`2026-12-02 10:00:00Z`; a time no calendar holds (a stored 1e300) as its number."""
    try:
        return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d %H:%M:%SZ")
    except (OverflowError, OSError, ValueError):
        return f"{t:g}"


def span(seconds: float) -> str:
    """`42s`, `5.5m`, `12h`, `3.0d`: one unit, two significant figures or so."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            n = seconds / size
            return f"{n:.0f}{unit}" if n >= 10 else f"{n:.1f}{unit}"
    return f"{seconds:.0f}s"
