"""The gateway's metrics, its per-request record (spans, metrics, access log), and the
queue-depth poller.

`RequestRecord` is filled in by the request's own task as it goes and finished exactly once
(`GatewayMetrics.finish`): one counter increment, at most six histogram records (never one
per token), span attributes, and one access-log line. Counters and gauges that components
keep anyway (dispatcher, mux, catalog, NATS client) are read at scrape time.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import msgspec
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from common.errors import ServiceUnavailable
from common.logs import ACCESS_LOGGER
from common.natsconn import broker_errors
from common.queue import QueueDepth, queue_depth, queued_models
from common.telemetry import (
    DURATION_BUCKETS,
    QUEUE_BUCKETS,
    TOKEN_BUCKETS,
    TPOT_BUCKETS,
    TTFT_BUCKETS,
    HistogramSeries,
    Telemetry,
    gen_ai_operation,
)
from gateway.edge import EdgeCounters
from gateway.stats import GatewayStats

log = logging.getLogger(__name__)
access_log = logging.getLogger(ACCESS_LOGGER)

OP = "gen_ai.operation.name"
MODEL = "gen_ai.request.model"
STATUS = "http.response.status_code"
ERROR = "error.type"
UNKNOWN_MODEL = "_unknown"  # models not in the catalog: clients must not mint label values
CLIENT_CLOSED = 499  # nginx's "client closed request": no status was sent


MAX_ORPHAN_MODELS = 100  # queue gauges for models outside the catalog, at most


class RequestRecord:
    """One inference request as the gateway saw it; owned by the request's task."""

    __slots__ = (
        "accepted_at",
        "error_type",
        "first_at",
        "model",
        "op",
        "request_id",
        "span",
        "start",
        "status",
        "stream",
        "tokens_in",
        "tokens_out",
        "worker",
        "worker_model",
    )

    def __init__(self, op: str, request_id: str, span: trace.Span | None) -> None:
        self.op = op
        self.request_id = request_id
        self.span = span
        self.start = time.perf_counter()
        self.model = UNKNOWN_MODEL
        self.stream = False
        self.status = 200
        self.error_type: str | None = None
        self.accepted_at: float | None = None  # perf_counter at the first `accepted`
        self.first_at: float | None = None  # perf_counter at the first content
        self.tokens_in = 0
        self.tokens_out = 0
        self.worker = ""
        self.worker_model = ""

    def fail(self, status: int, error_type: str) -> None:
        self.status = status
        self.error_type = error_type


class _ModelSeries(msgspec.Struct):
    """The histogram series of one (model, operation), bound once."""

    queue_wait: HistogramSeries
    ttft: HistogramSeries
    tpot: HistogramSeries
    tokens_in: HistogramSeries
    tokens_out: HistogramSeries


