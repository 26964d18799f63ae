"""`--engine anthropic` end to end: real nats-server, a real gateway and a worker process
serving models from the fake Messages upstream (tests/anthropic_upstream.py, a process too,
which checks every request the way the API does). Clients are the official SDKs: OpenAI
chat (streaming, non-streaming, tool calls with streamed arguments), OpenAI Responses, and
Anthropic Messages through the gateway's `/v1/messages`. The upstream key stays on the
worker; the usage clients see is exactly the upstream's."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import pytest

from tests.anthropic_upstream import sample_input, upstream_process
from tests.procs import Fleet, Gateway, Proc

MODEL = "claude-fake"
HOOKS = ("error-429", "error-529", "error-401", "error-400", "error-midstream")
UPSTREAM_KEY = "sk-ant-api03-e2e-upstream-secret-key"
GW_KEY = "gw-client-key"
TOKENS = 6
TEXT = " ".join(f"tok{i}" for i in range(TOKENS))
WEATHER: Any = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
            "required": ["city"],
        },
    },
}
WEATHER_INPUT = sample_input(WEATHER["function"]["parameters"])


def _front(name: str) -> bool:
    """Whether the gateway serves that API front yet (they are being built alongside)."""
    app = Path(__file__).resolve().parents[2] / "gateway" / "app.py"
    return name in app.read_text()


needs_messages = pytest.mark.skipif(
    not _front("front_messages"), reason="the gateway has no /v1/messages front yet"
)
needs_responses = pytest.mark.skipif(
    not _front("front_responses"), reason="the gateway has no /v1/responses front yet"
)


class Stack:
    def __init__(self, gw: Gateway, worker: Proc, upstream: str) -> None:
        self.gw, self.worker, self.upstream = gw, worker, upstream

    def stats(self) -> dict[str, Any]:
        r = httpx.get(self.upstream + "/stats", timeout=5.0)
        assert r.status_code == 200
        result: dict[str, Any] = r.json()
        return result

    def last_usage(self) -> dict[str, int]:
        usage: dict[str, int] = self.stats()["usages"][-1]
        return usage


@pytest.fixture(scope="module")
def stack(fleet: Fleet, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    workdir = tmp_path_factory.mktemp("anthropic")
    flags = ("--api-key", UPSTREAM_KEY, "--tokens", str(TOKENS), "--ttft-ms", "2")
    with upstream_process(workdir, *flags) as url:
        models = [a for m in (MODEL, *HOOKS) for a in ("--model", m)]
        worker = fleet.worker(
            "--engine", "anthropic", "--upstream", url, "--upstream-api-key", UPSTREAM_KEY,
            "--max-concurrency", "4", *models,
        )  # fmt: skip
        gw = fleet.gateway("--api-key", GW_KEY, wait_models=(MODEL, *HOOKS))
        yield Stack(gw, worker, url)


@pytest.fixture(scope="module")
def oai(stack: Stack) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=stack.gw.base_url, api_key=GW_KEY, max_retries=0) as c:
        yield c


def assert_usage_exact(usage: Any, stack: Stack) -> None:
    """A chat usage (OpenAI's names) against what the upstream answered last."""
    u = stack.last_usage()
    read, created = u["cache_read_input_tokens"], u["cache_creation_input_tokens"]
    assert usage.prompt_tokens == u["input_tokens"] + read + created
    assert usage.completion_tokens == u["output_tokens"]
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


# ---- OpenAI chat clients ------------------------------------------------------------------


def test_chat_non_streaming(oai: openai.OpenAI, stack: Stack) -> None:
    r = oai.chat.completions.create(
        model=MODEL,
        messages=[{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
    )
    assert r.choices[0].message.content == TEXT
    assert r.choices[0].finish_reason == "stop"
    assert r.usage is not None
    assert_usage_exact(r.usage, stack)
    stats = stack.stats()
    sent = stats["bodies"][-1]
    assert sent["model"] == MODEL and sent["system"] == [{"type": "text", "text": "be brief"}]
    assert sent["max_tokens"] == 4096  # the default: the client set none
    assert stats["keys"][-1] == UPSTREAM_KEY and stats["versions"][-1] == "2023-06-01"
    assert not stats["rejected"]


def test_chat_streaming_with_usage(oai: openai.OpenAI, stack: Stack) -> None:
    stream = oai.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "count"}],
        max_tokens=4,
        stream=True,
        stream_options={"include_usage": True},
    )
    text, finish, usage = "", None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            text += c.delta.content or ""
            finish = c.finish_reason or finish
    assert text == "tok0 tok1 tok2 tok3" and finish == "length"
    assert usage is not None
    assert_usage_exact(usage, stack)


