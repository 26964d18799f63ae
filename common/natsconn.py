"""Connecting to NATS with the project's settings, and the nats-py pitfalls worked around.

`NATS_ERRORS` is the one list of exceptions a NATS or JetStream call raises when the broker
is unreachable, slow or refuses; each package translates them at its own seam (the gateway
in `gateway/dispatch.py`, the body store in `common/bodies.py`).

TLS: `tls_context` turns `--nats-ca` / `--nats-cert` / `--nats-key` into the
`ssl.SSLContext` nats-py takes, and every connection is made by `open_client`, whose
`StrictTLSClient` closes nats-py's downgrade hole: nats-py upgrades to TLS only when the
server's INFO says `tls_required`, so a `tls://` URL answered by a plain (or
man-in-the-middle) server would send CONNECT, password included, in clear text. Errors:

    ValueError
     +-- TLSFilesError      a TLS flag names a missing, unreadable or mismatched file
    nats.errors.Error
     +-- TLSRequiredError   a server did not offer TLS where it is required (nothing sent)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import ssl
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any
from urllib.parse import urlsplit

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from common.bus import Bus
from common.errors import ServiceUnavailable

log = logging.getLogger(__name__)

NATS_ERRORS: tuple[type[Exception], ...] = (nats.errors.Error, nats.js.errors.Error, TimeoutError)
"""What a NATS or JetStream call raises when the broker cannot serve it."""


@contextlib.contextmanager
def broker_errors(what: str) -> Iterator[None]:
    """Translate a NATS or JetStream failure inside into `ServiceUnavailable` (503)."""
    try:
        yield
    except NATS_ERRORS as exc:
        raise ServiceUnavailable(
            f"{what}: the broker did not answer ({type(exc).__name__})"
        ) from exc


async def publish_best_effort(nc: Bus, subject: str, data: bytes) -> bool:
    """Publish if connected; a failure is not an error (announcements repeat)."""
    if not nc.is_connected:
        return False
    try:
        await nc.publish(subject, data)
    except NATS_ERRORS:
        return False
    return True


async def jetstream_ready(nc: Bus, js: Any) -> bool:
    """Connected, and JetStream answers (one API request)."""
    if not nc.is_connected:
        return False
    try:
        await js.account_info()
    except NATS_ERRORS:
        return False
    return True


PING_INTERVAL_S = 2
"""Client ping interval: a dead or frozen server is noticed within ~2 pings (4-6 s)
instead of nats-py's default of minutes."""
MAX_OUTSTANDING_PINGS = 2


