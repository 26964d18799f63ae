"""`worker.engines.openai` against the real test upstream (tests/upstream_server.py) on uvicorn."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import socket
import struct
from collections.abc import AsyncIterator
from typing import Any

import httpx
import msgspec
import pytest
import pytest_asyncio

from common.errors import EngineError, ServiceUnavailable, UpstreamError
from common.openai_types import ChatRequest, CompletionRequest, EmbeddingRequest
from common.protocol import Usage
from common.telemetry import UPSTREAM_TRACEPARENT
from tests.upstream_server import RunningServer, ServerSettings
from worker.engine import EngineEvent, Output
from worker.engines.openai import OpenAIEngine, SSEParser, UpChunk, chunk_output, upstream_error
from worker.settings import OpenAISettings

SECRET = "sk-very-secret-upstream-key"


@pytest_asyncio.fixture(scope="module")
async def upstream() -> AsyncIterator[RunningServer]:
    async with RunningServer(ServerSettings(ttft_ms=5, itl_ms=1, tokens=8)) as server:
        yield server


@pytest_asyncio.fixture(scope="module")
async def engine(upstream: RunningServer) -> AsyncIterator[OpenAIEngine]:
    eng = OpenAIEngine(
        OpenAISettings(base_url=upstream.base_url, served_model="served", upstream_model="m")
    )
    await eng.start()
    yield eng
    await eng.aclose()


@contextlib.asynccontextmanager
async def started(settings: OpenAISettings) -> AsyncIterator[OpenAIEngine]:
    eng = OpenAIEngine(settings)
    await eng.start()
    try:
        yield eng
    finally:
        await eng.aclose()


async def stats(server: RunningServer) -> dict[str, int]:
    async with httpx.AsyncClient() as client:
        resp = await client.get(f"http://127.0.0.1:{server.port}/stats")
        result: dict[str, int] = resp.json()
        return result


def chat_body(**fields: Any) -> tuple[ChatRequest, bytes]:
    body = {"model": "served", "messages": [{"role": "user", "content": "say hi now"}], **fields}
    raw = msgspec.json.encode(body)
    return msgspec.json.decode(raw, type=ChatRequest), raw


def completion_body(**fields: Any) -> tuple[CompletionRequest, bytes]:
    body = {"model": "served", "prompt": "once upon", **fields}
    raw = msgspec.json.encode(body)
    return msgspec.json.decode(raw, type=CompletionRequest), raw


def embedding_body(**fields: Any) -> tuple[EmbeddingRequest, bytes]:
    body = {"model": "served", "input": ["alpha", "beta gamma", "delta"], **fields}
    raw = msgspec.json.encode(body)
    return msgspec.json.decode(raw, type=EmbeddingRequest), raw


async def collect(events: AsyncIterator[EngineEvent]) -> tuple[list[Output], Usage]:
    outs: list[Output] = []
    usages: list[Usage] = []
    async for ev in events:
        assert not usages, "Usage must be the last event"
        if isinstance(ev, Usage):
            usages.append(ev)
        else:
            assert ev.choices, "an Output always advances at least one choice"
            outs.append(ev)
    assert len(usages) == 1
    return outs, usages[0]


def texts(outs: list[Output]) -> dict[int, str]:
    result: dict[int, str] = {}
    for out in outs:
        for c in out.choices:
            result[c.index] = result.get(c.index, "") + (c.content or "")
    return result


def finishes(outs: list[Output]) -> dict[int, str]:
    return {c.index: c.finish_reason for o in outs for c in o.choices if c.finish_reason}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


# ---- streaming ------------------------------------------------------------------------------


async def test_chat_streams_text_and_usage(engine: OpenAIEngine) -> None:
    # The client asked for no stream and no usage: the engine forces both upstream.
    req, raw = chat_body(stream=False)
    outs, usage = await collect(engine.chat(req, raw))
    assert texts(outs) == {0: "tok0 tok1 tok2 tok3 tok4 tok5 tok6 tok7"}
    assert finishes(outs) == {0: "stop"}
    assert usage == Usage(prompt_tokens=3, completion_tokens=8, total_tokens=11)


async def test_chat_n_and_max_tokens(engine: OpenAIEngine) -> None:
    req, raw = chat_body(n=2, max_completion_tokens=3, stream_options={"include_usage": False})
    outs, usage = await collect(engine.chat(req, raw))
    assert texts(outs) == {0: "tok0 tok1 tok2", 1: "tok0 tok1 tok2"}
    assert finishes(outs) == {0: "length", 1: "length"}
    assert usage.completion_tokens == 6


async def test_completions_stream(engine: OpenAIEngine) -> None:
    req, raw = completion_body(max_tokens=4)
    outs, usage = await collect(engine.complete(req, raw))
    assert texts(outs) == {0: "tok0 tok1 tok2 tok3"}
    assert finishes(outs) == {0: "length"}
    assert usage == Usage(prompt_tokens=2, completion_tokens=4, total_tokens=6)


async def test_model_is_rewritten_for_upstream(upstream: RunningServer) -> None:
    # The upstream model name decides what upstream sees, whatever the client sent.
    settings = OpenAISettings(
        base_url=upstream.base_url, served_model="served", upstream_model="error-400"
    )
    async with started(settings) as eng:
        req, raw = chat_body()
        with pytest.raises(EngineError):
            await collect(eng.chat(req, raw))
    # ... and without one, the served name is sent.
    settings = OpenAISettings(base_url=upstream.base_url, served_model="error-500")
    async with started(settings) as eng:
        req, raw = chat_body()
        with pytest.raises(UpstreamError):
            await collect(eng.chat(req, raw))


# ---- embeddings -----------------------------------------------------------------------------


async def test_embeddings_float_and_base64(engine: OpenAIEngine) -> None:
    req, raw = embedding_body(dimensions=4)
    floats = await engine.embed(req, raw)
    assert len(floats.embeddings) == 3
    assert all(isinstance(v, list) and len(v) == 4 for v in floats.embeddings)
    assert floats.usage == Usage(prompt_tokens=4, completion_tokens=0, total_tokens=4)

    req, raw = embedding_body(dimensions=4, encoding_format="base64")
    b64 = await engine.embed(req, raw)
    decoded = []
    for v in b64.embeddings:
        assert isinstance(v, str)
        decoded.append(list(struct.unpack("<4f", base64.b64decode(v))))
    assert decoded == floats.embeddings


async def test_embeddings_default_dimension(engine: OpenAIEngine) -> None:
    req, raw = embedding_body(input="just one")
    result = await engine.embed(req, raw)
    assert len(result.embeddings) == 1
    vec = result.embeddings[0]
    assert isinstance(vec, list) and len(vec) == 8


# ---- errors ---------------------------------------------------------------------------------


async def test_upstream_400_passes_through(engine: OpenAIEngine) -> None:
    req, raw = chat_body(model="x")
    settings = OpenAISettings(base_url=engine.settings.base_url, served_model="error-400")
    async with started(settings) as eng:
        with pytest.raises(EngineError) as info:
            await collect(eng.chat(req, raw))
        err = info.value
        assert (err.status, err.param, err.code) == (400, "messages", "invalid_value")
        assert err.type == "invalid_request_error"
        assert err.message == "simulated bad request"

        ereq, eraw = embedding_body()
        with pytest.raises(EngineError) as info:
            await eng.embed(ereq, eraw)
        assert info.value.status == 400


async def test_upstream_500_is_upstream_error(engine: OpenAIEngine) -> None:
    settings = OpenAISettings(base_url=engine.settings.base_url, served_model="error-500")
    async with started(settings) as eng:
        req, raw = completion_body()
        with pytest.raises(UpstreamError) as info:
            await collect(eng.complete(req, raw))
        assert info.value.status == 502
        # A 5xx names only its status: the upstream's own text stays in the worker's log.
        assert info.value.message == "The upstream failed with HTTP 500."


async def test_midstream_error(engine: OpenAIEngine) -> None:
    settings = OpenAISettings(base_url=engine.settings.base_url, served_model="error-midstream")
    async with started(settings) as eng:
        req, raw = chat_body()
        outs: list[Output] = []
        with pytest.raises(UpstreamError) as info:
            async for ev in eng.chat(req, raw):
                assert isinstance(ev, Output)
                outs.append(ev)
        assert texts(outs) == {0: "tok0 tok1"}
        assert info.value.status == 502
        assert "simulated mid-stream failure" in info.value.message


async def test_unreachable_upstream_names_neither_url_nor_key() -> None:
    url = f"http://127.0.0.1:{free_port()}/v1"
    settings = OpenAISettings(base_url=url, served_model="m", api_key=SECRET, wait_ready_s=0.5)
    with pytest.raises(UpstreamError) as start_info:
        async with started(settings):
            pass
    assert url in start_info.value.message and SECRET not in start_info.value.message

    server = RunningServer(ServerSettings(ttft_ms=1, itl_ms=0))
    await server.start()
    gone = OpenAISettings(base_url=server.base_url, served_model="m", api_key=SECRET)
    async with started(gone) as eng:
        await server.stop()  # the upstream goes away after the worker started
        req, raw = chat_body()
        with pytest.raises(UpstreamError) as info:
            await collect(eng.chat(req, raw))
        assert server.base_url not in info.value.message  # the URL is in the log only
        assert SECRET not in info.value.message
        assert SECRET not in repr(info.value.__cause__)

        ereq, eraw = embedding_body()
        with pytest.raises(UpstreamError) as einfo:
            await eng.embed(ereq, eraw)
        assert SECRET not in einfo.value.message


async def test_start_waits_for_a_loading_upstream() -> None:
    port = free_port()
    settings = OpenAISettings(
        base_url=f"http://127.0.0.1:{port}/v1", served_model="m", wait_ready_s=30
    )
    eng = OpenAIEngine(settings)
    starting = asyncio.create_task(eng.start())
    await asyncio.sleep(1.5)
    assert not starting.done()  # still waiting: nothing listens yet
    server = RunningServer(ServerSettings(ttft_ms=1, itl_ms=0), port=port)
    await server.start()
    try:
        await asyncio.wait_for(starting, 10)
        req, raw = chat_body(max_tokens=1)
        outs, _ = await collect(eng.chat(req, raw))
        assert texts(outs) == {0: "tok0"}
    finally:
        await eng.aclose()
        await server.stop()


async def test_api_key_sent_to_upstream() -> None:
    async with RunningServer(ServerSettings(api_key=SECRET, ttft_ms=1, itl_ms=0)) as server:
        good = OpenAISettings(base_url=server.base_url, served_model="m", api_key=SECRET)
        async with started(good) as eng:
            req, raw = chat_body(max_tokens=2)
            outs, _ = await collect(eng.chat(req, raw))
            assert texts(outs) == {0: "tok0 tok1"}
        bad = OpenAISettings(base_url=server.base_url, served_model="m", api_key="sk-wrong")
        async with started(bad) as eng:
            # Our credentials being wrong is the fleet's fault, not the client's: 502.
            with pytest.raises(UpstreamError) as info:
                await collect(eng.chat(req, raw))
            assert "sk-wrong" not in info.value.message


async def test_not_started_is_unavailable() -> None:
    eng = OpenAIEngine(OpenAISettings(base_url="http://127.0.0.1:1/v1", served_model="m"))
    req, raw = chat_body()
    with pytest.raises(ServiceUnavailable):
        await collect(eng.chat(req, raw))


def test_card_hides_credentials() -> None:
    eng = OpenAIEngine(
        OpenAISettings(base_url="http://user:pw@127.0.0.1:8000/v1", served_model="m")
    )
    card = eng.card()
    assert card.engine == "openai"
    assert card.owned_by == "llmfleet"
    assert card.description == "served by an OpenAI-compatible upstream"  # no URL


# ---- cancellation ---------------------------------------------------------------------------


async def wait_for_stats(server: RunningServer, **want: int) -> dict[str, int]:
    for _ in range(200):
        got = await stats(server)
        if all(got[k] == v for k, v in want.items()):
            return got
        await asyncio.sleep(0.01)
    raise AssertionError(f"stats never reached {want}: {got}")


async def test_cancelling_consumer_closes_upstream_stream() -> None:
    async with RunningServer(ServerSettings(ttft_ms=1, itl_ms=20, tokens=1000)) as server:
        settings = OpenAISettings(base_url=server.base_url, served_model="m")
        async with started(settings) as eng:
            first = asyncio.Event()

            async def consume() -> None:
                req, raw = chat_body()
                async for _ in eng.chat(req, raw):
                    first.set()

            task = asyncio.create_task(consume())
            await asyncio.wait_for(first.wait(), 5)
            assert (await stats(server))["open_streams"] == 1
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            got = await wait_for_stats(server, open_streams=0, aborted=1)
            assert got["requests"] == 1


async def test_closing_generator_closes_upstream_stream() -> None:
    async with RunningServer(ServerSettings(ttft_ms=1, itl_ms=20, tokens=1000)) as server:
        settings = OpenAISettings(base_url=server.base_url, served_model="m")
        async with started(settings) as eng:
            req, raw = completion_body(max_tokens=None)
            async with contextlib.aclosing(eng.complete(req, raw)) as events:
                async for ev in events:
                    assert isinstance(ev, Output)
                    break
            await wait_for_stats(server, open_streams=0, aborted=1)


async def test_finished_streams_are_not_aborted() -> None:
    async with RunningServer(ServerSettings(ttft_ms=1, itl_ms=0, tokens=4)) as server:
        settings = OpenAISettings(base_url=server.base_url, served_model="m")
        async with started(settings) as eng:
            for _ in range(5):
                req, raw = chat_body()
                await collect(eng.chat(req, raw))
            await wait_for_stats(server, open_streams=0, aborted=0, requests=5)


# ---- pure parts -----------------------------------------------------------------------------


def test_sse_parser_handles_crlf_comments_and_split_reads() -> None:
    p = SSEParser()
    assert p.feed(b': keep-alive\r\n\r\ndata: {"a"') == []
    assert p.feed(b":1}\r\n\r\ndata: x\n") == [b'{"a":1}']
    assert p.feed(b"event: message\nid: 3\ndata:y\n\ndata: [DONE]\n\n") == [b"x\ny", b"[DONE]"]
    assert p.feed(b"data: tail") == []
    assert p.close() == [b"tail"]


def test_chunk_output_skips_empty_and_reads_reasoning() -> None:
    dec = msgspec.json.Decoder(UpChunk)
    role_only = dec.decode(b'{"choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}')
    assert chunk_output(role_only) is None
    reasoning = dec.decode(
        b'{"choices":[{"index":1,"delta":{"reasoning":"hmm"}},'
        b'{"index":0,"delta":{"content":"","reasoning_content":"so"}}]}'
    )
    out = chunk_output(reasoning)
    assert out is not None
    assert [(c.index, c.reasoning_content, c.content) for c in out.choices] == [
        (1, "hmm", None),
        (0, "so", None),
    ]
    tools = dec.decode(
        b'{"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"id":"c1"}]},'
        b'"finish_reason":null}]}'
    )
    out = chunk_output(tools)
    assert out is not None and out.choices[0].tool_calls == [{"index": 0, "id": "c1"}]


def test_upstream_error_shapes() -> None:
    flat = upstream_error(
        400, b'{"object":"error","message":"bad","type":"BadRequestError","code":400}'
    )
    assert isinstance(flat, EngineError)
    assert (flat.status, flat.message, flat.type, flat.code) == (
        400,
        "bad",
        "BadRequestError",
        None,
    )
    tgi = upstream_error(422, b'{"error":"Input validation error","error_type":"validation"}')
    assert (tgi.status, tgi.message) == (422, "Input validation error")
    html = upstream_error(503, b"<html>bad gateway</html>")
    assert isinstance(html, UpstreamError)
    assert html.status == 502 and "503" in html.message
    limited = upstream_error(429, b'{"error":{"message":"slow down"}}', retry_after=2.0)
    assert (limited.status, limited.retry_after) == (429, 2.0)
    assert isinstance(upstream_error(401, b"{}"), UpstreamError)


# ---- trace context ---------------------------------------------------------------------------


async def test_the_request_traceparent_goes_upstream(
    engine: OpenAIEngine, upstream: RunningServer
) -> None:
    tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"

    async def run(value: str | None) -> None:  # a job task of its own, as on the worker
        UPSTREAM_TRACEPARENT.set(value)
        req, raw = chat_body()
        await collect(engine.chat(req, raw))
        ereq, eraw = embedding_body()
        await engine.embed(ereq, eraw)

    before = upstream.app.stats.requests
    await asyncio.create_task(run(tp))
    assert upstream.app.stats.traceparents[-2:] == [tp, tp]
    seen = len(upstream.app.stats.traceparents)
    await asyncio.create_task(run(None))  # no trace context: no header
    assert upstream.app.stats.requests == before + 4
    assert len(upstream.app.stats.traceparents) == seen
