"""Metrics and traces for one process: one `Telemetry` object, built by the composition root
(llmfleet/roots.py, or a test) and passed down. No module globals, no global OTel providers.

Metrics go through the OpenTelemetry SDK `MeterProvider`; its `PrometheusMetricReader`
(on a registry of our own) serves `/metrics`, and with an OTLP endpoint a periodic reader
pushes the same metrics there. Counters and gauges are observable instruments that read
counters the components keep anyway (stats snapshots): free on the request path.

Histograms are the exception. The SDK's synchronous `Histogram.record` costs ~9 us per call
(attribute cleaning and hashing, locks), and a request records five or six of them; the
gateway's whole cost per token message is ~39 us. So per-request histograms are
`FastHistogram`s: a series is bound once per attribute set, and `record` is a bisect and
three additions (~0.3 us). Our readers merge them into each collection as ordinary
cumulative `Histogram` metrics (`_FastHistograms.merge`), so Prometheus and OTLP see one set.

Tracing is off unless an OTLP endpoint or span processors are given; without them
`tracing` is False and callers skip span work entirely (not even a non-recording span).
Context crosses NATS in the W3C `traceparent` header (`inject` / `extract`).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import os
import time
from bisect import bisect_left
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.metrics import CallbackOptions, Meter, NoOpMeterProvider, Observation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    Histogram,
    HistogramDataPoint,
    Metric,
    MetricExporter,
    MetricReader,
    MetricsData,
    PeriodicExportingMetricReader,
    ResourceMetrics,
    ScopeMetrics,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import Tracer
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from prometheus_client import CollectorRegistry, generate_latest

from common import __version__

log = logging.getLogger(__name__)

PROMETHEUS_CONTENT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"
MAX_SERIES = 2000  # per histogram; further attribute sets share one overflow series

# Bucket boundaries: the GenAI semantic conventions' advice, extended down for fast engines.
TTFT_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
)  # fmt: skip
TPOT_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0,
    2.5,
)  # fmt: skip
DURATION_BUCKETS = (
    0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92,
)  # fmt: skip
QUEUE_BUCKETS = (
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
)  # fmt: skip
TOKEN_BUCKETS = (
    1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216, 67108864,
)  # fmt: skip

UPSTREAM_TRACEPARENT: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "llmfleet_upstream_traceparent", default=None
)
"""The W3C `traceparent` an engine sends to its upstream server (vLLM, SGLang ... join the
trace when they trace): the engine span's when tracing is on, else the request's own. Set by
the job task before it calls the engine (worker/job.py), so it is per request; a context
variable because engines take no per-request context otherwise."""

_OVERFLOW = (("otel.metric.overflow", True),)
_EXPORT_TIMEOUT_S = 3.0


class HistogramSeries:
    """One attribute set of a `FastHistogram`: cumulative bucket counts since start."""

    __slots__ = ("_bounds", "attributes", "count", "counts", "max", "min", "sum")

    def __init__(self, bounds: Sequence[float], attributes: Mapping[str, Any]) -> None:
        self._bounds = bounds
        self.attributes = dict(attributes)
        self.counts = [0] * (len(bounds) + 1)
        self.count = 0
        self.sum = 0.0
        self.min = float("inf")
        self.max = float("-inf")

    def record(self, value: float) -> None:
        # bisect_left: bucket i holds (bounds[i-1], bounds[i]], as OTel and Prometheus do.
        self.counts[bisect_left(self._bounds, value)] += 1
        self.count += 1
        self.sum += value
        self.min = min(self.min, value)
        self.max = max(self.max, value)


class FastHistogram:
    """A cumulative explicit-bucket histogram for the request path (see the module doc).

    `series(key, attrs)` binds (and caches) the series for an attribute set; callers keep a
    small key (a tuple) and build the attribute dict only the first time. Used by one event
    loop; the export side only reads.
    """

    def __init__(self, name: str, unit: str, description: str, bounds: Sequence[float]) -> None:
        self.name = name
        self.unit = unit
        self.description = description
        self.bounds = tuple(float(b) for b in bounds)
        self._series: dict[Any, HistogramSeries] = {}

    def series(self, key: Any, attributes: Callable[[], Mapping[str, Any]]) -> HistogramSeries:
        s = self._series.get(key)
        if s is None:
            if len(self._series) >= MAX_SERIES:
                key, attrs = _OVERFLOW, dict(_OVERFLOW)
                s = self._series.get(key)
                if s is not None:
                    return s
            else:
                attrs = dict(attributes())
            s = self._series[key] = HistogramSeries(self.bounds, attrs)
        return s

    def record(self, value: float, key: Any, attributes: Callable[[], Mapping[str, Any]]) -> None:
        self.series(key, attributes).record(value)

    def to_metric(self, start_ns: int, now_ns: int) -> Metric | None:
        points = [
            HistogramDataPoint(
                attributes=s.attributes,
                start_time_unix_nano=start_ns,
                time_unix_nano=now_ns,
                count=s.count,
                sum=s.sum,
                bucket_counts=list(s.counts),
                explicit_bounds=list(self.bounds),
                min=s.min,
                max=s.max,
                exemplars=[],
            )
            for s in list(self._series.values())
            if s.count
        ]
        if not points:
            return None
        return Metric(
            name=self.name,
            description=self.description,
            unit=self.unit,
            data=Histogram(
                data_points=points, aggregation_temporality=AggregationTemporality.CUMULATIVE
            ),
        )


class _FastHistograms:
    """The `FastHistogram`s of one process, merged into each reader's collection."""

    def __init__(self, resource: Resource, scope: InstrumentationScope) -> None:
        self.resource = resource
        self.scope = scope
        self.histograms: list[FastHistogram] = []
        self.start_ns = time.time_ns()

    def merge(self, data: MetricsData | None) -> MetricsData | None:
        now = time.time_ns()
        metrics = [m for h in self.histograms if (m := h.to_metric(self.start_ns, now))]
        if not metrics:
            return data
        extra = ScopeMetrics(scope=self.scope, metrics=metrics, schema_url="")
        if data is None or not data.resource_metrics:
            rm = ResourceMetrics(resource=self.resource, scope_metrics=[extra], schema_url="")
            return MetricsData(resource_metrics=[rm])
        first, *rest = data.resource_metrics
        merged = ResourceMetrics(
            resource=first.resource,
            scope_metrics=[*first.scope_metrics, extra],
            schema_url=first.schema_url,
        )
        return MetricsData(resource_metrics=[merged, *rest])