def test_tool_calls_stream_their_arguments(oai: openai.OpenAI, stack: Stack) -> None:
    messages: list[Any] = [{"role": "user", "content": "weather in Paris?"}]
    stream = oai.chat.completions.create(
        model=MODEL, messages=messages, tools=[WEATHER], tool_choice="required", stream=True
    )
    calls: dict[int, dict[str, Any]] = {}
    argument_chunks, finish = 0, None
    for chunk in stream:
        for c in chunk.choices:
            finish = c.finish_reason or finish
            for tc in c.delta.tool_calls or []:
                cur = calls.setdefault(tc.index, {"id": "", "name": "", "arguments": ""})
                cur["id"] = tc.id or cur["id"]
                if tc.function is not None:
                    cur["name"] += tc.function.name or ""
                    if tc.function.arguments:
                        cur["arguments"] += tc.function.arguments
                        argument_chunks += 1
    assert finish == "tool_calls" and list(calls) == [0]
    call = calls[0]
    assert call["name"] == "get_weather" and call["id"].startswith("toolu_")
    assert json.loads(call["arguments"]) == WEATHER_INPUT
    assert argument_chunks > 2  # streamed in pieces, not in one

    # non-streaming, then the result goes back: a valid Messages conversation upstream
    r = oai.chat.completions.create(
        model=MODEL,
        messages=messages,
        tools=[WEATHER],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
    )
    tool_calls = r.choices[0].message.tool_calls
    assert r.choices[0].finish_reason == "tool_calls" and tool_calls
    assert json.loads(tool_calls[0].function.arguments) == WEATHER_INPUT  # type: ignore[union-attr]
    messages += [
        r.choices[0].message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": tool_calls[0].id, "content": "sunny, 21 C"},
    ]
    r = oai.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER])
    assert r.choices[0].message.content == TEXT and r.choices[0].finish_reason == "stop"
    stats = stack.stats()
    assert not stats["rejected"]
    sent = stats["bodies"][-1]["messages"]
    assert [t["role"] for t in sent] == ["user", "assistant", "user"]
    assert sent[2]["content"][0]["type"] == "tool_result"


def test_catalog_and_errors_never_show_the_upstream_key(stack: Stack) -> None:
    auth = {"authorization": f"Bearer {GW_KEY}"}
    listing = httpx.get(stack.gw.base_url + "/models", headers=auth).text
    assert UPSTREAM_KEY not in listing and stack.upstream not in listing
    for model in ("error-401", "error-400"):
        body = {"model": model, "messages": [{"role": "user", "content": "x"}]}
        r = httpx.post(stack.gw.base_url + "/chat/completions", json=body, headers=auth)
        assert r.status_code in (400, 502), r.text
        assert UPSTREAM_KEY not in r.text and "api03" not in r.text
    assert r.status_code == 400 and "simulated bad request" in r.json()["error"]["message"]
    body = {"model": "error-midstream", "stream": True,
            "messages": [{"role": "user", "content": "x"}]}  # fmt: skip
    with httpx.stream(
        "POST", stack.gw.base_url + "/chat/completions", json=body, headers=auth
    ) as r:
        raw = r.read().decode()
    assert "tok0" in raw and "upstream error mid-stream" in raw
    assert UPSTREAM_KEY not in raw
    # the upstream did see it, on every request; the worker never logged it
    assert set(stack.stats()["keys"]) == {UPSTREAM_KEY}
    assert UPSTREAM_KEY not in stack.worker.log()


