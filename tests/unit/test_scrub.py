"""What upstream texts may carry to a client: `scrub` (pure), how the openai and llamacpp
engines map upstream errors, and an openai engine against an upstream that echoes its
credentials back in every error (a real HTTP server, uvicorn, in this event loop)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import msgspec
import pytest
import uvicorn

from common.errors import EngineError, FleetError, UpstreamError
from common.openai_types import ChatRequest, EmbeddingRequest
from worker.engines.llamacpp import engine_error
from worker.engines.openai import OpenAIEngine, upstream_error
from worker.engines.scrub import MAX_MESSAGE_CHARS, scrub
from worker.settings import OpenAISettings

KEY = "upstream-key-Zq81xw0LmP"  # not key-shaped: only known as the worker's own key
SMALL: dict[str, Any] = {"max_connections": 4, "wait_ready_s": 5.0}  # one small pool

# ---- scrub ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "leaked"),
    [
        ("Authorization: Bearer abc123def456", "abc123def456"),
        ("got header authorization=Bearer tok.en-12345", "tok.en-12345"),
        ("Invalid API key sk-proj-AbC123xyz9_QQ provided", "sk-proj-AbC123xyz9_QQ"),
        ("Incorrect API key provided: abcd1234. See docs", "abcd1234"),
        ("key sk-ant-api03-XYZxyz0123 is over quota", "sk-ant-api03-XYZxyz0123"),
        ("api_key=hunter2&x=1", "hunter2"),
        ("x-api-key: s3cr3t-value", "s3cr3t-value"),
        ('{"password": "p4ss word"}', "p4ss"),
        ("access_token=ya29.A0ARrdaM", "ya29.A0ARrdaM"),
        ("see https://bob:pw@api.example.com/v1 now", "bob:pw"),
        ("proxy http://token123@10.0.0.1:3128 refused", "token123"),
        ("Authorization: Basic dXNlcjpwYXNz", "dXNlcjpwYXNz"),
        ("token hf_AbCdEfGhIjKlMnOp expired", "hf_AbCdEfGhIjKlMnOp"),
        ("jwt eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.c2ln rejected", "eyJhbGciOiJIUzI1NiJ9"),
    ],
)
def test_credentials_are_removed(text: str, leaked: str) -> None:
    out = scrub(text)
    assert leaked not in out, out
    assert "***" in out
    assert scrub(out) == out  # idempotent


@pytest.mark.parametrize(
    "text",
    [
        "This model's maximum context length is 4096 tokens. Reduce max_tokens: 5000",
        "'messages' must contain at least one message",
        "Bearer token required",
        "basic validation failed for field 'n'",
        "temperature must be between 0 and 2, got 3.5",
        "The api key is required for this endpoint",
        "see https://docs.example.com/errors#400",
    ],
)
def test_ordinary_messages_pass_unchanged(text: str) -> None:
    assert scrub(text) == text


def test_known_secrets_go_wherever_they_appear() -> None:
    text = f"unknown key {KEY}; retried with {KEY}-2 at http://10.1.2.3:8000/v1"
    out = scrub(text, (KEY, None, "", "http://10.1.2.3:8000/v1"))
    assert KEY not in out and "10.1.2.3" not in out
    assert out == "unknown key ***; retried with ***-2 at ***"


def test_long_texts_are_cut() -> None:
    out = scrub("x" * 100_000 + KEY, (KEY,))
    assert len(out) == MAX_MESSAGE_CHARS and out.endswith("...")


# ---- error mapping -------------------------------------------------------------------------


def _body(message: str, **fields: Any) -> bytes:
    return msgspec.json.encode({"error": {"message": message, **fields}})


def test_401_and_403_echo_nothing_of_the_upstream() -> None:
    for status in (401, 403):
        err = upstream_error(status, _body(f"key {KEY} of account acme-corp is revoked"))
        assert isinstance(err, UpstreamError)
        assert err.status == 502 and err.code == "upstream_error"
        assert KEY not in err.message and "acme" not in err.message
        assert str(status) in err.message


def test_5xx_name_only_their_status() -> None:
    for status in (500, 502, 503):
        err = upstream_error(status, _body("CUDA OOM on gpu-node-7 (/opt/vllm/worker.py:88)"))
        assert isinstance(err, UpstreamError) and err.status == 502
        assert err.message == f"The upstream failed with HTTP {status}."
    raw = upstream_error(500, b"<html>Traceback: File /srv/app.py</html>")
    assert "srv" not in raw.message


def test_4xx_pass_through_scrubbed() -> None:
    for status in (400, 404, 422, 429):
        err = upstream_error(
            status,
            _body(
                f"bad request with Authorization: Bearer {KEY} via https://u:pw@up/v1",
                type="BadRequestError",
                param="messages",
                code="invalid_value",
            ),
            retry_after=2.0 if status == 429 else None,
            secrets=(KEY,),
        )
        assert isinstance(err, EngineError)
        assert (err.status, err.type, err.param, err.code) == (
            status,
            "BadRequestError",
            "messages",
            "invalid_value",
        )
        assert KEY not in err.message and "u:pw" not in err.message
        assert err.message.startswith("bad request with Authorization: ***")
    plain = upstream_error(404, b'{"error":"model `x` not found"}')
    assert plain.message == "model `x` not found"


def test_llamacpp_errors() -> None:
    bad = engine_error({"code": 400, "message": "bad 'n' api_key=abc123", "type": "x"})
    assert isinstance(bad, EngineError) and bad.status == 400
    assert bad.message == "bad 'n' api_key=***"
    ctx = engine_error({"code": 400, "type": "exceed_context_size_error", "message": "too long"})
    assert ctx.code == "context_length_exceeded"
    internal = engine_error({"code": 500, "message": "failed to parse /home/me/model.gguf"})
    assert isinstance(internal, UpstreamError)
    assert internal.message == "llama.cpp failed with HTTP 500."
    odd = engine_error("segfault at 0xdeadbeef")
    assert "deadbeef" not in odd.message


def test_the_card_names_no_upstream() -> None:
    eng = OpenAIEngine(OpenAISettings(base_url="http://user:pw@10.9.8.7:8000/v1", served_model="m"))
    assert eng.card().description == "served by an OpenAI-compatible upstream"


# ---- an upstream that echoes the worker's key in its errors --------------------------------

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


async def _echo_app(scope: Scope, receive: Receive, send: Send) -> None:
    """Every POST fails the way the request's `model` names, quoting the Authorization
    header it got and the URL it was called on, like a careless upstream would."""
    if scope["type"] != "http":
        return
    body = b""
    while True:
        msg = await receive()
        body += msg.get("body", b"")
        if not msg.get("more_body"):
            break
    auth = dict(scope["headers"]).get(b"authorization", b"").decode()
    host = dict(scope["headers"]).get(b"host", b"").decode()
    where = f"http://{host}{scope['path']}"
    if scope["method"] == "GET":
        status, payload, ctype = 200, b'{"object":"list","data":[]}', b"application/json"
    else:
        model = msgspec.json.decode(body).get("model", "")
        status = {"echo-401": 401, "echo-400": 400, "echo-503": 503}.get(model, 200)
        text = f"request to {where} with '{auth}' refused"
        if status == 200:  # a stream that fails after one token
            ctype = b"text/event-stream"
            tok = {"choices": [{"index": 0, "delta": {"content": "hi"}}]}
            payload = b"data: " + msgspec.json.encode(tok) + b"\n\n"
            payload += b"data: " + msgspec.json.encode({"error": {"message": text}}) + b"\n\n"
        else:
            ctype = b"application/json"
            payload = _body(text, type="invalid_request_error", param="model")
    headers = [(b"content-type", ctype), (b"content-length", str(len(payload)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})


@contextlib.asynccontextmanager
async def echo_upstream() -> AsyncIterator[str]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        _echo_app, log_config=None, log_level="warning", lifespan="off", ws="none"
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        await asyncio.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        server.should_exit = True
        await task
        sock.close()


def _chat(model: str) -> tuple[ChatRequest, bytes]:
    raw = msgspec.json.encode({"model": model, "messages": [{"role": "user", "content": "x"}]})
    return msgspec.json.decode(raw, type=ChatRequest), raw


async def _fail(eng: OpenAIEngine, model: str) -> FleetError:
    req, raw = _chat(model)
    with pytest.raises(FleetError) as info:
        async for _ in eng.chat(req, raw):
            pass
    return info.value


async def test_an_echoing_upstream_leaks_neither_key_nor_url(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with echo_upstream() as url:
        for model in ("echo-401", "echo-400", "echo-503", "echo-midstream"):
            settings = OpenAISettings(
                base_url=url, served_model="m", upstream_model=model, api_key=KEY, **SMALL
            )
            eng = OpenAIEngine(settings)
            await eng.start()
            try:
                with caplog.at_level(logging.WARNING, logger="worker.engines.openai"):
                    err = await _fail(eng, model)
            finally:
                await eng.aclose()
            assert isinstance(err, EngineError | UpstreamError)
            assert KEY not in err.message, (model, err.message)
            assert "127.0.0.1" not in err.message, (model, err.message)
            if model == "echo-400":
                assert (err.status, err.param) == (400, "model")
                assert "refused" in err.message  # the upstream's words, minus secrets
            else:
                assert err.status == 502
        # The operator still learns where and why, without the key.
        assert url in caplog.text and KEY not in caplog.text
        assert "answered HTTP 401" in caplog.text and "answered HTTP 503" in caplog.text


async def test_an_unreachable_upstream_is_not_named() -> None:
    async with echo_upstream() as url:
        eng = OpenAIEngine(OpenAISettings(base_url=url, served_model="m", api_key=KEY, **SMALL))
        await eng.start()
    try:  # the upstream is gone now
        err = await _fail(eng, "m")
        assert err.message == "The worker cannot connect to its upstream."
        raw = msgspec.json.encode({"model": "m", "input": "x"})
        with pytest.raises(UpstreamError) as info:
            await eng.embed(msgspec.json.decode(raw, type=EmbeddingRequest), raw)
        assert "127.0.0.1" not in info.value.message and KEY not in info.value.message
    finally:
        await eng.aclose()
