"""The gateway through the official `openai` SDK (and raw HTTP), against real processes:
nats-server, one gateway, a `sim` worker and an `openai` worker in front of a test server.
"""

from __future__ import annotations

import asyncio
import base64
import json
import struct
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from tests.procs import Fleet, Gateway, upstream_process
from tests.sse import sse_events

SIM = "sim/model:1.0"  # a model id with '/', ':' and '.' on purpose
UP = "up-model"


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    workdir = tmp_path_factory.mktemp("upstream")
    with upstream_process(workdir, "--ttft-ms", "2", "--itl-ms", "1") as url:
        yield url + "/v1"


@pytest.fixture(scope="module")
def gw(fleet: Fleet, upstream: str) -> Gateway:
    fleet.worker(
        "--engine", "sim", "--model", SIM, "--max-concurrency", "64",
        "--sim-ttft-ms", "5", "--sim-itl-ms", "1", "--sim-tokens", "12",
    )  # fmt: skip
    fleet.worker("--engine", "openai", "--model", UP, "--upstream", upstream)
    return fleet.gateway("--max-body-bytes", "65536", wait_models=(SIM, UP))


@pytest.fixture(scope="module")
def client(gw: Gateway) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=gw.base_url, api_key="unused", max_retries=0) as c:
        yield c


HELLO = [{"role": "user", "content": "Hello there, fleet"}]


# ---- models --------------------------------------------------------------------------


def test_models_lists_what_workers_serve(client: openai.OpenAI) -> None:
    models = {m.id: m for m in client.models.list()}
    assert {SIM, UP} <= set(models)
    sim = models[SIM]
    assert sim.object == "model"
    assert sim.owned_by == "llmfleet-sim"
    assert sim.created > 1_600_000_000
    assert sim.model_extra is not None and sim.model_extra["simulated"] is True
    assert client.models.retrieve(SIM).id == SIM


