"""Observability end to end: Prometheus `/metrics` on a real gateway and a real worker,
the queue-depth gauge, one trace across gateway and worker (in-process, one in-memory
exporter), JSON logs, and the headers naming the worker and model."""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import httpx
import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from prometheus_client.parser import text_string_to_metric_families

from common.telemetry import Telemetry
from gateway.server import Gateway as GatewayService
from gateway.settings import GatewaySettings
from llmfleet.broker import free_port
from tests.natshelp import connected, publish_request, reply_subject, request_headers
from tests.procs import Fleet, Gateway, Proc
from tests.upstream_server import RunningServer, ServerSettings
from worker.engines.openai import OpenAIEngine
from worker.engines.sim import SimEngine
from worker.service import ServedModel, Worker
from worker.settings import OpenAISettings, SimSettings, WorkerSettings

OBS = "obs-model"
IDLE = "idle-model"
SPAN = "span-model"
PROXIED = "proxied-model"  # served by the openai engine, to the test upstream
TRACED_UPSTREAM: list[RunningServer] = []
KEY = "obs-secret"
PROMPT = "PROMPT-TEXT-MUST-NOT-BE-LOGGED"

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(url: str) -> Samples:
    r = httpx.get(url, timeout=5.0, headers={"authorization": f"Bearer {KEY}"})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain")
    out: Samples = {}
    for fam in text_string_to_metric_families(r.text):
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels` (dots as underscores)."""
    want = {k: v for k, v in labels.items()}
    return sum(
        v for (n, ls), v in samples.items() if n == name and want.items() <= dict(ls).items()
    )


def eventually(check: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.05)


def chat(model: str, *, stream: bool = False, max_tokens: int = 5) -> dict[str, object]:
    return {
        "model": model,
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": max_tokens,
        "stream": stream,
    }


# ---- metrics from real processes ---------------------------------------------------------


@pytest.fixture(scope="module")
def obs(fleet: Fleet) -> tuple[Gateway, int]:
    mport = free_port()
    fleet.worker(
        "--model", OBS, "--worker-id", "obs-worker", "--max-concurrency", "3",
        "--sim-ttft-ms", "5", "--sim-itl-ms", "2", "--metrics-port", str(mport),
    )  # fmt: skip
    gw = fleet.gateway("--api-key", KEY, wait_models=(OBS,))
    return gw, mport


def test_gateway_and_worker_metrics_count_what_was_served(obs: tuple[Gateway, int]) -> None:
    gw, mport = obs
    auth = {"authorization": f"Bearer {KEY}"}
    with httpx.Client(base_url=gw.base_url, headers=auth, timeout=30.0) as c:
        for _ in range(3):
            r = c.post("/chat/completions", json=chat(OBS))
            assert r.status_code == 200, r.text
            assert r.headers["x-llmfleet-worker"] == "obs-worker"
            assert r.headers["x-llmfleet-model"] == OBS
            assert r.json()["usage"]["completion_tokens"] == 5
        for _ in range(2):
            with c.stream("POST", "/chat/completions", json=chat(OBS, stream=True)) as r:
                assert r.status_code == 200
                assert r.headers["x-llmfleet-worker"] == "obs-worker"
                assert r.headers["x-llmfleet-model"] == OBS
                assert r.read().endswith(b"data: [DONE]\n\n")
        r = c.post("/embeddings", json={"model": OBS, "input": ["a b", "c"]})
        assert r.status_code == 200
        assert r.headers["x-llmfleet-model"] == OBS
        r = c.post("/chat/completions", json=chat("no-such-model-xyz"))
        assert r.status_code == 404

    # With --api-key, /metrics needs it too (or --metrics-token, or --metrics-listen).
    g = scrape(gw.url + "/metrics")
    ok = {"gen_ai_request_model": OBS, "http_response_status_code": "200"}
    assert value(g, "llmfleet_gateway_requests_total", gen_ai_operation_name="chat", **ok) == 5
    assert value(g, "llmfleet_gateway_requests_total", gen_ai_operation_name="embeddings") == 1
    # An unknown model never becomes a label value of its own.
    assert (
        value(
            g,
            "llmfleet_gateway_requests_total",
            gen_ai_request_model="_unknown",
            http_response_status_code="404",
            error_type="model_not_found",
        )
        == 1
    )
    assert not any("no-such-model-xyz" in str(k) for k in g)
    chat_obs = {"gen_ai_operation_name": "chat", "gen_ai_request_model": OBS}
    assert value(g, "gen_ai_server_time_to_first_token_seconds_count", **chat_obs) == 5
    assert value(g, "gen_ai_server_time_per_output_token_seconds_count", **chat_obs) == 5
    assert value(g, "gen_ai_server_request_duration_seconds_count", **chat_obs) == 5
    assert value(g, "llmfleet_gateway_queue_wait_seconds_count", **chat_obs) == 5
    # The TTFT histogram's buckets are cumulative and end with +Inf == count.
    assert value(g, "gen_ai_server_time_to_first_token_seconds_bucket", le="+Inf", **chat_obs) == 5
    assert value(g, "gen_ai_client_token_usage_sum", gen_ai_token_type="output", **chat_obs) == 25
    assert value(g, "gen_ai_client_token_usage_count", gen_ai_token_type="input", **chat_obs) == 5
    assert value(g, "llmfleet_gateway_requests_active", gen_ai_request_model=OBS) == 0
    assert value(g, "llmfleet_fleet_workers", gen_ai_request_model=OBS) == 1
    assert value(g, "llmfleet_fleet_slots", gen_ai_request_model=OBS) == 3
    assert ("llmfleet_nats_reconnects_total", frozenset()) in g
    assert value(g, "llmfleet_gateway_failovers_total") == 0

    def worker_done() -> bool:
        w = scrape(f"http://127.0.0.1:{mport}/metrics")
        return value(w, "llmfleet_worker_requests_total", llmfleet_outcome="completed") == 6

    eventually(worker_done)
    w = scrape(f"http://127.0.0.1:{mport}/metrics")
    m = {"gen_ai_request_model": OBS}
    assert value(w, "llmfleet_worker_requests_total", llmfleet_outcome="failed", **m) == 0
    assert value(w, "llmfleet_worker_tokens_total", gen_ai_token_type="output", **m) == 25
    assert value(w, "llmfleet_worker_slots", **m) == 3
    assert value(w, "llmfleet_worker_requests_active", **m) == 0
    assert (
        value(
            w,
            "llmfleet_worker_time_to_first_token_seconds_count",
            gen_ai_operation_name="chat",
            **m,
        )
        == 5
    )
    assert (
        value(
            w, "llmfleet_worker_request_duration_seconds_count", llmfleet_outcome="completed", **m
        )
        == 6
    )
    assert ("llmfleet_nats_reconnects_total", frozenset()) in w
    assert httpx.get(f"http://127.0.0.1:{mport}/other").status_code == 404


def test_queue_depth_gauge_shows_requests_no_worker_takes(fleet: Fleet) -> None:
    w = fleet.worker("--model", IDLE, "--sim-ttft-ms", "1", "--sim-itl-ms", "1")
    gw = fleet.gateway("--queue-poll", "0.2", "--model-grace", "120", wait_models=(IDLE,))
    assert w.stop() == 0  # the model stays listed (grace), so requests queue for it

    async def run() -> list[int]:
        async with httpx.AsyncClient(base_url=gw.base_url, timeout=60.0) as c:
            calls = [
                asyncio.create_task(c.post("/chat/completions", json=chat(IDLE))) for _ in range(3)
            ]

            def depth() -> float:
                return value(
                    scrape(gw.url + "/metrics"), "llmfleet_queue_depth", gen_ai_request_model=IDLE
                )

            deadline = time.monotonic() + 15
            while depth() != 3:
                assert time.monotonic() < deadline, f"queue depth {depth()}"
                await asyncio.sleep(0.1)
            g = scrape(gw.url + "/metrics")
            assert value(g, "llmfleet_gateway_requests_active", gen_ai_request_model=IDLE) == 3
            assert value(g, "llmfleet_queue_oldest_wait_seconds", gen_ai_request_model=IDLE) > 0
            fleet.worker("--model", IDLE, "--sim-ttft-ms", "1", "--sim-itl-ms", "1")
            return [(await t).status_code for t in calls]

    assert asyncio.run(run()) == [200, 200, 200]
    eventually(
        lambda: (
            value(scrape(gw.url + "/metrics"), "llmfleet_queue_depth", gen_ai_request_model=IDLE)
            == 0
        )
    )


def test_queue_gauges_cover_models_no_worker_serves(fleet: Fleet, nats_url: str) -> None:
    """Requests NATS producers queue for a model nobody serves (not in the catalog) still
    show in the queue gauges, so "waiting with no worker" can be alerted on."""
    gw = fleet.gateway("--queue-poll", "0.2")
    orphan = "orphan/metric:1"

    async def publish() -> None:
        async with connected(nats_url) as nc:
            js = nc.jetstream()
            body = json.dumps(chat(orphan)).encode()
            for _ in range(2):
                await publish_request(js, orphan, body, request_headers(reply_subject("nobody")))

    asyncio.run(publish())
    eventually(
        lambda: (
            value(scrape(gw.url + "/metrics"), "llmfleet_queue_depth", gen_ai_request_model=orphan)
            == 2
        )
    )
    g = scrape(gw.url + "/metrics")
    assert value(g, "llmfleet_queue_oldest_wait_seconds", gen_ai_request_model=orphan) > 0
    assert value(g, "llmfleet_fleet_workers", gen_ai_request_model=orphan) == 0


# ---- JSON logs -------------------------------------------------------------------------


def test_json_logs_have_fields_and_an_access_line_without_text(fleet: Fleet) -> None:
    port = free_port()
    gw = Gateway(
        ["--log-format", "json", "gateway", "--nats", fleet.nats_url, "--port", str(port)],
        fleet.workdir / "json-gateway.log",
        port,
    )
    fleet.procs.append(gw)
    w = Proc(
        ["--log-format", "json", "worker", "--nats", fleet.nats_url, "--model", "json-model",
         "--sim-ttft-ms", "1", "--sim-itl-ms", "1"],
        fleet.workdir / "json-worker.log",
    )  # fmt: skip
    fleet.procs.append(w)
    fleet.wait_ready(gw, ("json-model",))
    r = httpx.post(gw.base_url + "/chat/completions", json=chat("json-model"), timeout=30.0)
    assert r.status_code == 200
    answer = r.json()["choices"][0]["message"]["content"]
    rid = r.headers["x-request-id"]
    r = httpx.post(gw.base_url + "/chat/completions", json=chat("json-model", stream=True))
    assert r.status_code == 200

    def access_lines() -> list[dict[str, object]]:
        lines = [json.loads(x) for x in gw.log().splitlines() if x.strip()]
        for doc in lines:
            assert {"ts", "level", "logger", "message"} <= doc.keys(), doc
        return [d for d in lines if d["logger"] == "llmfleet.access"]

    eventually(lambda: len(access_lines()) == 2)
    first = next(d for d in access_lines() if d["request_id"] == rid)
    assert first["level"] == "info"
    assert first["model"] == "json-model"
    assert first["op"] == "chat"
    assert first["status"] == 200
    assert first["worker"]
    assert first["stream"] is False
    assert first["tokens_out"] == 5
    assert first["tokens_in"] == len(PROMPT.split())
    assert isinstance(first["duration_ms"], float)
    assert isinstance(first["ttft_ms"], float)
    assert any(d["stream"] is True for d in access_lines())
    for proc in (gw, w):
        text = proc.log()
        assert PROMPT not in text
        assert answer not in text
    for line in w.log().splitlines():
        if line.strip():
            assert json.loads(line)["logger"]


# ---- one trace across gateway and worker (in-process) --------------------------------------


@pytest.fixture(scope="module")
async def traced(nats_url: str) -> AsyncIterator[tuple[str, InMemorySpanExporter]]:
    exporter = InMemorySpanExporter()
    tel = Telemetry(service_name="test", span_processors=[SimpleSpanProcessor(exporter)])
    upstream = RunningServer(ServerSettings(ttft_ms=1, itl_ms=1))
    await upstream.start()
    proxied = OpenAIEngine(OpenAISettings(base_url=upstream.base_url, served_model=PROXIED))
    worker = Worker(
        WorkerSettings(nats_url=nats_url, worker_id="span-worker"),
        [
            ServedModel(SPAN, SimEngine(SimSettings(ttft_ms=1, itl_ms=1, tokens=4)), 2),
            ServedModel(PROXIED, proxied, 2),
        ],
        telemetry=tel,
    )
    TRACED_UPSTREAM.append(upstream)
    gw = GatewayService(GatewaySettings(nats_url=nats_url, port=0), telemetry=tel)
    loop = asyncio.get_running_loop()
    w_ready: asyncio.Future[None] = loop.create_future()
    g_ready: asyncio.Future[None] = loop.create_future()
    w_task = asyncio.create_task(worker.run(w_ready))
    await w_ready
    g_task = asyncio.create_task(gw.run(g_ready))
    await g_ready
    base = f"http://127.0.0.1:{gw.port}/v1"
    async with httpx.AsyncClient(timeout=5.0) as c:  # wait until the catalog lists it
        for _ in range(100):
            if (await c.get(f"{base}/models/{SPAN}")).status_code == 200:
                break
            await asyncio.sleep(0.05)
    try:
        yield base, exporter
    finally:
        gw.request_stop()
        worker.request_drain()
        await g_task
        await w_task
        tel.shutdown()
        await upstream.stop()
        TRACED_UPSTREAM.clear()


async def _trace(exporter: InMemorySpanExporter, trace_id: int) -> dict[str, ReadableSpan]:
    for _ in range(200):
        spans = [
            s
            for s in exporter.get_finished_spans()
            if s.context is not None and s.context.trace_id == trace_id
        ]
        if len(spans) >= 4:
            break
        await asyncio.sleep(0.02)
    by_kind = {}
    for s in spans:
        by_kind[s.kind.name] = s
    return by_kind


@pytest.mark.parametrize("stream", [False, True])
async def test_one_trace_spans_gateway_queue_worker_and_engine(
    traced: tuple[str, InMemorySpanExporter], stream: bool
) -> None:
    base, exporter = traced
    trace_id = 0x4BF92F3577B34DA6A3CE929D0E0E4736 + stream
    parent_id = 0x00F067AA0BA902B7
    traceparent = f"00-{trace_id:032x}-{parent_id:016x}-01"
    async with httpx.AsyncClient(timeout=30.0) as c:
        r = await c.post(
            f"{base}/chat/completions",
            json=chat(SPAN, stream=stream, max_tokens=3),
            headers={"traceparent": traceparent},
        )
    assert r.status_code == 200
    assert r.headers["x-llmfleet-model"] == SPAN
    spans = await _trace(exporter, trace_id)
    server = spans["SERVER"]
    queue = spans["PRODUCER"]
    process = spans["CONSUMER"]
    engine = spans["INTERNAL"]
    assert server.name == f"chat {SPAN}"
    assert queue.name == "queue wait"
    assert process.name == f"process {SPAN}"
    assert engine.name == f"chat {SPAN}"
    # The incoming traceparent is continued, and each span is its predecessor's child.
    assert server.parent is not None and server.parent.span_id == parent_id
    for child, parent in ((queue, server), (process, queue), (engine, process)):
        assert child.parent is not None and parent.context is not None
        assert child.parent.span_id == parent.context.span_id
        assert child.context is not None and child.context.trace_id == trace_id
    attrs = dict(server.attributes or {})
    assert attrs["gen_ai.operation.name"] == "chat"
    assert attrs["gen_ai.request.model"] == SPAN
    assert attrs["http.response.status_code"] == 200
    assert attrs["gen_ai.usage.output_tokens"] == 3
    assert attrs["llmfleet.worker"] == "span-worker"
    assert attrs["llmfleet.stream"] is stream
    assert dict(engine.attributes or {})["gen_ai.usage.output_tokens"] == 3
    assert dict(process.attributes or {})["llmfleet.worker"] == "span-worker"
    assert dict(queue.attributes or {})["llmfleet.worker"] == "span-worker"


async def test_the_upstream_server_gets_the_engine_spans_traceparent(
    traced: tuple[str, InMemorySpanExporter],
) -> None:
    """An openai-engine request carries the trace to the upstream (vLLM joins it when it
    traces): its `traceparent` names the worker's engine span as the parent."""
    base, exporter = traced
    trace_id = 0x0AF7651916CD43DD8448EB211C80319C
    traceparent = f"00-{trace_id:032x}-{0xB7AD6B7169203331:016x}-01"
    async with httpx.AsyncClient(timeout=30.0) as c:
        r = await c.post(
            f"{base}/chat/completions",
            json=chat(PROXIED, stream=True, max_tokens=3),
            headers={"traceparent": traceparent},
        )
    assert r.status_code == 200, r.text
    spans = await _trace(exporter, trace_id)
    engine = spans["CLIENT"]  # the openai engine's span is a CLIENT span
    assert engine.context is not None
    sent = TRACED_UPSTREAM[0].app.stats.traceparents[-1]
    assert sent == f"00-{trace_id:032x}-{engine.context.span_id:016x}-01"


async def test_a_request_without_traceparent_starts_a_new_trace(
    traced: tuple[str, InMemorySpanExporter],
) -> None:
    base, exporter = traced
    exporter.clear()
    async with httpx.AsyncClient(timeout=30.0) as c:
        r = await c.post(f"{base}/embeddings", json={"model": SPAN, "input": "x y"})
    assert r.status_code == 200
    for _ in range(200):
        done = exporter.get_finished_spans()
        if len(done) >= 4:
            break
        await asyncio.sleep(0.02)
    server = next(s for s in done if s.kind is SpanKind.SERVER)
    assert server.parent is None
    assert server.name == f"embeddings {SPAN}"
    assert server.context is not None
    assert {s.context.trace_id for s in done if s.context is not None} == {server.context.trace_id}
    assert any(s.name == f"embeddings {SPAN}" and s.kind is SpanKind.INTERNAL for s in done)


def test_documented_queries_and_alerts_name_real_metrics(obs: tuple[Gateway, int]) -> None:
    """Every metric or label named in the PromQL of docs/operations.md (alerts) and
    docs/observability.md (queries) is exported by a real gateway or worker."""
    gw, mport = obs
    with httpx.Client() as c:  # traffic, so that every labelled series exists
        auth = {"authorization": f"Bearer {KEY}"}
        r = c.post(gw.base_url + "/chat/completions", json=chat(OBS), headers=auth)
        assert r.status_code == 200, r.text
        r = c.post(gw.base_url + "/chat/completions", json=chat("no-such-model"), headers=auth)
        assert r.status_code == 404, r.text  # a series with an error.type
    names: set[str] = set()
    labels: set[str] = set()

    def collect() -> bool:
        for url in (gw.url + "/metrics", f"http://127.0.0.1:{mport}/metrics"):
            for n, ls in scrape(url):
                names.add(n)
                labels.update(k for k, _ in ls)
        return "llmfleet_queue_oldest_wait_seconds" in names  # after the first queue poll

    eventually(collect, timeout=15)
    docs = Path(__file__).parents[2] / "docs"
    blocks = []
    for doc in ("operations.md", "observability.md"):
        blocks += re.findall(r"```(?:promql|yaml)\n(.*?)```", (docs / doc).read_text(), re.S)
    used = set(re.findall(r"\b(?:llmfleet|gen_ai|http|error)_[a-z_]+\b", "\n".join(blocks)))
    assert len(used) >= 10, used
    unknown = sorted(u for u in used if u not in names and u not in labels)
    assert unknown == [], f"named in the docs but not exported: {unknown}"
