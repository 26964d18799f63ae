"""Per-request CPU cost of llmfleet's instrumentation (microbenchmark, one core).

    .venv/bin/python -m bench.telemetry_overhead

Measures the record path the gateway and the worker run once per request (never per
token), with tracing off (the default) and on (spans exported to a no-op exporter through
the SDK's batch processor), the access-log line, and for comparison the same six
histogram records through the OTel SDK's synchronous instruments.
"""

from __future__ import annotations

import io
import logging
import timeit
from collections.abc import Callable, Sequence

from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

from common.logs import ACCESS_LOGGER, JsonFormatter
from common.protocol import Usage
from common.telemetry import Telemetry
from gateway.observe import GatewayMetrics, RequestRecord
from worker.observe import WorkerMetrics


class _Null(SpanExporter):
    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        return SpanExportResult.SUCCESS


class _Card:
    engine = "sim"


class _Engine:
    def card(self) -> _Card:
        return _Card()


def per_call_us(fn: Callable[[], None], n: int = 20000) -> float:
    fn()
    best = min(timeit.repeat(fn, number=n, repeat=5))
    return best / n * 1e6


def gateway_request(m: GatewayMetrics, tel: Telemetry) -> Callable[[], None]:
    def run() -> None:
        span = None
        if tel.tracing:
            span = m.server_span("chat", "POST", "/v1/chat/completions", None, None)
        rec = RequestRecord("chat", "0123456789abcdef01234567", span)
        rec.model = "sim-model"
        m.started(rec)
        if span is not None:  # what app.py and Dispatcher.submit do with tracing on
            span.update_name("chat sim-model")
            q = tel.tracer.start_span("queue wait", context=trace.set_span_in_context(span))
            tel.traceparent(q)
            q.end()
        rec.accepted_at = rec.start + 0.001
        rec.first_at = rec.start + 0.02
        rec.tokens_in, rec.tokens_out = 12, 32
        rec.worker = "w1"
        m.finish(rec, published=True)

    return run


def worker_request(m: WorkerMetrics) -> Callable[[], None]:
    usage = Usage(prompt_tokens=12, completion_tokens=32, total_tokens=44)
    engine = _Engine()

    def run() -> None:
        obs = m.job(
            request_id="r", op="chat", model="sim-model", worker="w1", engine=engine,
            traceparent="00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            queued_ms=1.0,
        )  # fmt: skip
        obs.engine_started()
        obs.finish("completed", obs.start + 0.02, usage, None)

    return run


def main() -> None:
    logging.getLogger(ACCESS_LOGGER).setLevel(logging.WARNING)  # measured separately below
    off = Telemetry(service_name="bench")
    on = Telemetry(service_name="bench", span_processors=[BatchSpanProcessor(_Null())])
    rows = [
        ("gateway record, tracing off", per_call_us(gateway_request(GatewayMetrics(off), off))),
        ("gateway record, tracing on", per_call_us(gateway_request(GatewayMetrics(on), on))),
        ("worker record, tracing off", per_call_us(worker_request(WorkerMetrics(off)))),
        ("worker record, tracing on", per_call_us(worker_request(WorkerMetrics(on)))),
    ]
    access = logging.getLogger(ACCESS_LOGGER)
    handler = logging.StreamHandler(io.StringIO())
    handler.setFormatter(JsonFormatter())
    access.addHandler(handler)
    access.setLevel(logging.INFO)
    access.propagate = False
    rows.append(
        (
            "gateway record + JSON access line",
            per_call_us(gateway_request(GatewayMetrics(off), off)),
        )
    )
    sdk = Telemetry(service_name="bench")
    hists = [sdk.meter.create_histogram(f"h{i}", unit="s") for i in range(6)]
    attrs = {"gen_ai.operation.name": "chat", "gen_ai.request.model": "sim-model"}

    def six_sdk_records() -> None:
        for h in hists:
            h.record(0.02, attrs)

    rows.append(("(6 OTel SDK Histogram.record calls)", per_call_us(six_sdk_records)))
    for name, us in rows:
        print(f"{name:40s} {us:7.2f} us per request")
    on.shutdown()


if __name__ == "__main__":
    main()
