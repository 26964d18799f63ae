"""The Anthropic Messages API (`/v1/messages`, `/v1/messages/count_tokens`) through the
official `anthropic` SDK (and raw HTTP), against real processes: nats-server, one gateway
with `--api-key`, one `sim` worker. One fleet for the module."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import anthropic
import httpx
import pytest
from anthropic.types import Message, TextBlock, ToolUseBlock

from tests.procs import Fleet, Gateway

MODEL = "claude-sim-1"
KEY = "sk-ant-test-key"
HELLO: list[Any] = [{"role": "user", "content": "Hello there, fleet"}]
WEATHER: Any = {
    "name": "get_weather",
    "description": "The weather in a city",
    "input_schema": {
        "type": "object",
        "properties": {
            "city": {"type": "string"},
            "days": {"type": "integer", "minimum": 1},
            "units": {"enum": ["metric", "imperial"]},
            "hourly": {"type": "boolean"},
        },
        "required": ["city", "days", "units", "hourly"],
    },
}
WEATHER_INPUT = {"city": "sim", "days": 1, "units": "metric", "hourly": False}


@pytest.fixture(scope="module")
def gw(fleet: Fleet) -> Gateway:
    fleet.worker(
        "--engine", "sim", "--model", MODEL, "--max-concurrency", "32",
        "--sim-ttft-ms", "2", "--sim-itl-ms", "1", "--sim-tokens", "12",
    )  # fmt: skip
    return fleet.gateway("--api-key", KEY, wait_models=(MODEL,))


@pytest.fixture(scope="module")
def client(gw: Gateway) -> Iterator[anthropic.Anthropic]:
    with anthropic.Anthropic(base_url=gw.url, api_key=KEY, max_retries=0) as c:  # x-api-key
        yield c


def text_of(msg: Message) -> str:
    return "".join(b.text for b in msg.content if isinstance(b, TextBlock))


def raw_events(gw: Gateway, body: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(event, data) pairs of a streaming response, read without the SDK."""
    headers = {"x-api-key": KEY, "anthropic-version": "2023-06-01"}
    with httpx.stream("POST", gw.url + "/v1/messages", json=body, headers=headers) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = r.read()
    out = []
    for frame in raw.split(b"\n\n"):
        if not frame.strip():
            continue
        head, data = frame.split(b"\n")
        assert head.startswith(b"event: ") and data.startswith(b"data: "), frame
        doc = json.loads(data[len(b"data: ") :])
        assert doc["type"] == head[len(b"event: ") :].decode()
        out.append((doc["type"], doc))
    return out


# ---- text ------------------------------------------------------------------------------------


def test_create(client: anthropic.Anthropic) -> None:
    msg = client.messages.create(model=MODEL, max_tokens=100, messages=HELLO)
    assert msg.id.startswith("msg_")
    assert (msg.type, msg.role, msg.model) == ("message", "assistant", MODEL)
    assert msg.stop_reason == "end_turn" and msg.stop_sequence is None
    assert len(text_of(msg).split()) == 12
    assert msg.usage.input_tokens == 3  # sim counts words
    assert msg.usage.output_tokens == 12
    assert msg.usage.cache_read_input_tokens == 0


def test_max_tokens_stop_reason(client: anthropic.Anthropic) -> None:
    msg = client.messages.create(model=MODEL, max_tokens=3, messages=HELLO)
    assert msg.stop_reason == "max_tokens"
    assert msg.usage.output_tokens == 3
    assert len(text_of(msg).split()) == 3


def test_max_tokens_above_the_gateway_limit_is_lowered(client: anthropic.Anthropic) -> None:
    # Claude Code asks for 32000-64000; the gateway's --max-tokens here is 32768.
    with client.messages.stream(model=MODEL, max_tokens=64000, messages=HELLO) as stream:
        msg = stream.get_final_message()
    assert msg.stop_reason == "end_turn" and msg.usage.output_tokens == 12


def test_system_blocks_and_content_blocks(client: anthropic.Anthropic) -> None:
    msg = client.messages.create(
        model=MODEL,
        max_tokens=50,
        system=[
            {"type": "text", "text": "You are terse."},
            {"type": "text", "text": "Really.", "cache_control": {"type": "ephemeral"}},
        ],
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Describe"},
                    {
                        "type": "image",
                        "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0K"},
                    },
                    {
                        "type": "document",
                        "source": {"type": "text", "media_type": "text/plain", "data": "a doc"},
                    },
                ],
            }
        ],
        extra_body={
            "temperature": 0.2,
            "top_k": 5,
            "thinking": {"type": "enabled", "budget_tokens": 1024},
        },
        metadata={"user_id": "user-1"},
    )
    assert msg.stop_reason == "end_turn"
    assert msg.usage.input_tokens > 0