class _MergesFastHistograms(MetricReader):
    """A reader that adds the `FastHistogram`s to every collection it receives."""

    _fast: _FastHistograms

    def _receive_metrics(
        self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: Any
    ) -> None:
        merged = self._fast.merge(metrics_data)
        if merged is not None:
            # The next class in the MRO is the concrete reader (Prometheus or periodic).
            super()._receive_metrics(merged, timeout_millis, **kwargs)  # type: ignore[safe-super]


class _PrometheusReader(_MergesFastHistograms, PrometheusMetricReader):
    def __init__(self, fast: _FastHistograms, registry: CollectorRegistry) -> None:
        super().__init__(registry=registry, scope_info_enabled=False)
        self._fast = fast


class _PeriodicReader(_MergesFastHistograms, PeriodicExportingMetricReader):
    def __init__(self, fast: _FastHistograms, exporter: MetricExporter) -> None:
        super().__init__(exporter)
        self._fast = fast


def otlp_endpoint_from_env(flag_value: str) -> str:
    """The OTLP/HTTP base URL: the flag (or LLMFLEET_OTLP_ENDPOINT), else the standard
    OTEL_EXPORTER_OTLP_ENDPOINT; "" (tracing off) when neither is set."""
    return flag_value or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT", "")


def _signal_url(base: str, signal: str) -> str:
    """`http://collector:4318` -> `http://collector:4318/v1/traces` (kept if already so)."""
    base = base.rstrip("/")
    return base if base.endswith(f"/v1/{signal}") else f"{base}/v1/{signal}"


