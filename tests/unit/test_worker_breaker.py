"""A model's circuit breaker on a worker: the pure decisions (worker/decide.py) and the
runner (worker/runner.py) on the in-memory bus, the test playing JetStream and an engine
whose answers it scripts (and, for the health probe, whose upstream health it sets)."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator

import msgspec
import pytest

from common import names
from common import protocol as p
from common.breaker import CLOSED, HALF_OPEN, OPEN, BreakerSettings
from common.errors import EngineError, UpstreamError
from common.fakebus import FakeBus, FakeMsg
from common.openai_types import ChatRequest, CompletionRequest, EmbeddingRequest
from tests.natshelp import reply_subject, request_headers
from worker.decide import (
    Admission,
    RunnerState,
    Verdict,
    admit,
    breaker_verdict,
    pull_batch,
)
from worker.engine import EmbedResult, EngineEvent, ModelCard, Output, health_probe
from worker.engines.sim import SimEngine
from worker.runner import Drain, ModelRunner
from worker.settings import (
    OpenAISettings,
    RunnerSettings,
    SimSettings,
    WorkerSettings,
    check_worker,
)

READY = RunnerState.READY
SLOTS = 2
BACKOFF = 0.2
NEXT = f"$JS.API.CONSUMER.MSG.NEXT.{names.REQUEST_STREAM}.{names.consumer_name('m')}"
SUBJECT = names.request_subject("m", "test")
BODY = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]}).encode()


# ---- pure decisions -----------------------------------------------------------------------


def test_pull_batch_pulls_nothing_while_open_and_one_probe_while_half_open() -> None:
    assert pull_batch(4, 0, 0, READY, circuit=CLOSED) == 4
    assert pull_batch(4, 0, 0, READY, circuit=OPEN) == 0
    assert pull_batch(4, 0, 0, READY, circuit=HALF_OPEN) == 1
    assert pull_batch(4, 0, 1, READY, circuit=HALF_OPEN) == 0  # the probe is asked for
    assert pull_batch(4, 1, 0, READY, circuit=HALF_OPEN) == 0  # the probe (or one) runs
    assert pull_batch(4, 3, 2, READY, circuit=HALF_OPEN) == 0  # old credits: never negative
    assert pull_batch(4, 0, 0, RunnerState.DRAINING, circuit=HALF_OPEN) == 0


def test_admit_gives_back_what_an_open_circuit_refuses() -> None:
    kw = {"state": READY, "running": 0, "max_concurrency": 2, "queued_ms": 5.0}
    assert admit(**kw, queue_timeout_ms=None, circuit_allows=False) is Admission.CIRCUIT_OPEN  # type: ignore[arg-type]
    assert admit(**kw, queue_timeout_ms=None, circuit_allows=True) is Admission.RUN  # type: ignore[arg-type]
    # an expired request is answered (504) even while open: it never reaches the upstream
    assert admit(**kw, queue_timeout_ms=1, circuit_allows=False) is Admission.EXPIRED  # type: ignore[arg-type]
    assert admit(**kw, queue_timeout_ms=None, delivered=11, circuit_allows=False) is (  # type: ignore[arg-type]
        Admission.POISON
    )


@pytest.mark.parametrize(
    ("ok", "status", "code", "ran", "answered", "verdict"),
    [
        (True, 200, "", True, False, Verdict.SUCCESS),
        (False, 502, "upstream_error", True, False, Verdict.FAILURE),  # 5xx, no connection
        (False, 429, "upstream_rate_limited", True, False, Verdict.FAILURE),
        (False, 500, "internal_error", True, False, Verdict.FAILURE),  # an engine crashed
        (False, 400, "invalid_value", True, True, Verdict.SUCCESS),  # the upstream's 4xx
        (False, 400, "invalid_request_error", True, False, Verdict.NONE),  # our own 400
        (False, 503, "cancelled", True, False, Verdict.NONE),
        (False, 499, "cancelled", True, False, Verdict.NONE),
        (False, 504, "deadline_exceeded", True, False, Verdict.NONE),
        (False, 503, "service_unavailable", False, False, Verdict.NONE),  # body not fetched
    ],
)
def test_breaker_verdict(
    ok: bool, status: int, code: str, ran: bool, answered: bool, verdict: Verdict
) -> None:
    got = breaker_verdict(
        ok=ok, status=status, code=code, engine_ran=ran, upstream_answered=answered
    )
    assert got is verdict


# ---- the runner -----------------------------------------------------------------------------


class Scripted:
    """An engine answering chat as `mode` says: ok, 5xx, 4xx, midstream (a broken stream)
    or hang (until cancelled)."""

    def __init__(self) -> None:
        self.mode = "ok"
        self.calls = 0

    def card(self) -> ModelCard:
        return ModelCard(engine="scripted")

    async def start(self) -> None:
        pass

    async def aclose(self) -> None:
        pass

    async def chat(self, req: ChatRequest, raw: bytes) -> AsyncIterator[EngineEvent]:
        self.calls += 1
        match self.mode:
            case "5xx":
                raise UpstreamError("The upstream failed with HTTP 500.")
            case "4xx":
                raise EngineError("bad temperature", status=400, param="temperature")
            case "hang":
                await asyncio.Event().wait()
        yield Output(choices=[p.ChoiceDelta(index=0, content="hi")])
        if self.mode == "midstream":
            raise UpstreamError("upstream error mid-stream: boom")
        yield p.Usage(prompt_tokens=1, completion_tokens=1, total_tokens=2)

    def complete(self, req: CompletionRequest, raw: bytes) -> AsyncIterator[EngineEvent]:
        return self.chat(ChatRequest(model="m", messages=[]), raw)

    async def embed(self, req: EmbeddingRequest, raw: bytes) -> EmbedResult:
        raise EngineError("no", status=400)

    async def count_tokens(self, req: ChatRequest, raw: bytes) -> int:
        return 1


class Probed(Scripted):
    """A scripted engine with an upstream health probe (`health`)."""

    def __init__(self) -> None:
        super().__init__()
        self.upstream_error: str | None = None
        self.probes = 0

    async def health(self) -> str | None:
        self.probes += 1
        return self.upstream_error


class Rig(msgspec.Struct):
    bus: FakeBus
    runner: ModelRunner
    engine: Scripted
    pulls: list[FakeMsg]
    n: int = 0


async def _rig(engine: Scripted, health_interval_s: float = 0.0) -> AsyncIterator[Rig]:
    bus = FakeBus()
    pulls: list[FakeMsg] = []

    async def on_pull(msg: FakeMsg) -> None:  # type: ignore[misc]
        pulls.append(msg)

    await bus.subscribe(NEXT, cb=on_pull)  # type: ignore[arg-type]
    settings = RunnerSettings(
        breaker=BreakerSettings(threshold=3, base_s=BACKOFF, max_s=1.0),
        health_interval_s=health_interval_s,
    )
    runner = ModelRunner(
        model_id="m",
        engine=engine,  # type: ignore[arg-type]
        max_concurrency=SLOTS,
        nc=bus,
        worker_id="w",
        settings=settings,
    )
    ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    async with asyncio.TaskGroup() as tg:
        task = tg.create_task(runner.run(ready))
        await ready
        await bus.settle()
        yield Rig(bus, runner, engine, pulls)
        runner.post(Drain(grace_s=0.5))
        await asyncio.wait_for(task, 5)
    await bus.aclose()


@pytest.fixture
async def rig() -> AsyncIterator[Rig]:
    async for r in _rig(Scripted()):
        yield r


@pytest.fixture
async def probed() -> AsyncIterator[Rig]:
    async for r in _rig(Probed(), health_interval_s=0.02):
        yield r


def open_pulls(rig: Rig) -> list[FakeMsg]:
    answered = {m.subject for m in rig.bus.published if m.subject.startswith("_LLMFLEET.w.")}
    return [m for m in rig.pulls if m.reply not in answered]


async def deliver(rig: Rig, rid: str, **headers: str) -> tuple[str, str]:
    """Deliver one request into the oldest open pull; (its reply subject, its ack subject)."""
    rig.n += 1
    pull = open_pulls(rig)[0]
    ack = f"$JS.ACK.{names.REQUEST_STREAM}.llmfleet-m.1.{rig.n}.{rig.n}.{p.now_ms() * 10**6}.0"
    reply = reply_subject(rid)
    h = request_headers(reply, request_id=rid, **headers)
    await rig.bus.deliver(pull.reply, SUBJECT, BODY, ack, h)
    await rig.bus.settle()
    return reply, ack


async def until(cond: object, timeout: float = 3.0) -> None:
    async with asyncio.timeout(timeout):
        while not cond():  # type: ignore[operator]
            await asyncio.sleep(0.01)


def finished(rig: Rig, reply: str) -> bool:
    return any(json.loads(m.data)["type"] in ("done", "error") for m in rig.bus.sent_to(reply))


async def run_one(rig: Rig, rid: str, **headers: str) -> tuple[str, str]:
    reply, ack = await deliver(rig, rid, **headers)
    await until(lambda: finished(rig, reply))
    await until(lambda: rig.runner.stats().in_flight == 0)
    return reply, ack


async def expire_open_pulls(rig: Rig) -> None:
    for pull in open_pulls(rig):
        await rig.bus.publish(pull.reply, b"", headers={"Status": "408"})
    await rig.bus.settle()


async def fail_three(rig: Rig) -> None:
    rig.engine.mode = "5xx"
    for i in range(3):
        await run_one(rig, f"f{i}")
    s = rig.runner.stats()
    assert (s.circuit, s.circuit_failures, s.circuit_opened) == (OPEN, 3, 1)
    assert s.circuit_error == "502 upstream_error"


async def test_three_failures_open_the_circuit_and_stop_pulling(rig: Rig) -> None:
    rig.engine.mode = "5xx"
    await run_one(rig, "f0")
    await run_one(rig, "f1")
    assert rig.runner.stats().circuit == CLOSED and rig.runner.stats().circuit_failures == 2
    await run_one(rig, "f2")
    s = rig.runner.stats()
    assert s.circuit == OPEN and s.circuit_state == 2 and 0 < s.circuit_reopen_in_s <= BACKOFF
    pulled = len(rig.pulls)
    await expire_open_pulls(rig)  # the pulls from before lapse: none is renewed
    await asyncio.sleep(BACKOFF / 2)
    assert len(rig.pulls) == pulled and rig.runner.stats().credits == 0


async def test_a_delivery_while_open_is_given_back_delayed(rig: Rig) -> None:
    await fail_three(rig)
    assert open_pulls(rig)  # one pull from before the circuit opened is still open
    calls = rig.engine.calls
    reply, ack = await deliver(rig, "late")
    assert [m.data for m in rig.bus.sent_to(ack)] == [b'-NAK {"delay":1000000000}']
    assert rig.bus.sent_to(reply) == [] and rig.engine.calls == calls  # never run
    assert rig.runner.stats().circuit_naks == 1


async def test_after_the_backoff_one_probe_closes_the_circuit(rig: Rig) -> None:
    await fail_three(rig)
    await expire_open_pulls(rig)
    pulled = len(rig.pulls)
    await until(lambda: len(rig.pulls) == pulled + 1)  # half-open: exactly one pull
    assert rig.runner.stats().circuit == HALF_OPEN and rig.runner.stats().credits == 1
    await asyncio.sleep(0.6)  # a tick or more later: still that one
    assert len(rig.pulls) == pulled + 1
    rig.engine.mode = "ok"
    reply, _ = await run_one(rig, "probe")
    assert json.loads(rig.bus.sent_to(reply)[-1].data)["type"] == "done"
    s = rig.runner.stats()
    assert (s.circuit, s.circuit_failures, s.circuit_state) == (CLOSED, 0, 0)
    await until(lambda: rig.runner.stats().credits == SLOTS)  # pulling normally again


async def test_a_failed_probe_reopens_with_the_backoff_doubled(rig: Rig) -> None:
    await fail_three(rig)
    await expire_open_pulls(rig)
    pulled = len(rig.pulls)
    await until(lambda: len(rig.pulls) == pulled + 1)
    await run_one(rig, "probe")  # still failing
    s = rig.runner.stats()
    assert s.circuit == OPEN and s.circuit_opened == 2
    assert BACKOFF < s.circuit_reopen_in_s <= 2 * BACKOFF
    assert len(rig.pulls) == pulled + 1  # nothing pulled while open again


async def test_a_broken_stream_counts_as_a_failure(rig: Rig) -> None:
    rig.engine.mode = "midstream"
    await run_one(rig, "m0")
    s = rig.runner.stats()
    assert s.circuit_failures == 1 and s.circuit_error == "502 upstream_error"


async def test_a_success_resets_the_run_of_failures(rig: Rig) -> None:
    rig.engine.mode = "5xx"
    await run_one(rig, "f0")
    await run_one(rig, "f1")
    rig.engine.mode = "ok"
    await run_one(rig, "ok")
    rig.engine.mode = "5xx"
    await run_one(rig, "f2")
    assert rig.runner.stats().circuit == CLOSED and rig.runner.stats().circuit_failures == 1


async def test_client_errors_cancels_and_deadlines_do_not_count(rig: Rig) -> None:
    rig.engine.mode = "4xx"
    for i in range(3):
        reply, _ = await run_one(rig, f"bad{i}")
        assert json.loads(rig.bus.sent_to(reply)[-1].data)["status"] == 400
    rig.engine.mode = "hang"
    for i in range(3):
        calls = rig.engine.calls
        reply, _ = await deliver(rig, f"c{i}")
        await until(lambda: rig.engine.calls > calls)  # noqa: B023 (awaited right here)
        rig.runner.cancel("test", f"c{i}")
        await until(lambda: finished(rig, reply))  # noqa: B023
        await until(lambda: rig.runner.stats().in_flight == 0)
    for i in range(3):  # the request's own deadline passed while the engine ran
        await run_one(rig, f"t{i}", **{p.H_TIMEOUT: "50"})
    s = rig.runner.stats()
    assert s.failed == 9 and s.cancelled == 3
    assert (s.circuit, s.circuit_failures, s.circuit_opened) == (CLOSED, 0, 0)


async def test_a_cancelled_probe_lets_the_next_request_probe(rig: Rig) -> None:
    await fail_three(rig)
    await expire_open_pulls(rig)
    pulled = len(rig.pulls)
    await until(lambda: len(rig.pulls) == pulled + 1)
    rig.engine.mode = "hang"
    reply, _ = await deliver(rig, "probe")
    rig.runner.cancel("test", "probe")
    await until(lambda: finished(rig, reply))
    await until(lambda: len(rig.pulls) == pulled + 2)  # still half-open: the next probe
    assert rig.runner.stats().circuit == HALF_OPEN
    rig.engine.mode = "ok"
    await run_one(rig, "probe2")
    assert rig.runner.stats().circuit == CLOSED


async def test_health_probe_failures_open_the_circuit_without_a_request(probed: Rig) -> None:
    engine = probed.engine
    assert isinstance(engine, Probed) and health_probe(engine) is not None  # type: ignore[arg-type]
    await until(lambda: engine.probes >= 2)
    assert probed.runner.stats().circuit == CLOSED
    engine.upstream_error = "health probe: connection refused"
    await until(lambda: probed.runner.stats().circuit == OPEN)
    s = probed.runner.stats()
    assert s.circuit_error == "health probe: connection refused" and s.failed == 0
    assert engine.calls == 0 and s.circuit_opened >= 1


async def test_a_health_success_resets_failures_but_never_closes(probed: Rig) -> None:
    engine = probed.engine
    assert isinstance(engine, Probed)
    engine.mode = "5xx"
    await run_one(probed, "f0")
    await run_one(probed, "f1")
    await until(lambda: probed.runner.stats().circuit_failures == 0)  # the probe answered
    engine.upstream_error = "health probe: HTTP 503"
    await until(lambda: probed.runner.stats().circuit == OPEN)
    engine.upstream_error = None
    await asyncio.sleep(BACKOFF / 2)  # probes answer meanwhile: the circuit stays open
    assert probed.runner.stats().circuit == OPEN
    await expire_open_pulls(probed)
    await until(lambda: probed.runner.stats().circuit == HALF_OPEN)
    await asyncio.sleep(0.1)  # healthy probes do not close a half-open circuit either
    assert probed.runner.stats().circuit == HALF_OPEN
    engine.mode = "ok"
    await until(lambda: len(open_pulls(probed)) == 1)
    await run_one(probed, "probe")
    assert probed.runner.stats().circuit == CLOSED


async def test_a_health_failure_while_half_open_reopens_doubled(probed: Rig) -> None:
    engine = probed.engine
    assert isinstance(engine, Probed)
    engine.upstream_error = "health probe: timed out"
    await until(lambda: probed.runner.stats().circuit_opened == 1)
    # the backoff passes while the upstream stays down: the next probe re-opens it, doubled
    await until(lambda: probed.runner.stats().circuit_opened == 2, timeout=2 * BACKOFF + 1)
    assert probed.runner.stats().circuit == OPEN
    assert probed.runner.stats().circuit_reopen_in_s > BACKOFF


async def test_an_interval_of_0_turns_the_probe_off() -> None:
    engine = Probed()
    engine.upstream_error = "health probe: HTTP 500"
    async for rig in _rig(engine, health_interval_s=0.0):
        await asyncio.sleep(0.1)
        assert engine.probes == 0 and rig.runner.stats().circuit == CLOSED


async def test_engines_without_a_probe_have_none() -> None:
    assert health_probe(SimEngine(SimSettings())) is None
    assert health_probe(Scripted()) is None  # type: ignore[arg-type]


# ---- settings and flags -------------------------------------------------------------------


def test_the_flags_reach_the_breaker_and_probe_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    from llmfleet.flags import OPENAI_FLAGS, WORKER_FLAGS, build_parser, settings_from  # noqa: PLC0415

    for k in [k for k in os.environ if k.startswith("LLMFLEET_")]:
        monkeypatch.delenv(k)
    monkeypatch.setenv("LLMFLEET_UPSTREAM_HEALTH_PATH", "/health")
    argv = ["worker", "--breaker-failures", "5", "--breaker-backoff", "0.5",
            "--breaker-backoff-max", "8", "--upstream-health-interval", "0"]  # fmt: skip
    args = build_parser().parse_args(argv)
    s = settings_from(args, WorkerSettings("nats://x"), (*WORKER_FLAGS, *OPENAI_FLAGS))
    assert s.runner.breaker == BreakerSettings(threshold=5, base_s=0.5, max_s=8.0)
    assert s.runner.health_interval_s == 0.0 and s.engine.openai.health_path == "/health"
    check_worker(s)
    d = WorkerSettings("nats://x")
    assert d.runner.breaker == BreakerSettings(3, 5.0, 60.0)
    assert d.runner.health_interval_s == 2.0 and d.engine.openai.health_path == "/v1/models"


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("runner.breaker.threshold", 0, "--breaker-failures must be at least 1"),
        ("runner.breaker.base_s", 0.0, "--breaker-backoff must be positive"),
        ("runner.breaker.max_s", 1.0, "--breaker-backoff-max must be at least"),
        ("runner.health_interval_s", -1.0, "--upstream-health-interval must be 0"),
        ("runner.health_interval_s", float("nan"), "--upstream-health-interval must be 0"),
        ("engine.openai.health_path", "v1/models", "--upstream-health-path must be a path"),
        ("engine.openai.health_path", "http://x/", "--upstream-health-path must be a path"),
    ],
)
def test_check_worker_names_the_bad_flag(field: str, value: object, message: str) -> None:
    s = WorkerSettings("nats://x")
    parts = field.split(".")
    chain = [s]
    for part in parts[:-1]:
        chain.append(getattr(chain[-1], part))
    new: object = value
    for holder, part in zip(reversed(chain), reversed(parts), strict=True):
        new = msgspec.structs.replace(holder, **{part: new})
    assert isinstance(new, WorkerSettings)
    with pytest.raises(ValueError, match=message):
        check_worker(new)


# ---- the engines' health probe against a recording HTTP server --------------------------


class Recorder:
    """A tiny HTTP/1.1 server: records each request's line and headers, answers `status`
    (or holds the answer while `hold` is clear)."""

    def __init__(self) -> None:
        self.status = 200
        self.seen: list[tuple[str, dict[str, str]]] = []
        self.hold = asyncio.Event()
        self.hold.set()
        self.port = 0
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> Recorder:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        self.hold.set()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
                fields = (line.partition(":") for line in head[1:] if line)
                self.seen.append((head[0], {k.lower(): v.strip() for k, _, v in fields}))
                await self.hold.wait()
                body = b'{"object": "list", "data": []}'
                writer.write(
                    f"HTTP/1.1 {self.status} X\r\nContent-Type: application/json\r\n"
                    f"Content-Length: {len(body)}\r\n\r\n".encode()
                    + body
                )
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


async def test_the_openai_engine_probes_its_upstream_with_its_key(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from worker.engines import openai as oai  # noqa: PLC0415

    key = "sk-probe-secret-key-123456"
    async with Recorder() as up:
        url = f"http://127.0.0.1:{up.port}/v1"
        engine = oai.OpenAIEngine(OpenAISettings(base_url=url, served_model="m", api_key=key))
        await engine.start()
        try:
            assert health_probe(engine) is not None  # type: ignore[arg-type]
            assert await engine.health() is None
            line, headers = up.seen[-1]
            assert line == "GET /v1/models HTTP/1.1"
            assert headers["authorization"] == f"Bearer {key}"
            up.status = 404  # answered: the upstream is up (a 404 shows on requests)
            assert await engine.health() is None
            up.status = 503
            assert await engine.health() == "health probe: HTTP 503"
            up.status = 200
            monkeypatch.setattr(oai, "HEALTH_TIMEOUT_S", 0.2)
            up.hold.clear()
            assert await engine.health() == "health probe: timed out"
            await up.close()
            error = await engine.health()
            assert error == "health probe: connection refused"
            assert str(up.port) not in error and key not in error
        finally:
            await engine.aclose()
    assert await engine.health() == "health probe: the engine is not running"


async def test_the_health_path_is_configurable() -> None:
    from worker.engines.openai import OpenAIEngine  # noqa: PLC0415

    async with Recorder() as up:
        base = f"http://127.0.0.1:{up.port}/v1"
        engine = OpenAIEngine(
            OpenAISettings(base_url=base, served_model="m", health_path="/health")
        )
        await engine.start()
        try:
            assert await engine.health() is None
            assert up.seen[-1][0] == "GET /health HTTP/1.1"
        finally:
            await engine.aclose()


async def test_the_anthropic_engine_probes_v1_models_with_its_headers() -> None:
    from worker.engines.anthropic import AnthropicEngine  # noqa: PLC0415

    key = "sk-ant-api03-probe-secret"
    async with Recorder() as up:
        root = f"http://127.0.0.1:{up.port}"
        engine = AnthropicEngine(OpenAISettings(base_url=root, served_model="m", api_key=key))
        await engine.start()
        try:
            assert await engine.health() is None
            line, headers = up.seen[-1]
            assert line == "GET /v1/models HTTP/1.1"
            assert headers["x-api-key"] == key and headers["anthropic-version"] == "2023-06-01"
            assert "authorization" not in headers
        finally:
            await engine.aclose()