def test_stream_matches_create(client: anthropic.Anthropic) -> None:
    full = client.messages.create(model=MODEL, max_tokens=100, messages=HELLO)
    with client.messages.stream(model=MODEL, max_tokens=100, messages=HELLO) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == text_of(full) == text_of(final)
    assert final.id.startswith("msg_") and final.model == MODEL
    assert final.stop_reason == "end_turn"
    assert (final.usage.input_tokens, final.usage.output_tokens) == (3, 12)


def test_raw_stream_event_sequence(gw: Gateway) -> None:
    evs = raw_events(gw, {"model": MODEL, "max_tokens": 5, "messages": HELLO, "stream": True})
    kinds = [k for k, _ in evs]
    assert kinds[:3] == ["message_start", "ping", "content_block_start"]
    assert kinds[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert set(kinds[3:-3]) == {"content_block_delta"}
    start = evs[0][1]["message"]
    assert start["content"] == [] and start["stop_reason"] is None
    assert start["usage"]["input_tokens"] >= 1 and start["usage"]["output_tokens"] == 1
    delta = evs[-2][1]
    assert delta["delta"] == {"stop_reason": "max_tokens", "stop_sequence": None}
    assert delta["usage"] == {
        "input_tokens": 3,
        "output_tokens": 5,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
    }


def test_stop_sequence(client: anthropic.Anthropic) -> None:
    words = text_of(client.messages.create(model=MODEL, max_tokens=100, messages=HELLO)).split()
    stop = " " + words[3]
    msg = client.messages.create(model=MODEL, max_tokens=100, messages=HELLO, stop_sequences=[stop])
    text = text_of(msg)
    assert stop not in text and len(text.split()) <= 3
    assert msg.stop_reason == "stop_sequence"
    assert msg.stop_sequence == stop


# ---- tools -----------------------------------------------------------------------------------


def test_named_tool_streams_arguments_in_pieces(gw: Gateway, client: anthropic.Anthropic) -> None:
    body: dict[str, Any] = {
        "model": MODEL,
        "max_tokens": 200,
        "messages": [{"role": "user", "content": "Weather in Oslo?"}],
        "tools": [WEATHER],
        "tool_choice": {"type": "tool", "name": "get_weather"},
    }
    with client.messages.stream(**body) as stream:
        final = stream.get_final_message()
    (block,) = final.content
    assert isinstance(block, ToolUseBlock)
    assert block.name == "get_weather" and block.id
    assert block.input == WEATHER_INPUT
    assert final.stop_reason == "tool_use"
    evs = raw_events(gw, {**body, "stream": True})
    pieces = [d["delta"]["partial_json"] for k, d in evs if k == "content_block_delta"]
    assert len(pieces) > 1  # the sim streams the arguments in pieces; none is lost
    assert json.loads("".join(pieces)) == WEATHER_INPUT
    (start,) = [d for k, d in evs if k == "content_block_start"]
    assert start["content_block"]["type"] == "tool_use" and start["content_block"]["input"] == {}


def test_any_tool_not_streaming(client: anthropic.Anthropic) -> None:
    msg = client.messages.create(
        model=MODEL,
        max_tokens=200,
        messages=[{"role": "user", "content": "Weather?"}],
        tools=[WEATHER],
        tool_choice={"type": "any", "disable_parallel_tool_use": True},
    )
    (block,) = msg.content
    assert isinstance(block, ToolUseBlock)
    assert (block.name, block.input) == ("get_weather", WEATHER_INPUT)
    assert msg.stop_reason == "tool_use"
    assert msg.usage.output_tokens > 0


def test_auto_tool_answers_text_and_tool_result_round_trip(client: anthropic.Anthropic) -> None:
    msg = client.messages.create(
        model=MODEL,
        max_tokens=100,
        tools=[WEATHER],
        tool_choice={"type": "auto"},
        messages=[
            {"role": "user", "content": "Weather in Oslo?"},
            {
                "role": "assistant",
                "content": [
                    {"type": "text", "text": "Let me check."},
                    {
                        "type": "tool_use",
                        "id": "toolu_1",
                        "name": "get_weather",
                        "input": WEATHER_INPUT,
                    },
                ],
            },
            {
                "role": "user",
                "content": [
                    {"type": "tool_result", "tool_use_id": "toolu_1", "content": "Sunny, 20C"},
                    {"type": "text", "text": "Thanks"},
                ],
            },
        ],
    )
    assert msg.stop_reason == "end_turn"
    assert text_of(msg)


# ---- count_tokens ----------------------------------------------------------------------------


def test_count_tokens_matches_usage(client: anthropic.Anthropic) -> None:
    messages: list[Any] = [{"role": "user", "content": "Count these four words"}]
    counted = client.messages.count_tokens(model=MODEL, system="Be brief", messages=messages)
    msg = client.messages.create(model=MODEL, max_tokens=5, system="Be brief", messages=messages)
    assert counted.input_tokens == msg.usage.input_tokens == 6


# ---- errors ----------------------------------------------------------------------------------


def test_deep_nesting_is_400_not_500(gw: Gateway) -> None:
    deep = "[" * 5000 + "]" * 5000
    for path, extra in (("/v1/messages", '"max_tokens": 5, '), ("/v1/chat/completions", "")):
        body = (
            f'{{"model": "{MODEL}", {extra}"messages": [{{"role": "user", "content": "hi"}}],'
            f' "metadata": {{"x": {deep}}}, "tools": [{{"x": {deep}}}]}}'
        )
        r = httpx.post(gw.url + path, content=body, headers={"x-api-key": KEY})
        assert r.status_code == 400, r.text
        assert "nested too deeply" in r.text


def test_thinking_budget_is_lowered_with_max_tokens(
    client: anthropic.Anthropic, gw: Gateway
) -> None:
    thinking = {"type": "enabled", "budget_tokens": 63999}
    with client.messages.stream(
        model=MODEL,
        max_tokens=64000,
        messages=HELLO,
        thinking=thinking,  # type: ignore[arg-type]
    ) as stream:
        assert stream.get_final_message().stop_reason == "end_turn"


def test_missing_max_tokens_is_400(client: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.BadRequestError) as e:
        client.post("/v1/messages", cast_to=Message, body={"model": MODEL, "messages": HELLO})
    assert e.value.status_code == 400
    assert e.value.body == {
        "type": "error",
        "error": {"type": "invalid_request_error", "message": "max_tokens: Field required"},
    }


def test_bad_field_types_name_the_field(client: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.BadRequestError) as e:
        client.messages.create(
            model=MODEL, max_tokens=5, messages=HELLO, extra_body={"temperature": "hot"}
        )
    assert isinstance(e.value.body, dict)
    assert e.value.body["error"]["message"].startswith("temperature: ")
    server_tool: Any = {"type": "web_search_20250305", "name": "web_search", "max_uses": 1}
    with pytest.raises(anthropic.BadRequestError, match="web_search_20250305"):
        client.messages.create(model=MODEL, max_tokens=5, messages=HELLO, tools=[server_tool])


def test_unknown_model_is_404(client: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.NotFoundError) as e:
        client.messages.create(model="no-such-model", max_tokens=5, messages=HELLO)
    assert isinstance(e.value.body, dict)
    assert e.value.body["type"] == "error"
    assert e.value.body["error"]["type"] == "not_found_error"
    with pytest.raises(anthropic.NotFoundError):
        client.messages.count_tokens(model="no-such-model", messages=HELLO)


def test_auth(gw: Gateway) -> None:
    with anthropic.Anthropic(base_url=gw.url, api_key="wrong", max_retries=0) as bad:
        with pytest.raises(anthropic.AuthenticationError) as e:
            bad.messages.create(model=MODEL, max_tokens=5, messages=HELLO)
        assert isinstance(e.value.body, dict)
        assert e.value.body["error"]["type"] == "authentication_error"
        with pytest.raises(anthropic.AuthenticationError):
            bad.messages.count_tokens(model=MODEL, messages=HELLO)
    with anthropic.Anthropic(base_url=gw.url, auth_token=KEY, max_retries=0) as bearer:
        assert (
            bearer.messages.create(model=MODEL, max_tokens=2, messages=HELLO).usage.output_tokens
            == 2
        )