@pytest.mark.parametrize(
    ("model", "status", "retry_after"), [("error-429", 429, "7"), ("error-529", 503, "2")]
)
def test_rate_limits_and_overload_reach_the_client_with_retry_after(
    oai: openai.OpenAI, model: str, status: int, retry_after: str
) -> None:
    with pytest.raises(openai.APIStatusError) as info:
        oai.chat.completions.create(model=model, messages=[{"role": "user", "content": "x"}])
    assert info.value.status_code == status
    assert info.value.response.headers["retry-after"] == retry_after
    assert UPSTREAM_KEY not in info.value.response.text


# ---- the other fronts: Anthropic Messages, OpenAI Responses -------------------------------


@needs_messages
def test_anthropic_sdk_through_the_messages_front(stack: Stack) -> None:
    with anthropic.Anthropic(base_url=stack.gw.url, api_key=GW_KEY, max_retries=0) as c:
        msg = c.messages.create(
            model=MODEL,
            max_tokens=3,
            system="be brief",
            messages=[{"role": "user", "content": "hi"}],
        )
        u = stack.last_usage()
        assert [b.type for b in msg.content] == ["text"]
        assert msg.content[0].text == "tok0 tok1 tok2"  # type: ignore[union-attr]
        assert msg.stop_reason == "max_tokens"
        assert msg.usage.input_tokens == u["input_tokens"]
        assert msg.usage.output_tokens == u["output_tokens"]

        with c.messages.stream(
            model=MODEL,
            max_tokens=100,
            messages=[{"role": "user", "content": "weather?"}],
            tools=[{"name": "get_weather", "input_schema": WEATHER["function"]["parameters"]}],
            tool_choice={"type": "any"},
        ) as s:
            final = s.get_final_message()
        tool = final.content[-1]
        assert tool.type == "tool_use" and tool.input == WEATHER_INPUT
        assert final.stop_reason == "tool_use"
        assert final.usage.output_tokens == stack.last_usage()["output_tokens"]

        # prompt caching: written once, then read; the client sees the upstream's counts
        system: Any = [{"type": "text", "text": "a long shared prefix " * 8,
                        "cache_control": {"type": "ephemeral"}}]  # fmt: skip
        for n, question in enumerate(("one", "two")):
            msg = c.messages.create(
                model=MODEL, max_tokens=5, system=system,
                messages=[{"role": "user", "content": question}],
            )  # fmt: skip
            u = stack.last_usage()
            assert msg.usage.cache_read_input_tokens == u["cache_read_input_tokens"]
            assert msg.usage.cache_creation_input_tokens == u["cache_creation_input_tokens"]
            assert msg.usage.input_tokens == u["input_tokens"]
            assert (u["cache_read_input_tokens"] > 0) == (n == 1)

        count = c.messages.count_tokens(model=MODEL, messages=[{"role": "user", "content": "a b"}])
        assert count.input_tokens == 3  # the fake: 1 per turn + 1 per word
    assert not stack.stats()["rejected"]


@needs_messages
def test_an_overloaded_upstream_is_529_to_anthropic_clients(stack: Stack) -> None:
    with anthropic.Anthropic(base_url=stack.gw.url, api_key=GW_KEY, max_retries=0) as c:
        with pytest.raises(anthropic.APIStatusError) as info:
            c.messages.create(
                model="error-529", max_tokens=5, messages=[{"role": "user", "content": "x"}]
            )
    assert info.value.status_code == 529
    assert info.value.response.headers["retry-after"] == "2"


@needs_responses
def test_openai_responses_client(oai: openai.OpenAI, stack: Stack) -> None:
    r = oai.responses.create(model=MODEL, input="hello", instructions="be brief", store=False)
    assert r.output_text == TEXT
    assert r.usage is not None
    u = stack.last_usage()
    assert r.usage.input_tokens == u["input_tokens"] + u["cache_read_input_tokens"]
    assert r.usage.output_tokens == u["output_tokens"]
    assert stack.stats()["bodies"][-1]["system"] == [{"type": "text", "text": "be brief"}]
