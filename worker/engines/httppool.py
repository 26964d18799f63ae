"""Many concurrent HTTP requests without httpx's pool collapsing.

httpcore's connection pool scans every connection for every request it assigns, so its
cost per request grows with the number of open connections: measured here, a worker
proxying 256 concurrent requests through one `httpx.AsyncClient` fell to 66 req/s. Keeping
each pool small and spreading requests round-robin over several keeps that cost flat.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import httpx

SHARD_CONNECTIONS = 32


class ShardedClient:
    """Round-robin over `ceil(max_connections / 32)` small `httpx.AsyncClient`s."""

    def __init__(self, max_connections: int, **client_kwargs: Any) -> None:
        shards = max(1, math.ceil(max_connections / SHARD_CONNECTIONS))
        per = max(1, math.ceil(max_connections / shards))
        limits = httpx.Limits(
            max_connections=per, max_keepalive_connections=per, keepalive_expiry=30.0
        )
        self._clients = [httpx.AsyncClient(limits=limits, **client_kwargs) for _ in range(shards)]
        self._next = itertools.cycle(self._clients)

    def client(self) -> httpx.AsyncClient:
        return next(self._next)

    async def aclose(self) -> None:
        for c in self._clients:
            await c.aclose()

    async def __aenter__(self) -> ShardedClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