def test_unknown_model_retrieve_is_404(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("no-such-model")
    assert e.value.code == "model_not_found"


# ---- chat ------------------------------------------------------------------------------


def test_chat_non_streaming(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model=SIM, messages=HELLO)  # type: ignore[arg-type]
    assert r.object == "chat.completion"
    assert r.id.startswith("chatcmpl-")
    assert r.model == SIM
    (choice,) = r.choices
    assert choice.message.role == "assistant"
    assert choice.finish_reason == "stop"
    assert choice.message.content and len(choice.message.content.split()) == 12
    assert r.usage is not None
    assert r.usage.prompt_tokens == 3
    assert r.usage.completion_tokens == 12
    assert r.usage.total_tokens == 15


def test_chat_max_tokens_is_respected(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model=SIM, messages=HELLO, max_tokens=4)  # type: ignore[arg-type]
    assert r.choices[0].finish_reason == "length"
    assert r.usage is not None and r.usage.completion_tokens == 4
    assert len((r.choices[0].message.content or "").split()) == 4


def test_chat_streaming_matches_non_streaming(client: openai.OpenAI) -> None:
    full = client.chat.completions.create(model=SIM, messages=HELLO, seed=7)  # type: ignore[arg-type]
    stream = client.chat.completions.create(
        model=SIM,
        messages=HELLO,  # type: ignore[arg-type]
        seed=7,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert len({c.id for c in chunks}) == 1
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    content = [c for c in chunks if c.choices]
    assert content[-1].choices[0].finish_reason == "stop"
    assert all(c.choices[0].finish_reason is None for c in content[:-1])
    text = "".join(c.choices[0].delta.content or "" for c in content)
    assert text == full.choices[0].message.content
    last = chunks[-1]
    assert last.choices == []
    assert last.usage is not None and last.usage.completion_tokens == 12
    assert all(c.usage is None for c in chunks[:-1])


def test_chat_streaming_without_usage_has_no_usage_chunk(client: openai.OpenAI) -> None:
    chunks = list(
        client.chat.completions.create(model=SIM, messages=HELLO, stream=True, max_tokens=3)  # type: ignore[arg-type]
    )
    assert all(c.choices for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "length"


def test_chat_n_choices(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model=SIM, messages=HELLO, n=3, max_tokens=5)  # type: ignore[arg-type]
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert r.usage is not None and r.usage.completion_tokens == 15
    chunks = list(
        client.chat.completions.create(model=SIM, messages=HELLO, n=3, max_tokens=5, stream=True)  # type: ignore[arg-type]
    )
    texts = ["", "", ""]
    for c in chunks:
        for ch in c.choices:
            texts[ch.index] += ch.delta.content or ""
    assert texts == [c.message.content for c in r.choices]


def test_raw_sse_framing(gw: Gateway) -> None:
    body = {"model": SIM, "messages": HELLO, "stream": True, "max_tokens": 2}
    with httpx.stream("POST", gw.base_url + "/chat/completions", json=body) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["x-llmfleet-worker"]
        raw = b"".join(r.iter_bytes())
    events = sse_events(raw, strict=True)
    assert events[-1] == "[DONE]" and raw.endswith(b"data: [DONE]\n\n")
    chunks: list[Any] = events[:-1]
    assert all(isinstance(c, dict) for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": "", "refusal": None}
    assert chunks[-1]["choices"][0] == {
        "index": 0,
        "delta": {},
        "logprobs": None,
        "finish_reason": "length",
    }
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert len(text.split()) == 2  # tokens may arrive coalesced into fewer chunks
    assert list(chunks[0]) == ["id", "object", "created", "model", "system_fingerprint", "choices"]


# ---- completions -------------------------------------------------------------------


def test_completions_both_ways(client: openai.OpenAI) -> None:
    r = client.completions.create(model=SIM, prompt="Once upon a time", max_tokens=6, seed=1)
    assert r.object == "text_completion"
    assert r.choices[0].finish_reason == "length"
    assert r.usage is not None and r.usage.prompt_tokens == 4 and r.usage.completion_tokens == 6
    chunks = list(
        client.completions.create(
            model=SIM,
            prompt="Once upon a time",
            max_tokens=6,
            seed=1,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == r.choices[0].text
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 6


# ---- the openai engine (a proxy to an OpenAI-compatible upstream) ----------------------


def test_openai_engine_chat_streaming(client: openai.OpenAI) -> None:
    chunks = list(
        client.chat.completions.create(
            model=UP,
            messages=HELLO,  # type: ignore[arg-type]
            max_tokens=5,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "tok0 tok1 tok2 tok3 tok4"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 5
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


def test_openai_engine_embeddings_float_and_base64(client: openai.OpenAI) -> None:
    f = client.embeddings.create(model=UP, input=["a b c", "d"], encoding_format="float")
    assert [d.index for d in f.data] == [0, 1]
    assert len(f.data[0].embedding) == 8
    assert f.usage.prompt_tokens == 4
    # The SDK's default is base64, decoded by the SDK itself.
    b = client.embeddings.create(model=UP, input=["a b c", "d"])
    assert b.data[0].embedding == pytest.approx(f.data[0].embedding, rel=1e-6)
    d = client.embeddings.create(model=UP, input="x y", dimensions=4, encoding_format="float")
    assert len(d.data[0].embedding) == 4


def test_sim_embeddings_base64_raw(gw: Gateway) -> None:
    r = httpx.post(
        gw.base_url + "/embeddings",
        json={"model": SIM, "input": "hello", "encoding_format": "base64", "dimensions": 16},
    )
    assert r.status_code == 200
    emb = r.json()["data"][0]["embedding"]
    assert isinstance(emb, str)
    vec = struct.unpack("<16f", base64.b64decode(emb))
    assert sum(v * v for v in vec) == pytest.approx(1.0, rel=1e-5)


def test_upstream_4xx_passes_through(fleet: Fleet, gw: Gateway, upstream: str) -> None:
    fleet.worker("--engine", "openai", "--model", "error-400", "--upstream", upstream)
    fleet.wait_ready(gw, ("error-400",))
    with openai.OpenAI(base_url=gw.base_url, api_key="x", max_retries=0) as c:
        with pytest.raises(openai.BadRequestError) as e:
            c.chat.completions.create(model="error-400", messages=HELLO, stream=True)  # type: ignore[arg-type]
    assert e.value.status_code == 400
    assert e.value.param == "messages"


# ---- errors ----------------------------------------------------------------------------


def _post(gw: Gateway, path: str, content: bytes) -> httpx.Response:
    return httpx.post(
        gw.base_url + path, content=content, headers={"content-type": "application/json"}
    )


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (b'{"model": "x", "messages": [', None),
        (b"[]", None),
        (b'{"messages": [{"role": "user", "content": "hi"}]}', "model"),
        (b'{"model": "m", "messages": "hi"}', "messages"),
        (b'{"model": "m", "messages": [{"role": "wizard", "content": "hi"}]}', "messages[0].role"),
        (b'{"model": "m", "messages": [], "max_tokens": 5}', "messages"),
        (
            b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": "5"}',
            "max_tokens",
        ),
        (
            b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": -1}',
            "max_tokens",
        ),
        (
            b'{"model": "m", "messages": [{"role": "user", "content": "x"}], '
            b'"max_tokens": 10000000}',
            "max_tokens",
        ),
        (b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "n": 1000}', "n"),
        (
            b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "temperature": 9}',
            "temperature",
        ),
    ],
)
def test_bad_chat_requests_are_400(gw: Gateway, body: bytes, param: str | None) -> None:
    r = _post(gw, "/chat/completions", body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == "invalid_request_error"
    assert err["param"] == param
    assert err["message"]


def test_sdk_sees_bad_request(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=SIM, messages=HELLO, temperature=5)  # type: ignore[arg-type]


def test_unknown_model_is_404_at_once(client: openai.OpenAI) -> None:
    t0 = time.monotonic()
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="nobody-serves-this", messages=HELLO)  # type: ignore[arg-type]
    assert e.value.code == "model_not_found"
    assert time.monotonic() - t0 < 5  # not queued until some timeout


def test_body_over_limit_is_413(gw: Gateway) -> None:
    big = b'{"model": "m", "messages": [{"role": "user", "content": "' + b"x" * 70_000 + b'"}]}'
    r = _post(gw, "/chat/completions", big)
    assert r.status_code == 413
    assert r.json()["error"]["code"] == "payload_too_large"


def test_wrong_method_and_path(gw: Gateway) -> None:
    r = httpx.get(gw.base_url + "/chat/completions")
    assert r.status_code == 405
    assert r.json()["error"]["code"] == "method_not_allowed"
    r = httpx.get(gw.base_url + "/nothing/here")
    assert r.status_code == 404
    assert "error" in r.json()


def test_health_and_readiness(gw: Gateway) -> None:
    assert httpx.get(gw.url + "/healthz").json() == {"status": "ok"}
    assert httpx.get(gw.url + "/readyz").status_code == 200


def test_bad_requests_leave_the_gateway_serving(client: openai.OpenAI, gw: Gateway) -> None:
    for _ in range(20):
        _post(gw, "/chat/completions", b"\xff\xfe garbage")
    r = client.chat.completions.create(model=SIM, messages=HELLO, max_tokens=2)  # type: ignore[arg-type]
    assert r.choices[0].message.content


# ---- concurrency -----------------------------------------------------------------------


async def test_64_concurrent_streams(gw: Gateway) -> None:
    async with openai.AsyncOpenAI(base_url=gw.base_url, api_key="x", max_retries=0) as c:

        async def one(i: int) -> tuple[str, int]:
            stream = await c.chat.completions.create(
                model=SIM,
                messages=[{"role": "user", "content": f"stream number {i}"}],
                stream=True,
                stream_options={"include_usage": True},
            )
            text, usage = "", 0
            async for chunk in stream:
                if chunk.choices:
                    text += chunk.choices[0].delta.content or ""
                if chunk.usage:
                    usage = chunk.usage.completion_tokens
            return text, usage

        results = await asyncio.gather(*(one(i) for i in range(64)))
    assert len(results) == 64
    assert all(len(text.split()) == 12 and usage == 12 for text, usage in results)


# ---- output-shaping parameters (the sim honours them) ------------------------------------


def test_completions_batch_of_prompts_gives_prompts_times_n_choices(client: openai.OpenAI) -> None:
    r = client.completions.create(model=SIM, prompt=["a b", "c d"], max_tokens=2, n=2, seed=3)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert r.choices[0].text != r.choices[2].text  # different prompts, different answers
    assert r.usage is not None and r.usage.completion_tokens == 8 and r.usage.prompt_tokens == 4
    echo = client.completions.create(model=SIM, prompt="say it", max_tokens=2, echo=True)
    assert echo.choices[0].text.startswith("say it ")


def test_structured_output_parses(client: openai.OpenAI) -> None:
    from pydantic import BaseModel  # noqa: PLC0415

    class Pet(BaseModel):
        name: str
        legs: int
        tags: list[str]

    r = client.chat.completions.parse(model=SIM, messages=HELLO, response_format=Pet)  # type: ignore[arg-type]
    assert r.choices[0].message.parsed == Pet(name="sim", legs=0, tags=[])
    j = client.chat.completions.create(
        model=SIM,
        messages=HELLO,  # type: ignore[arg-type]
        response_format={"type": "json_object"},
    )
    assert isinstance(json.loads(j.choices[0].message.content or ""), dict)


def test_required_tool_call(client: openai.OpenAI) -> None:
    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "parameters": {
                    "type": "object",
                    "properties": {"city": {"type": "string"}},
                    "required": ["city"],
                },
            },
        }
    ]
    r = client.chat.completions.create(
        model=SIM,
        messages=HELLO,  # type: ignore[arg-type]
        tools=tools,  # type: ignore[arg-type]
        tool_choice="required",
    )
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls or []
    assert call.function.name == "get_weather"  # type: ignore[union-attr]
    assert json.loads(call.function.arguments) == {"city": "sim"}  # type: ignore[union-attr]
    chunks = list(
        client.chat.completions.create(
            model=SIM,
            messages=HELLO,  # type: ignore[arg-type]
            tools=tools,  # type: ignore[arg-type]
            tool_choice="required",
            stream=True,
        )
    )
    deltas = [c.choices[0].delta for c in chunks if c.choices and c.choices[0].delta.tool_calls]
    assert deltas[0].tool_calls[0].function.name == "get_weather"  # type: ignore[index,union-attr]


def test_logprobs(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model=SIM,
        messages=HELLO,  # type: ignore[arg-type]
        max_tokens=3,
        logprobs=True,
        top_logprobs=2,
    )
    lp = r.choices[0].logprobs
    assert lp is not None and lp.content is not None and len(lp.content) == 3
    assert len(lp.content[0].top_logprobs) == 2
    c = client.completions.create(model=SIM, prompt="x", max_tokens=3, logprobs=1)
    assert c.choices[0].logprobs is not None
    assert len(c.choices[0].logprobs.tokens or []) == 3


# ---- HTTP details ------------------------------------------------------------------------


def test_explicit_nulls_and_bad_utf8(gw: Gateway) -> None:
    r = httpx.post(
        gw.base_url + "/chat/completions",
        json={"model": SIM, "messages": HELLO, "n": None, "stream": None, "max_tokens": 2},
    )
    assert r.status_code == 200
    bad = _post(
        gw, "/chat/completions", b'{"model":"m","messages":[{"role":"user","content":"\xff"}]}'
    )
    assert bad.status_code == 400
    assert bad.json()["error"]["type"] == "invalid_request_error"


def test_model_routes_methods_and_slashes(gw: Gateway) -> None:
    assert httpx.post(gw.base_url + "/models").status_code == 405
    assert httpx.delete(gw.base_url + f"/models/{SIM}").status_code == 405
    assert httpx.get(gw.base_url + f"/models/{SIM}/").json()["id"] == SIM


def test_cors_when_enabled(fleet: Fleet, gw: Gateway) -> None:
    cors = fleet.gateway("--cors-origins", "http://app.example", wait_models=(SIM,))
    pre = httpx.options(
        cors.base_url + "/chat/completions",
        headers={"origin": "http://app.example", "access-control-request-method": "POST"},
    )
    assert pre.status_code == 204
    assert pre.headers["access-control-allow-origin"] == "http://app.example"
    sdk = httpx.options(  # the SDKs' own headers, from a browser (anthropic's JS SDK)
        cors.url + "/v1/messages",
        headers={
            "origin": "http://app.example",
            "access-control-request-method": "POST",
            "access-control-request-headers": "x-api-key,anthropic-version,x-stainless-os",
        },
    )
    allowed = sdk.headers["access-control-allow-headers"]
    assert "x-stainless-os" in allowed and "anthropic-version" in allowed
    r = httpx.get(cors.base_url + "/models", headers={"origin": "http://app.example"})
    assert r.headers["access-control-allow-origin"] == "http://app.example"
    other = httpx.get(cors.base_url + "/models", headers={"origin": "http://evil.example"})
    assert "access-control-allow-origin" not in other.headers