class GatewayMetrics:
    """Instruments of one gateway; `finish(record)` is the only per-request entry point."""

    def __init__(self, tel: Telemetry) -> None:
        self.tel = tel
        self._requests: dict[tuple[str, str, int, str | None], int] = {}
        self._active: dict[tuple[str, str], int] = {}
        self._attrs: dict[tuple[Any, ...], dict[str, Any]] = {}
        self._bundles: dict[tuple[str, str], _ModelSeries] = {}
        h = tel.histogram
        self.duration = h(
            "gen_ai.server.request.duration",
            "s",
            "Time from receiving the HTTP request to its last byte",
            DURATION_BUCKETS,
        )
        self.ttft = h(
            "gen_ai.server.time_to_first_token",
            "s",
            "Time from receiving the request to the first output (queue wait included)",
            TTFT_BUCKETS,
        )
        self.tpot = h(
            "gen_ai.server.time_per_output_token",
            "s",
            "(last output - first output) / (output tokens - 1), once per request",
            TPOT_BUCKETS,
        )
        self.tokens = h(
            "gen_ai.client.token.usage",
            "{token}",
            "Tokens per request, by gen_ai.token.type (input, output)",
            TOKEN_BUCKETS,
        )
        self.queue_wait = h(
            "llmfleet.gateway.queue.wait",
            "s",
            "Time from publishing a request until a worker accepted it",
            QUEUE_BUCKETS,
        )
        self.queue: dict[str, QueueDepth] = {}
        tel.observe(
            "counter",
            "llmfleet.gateway.requests",
            "{request}",
            "Finished inference requests by model, operation, HTTP status and error type",
            self._read_requests,
        )
        tel.observe(
            "updown",
            "llmfleet.gateway.requests.active",
            "{request}",
            "Inference requests published and not yet finished",
            lambda: ((n, self._labels(k)) for k, n in list(self._active.items())),
        )
        for name, unit, desc, field in (
            ("llmfleet.queue.depth", "{request}", "Requests waiting for a worker", "pending"),
            ("llmfleet.queue.starting", "{request}", "Taken, not yet answered", "starting"),
            ("llmfleet.queue.pulls", "{request}", "Free worker slots waiting", "pulls"),
            ("llmfleet.queue.oldest_wait", "s", "Age of the oldest waiting request", "oldest"),
        ):
            tel.observe("gauge", name, unit, desc, self._queue_reader(field))

    # ---- the request path -----------------------------------------------------------

    def _labels(self, key: tuple[Any, ...]) -> dict[str, Any]:
        a = self._attrs.get(key)
        if a is None:
            model, op, *rest = key
            a = {MODEL: model, OP: gen_ai_operation(op)}
            if rest:
                a[STATUS] = rest[0]
                if rest[1] is not None:
                    a[ERROR] = rest[1]
            self._attrs[key] = a
        return a

    def started(self, rec: RequestRecord) -> None:
        """The request was published (it counts as active until `finish`)."""
        key = (rec.model, rec.op)
        self._active[key] = self._active.get(key, 0) + 1

    def finish(self, rec: RequestRecord, *, published: bool) -> None:
        """Record a finished request: metrics, span end, access log. Called exactly once."""
        end = time.perf_counter()
        model, op = rec.model, rec.op
        mo = (model, op)
        if published:
            self._active[mo] -= 1
        key = (model, op, rec.status, rec.error_type)
        self._requests[key] = self._requests.get(key, 0) + 1
        self.duration.record(end - rec.start, key, lambda: self._labels(key))
        b = self._bundles.get(mo)
        if b is None:
            b = self._bundles[mo] = self._bundle(mo)
        if rec.accepted_at is not None:
            b.queue_wait.record(rec.accepted_at - rec.start)
        if rec.first_at is not None:
            b.ttft.record(rec.first_at - rec.start)
            if rec.tokens_out > 1:
                b.tpot.record((end - rec.first_at) / (rec.tokens_out - 1))
        if rec.tokens_in:
            b.tokens_in.record(rec.tokens_in)
        if rec.tokens_out:
            b.tokens_out.record(rec.tokens_out)
        if rec.span is not None:
            self._end_span(rec)
        if access_log.isEnabledFor(logging.INFO):
            self._access(rec, end)

    def _bundle(self, mo: tuple[str, str]) -> _ModelSeries:
        model, op = mo
        return _ModelSeries(
            queue_wait=self.queue_wait.series(mo, lambda: self._labels(mo)),
            ttft=self.ttft.series(mo, lambda: self._labels(mo)),
            tpot=self.tpot.series(mo, lambda: self._labels(mo)),
            tokens_in=self.tokens.series((*mo, "in"), lambda: self._tok(model, op, "input")),
            tokens_out=self.tokens.series((*mo, "out"), lambda: self._tok(model, op, "output")),
        )

    def _tok(self, model: str, op: str, kind: str) -> dict[str, Any]:
        return {**self._labels((model, op)), "gen_ai.token.type": kind}

    @staticmethod
    def _end_span(rec: RequestRecord) -> None:
        span = rec.span
        assert span is not None
        attrs: dict[str, Any] = {STATUS: rec.status, "llmfleet.stream": rec.stream}
        if rec.worker:
            attrs["llmfleet.worker"] = rec.worker
        if rec.worker_model:
            attrs["gen_ai.response.model"] = rec.worker_model
        if rec.tokens_in:
            attrs["gen_ai.usage.input_tokens"] = rec.tokens_in
        if rec.tokens_out:
            attrs["gen_ai.usage.output_tokens"] = rec.tokens_out
        if rec.error_type is not None:
            attrs[ERROR] = rec.error_type
            if rec.status >= 500 or rec.status == 200:  # 4xx are the client's, not ours
                span.set_status(Status(StatusCode.ERROR, rec.error_type))
        span.set_attributes(attrs)
        span.end()

    @staticmethod
    def _access(rec: RequestRecord, end: float) -> None:
        ttft = None if rec.first_at is None else round((rec.first_at - rec.start) * 1000, 3)
        # A record made directly (not `access_log.info(..., extra=)`): skips the caller
        # lookup and the extra-key checks, a third of the logging cost at this rate.
        record = logging.LogRecord(
            ACCESS_LOGGER, logging.INFO, __file__, 0, "request finished", None, None
        )
        record.__dict__.update(
            request_id=rec.request_id,
            model=rec.model,
            op=rec.op,
            status=rec.status,
            error=rec.error_type,
            worker=rec.worker or None,
            duration_ms=round((end - rec.start) * 1000, 3),
            ttft_ms=ttft,
            tokens_in=rec.tokens_in,
            tokens_out=rec.tokens_out,
            stream=rec.stream,
        )
        access_log.handle(record)

    # ---- spans ------------------------------------------------------------------------

    def server_span(
        self, op: str, method: str, path: str, traceparent: str | None, tracestate: str | None
    ) -> trace.Span | None:
        """The request's SERVER span (continuing an incoming traceparent), or None when
        tracing is off. Named `{operation}` until the model is known."""
        if not self.tel.tracing:
            return None
        return self.tel.tracer.start_span(
            gen_ai_operation(op),
            context=self.tel.extract(traceparent, tracestate),
            kind=SpanKind.SERVER,
            attributes={OP: gen_ai_operation(op), "http.request.method": method, "url.path": path},
        )

    # ---- scrape-time readers ----------------------------------------------------------

    def _read_requests(self) -> Iterator[tuple[float, Mapping[str, Any]]]:
        for key, n in list(self._requests.items()):
            yield n, self._labels(key)

    def _queue_reader(self, field: str) -> Callable[[], Iterator[tuple[float, Mapping[str, Any]]]]:
        def read() -> Iterator[tuple[float, Mapping[str, Any]]]:
            for model, d in list(self.queue.items()):
                v = d.oldest_wait_s if field == "oldest" else getattr(d, field)
                yield v, {MODEL: model}

        return read

    async def poll_queues(self, js: Any, models: Callable[[], list[str]], every_s: float) -> None:
        """Refresh `queue` every `every_s` for the catalog's models and every model with
        requests in the stream, served or not (a background task; scrapes only read the last
        result). Models in neither are dropped."""
        while True:
            wanted = set(models())
            try:
                # Models no worker serves (requests from NATS producers wait for one): a
                # bounded number, since these names come from whoever may publish.
                with broker_errors("queued models"):
                    orphans = sorted(await queued_models(js) - wanted)
                wanted.update(orphans[:MAX_ORPHAN_MODELS])
            except ServiceUnavailable as exc:
                log.debug("%s", exc)
            for model in sorted(wanted):
                try:
                    with broker_errors(f"queue depth of {model}"):
                        self.queue[model] = await queue_depth(js, model)
                except ServiceUnavailable as exc:
                    log.debug("%s", exc)
            for gone in set(self.queue) - set(wanted):
                del self.queue[gone]
            await asyncio.sleep(every_s)


