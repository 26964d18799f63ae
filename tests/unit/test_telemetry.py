"""Telemetry units: the fast histogram against the SDK's own, the Prometheus rendering, the
gateway's per-request record, traceparent handling, the metrics server, and log formats."""

from __future__ import annotations

import asyncio
import json
import logging
import sys

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client.parser import text_string_to_metric_families

from common import logs, telemetry
from common.telemetry import Telemetry, gen_ai_operation, serve_metrics
from gateway.observe import GatewayMetrics, RequestRecord

BOUNDS = (0.1, 0.5, 1.0)


def samples(tel: Telemetry) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    out = {}
    for fam in text_string_to_metric_families(tel.render_metrics().decode()):
        for s in fam.samples:
            # An empty label is an absent one (the exporter fills in missing keys with "").
            out[(s.name, frozenset((k, v) for k, v in s.labels.items() if v))] = s.value
    return out


def test_fast_histogram_renders_like_the_sdk_histogram() -> None:
    tel = Telemetry(service_name="t")
    sdk = tel.meter.create_histogram(
        "sdk.h", unit="s", explicit_bucket_boundaries_advisory=list(BOUNDS)
    )
    fast = tel.histogram("fast.h", "s", "", BOUNDS)
    values = [0.05, 0.1, 0.1000001, 0.5, 0.7, 1.0, 3.0, 0.0]  # boundaries included
    for v in values:
        sdk.record(v, {"m": "x"})
        fast.record(v, ("x",), lambda: {"m": "x"})
    got = samples(tel)
    for suffix in ("_count", "_sum"):
        assert got[(f"fast_h_seconds{suffix}", frozenset({("m", "x")}))] == pytest.approx(
            got[(f"sdk_h_seconds{suffix}", frozenset({("m", "x")}))]
        )
    for le in ("0.1", "0.5", "1.0", "+Inf"):
        labels = frozenset({("m", "x"), ("le", le)})
        assert got[("fast_h_seconds_bucket", labels)] == got[("sdk_h_seconds_bucket", labels)]
    assert got[("fast_h_seconds_bucket", frozenset({("m", "x"), ("le", "0.1")}))] == 3


