"""A component's inbox with two classes of event.

Lifecycle events (a delivery, a pull's end, a job's end, drain, reconnect) are never
dropped: each is bounded by construction (one per open pull, one per job, one per
connection change), so they need no bound of their own. Requests from outside (cancels,
listener-gone notices) and ticks can come in floods: at most `max_offered` of them wait,
and an offer beyond that is refused and counted, so a flood can never crowd out a
lifecycle event nor grow memory.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Generic, TypeVar

E = TypeVar("E")


class Inbox(Generic[E]):
    """Single consumer (`get`), any number of producers on the same event loop."""

    def __init__(self, max_offered: int) -> None:
        self._items: deque[tuple[bool, E]] = deque()
        self._offered = 0
        self._max = max_offered
        self._wake = asyncio.Event()
        self.refused = 0

    def put(self, ev: E) -> None:
        """A lifecycle event: always queued."""
        self._items.append((False, ev))
        self._wake.set()

    def offer(self, ev: E) -> bool:
        """A droppable event: queued unless `max_offered` already wait (then counted)."""
        if self._offered >= self._max:
            self.refused += 1
            return False
        self._offered += 1
        self._items.append((True, ev))
        self._wake.set()
        return True

    async def get(self) -> E:
        while not self._items:
            self._wake.clear()
            await self._wake.wait()
        offered, ev = self._items.popleft()
        if offered:
            self._offered -= 1
        return ev

    def __len__(self) -> int:
        return len(self._items)