class Telemetry:
    """The tracer, meter and metric registry of one process.

    `tracing` says whether spans are recorded at all; when False, callers do no span work.
    `render_metrics()` is the Prometheus text for `/metrics` (b"" with metrics off).
    """

    def __init__(
        self,
        *,
        service_name: str,
        metrics: bool = True,
        span_processors: Sequence[SpanProcessor] = (),
        otlp_endpoint: str = "",
        metric_exporters: Sequence[MetricExporter] = (),
    ) -> None:
        self.service_name = service_name
        resource = Resource.create(
            {"service.name": os.environ.get("OTEL_SERVICE_NAME") or service_name}
        ).merge(Resource({"service.version": __version__}))
        self.propagator = TraceContextTextMapPropagator()
        processors = list(span_processors)
        exporters = list(metric_exporters)
        if otlp_endpoint:
            from opentelemetry.exporter.otlp.proto.http.metric_exporter import (  # noqa: PLC0415
                OTLPMetricExporter,
            )
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import (  # noqa: PLC0415
                OTLPSpanExporter,
            )

            # A short export timeout: a dead collector must not hold up a drain at exit.
            traces_url = _signal_url(otlp_endpoint, "traces")
            processors.append(
                BatchSpanProcessor(OTLPSpanExporter(endpoint=traces_url, timeout=_EXPORT_TIMEOUT_S))
            )
            if metrics:
                metrics_url = _signal_url(otlp_endpoint, "metrics")
                exporters.append(
                    OTLPMetricExporter(endpoint=metrics_url, timeout=_EXPORT_TIMEOUT_S)
                )
        self.tracing = bool(processors)
        self._tracer_provider: TracerProvider | None = None
        if self.tracing:
            self._tracer_provider = TracerProvider(resource=resource)
            for proc in processors:
                self._tracer_provider.add_span_processor(proc)
            self.tracer: Tracer = self._tracer_provider.get_tracer("llmfleet", __version__)
        else:
            self.tracer = trace.NoOpTracerProvider().get_tracer("llmfleet")
        self.metrics = metrics
        self.registry = CollectorRegistry(auto_describe=True)
        self._fast = _FastHistograms(resource, InstrumentationScope("llmfleet", __version__))
        self._meter_provider: MeterProvider | None = None
        if metrics:
            readers: list[MetricReader] = [_PrometheusReader(self._fast, self.registry)]
            readers += [_PeriodicReader(self._fast, e) for e in exporters]
            self._meter_provider = MeterProvider(metric_readers=readers, resource=resource)
            self.meter: Meter = self._meter_provider.get_meter("llmfleet", __version__)
            # Always one SDK metric, so every collection reaches `_receive_metrics` (the SDK
            # skips it when it has nothing), where the fast histograms are merged in.
            started = time.monotonic()
            self.observe(
                "gauge",
                "llmfleet.process.uptime",
                "s",
                "Seconds since this process's telemetry started",
                lambda: [(time.monotonic() - started, {})],
            )
        else:
            self.meter = NoOpMeterProvider().get_meter("llmfleet")

    @property
    def enabled(self) -> bool:
        """Metrics or tracing is on (else per-request telemetry can be skipped)."""
        return self.metrics or self.tracing

    @classmethod
    def off(cls, service_name: str = "llmfleet") -> Telemetry:
        """No metrics, no tracing: the default for components built without telemetry."""
        return cls(service_name=service_name, metrics=False)

    # ---- metrics -----------------------------------------------------------------------

    def histogram(
        self, name: str, unit: str, description: str, bounds: Sequence[float]
    ) -> FastHistogram:
        h = FastHistogram(name, unit, description, bounds)
        if self.metrics:
            self._fast.histograms.append(h)
        return h

    def observe(
        self,
        kind: str,
        name: str,
        unit: str,
        description: str,
        read: Callable[[], Iterable[tuple[float, Mapping[str, Any]]]],
    ) -> None:
        """An observable `counter`, `updown` or `gauge` whose callback yields (value, attrs)
        pairs from `read()`; read is called at collection time and must not block."""

        def callback(options: CallbackOptions) -> Iterable[Observation]:
            return [Observation(v, dict(a)) for v, a in read()]

        match kind:
            case "counter":
                self.meter.create_observable_counter(name, [callback], unit, description)
            case "updown":
                self.meter.create_observable_up_down_counter(name, [callback], unit, description)
            case _:
                self.meter.create_observable_gauge(name, [callback], unit, description)

    def render_metrics(self) -> bytes:
        """The Prometheus text exposition of every metric (runs the observable callbacks)."""
        if not self.metrics:
            return b""
        return generate_latest(self.registry)

    # ---- traces ------------------------------------------------------------------------

    def extract(self, traceparent: str | None, tracestate: str | None = None) -> Context:
        """The context an incoming `traceparent` names (an empty context if none/invalid)."""
        if not traceparent:
            return Context()
        carrier = {"traceparent": traceparent}
        if tracestate:
            carrier["tracestate"] = tracestate
        return self.propagator.extract(carrier)

    def traceparent(self, span: trace.Span) -> str | None:
        """The W3C `traceparent` naming `span` as the parent, for a NATS header."""
        carrier: dict[str, str] = {}
        self.propagator.inject(carrier, trace.set_span_in_context(span))
        return carrier.get("traceparent")

    def shutdown(self) -> None:
        """Flush and stop exporters (called once by the composition root at exit)."""
        if self._tracer_provider is not None:
            self._tracer_provider.shutdown()
        if self._meter_provider is not None:
            self._meter_provider.shutdown()