class _RateLimitedLog:
    """Slow-consumer errors arrive once per dropped message: log at most once a second."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._last = 0.0
        self._suppressed = 0

    def __call__(self, exc: Exception) -> None:
        now = time.monotonic()
        if now - self._last < 1.0:
            self._suppressed += 1
            return
        log.warning(
            "nats error (%s): %s (%d similar suppressed)",
            self._name,
            exc if isinstance(exc, TLSRequiredError) else type(exc).__name__,
            self._suppressed,
        )
        self._last = now
        self._suppressed = 0


# ---- TLS ---------------------------------------------------------------------------------


class TLSFilesError(ValueError):
    """`flag` (`--nats-ca`, `--nats-cert`, `--nats-key`) names `path`, which cannot be
    used: `problem` says why. A ValueError, so the CLI shows it as a flag error."""

    def __init__(self, flag: str, path: str | None, problem: str) -> None:
        super().__init__(flag, path, problem)
        self.flag = flag
        self.path = path
        self.problem = problem

    def __str__(self) -> str:
        return f"{self.flag} {self.path}: {self.problem}" if self.path else self.problem


class TLSRequiredError(nats.errors.Error):
    """The server at `server` (scheme://host:port, never credentials) sent an INFO without
    TLS where TLS is required; the connection was closed before CONNECT, so no
    credentials were sent to it."""

    def __init__(self, server: str) -> None:
        super().__init__(server)
        self.server = server

    def __str__(self) -> str:
        return (
            f"nats: {self.server} does not offer TLS, which is required here (a tls:// URL, "
            "or --nats-ca/--nats-cert/--nats-key given): refused before sending credentials"
        )


def tls_context(
    ca: str | None = None, cert: str | None = None, key: str | None = None
) -> ssl.SSLContext | None:
    """The client TLS context for NATS from `--nats-ca`, `--nats-cert` and `--nats-key`
    (PEM files); None when none is given, and nats-py's default context serves tls://
    URLs (the system CA store, or `SSL_CERT_FILE`).

    `ca` is the store server certificates are checked against, for NATS only (unlike
    `SSL_CERT_FILE`, which also replaces it for a worker's HTTPS upstream); without it the
    system store is used. `cert` + `key`: the client certificate a server with `verify:
    true` demands. Raises TLSFilesError: only one of cert/key, a missing file, a file that
    is not PEM, a key that does not match its certificate, an encrypted key."""
    if not (ca or cert or key):
        return None
    if bool(cert) != bool(key):
        given, missing = ("--nats-cert", "--nats-key") if cert else ("--nats-key", "--nats-cert")
        raise TLSFilesError(given, None, f"{given} needs {missing} too (a certificate and its key)")
    for flag, path in (("--nats-ca", ca), ("--nats-cert", cert), ("--nats-key", key)):
        if path and not os.path.isfile(path):
            raise TLSFilesError(flag, path, "no such file")
    try:
        ctx = ssl.create_default_context(cafile=ca or None)
    except (ssl.SSLError, OSError) as exc:
        raise TLSFilesError("--nats-ca", ca, f"not a PEM CA certificate file ({exc})") from exc
    if cert and key:

        def no_password() -> str:  # else OpenSSL would prompt on the terminal
            raise TLSFilesError("--nats-key", key, "encrypted; give an unencrypted key")

        try:
            ctx.load_cert_chain(cert, key, password=no_password)
        except (ssl.SSLError, OSError) as exc:
            raise TLSFilesError(
                "--nats-cert", cert, f"and --nats-key {key}: not a matching PEM pair ({exc})"
            ) from exc
    return ctx


class _FirstConnectRefused(Exception):
    """Carries a TLSRequiredError out of nats-py's first-connect loop, which retries every
    nats error (forever, with `max_reconnect_attempts=-1`); not a nats error on purpose."""

    def __init__(self, error: TLSRequiredError) -> None:
        super().__init__(error)
        self.error = error


class StrictTLSClient(NATS):
    """A nats-py client that never talks in plain text to a server it must reach over TLS,
    and whose read loop survives malformed header blocks (`_process_headers`).

    TLS is required for a `tls://` server, and for every server (`nats://` included, as
    the Go client's `Secure` option does) when `tls_everywhere` (a CA or a client
    certificate was configured). nats-py has no option for this: it decides from the
    server's INFO alone. So the one hook that sees each connection's INFO before CONNECT
    is written (`_process_info`, called by `_process_connect_init` with
    `initial_connection=True` on the first connection and on every reconnect) refuses an
    INFO without TLS: it closes the socket and raises TLSRequiredError. On a reconnect
    nats-py treats that like an unreachable server and tries the next one; on the first
    connection `connect()` raises it (the start fails: a misconfiguration or an attack,
    not an outage to wait out). A server that offers TLS without requiring it
    (`allow_non_tls`, INFO `tls_available`) is upgraded.
    """

    def __init__(self, *, tls_everywhere: bool = False) -> None:
        super().__init__()
        self._tls_everywhere = tls_everywhere
        self._first_connect = False

    async def connect(self, *args: Any, **kwargs: Any) -> None:
        self._first_connect = True
        try:
            await super().connect(*args, **kwargs)
        except _FirstConnectRefused as exc:
            await self._close(NATS.CLOSED, do_cbs=False)
            raise exc.error from None
        finally:
            self._first_connect = False

    async def _process_headers(self, headers: bytes) -> dict[str, str] | None:
        """nats-py 2.16 raises (IndexError, UnicodeDecodeError) on a malformed header block,
        which ends its read loop: one 8-byte message any producer can publish would deafen
        the connection until it reconnects. Such a block reads as no headers here (the
        worker then refuses the message: no reply subject, terminated)."""
        try:
            return await super()._process_headers(headers)
        except (IndexError, UnicodeDecodeError, ValueError):
            return None

    async def _process_info(self, info: dict[str, Any], initial_connection: bool = False) -> None:
        if initial_connection:  # a connection's first INFO: CONNECT follows it
            self._require_tls(info)
        await super()._process_info(info, initial_connection)

    def _require_tls(self, info: dict[str, Any]) -> None:
        assert self._current_server is not None, "set by nats-py before it reads INFO"
        uri = self._current_server.uri
        if uri.scheme == "wss" or self.options["tls_handshake_first"]:
            return  # TLS from the first byte
        if uri.scheme != "tls" and not self._tls_everywhere:
            return  # plain nats:// with no TLS settings: nats-py decides, as before
        if uri.scheme != "ws":  # nats-py never upgrades a ws:// connection
            if info.get("tls_required"):
                return  # nats-py upgrades right after this hook
            if info.get("tls_available"):
                # The server takes TLS without demanding it. nats-py reads `tls_required`
                # from this same dict (its `_server_info`) right after this hook to decide
                # whether to upgrade: ask it to.
                info["tls_required"] = True
                return
        if self._transport is not None:  # nats-py does not close it before its next try
            self._transport.close()  # type: ignore[no-untyped-call]
        error = TLSRequiredError(f"{uri.scheme}://{uri.hostname}:{uri.port}")
        raise _FirstConnectRefused(error) if self._first_connect else error


async def open_client(
    servers: list[str], *, tls: ssl.SSLContext | None = None, **options: Any
) -> NATS:
    """A connected `StrictTLSClient`: `options` are nats-py's `connect()` arguments; `tls`
    (from `tls_context`) also makes TLS required for nats:// servers. Raises what nats-py
    raises, and TLSRequiredError (above). A connect that fails or is cancelled (a
    caller's timeout) leaves no socket behind."""
    nc = StrictTLSClient(tls_everywhere=tls is not None)
    if tls is not None:
        options["tls"] = tls
    try:
        await nc.connect(servers, **options)
    except BaseException:
        await discard(nc)
        raise
    return nc


async def discard(nc: NATS) -> None:
    """Close without draining, never raising. A connect cancelled between two of nats-py's
    retries leaves the client marked closed with its socket open (its close() then does
    nothing): that socket is closed too."""
    with contextlib.suppress(nats.errors.Error, TimeoutError, OSError, RuntimeError):
        await nc.close()
    transport = getattr(nc, "_transport", None)
    if transport is not None:
        transport.close()
        with contextlib.suppress(OSError, RuntimeError, AttributeError):
            await transport.wait_closed()


# ---- the components' connection ---------------------------------------------------------


async def connect(
    servers: str | list[str],
    *,
    name: str,
    inbox_prefix: str = "_INBOX",
    on_reconnect: Callable[[], Awaitable[None]] | None = None,
    on_disconnect: Callable[[], Awaitable[None]] | None = None,
    connect_timeout: float = 2.0,
    tls_ca: str | None = None,
    tls_cert: str | None = None,
    tls_key: str | None = None,
) -> NATS:
    """Connect with lowered pings, endless reconnects and rate-limited error logging.

    `tls_ca`, `tls_cert`, `tls_key`: `--nats-ca`, `--nats-cert`, `--nats-key` (see
    `tls_context`, which raises TLSFilesError); a tls:// URL, or any of them, makes TLS
    required (`StrictTLSClient`: TLSRequiredError if the first server offers none)."""
    tls = tls_context(tls_ca, tls_cert, tls_key)
    err_log = _RateLimitedLog(name)
    nc_box: list[NATS] = []  # the connection, once made (callbacks run before it exists)

    async def error_cb(exc: Exception) -> None:
        err_log(exc)

    async def reconnected_cb() -> None:
        log.info("nats reconnected (%s)", name)
        if on_reconnect is not None:
            try:
                await on_reconnect()
            except (nats.errors.Error, TimeoutError, OSError) as exc:
                log.warning("after reconnect (%s): %s", name, exc)

    async def disconnected_cb() -> None:
        if nc_box and (nc_box[0].is_closed or nc_box[0].is_draining):
            log.info("nats connection closed (%s)", name)
        else:
            log.warning("nats disconnected (%s)", name)
        if on_disconnect is not None:
            await on_disconnect()

    urls = [s.strip() for s in servers.split(",")] if isinstance(servers, str) else servers
    kwargs: dict[str, Any] = {
        "name": name,
        "inbox_prefix": inbox_prefix,
        "ping_interval": PING_INTERVAL_S,
        "max_outstanding_pings": MAX_OUTSTANDING_PINGS,
        "max_reconnect_attempts": -1,
        "reconnect_time_wait": 0.5,
        "connect_timeout": connect_timeout,
        "error_cb": error_cb,
        "reconnected_cb": reconnected_cb,
        "disconnected_cb": disconnected_cb,
        "pending_size": 64 * 1024 * 1024,
    }
    nc = await open_client(urls, tls=tls, **kwargs)
    nc_box.append(nc)
    return nc


async def flush(nc: Bus, wait_s: int = 5) -> None:
    """A flush that really flushes: nats-py's PING can overtake buffered SUB/PUB commands.
    (A bus with no client-side buffer, like the in-memory one, has nothing to flush.)"""
    flush_pending = getattr(nc, "_flush_pending", None)
    if flush_pending is None:
        return
    await flush_pending(force_flush=True)
    await nc.flush(timeout=wait_s)


def jetstream(nc: NATS, timeout: float = 5.0) -> JetStreamContext:
    return nc.jetstream(timeout=timeout)


def header_bytes(headers: dict[str, str]) -> int:
    """Bytes the NATS/1.0 header block takes on the wire (server counts it in max_payload)."""
    return 12 + sum(len(k) + len(v) + 4 for k, v in headers.items()) + 2


async def close(nc: NATS) -> None:
    """Drain if possible (delivers what is buffered), else just close; never raises."""
    try:
        await nc.drain()
    except (nats.errors.Error, TimeoutError, OSError, RuntimeError):
        with contextlib.suppress(nats.errors.Error, TimeoutError, OSError, RuntimeError):
            await nc.close()


def redact_url(url: str) -> str:
    """`url` (one or a comma-separated list) without user and password, for messages."""
    out = []
    for one in url.split(","):
        parts = urlsplit(one.strip())
        if parts.hostname is None:
            out.append(one.strip() if "@" not in one else "<url>")
            continue
        host = parts.hostname + (f":{parts.port}" if parts.port else "")
        out.append(f"{parts.scheme}://{host}" if parts.scheme else host)
    return ",".join(out)


DISCOVER_EVERY_S = 0.25
CONTROL_PENDING = 4096
"""Messages a control subscription (ping, cancel, discover) may hold unread: a flood beyond
it is dropped by the client (a slow-consumer error, logged rate-limited), not queued."""


class Throttle:
    """Run an answer at most once per `every_s` (`llmfleet.discover`: every worker and
    gateway answers each one). A call that comes sooner waits for the end of that window
    and runs then, once for any number of such calls; the others return at once. Meant for
    a subscription callback (nats-py runs those one at a time)."""

    def __init__(self, every_s: float = DISCOVER_EVERY_S) -> None:
        self._every = every_s
        self._last = -every_s
        self._due = False

    async def run(self, answer: Callable[[], Awaitable[None]]) -> None:
        wait = self._last + self._every - time.monotonic()
        if wait > 0:
            if self._due:
                return
            self._due = True
            try:
                await asyncio.sleep(wait)
            finally:
                self._due = False
        self._last = time.monotonic()
        await answer()