# (name, unit, description, label, {label value: GatewayStats field}); label "" means one
# unlabelled series. All are counters read from the stats snapshot at each scrape.
_GATEWAY_COUNTERS: tuple[tuple[str, str, str, str, dict[str, str]], ...] = (
    ("llmfleet.gateway.failovers", "{request}",
     "Requests continued on another worker: redelivered (before any output) or resumed",
     "llmfleet.failover.kind", {"redelivered": "redelivered", "resumed": "resumed"}),
    ("llmfleet.gateway.workers_lost", "{worker}",
     "Workers given up on while serving a request (no responders or stalled)",
     "", {"": "workers_lost"}),
    ("llmfleet.gateway.cancellations", "{request}",
     "Requests the gateway stopped: cancel sent to the worker, or withdrawn from the queue",
     "llmfleet.cancel.kind", {"worker": "cancels_sent", "queued": "withdrawn"}),
    ("llmfleet.gateway.client_disconnects", "{request}",
     "HTTP clients that left before their answer was complete", "", {"": "disconnects"}),
    ("llmfleet.gateway.queue.rejections", "{request}",
     "Requests refused by the queue: full (429), broker out of room (503), not taken in time (503)",
     "llmfleet.queue.reason", {"queue_full": "rejected_full", "queue_timeout": "queue_timeouts",
                               "queue_storage_full": "rejected_storage"}),
    ("llmfleet.gateway.publish.retries", "{retry}",
     "JetStream publishes retried while the broker reconnected or elected a leader",
     "", {"": "publish_retries"}),
    ("llmfleet.gateway.stream.overflows", "{request}",
     "Reply streams that overflowed the gateway's per-request buffer", "", {"": "overflows"}),
    ("llmfleet.gateway.stream.fenced", "{message}",
     "Reply messages ignored because they came from a delivery the gateway gave up on",
     "", {"": "fenced"}),
)  # fmt: skip


