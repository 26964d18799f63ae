"""Running a component's event loop: uvloop where available, signals wired to its stop."""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import Callable, Coroutine
from typing import Any


def run_async(main: Coroutine[Any, Any, Any]) -> Any:
    """Run on uvloop where available; returns what `main` returns."""
    try:
        import uvloop  # noqa: PLC0415

        factory: Callable[[], asyncio.AbstractEventLoop] | None = uvloop.new_event_loop
    except ImportError:  # pragma: no cover - Windows
        factory = None
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main)


async def run_with_signals(
    start: Callable[[asyncio.Future[None]], Coroutine[Any, Any, None]],
    stop: Callable[[], None],
) -> bool:
    """Run a component; SIGTERM/SIGINT stop it gracefully once it is up, and abort it while
    it is still starting (e.g. waiting for an unreachable broker). False if aborted."""
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = loop.create_future()
    main = asyncio.current_task()
    aborted = False

    def on_signal() -> None:
        nonlocal aborted
        if ready.done():
            stop()
        elif main is not None:
            aborted = True
            main.cancel()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    try:
        await start(ready)
    except asyncio.CancelledError:
        if not aborted:
            raise
        print("llmfleet: stopped before it was ready", file=sys.stderr, flush=True)
        return False
    return True