def gen_ai_operation(op: str) -> str:
    """llmfleet's op -> the GenAI semantic conventions' `gen_ai.operation.name`."""
    return _GEN_AI_OPS.get(op, op)


_GEN_AI_OPS = {
    "chat": "chat",
    "messages": "chat",
    "responses": "chat",
    "completion": "text_completion",
    "embedding": "embeddings",
}


# ---- a tiny /metrics HTTP server (workers) ------------------------------------------------


async def serve_metrics(
    telemetry: Telemetry,
    host: str,
    port: int,
    ready: asyncio.Future[int] | None = None,
) -> None:
    """Serve `GET /metrics` on host:port until cancelled; `ready` gets the bound port.

    One request per connection, headers bounded to 16 KiB and 5 s; anything but
    `/metrics` is a 404. Runs on the caller's event loop (owned by its TaskGroup).
    """

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(5.0):
                head = await reader.readuntil(b"\r\n\r\n")
            parts = head.split(b"\r\n", 1)[0].split()
            path = parts[1].split(b"?", 1)[0] if len(parts) >= 2 else b""
            if len(parts) >= 2 and parts[0] in (b"GET", b"HEAD") and path == b"/metrics":
                body = telemetry.render_metrics()
                status, ctype = b"200 OK", PROMETHEUS_CONTENT_TYPE
                if parts[0] == b"HEAD":
                    body = b""
            else:
                body, status, ctype = b"not found\n", b"404 Not Found", b"text/plain"
            writer.write(
                b"HTTP/1.1 %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n"
                b"Connection: close\r\n\r\n%s" % (status, ctype, len(body), body)
            )
            await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    try:
        server = await asyncio.start_server(handle, host, port, limit=16 * 1024)
    except OSError as exc:
        if ready is not None:
            ready.set_exception(exc)
        raise
    bound = server.sockets[0].getsockname()[1]
    log.info("metrics on http://%s:%s/metrics", host, bound)
    if ready is not None:
        ready.set_result(int(bound))
    async with server:
        await server.serve_forever()
