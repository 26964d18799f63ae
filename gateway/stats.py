"""The gateway's counters, and the one frozen snapshot that `/stats`, `/metrics` and the
gateway's announcement all read.

`GatewayCounters` is created once by the composition root (`gateway/server.py`) and handed
to the parts that see each event (the app, the dispatcher, the reply mux); they add to
it on the event loop, never across an `await`, so no lock is needed. Everyone else reads
`snapshot()`, a `GatewayStats`: adding a counter is a field of `GatewayStats` (and its
annotation on `GatewayCounters`) and one line where it is counted; every projection has it.
"""

from __future__ import annotations

import msgspec


class GatewayStats(msgspec.Struct, frozen=True):
    """The gateway's counters at one moment (totals since start, except the gauges
    `in_flight` and `open_streams`)."""

    # HTTP
    requests: int = 0
    in_flight: int = 0
    ok: int = 0
    client_errors: int = 0
    server_errors: int = 0
    disconnects: int = 0
    # the queue
    published: int = 0
    rejected_full: int = 0
    rejected_storage: int = 0  # the stream (the broker) had no room left: 503
    queue_timeouts: int = 0
    publish_retries: int = 0
    by_reference: int = 0
    # failures and failover
    workers_lost: int = 0
    redelivered: int = 0
    resumed: int = 0
    # cancellations: a cancel sent to a worker, or a request withdrawn from the queue
    cancels_sent: int = 0
    withdrawn: int = 0
    # reply streams
    orphans: int = 0
    overflows: int = 0
    fenced: int = 0  # reply messages of a delivery given up on (a lost worker), ignored
    open_streams: int = 0  # a gauge, from the mux: not a counter

    def as_document(self) -> dict[str, dict[str, int]]:
        """The `/stats` JSON layout (grouped as operators read it)."""
        return {
            "http": {
                "requests": self.requests,
                "in_flight": self.in_flight,
                "ok": self.ok,
                "client_errors": self.client_errors,
                "server_errors": self.server_errors,
                "disconnects": self.disconnects,
            },
            "queue": {
                "published": self.published,
                "rejected_queue_full": self.rejected_full,
                "rejected_storage_full": self.rejected_storage,
                "queue_timeouts": self.queue_timeouts,
                "publish_retries": self.publish_retries,
                "bodies_by_reference": self.by_reference,
            },
            "failures": {
                "workers_lost": self.workers_lost,
                "redelivered": self.redelivered,
                "resumed": self.resumed,
            },
            "cancellations": {"to_workers": self.cancels_sent, "withdrawn": self.withdrawn},
            "streams": {
                "open": self.open_streams,
                "orphans": self.orphans,
                "overflows": self.overflows,
                "fenced": self.fenced,
            },
        }


_FIELDS = tuple(f for f in GatewayStats.__struct_fields__ if f != "open_streams")


class GatewayCounters:
    """Mutable counters, one instance per gateway process (see the module docstring)."""

    __slots__ = _FIELDS

    def __init__(self) -> None:
        for name in _FIELDS:
            setattr(self, name, 0)

    requests: int
    in_flight: int
    ok: int
    client_errors: int
    server_errors: int
    disconnects: int
    published: int
    rejected_full: int
    rejected_storage: int
    queue_timeouts: int
    publish_retries: int
    by_reference: int
    workers_lost: int
    redelivered: int
    resumed: int
    cancels_sent: int
    withdrawn: int
    orphans: int
    overflows: int
    fenced: int

    def count_status(self, status: int) -> None:
        if status >= 500:
            self.server_errors += 1
        elif status >= 400:
            self.client_errors += 1
        else:
            self.ok += 1

    def snapshot(self, open_streams: int = 0) -> GatewayStats:
        return GatewayStats(
            **{name: getattr(self, name) for name in _FIELDS}, open_streams=open_streams
        )