def observe_gateway(
    tel: Telemetry,
    *,
    stats: Callable[[], GatewayStats],
    catalog: Any,
    nc: Any,
    edge: EdgeCounters | None = None,
) -> None:
    """Counters and gauges read at scrape time from the gateway's one stats snapshot (and
    the HTTP edge's refusals, which never reach the app)."""

    def counter(label: str, fields: dict[str, str]) -> Callable[[], list[tuple[float, Any]]]:
        def read() -> list[tuple[float, Any]]:
            snap = stats()
            return [(getattr(snap, f), {label: k} if label else {}) for k, f in fields.items()]

        return read

    for name, unit, description, label, fields in _GATEWAY_COUNTERS:
        tel.observe("counter", name, unit, description, counter(label, fields))
    tel.observe(
        "counter",
        "llmfleet.nats.reconnects",
        "{reconnect}",
        "Reconnections of this process's NATS connection",
        lambda: [(int(nc.stats.get("reconnects", 0)), {})],
    )
    if edge is not None:
        tel.observe(
            "counter",
            "llmfleet.gateway.http.refused",
            "{request}",
            "Connections the HTTP edge answered itself and closed: request head too large "
            "(431), not complete in time (408), too many connections (503)",
            lambda: [(getattr(edge, r), {"llmfleet.refused.reason": r}) for r in edge.REASONS],
        )

    def fleet(field: str) -> Callable[[], list[tuple[float, Mapping[str, Any]]]]:
        def read() -> list[tuple[float, Mapping[str, Any]]]:
            snap = catalog.snapshot
            return [
                (len(m.workers) if field == "workers" else getattr(m, field), {MODEL: m.id})
                for m in snap.models.values()
            ]

        return read

    tel.observe(
        "gauge", "llmfleet.fleet.workers", "{worker}", "Workers per model", fleet("workers")
    )
    tel.observe(
        "gauge", "llmfleet.fleet.slots", "{request}", "Ready slots per model", fleet("slots")
    )
    tel.observe(
        "gauge",
        "llmfleet.fleet.in_flight",
        "{request}",
        "Requests running per model, as the workers last announced",
        fleet("in_flight"),
    )