def test_fast_histogram_caps_its_series(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(telemetry, "MAX_SERIES", 2)
    h = telemetry.FastHistogram("h", "s", "", BOUNDS)
    for i in range(5):
        h.record(1.0, (i,), lambda i=i: {"k": str(i)})  # type: ignore[misc]
    metric = h.to_metric(0, 1)
    assert metric is not None
    points = metric.data.data_points
    assert len(points) == 3  # two series, then one overflow series for the rest
    overflow = [p for p in points if p.attributes.get("otel.metric.overflow")]
    assert len(overflow) == 1 and overflow[0].count == 3  # type: ignore[attr-defined]


def test_telemetry_off_costs_nothing_and_renders_nothing() -> None:
    tel = Telemetry.off()
    assert not tel.tracing and not tel.metrics and not tel.enabled
    h = tel.histogram("x", "s", "", BOUNDS)
    h.record(1.0, (), dict)
    assert tel.render_metrics() == b""
    span = tel.tracer.start_span("s")
    assert not span.is_recording()


def test_traceparent_round_trip() -> None:
    exporter = InMemorySpanExporter()
    tel = Telemetry(
        service_name="t", metrics=False, span_processors=[SimpleSpanProcessor(exporter)]
    )
    incoming = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    span = tel.tracer.start_span("a", context=tel.extract(incoming))
    tp = tel.traceparent(span)
    assert tp is not None and tp.startswith("00-0af7651916cd43dd8448eb211c80319c-")
    assert tp.split("-")[2] == f"{span.get_span_context().span_id:016x}"
    span.end()
    assert exporter.get_finished_spans()[0].parent.span_id == 0xB7AD6B7169203331  # type: ignore[union-attr]
    for bad in ("garbage", None, ""):  # no parent: the span would start a new trace
        assert not trace.get_current_span(tel.extract(bad)).get_span_context().is_valid


def test_gen_ai_operation_names() -> None:
    assert [gen_ai_operation(o) for o in ("chat", "completion", "embedding")] == [
        "chat",
        "text_completion",
        "embeddings",
    ]


def test_gateway_record_counts_once_per_request() -> None:
    tel = Telemetry(service_name="t")
    m = GatewayMetrics(tel)
    rec = RequestRecord("chat", "rid1", None)
    rec.model = "m1"
    m.started(rec)
    rec.accepted_at = rec.start + 0.01
    rec.first_at = rec.start + 0.02
    rec.tokens_in, rec.tokens_out = 7, 11
    m.finish(rec, published=True)
    bad = RequestRecord("completion", "rid2", None)
    bad.fail(400, "invalid_request_error")
    m.finish(bad, published=False)
    got = samples(tel)
    base = {("gen_ai_operation_name", "chat"), ("gen_ai_request_model", "m1")}
    ok = frozenset({*base, ("http_response_status_code", "200")})
    assert got[("llmfleet_gateway_requests_total", ok)] == 1
    assert got[("gen_ai_server_time_per_output_token_seconds_count", frozenset(base))] == 1
    out = frozenset({*base, ("gen_ai_token_type", "output")})
    assert got[("gen_ai_client_token_usage_sum", out)] == 11
    assert got[("llmfleet_gateway_requests_active", frozenset(base))] == 0
    failed = frozenset(
        {
            ("gen_ai_operation_name", "text_completion"),
            ("gen_ai_request_model", "_unknown"),
            ("http_response_status_code", "400"),
            ("error_type", "invalid_request_error"),
        }
    )
    assert got[("llmfleet_gateway_requests_total", failed)] == 1
    # no first output: no TTFT for the failed request
    assert not any(
        n.startswith("gen_ai_server_time_to_first_token")
        and ("gen_ai_request_model", "_unknown") in ls
        for n, ls in got
    )


async def test_metrics_server_serves_metrics_and_404() -> None:
    tel = Telemetry(service_name="t")
    tel.histogram("served.h", "s", "", BOUNDS).record(0.2, (), dict)
    ready: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(serve_metrics(tel, "127.0.0.1", 0, ready))
    port = await ready

    async def get(path: str) -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        data = await reader.read()
        writer.close()
        return data

    ok = await get("/metrics")
    assert ok.startswith(b"HTTP/1.1 200 OK") and b"served_h_seconds_count 1.0" in ok
    assert (await get("/nope")).startswith(b"HTTP/1.1 404")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


def _record(msg: str, **extra: object) -> logging.LogRecord:
    rec = logging.LogRecord("x.y", logging.INFO, __file__, 1, msg, (), None)
    rec.__dict__.update(extra)
    return rec


def test_json_log_lines_carry_context_and_extra_fields() -> None:
    async def in_a_task() -> str:
        logs.bind(request_id="r1", model="m1")
        return logs.JsonFormatter().format(_record("hello", status=200, ttft_ms=None))

    doc = json.loads(asyncio.run(in_a_task()))
    assert doc["message"] == "hello" and doc["logger"] == "x.y" and doc["level"] == "info"
    assert doc["request_id"] == "r1" and doc["model"] == "m1" and doc["status"] == 200
    assert "ttft_ms" not in doc  # None fields are left out
    assert doc["ts"].endswith("Z")
    # the context was the task's own: nothing leaked into this one
    assert "request_id" not in json.loads(logs.JsonFormatter().format(_record("x")))
    try:
        raise ValueError("boom")
    except ValueError:
        rec = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    assert "ValueError: boom" in json.loads(logs.JsonFormatter().format(rec))["exc"]


def test_text_log_lines_append_extra_fields() -> None:
    line = logs.TextFormatter().format(_record("request finished", status=200, worker="w1"))
    assert line.endswith("x.y: request finished status=200 worker=w1")


def test_otlp_endpoint_exports_traces_and_metrics() -> None:
    import threading  # noqa: PLC0415
    from http.server import BaseHTTPRequestHandler, HTTPServer  # noqa: PLC0415

    posts: list[tuple[str, str, int]] = []

    class Collector(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            n = int(self.headers.get("content-length", 0))
            posts.append((self.path, self.headers.get("content-type", ""), len(self.rfile.read(n))))
            self.send_response(200)
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Collector)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        tel = Telemetry(service_name="t", otlp_endpoint=f"http://127.0.0.1:{server.server_port}/")
        assert tel.tracing and tel.metrics
        tel.tracer.start_span("exported").end()
        tel.histogram("otlp.h", "s", "", BOUNDS).record(0.2, (), dict)
        tel.shutdown()  # flushes both
    finally:
        server.shutdown()
        server.server_close()
    paths = {p for p, _, _ in posts}
    assert paths == {"/v1/traces", "/v1/metrics"}
    assert all(ct == "application/x-protobuf" and size > 0 for _, ct, size in posts)
