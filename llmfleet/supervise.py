"""Child processes that die with their parent, and a supervisor that restarts dead workers.

`llmfleet dev` runs each worker as a child process, so native code that crashes (SIGILL
from an instruction this CPU lacks, SIGSEGV) takes down only that worker: the gateway and
the broker stay up, the broker holds the model's requests, and the `Supervisor` prints
one line naming the model and the signal, then starts the worker again with backoff.

No orphans: children are tied to the parent with Linux's `PR_SET_PDEATHSIG`, so they get
a signal when the parent dies, even by SIGKILL. For programs we do not control (the
nats-server binary) it is set between fork and exec (`die_with_parent` as `preexec_fn`);
our own Python children set it themselves at start (`adopt_parent_death_signal`, reading
`LLMFLEET_PARENT_PID`), which also works where the event loop cannot run a `preexec_fn`.
The signal fires when the *thread* that started the child exits, so children are started
from the main thread (the event loop's). Elsewhere than Linux this is a no-op.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
import sys
from collections.abc import Callable, Coroutine
from typing import Any, TextIO

import msgspec

PARENT_ENV = "LLMFLEET_PARENT_PID"
_PR_SET_PDEATHSIG = 1
_HINTS = {
    signal.SIGILL: "illegal instruction: its native code uses a CPU instruction this machine "
    "cannot run; reinstall the engine from a portable build (README, 'A real GPU host')",
    signal.SIGSEGV: "a crash in native code",
    signal.SIGBUS: "a crash in native code",
    signal.SIGABRT: "aborted by native code",
    signal.SIGKILL: "killed, perhaps for memory",
}


def _prctl_death_signal(sig: int) -> bool:
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    return int(libc.prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0)) == 0


def die_with_parent(sig: int = signal.SIGTERM) -> Callable[[], None]:
    """A `preexec_fn` that makes the child get `sig` when this process dies."""
    parent = os.getpid()

    def preexec() -> None:
        _prctl_death_signal(sig)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return preexec


def adopt_parent_death_signal(sig: int = signal.SIGKILL) -> None:
    """In a child started by `Supervisor`: die with the parent named in LLMFLEET_PARENT_PID."""
    raw = os.environ.pop(PARENT_ENV, "")
    if not raw.isdigit():
        return
    _prctl_death_signal(sig)
    if os.getppid() != int(raw):  # the parent is already gone
        os._exit(1)


def describe_exit(returncode: int) -> str:
    """How a child ended, for a person: `signal SIGILL (illegal instruction: ...)`."""
    if returncode < 0:
        try:
            sig = signal.Signals(-returncode)
        except ValueError:
            return f"signal {-returncode}"
        hint = _HINTS.get(sig)
        return f"signal {sig.name}" + (f" ({hint})" if hint else "")
    return f"exit code {returncode}"


def next_backoff(
    previous: float, ran_for: float, *, first: float = 1.0, cap: float = 30.0
) -> float:
    """Seconds to wait before a restart: doubling while the child keeps dying soon after
    it starts; back to `first` once it had run for a minute."""
    if previous <= 0 or ran_for >= 60.0:
        return first
    return min(previous * 2, cap)


class ChildSpec(msgspec.Struct, frozen=True):
    """A supervised worker command and the models it serves (named in its messages)."""

    argv: list[str]
    models: tuple[str, ...]
    engine: str

    @property
    def label(self) -> str:
        return ", ".join(self.models) + f" ({self.engine})"


class Supervisor:
    """Owns one child process: starts it, restarts it when it dies, stops it on request.

    `run(stopping)` returns once `stopping` is set and the child has exited: it is sent
    SIGTERM (a worker drains) and SIGKILL after `stop_grace_s`.
    """

    def __init__(self, spec: ChildSpec, *, stop_grace_s: float, out: TextIO = sys.stderr) -> None:
        self.spec = spec
        self.stop_grace_s = stop_grace_s
        self.out = out
        self.pid: int | None = None
        self.restarts = 0

    def _say(self, line: str) -> None:
        print(f"llmfleet dev: {line}", file=self.out, flush=True)

    async def run(self, stopping: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        backoff = 0.0
        env = {**os.environ, PARENT_ENV: str(os.getpid())}
        while not stopping.is_set():
            proc = await asyncio.create_subprocess_exec(
                *self.spec.argv, env=env, start_new_session=True
            )
            self.pid = proc.pid
            self._say(f"started the worker for {self.spec.label} (pid {proc.pid})")
            started = loop.time()
            if await _first(proc.wait(), stopping.wait()) == 1:
                await self._stop(proc)
                return
            rc = proc.returncode
            assert rc is not None
            backoff = next_backoff(backoff, loop.time() - started)
            self.restarts += 1
            self._say(
                f"the worker for {self.spec.label} died ({describe_exit(rc)}); restarting it "
                f"in {backoff:.0f} s. Its requests wait in the broker meanwhile."
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), backoff)

    async def _stop(self, proc: asyncio.subprocess.Process) -> None:
        if proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), self.stop_grace_s)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()


async def _first(*aws: Coroutine[Any, Any, Any]) -> int:
    """Await coroutines side by side; the index of the first to finish (the rest cancelled)."""
    tasks = [asyncio.ensure_future(a) for a in aws]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        return next(i for i, t in enumerate(tasks) if t in done)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
