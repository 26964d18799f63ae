"""The `anthropic` engine's wire: chat body -> Messages request, Messages events -> chat
deltas (`common.apis.anthropic_upstream`, `common.apis.anthropic_events`, pure), and the
engine itself against the fake Messages upstream (tests/anthropic_upstream.py) on uvicorn,
which checks every request the way the API does."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import msgspec
import pytest
import pytest_asyncio

from common.apis.anthropic_events import EventReader, MessagesStreamError
from common.apis.anthropic_upstream import JSON_TOOL, chat_to_messages, count_tokens_body
from common.errors import FleetError, InvalidRequest
from common.openai_types import ChatRequest, CompletionRequest, EmbeddingRequest
from common.protocol import ChoiceDelta, Usage
from tests.anthropic_upstream import RunningServer, ServerSettings, sample_input, signature_of
from worker.engine import EngineEvent, Output
from worker.engines import build_engine
from worker.engines.anthropic import AnthropicEngine, api_root
from worker.settings import AnthropicSettings, EngineSettings, OpenAISettings

KEY = "sk-ant-api03-very-secret-upstream-key"
WEATHER = {
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
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}


def user(text: str) -> dict[str, Any]:
    return {"role": "user", "content": text}


def translate(**chat: Any) -> dict[str, Any]:
    chat.setdefault("messages", [user("hi")])
    return chat_to_messages(chat, "claude-x")


# ---- the request ----------------------------------------------------------------------------


def test_a_plain_chat_becomes_a_messages_request() -> None:
    body = translate(messages=[user("hello there")])
    assert body == {
        "model": "claude-x",
        "messages": [{"role": "user", "content": [{"type": "text", "text": "hello there"}]}],
        "max_tokens": 4096,
    }


def test_system_and_developer_messages_go_to_the_top_level_system() -> None:
    cc = {"type": "ephemeral"}
    body = translate(
        messages=[
            {"role": "system", "content": [{"type": "text", "text": "rules", "cache_control": cc}]},
            user("a"),
            {"role": "developer", "content": "more rules"},
            user("b"),
        ]
    )
    assert body["system"] == [
        {"type": "text", "text": "rules", "cache_control": cc},
        {"type": "text", "text": "more rules"},
    ]
    # the two user messages around the developer one are one turn now
    assert body["messages"] == [
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}
    ]


def test_a_tool_round_trip_becomes_tool_use_and_tool_result_blocks() -> None:
    call = {
        "id": "call_1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
    }
    call2 = {"id": "call_2", "type": "function", "function": {"name": "get_time", "arguments": ""}}
    body = translate(
        messages=[
            user("weather?"),
            {
                "role": "assistant",
                "content": "Checking.",
                "reasoning_content": "unsigned, dropped",
                "thinking_blocks": [
                    {"type": "thinking", "thinking": "hmm", "signature": "sig"},
                    {"type": "redacted_thinking", "data": "opaque"},
                ],
                "tool_calls": [call, call2],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
            {"role": "tool", "tool_call_id": "call_2", "content": "", "is_error": True},
            user("thanks"),
        ]
    )
    assert body["messages"][1] == {
        "role": "assistant",
        "content": [
            {"type": "thinking", "thinking": "hmm", "signature": "sig"},
            {"type": "redacted_thinking", "data": "opaque"},
            {"type": "text", "text": "Checking."},
            {"type": "tool_use", "id": "call_1", "name": "get_weather", "input": {"city": "Paris"}},
            {"type": "tool_use", "id": "call_2", "name": "get_time", "input": {}},
        ],
    }
    assert body["messages"][2] == {
        "role": "user",
        "content": [
            {
                "type": "tool_result",
                "tool_use_id": "call_1",
                "content": [{"type": "text", "text": "sunny"}],
            },
            {"type": "tool_result", "tool_use_id": "call_2", "is_error": True},
            {"type": "text", "text": "thanks"},
        ],
    }
    assert len(body["messages"]) == 3


def test_tool_results_go_first_in_their_user_turn() -> None:
    call = {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    body = translate(
        messages=[
            user("go"),
            {"role": "assistant", "tool_calls": [call]},
            user("(note)"),
            {"role": "tool", "tool_call_id": "c", "content": "done"},
        ]
    )
    assert [b["type"] for b in body["messages"][2]["content"]] == ["tool_result", "text"]


def test_images_and_files_become_image_and_document_blocks() -> None:
    cc = {"type": "ephemeral"}
    parts = [
        {"type": "text", "text": "look"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0K"}},
        {"type": "image_url", "image_url": {"url": "https://x.test/a.jpg"}, "cache_control": cc},
        {
            "type": "file",
            "file": {"file_data": "data:application/pdf;base64,JVBERi0=", "filename": "a.pdf"},
        },
        {"type": "file", "file": {"file_data": "data:text/plain;base64,aGVsbG8="}},
    ]
    content = translate(messages=[{"role": "user", "content": parts}])["messages"][0]["content"]
    assert content == [
        {"type": "text", "text": "look"},
        {
            "type": "image",
            "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0K"},
        },
        {
            "type": "image",
            "source": {"type": "url", "url": "https://x.test/a.jpg"},
            "cache_control": cc,
        },
        {
            "type": "document",
            "source": {"type": "base64", "media_type": "application/pdf", "data": "JVBERi0="},
            "title": "a.pdf",
        },
        {
            "type": "document",
            "source": {"type": "text", "media_type": "text/plain", "data": "hello"},
        },
    ]


@pytest.mark.parametrize(
    ("part", "param"),
    [
        ({"type": "input_audio", "input_audio": {}}, "messages[0].content[0].type"),
        (
            {"type": "image_url", "image_url": {"url": "ftp://x"}},
            "messages[0].content[0].image_url.url",
        ),
        (
            {"type": "image_url", "image_url": {"url": "data:image/png,raw"}},
            "messages[0].content[0].image_url.url",
        ),
        ({"type": "file", "file": {"file_id": "file-1"}}, "messages[0].content[0].file"),
    ],
)
def test_parts_messages_cannot_carry_are_refused(part: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        translate(messages=[{"role": "user", "content": [part]}])
    assert info.value.param == param


@pytest.mark.parametrize(
    ("choice", "parallel", "want"),
    [
        (None, None, None),
        ("auto", None, {"type": "auto"}),
        ("required", None, {"type": "any"}),
        ("none", None, {"type": "none"}),
        (
            {"type": "function", "function": {"name": "get_weather"}},
            None,
            {"type": "tool", "name": "get_weather"},
        ),
        (None, False, {"type": "auto", "disable_parallel_tool_use": True}),
        ("required", False, {"type": "any", "disable_parallel_tool_use": True}),
        ("none", False, {"type": "none"}),
        ("auto", True, {"type": "auto"}),
    ],
)
def test_tool_choice_maps_to_anthropics(choice: Any, parallel: Any, want: Any) -> None:
    chat: dict[str, Any] = {"tools": [WEATHER]}
    if choice is not None:
        chat["tool_choice"] = choice
    if parallel is not None:
        chat["parallel_tool_calls"] = parallel
    body = translate(**chat)
    assert body.get("tool_choice") == want
    assert body["tools"] == [
        {
            "name": "get_weather",
            "description": "The weather in a city",
            "input_schema": WEATHER["function"]["parameters"],
        }
    ]


def test_tools_keep_cache_control_and_get_an_object_schema() -> None:
    tool = {
        "type": "function",
        "function": {"name": "noop"},
        "cache_control": {"type": "ephemeral"},
    }
    body = translate(tools=[tool])
    assert body["tools"] == [
        {
            "name": "noop",
            "input_schema": {"type": "object", "properties": {}},
            "cache_control": {"type": "ephemeral"},
        }
    ]
    assert "tool_choice" not in translate(tool_choice="auto")  # no tools: no choice


def test_sampling_fields() -> None:
    body = translate(
        temperature=1.6,
        top_p=0.9,
        top_k=40,
        stop="END",
        user="u-1",
        seed=3,
        presence_penalty=0.5,
        max_completion_tokens=77,
    )
    assert body["temperature"] == 1.0  # Anthropic's range is 0..1: clamped, not rescaled
    assert (body["top_p"], body["top_k"], body["stop_sequences"]) == (0.9, 40, ["END"])
    assert body["metadata"] == {"user_id": "u-1"}
    assert body["max_tokens"] == 77
    assert "seed" not in body and "presence_penalty" not in body
    assert translate(temperature=0.3, stop=["a", "b"])["stop_sequences"] == ["a", "b"]
    assert translate(temperature=0.3)["temperature"] == 0.3


def test_max_tokens_defaults_and_makes_room_for_thinking() -> None:
    thinking = {"type": "enabled", "budget_tokens": 2048}
    assert translate(max_tokens=9)["max_tokens"] == 9
    body = translate(thinking=thinking)
    assert body["max_tokens"] == 4096 + 2048 and body["thinking"] == thinking
    chat = {"messages": [user("x")]}
    assert chat_to_messages(chat, "m", default_max_tokens=100)["max_tokens"] == 100


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"n": 2}, "n"),
        ({"logprobs": True}, "logprobs"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"messages": [{"role": "function", "name": "f", "content": "x"}]}, "messages[0].role"),
        (
            {
                "messages": [
                    user("a"),
                    {
                        "role": "assistant",
                        "tool_calls": [
                            {
                                "id": "c",
                                "type": "function",
                                "function": {"name": "f", "arguments": "{oops"},
                            }
                        ],
                    },
                ]
            },
            "messages[1].tool_calls[0].function.arguments",
        ),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].tool_call_id"),
        ({"tools": [{"type": "code_interpreter"}]}, "tools[0]"),
        ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice"),
        ({"tools": [WEATHER], "response_format": {"type": "json_object"}}, "response_format"),
        ({"messages": []}, "messages"),
    ],
)
def test_what_messages_cannot_express_is_a_400(fields: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        translate(**fields)
    assert info.value.status == 400 and info.value.param == param


def test_a_json_response_format_becomes_a_forced_tool() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "string"}}}
    rf = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    body = translate(response_format=rf)
    assert body["tools"][0]["name"] == JSON_TOOL and body["tools"][0]["input_schema"] == schema
    assert body["tool_choice"] == {"type": "tool", "name": JSON_TOOL}
    assert translate(response_format={"type": "json_object"})["tools"][0]["input_schema"] == {
        "type": "object"
    }
    assert "tools" not in translate(response_format={"type": "text"})


def test_a_final_assistant_prefill_loses_trailing_whitespace() -> None:
    body = translate(messages=[user("q"), {"role": "assistant", "content": "The answer is "}])
    assert body["messages"][-1]["content"] == [{"type": "text", "text": "The answer is"}]
    body = translate(messages=[user("q"), {"role": "assistant", "content": "  "}])
    assert [t["role"] for t in body["messages"]] == ["user"]


def test_a_message_level_cache_control_goes_on_its_last_block() -> None:
    cc = {"type": "ephemeral"}
    body = translate(messages=[{"role": "user", "content": "long doc", "cache_control": cc}])
    assert body["messages"][0]["content"] == [
        {"type": "text", "text": "long doc", "cache_control": cc}
    ]


def test_count_tokens_takes_only_the_prompt() -> None:
    body = translate(tools=[WEATHER], tool_choice="auto", max_tokens=5, temperature=0.5, stop="x")
    assert set(count_tokens_body(body)) == {"model", "messages", "tools", "tool_choice"}


# ---- the stream -----------------------------------------------------------------------------


def ev(**fields: Any) -> bytes:
    return json.dumps(fields).encode()


def start(input_tokens: int = 10, read: int = 0, created: int = 0) -> bytes:
    usage = {
        "input_tokens": input_tokens,
        "output_tokens": 1,
        "cache_read_input_tokens": read,
        "cache_creation_input_tokens": created,
    }
    return ev(
        type="message_start",
        message={
            "id": "msg_1",
            "type": "message",
            "role": "assistant",
            "content": [],
            "usage": usage,
        },
    )


def block(index: int, **content_block: Any) -> bytes:
    return ev(type="content_block_start", index=index, content_block=content_block)


def delta(index: int, **d: Any) -> bytes:
    return ev(type="content_block_delta", index=index, delta=d)


def end(stop: str, output: int, sequence: str | None = None) -> list[bytes]:
    return [
        ev(
            type="message_delta",
            delta={"stop_reason": stop, "stop_sequence": sequence},
            usage={"output_tokens": output},
        ),
        ev(type="message_stop"),
    ]


def read_all(reader: EventReader, events: list[bytes]) -> list[ChoiceDelta]:
    out: list[ChoiceDelta] = []
    for e in events:
        out.extend(reader.feed(e))
    return out


def test_a_text_stream_reads_as_content_then_finish_with_exact_usage() -> None:
    reader = EventReader()
    out = read_all(
        reader,
        [
            start(12, read=100, created=20),
            block(0, type="text", text=""),
            ev(type="ping"),
            delta(0, type="text_delta", text="Hello"),
            delta(0, type="text_delta", text=" world"),
            ev(type="content_block_stop", index=0),
            *end("end_turn", 5),
        ],
    )
    assert out == [
        ChoiceDelta(index=0, content="Hello"),
        ChoiceDelta(index=0, content=" world"),
        ChoiceDelta(index=0, finish_reason="stop"),
    ]
    assert reader.done and reader.finished
    assert reader.usage() == Usage(
        prompt_tokens=132,
        completion_tokens=5,
        total_tokens=137,
        prompt_tokens_details={"cached_tokens": 100, "cache_creation_tokens": 20},
    )


def test_tool_use_blocks_read_as_tool_call_deltas() -> None:
    reader = EventReader()
    out = read_all(
        reader,
        [
            start(),
            block(0, type="text", text=""),
            delta(0, type="text_delta", text="Let me check."),
            ev(type="content_block_stop", index=0),
            block(1, type="tool_use", id="toolu_a", name="get_weather", input={}),
            delta(1, type="input_json_delta", partial_json=""),
            delta(1, type="input_json_delta", partial_json='{"city": '),
            delta(1, type="input_json_delta", partial_json='"Paris"}'),
            ev(type="content_block_stop", index=1),
            block(2, type="tool_use", id="toolu_b", name="get_time", input={}),
            ev(type="content_block_stop", index=2),
            *end("tool_use", 9),
        ],
    )
    assert [d.tool_calls for d in out if d.tool_calls] == [
        [
            {
                "index": 0,
                "id": "toolu_a",
                "type": "function",
                "function": {"name": "get_weather", "arguments": ""},
            }
        ],
        [{"index": 0, "function": {"arguments": '{"city": '}}],
        [{"index": 0, "function": {"arguments": '"Paris"}'}}],
        [
            {
                "index": 1,
                "id": "toolu_b",
                "type": "function",
                "function": {"name": "get_time", "arguments": ""},
            }
        ],
        [{"index": 1, "function": {"arguments": "{}"}}],  # no input at all: "{}"
    ]
    assert out[0].content == "Let me check."
    assert out[-1] == ChoiceDelta(index=0, finish_reason="tool_calls")


def test_thinking_signatures_and_redacted_blocks() -> None:
    out = read_all(
        EventReader(),
        [
            start(),
            block(0, type="thinking", thinking="", signature=""),
            delta(0, type="thinking_delta", thinking="First, "),
            delta(0, type="thinking_delta", thinking="think."),
            delta(0, type="signature_delta", signature="EqQBCkYI"),
            ev(type="content_block_stop", index=0),
            block(1, type="redacted_thinking", data="EmwKAhgB"),
            ev(type="content_block_stop", index=1),
            block(2, type="text", text=""),
            delta(2, type="text_delta", text="42"),
            *end("end_turn", 7),
        ],
    )
    assert out == [
        ChoiceDelta(index=0, reasoning_content="First, "),
        ChoiceDelta(index=0, reasoning_content="think."),
        ChoiceDelta(index=0, reasoning_signature="EqQBCkYI"),
        ChoiceDelta(index=0, redacted_reasoning="EmwKAhgB"),
        ChoiceDelta(index=0, content="42"),
        ChoiceDelta(index=0, finish_reason="stop"),
    ]


@pytest.mark.parametrize(
    ("stop", "sequence", "want"),
    [
        ("stop_sequence", "END", ChoiceDelta(index=0, finish_reason="stop", stop_sequence="END")),
        ("max_tokens", None, ChoiceDelta(index=0, finish_reason="length")),
        ("refusal", None, ChoiceDelta(index=0, finish_reason="content_filter")),
        ("pause_turn", None, ChoiceDelta(index=0, finish_reason="stop")),
    ],
)
def test_stop_reasons(stop: str, sequence: str | None, want: ChoiceDelta) -> None:
    assert read_all(EventReader(), [start(), *end(stop, 1, sequence)]) == [want]


def test_message_delta_usage_is_cumulative_and_wins() -> None:
    reader = EventReader()
    md = ev(
        type="message_delta",
        delta={"stop_reason": "end_turn"},
        usage={"input_tokens": 30, "output_tokens": 4, "cache_read_input_tokens": 8},
    )
    read_all(reader, [start(10), md, ev(type="message_stop")])
    assert reader.usage().prompt_tokens == 38 and reader.usage().completion_tokens == 4


def test_an_error_event_says_whether_output_came_before_it() -> None:
    err = ev(type="error", error={"type": "overloaded_error", "message": "Overloaded"})
    reader = EventReader()
    with pytest.raises(MessagesStreamError) as info:
        read_all(reader, [start(), ev(type="ping"), err])
    assert info.value.error_type == "overloaded_error" and not info.value.after_output
    reader = EventReader()
    with pytest.raises(MessagesStreamError) as info:
        read_all(
            reader,
            [start(), block(0, type="text", text=""), delta(0, type="text_delta", text="a"), err],
        )
    assert info.value.after_output
    with pytest.raises(MessagesStreamError):
        EventReader().feed(b"{not json")


def test_unknown_events_and_server_tool_blocks_are_skipped() -> None:
    out = read_all(
        EventReader(),
        [
            start(),
            ev(type="some_future_event", x=1),
            block(0, type="server_tool_use", id="srvtoolu_1", name="web_search", input={}),
            delta(0, type="input_json_delta", partial_json='{"q": 1}'),
            ev(type="content_block_stop", index=0),
            block(1, type="text", text=""),
            delta(1, type="citations_delta", citation={}),
            *end("end_turn", 1),
        ],
    )
    assert out == [ChoiceDelta(index=0, finish_reason="stop")]


def test_a_whole_message_body_reads_like_its_stream() -> None:
    message = {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "content": [
            {"type": "thinking", "thinking": "hm", "signature": "sig"},
            {"type": "text", "text": "Hi"},
            {"type": "tool_use", "id": "toolu_1", "name": "f", "input": {"a": 1}},
        ],
        "stop_reason": "tool_use",
        "stop_sequence": None,
        "usage": {"input_tokens": 3, "output_tokens": 4},
    }
    reader = EventReader()
    out = reader.feed(json.dumps(message).encode())
    assert out == [
        ChoiceDelta(index=0, reasoning_content="hm"),
        ChoiceDelta(index=0, reasoning_signature="sig"),
        ChoiceDelta(index=0, content="Hi"),
        ChoiceDelta(
            index=0,
            tool_calls=[
                {
                    "index": 0,
                    "id": "toolu_1",
                    "type": "function",
                    "function": {"name": "f", "arguments": '{"a":1}'},
                }
            ],
        ),
        ChoiceDelta(index=0, finish_reason="tool_calls"),
    ]
    assert reader.done and reader.usage().total_tokens == 7


def test_json_output_reads_the_forced_tool_as_content() -> None:
    out = read_all(
        EventReader(json_output=True),
        [
            start(),
            block(0, type="tool_use", id="toolu_j", name=JSON_TOOL, input={}),
            delta(0, type="input_json_delta", partial_json='{"a"'),
            delta(0, type="input_json_delta", partial_json=": 1}"),
            ev(type="content_block_stop", index=0),
            *end("tool_use", 2),
        ],
    )
    assert "".join(d.content or "" for d in out) == '{"a": 1}'
    assert out[-1].finish_reason == "stop" and not any(d.tool_calls for d in out)


# ---- the engine, against the fake upstream --------------------------------------------------


@pytest_asyncio.fixture(scope="module")
async def upstream() -> AsyncIterator[RunningServer]:
    async with RunningServer(ServerSettings(ttft_ms=2, itl_ms=0, tokens=6, api_key=KEY)) as s:
        yield s


@contextlib.asynccontextmanager
async def started(
    upstream: RunningServer, model: str = "claude-fake", **fields: Any
) -> AsyncIterator[AnthropicEngine]:
    s = OpenAISettings(
        base_url=upstream.base_url, served_model=model, api_key=KEY, max_connections=8
    )
    eng = AnthropicEngine(msgspec.structs.replace(s, **fields))
    await eng.start()
    try:
        yield eng
    finally:
        await eng.aclose()


@pytest_asyncio.fixture(scope="module")
async def engine(upstream: RunningServer) -> AsyncIterator[AnthropicEngine]:
    async with started(upstream) as eng:
        yield eng


def chat_body(**fields: Any) -> tuple[ChatRequest, bytes]:
    body = {"model": "served", "messages": [user("say hi now")], **fields}
    raw = msgspec.json.encode(body)
    return msgspec.json.decode(raw, type=ChatRequest), raw


async def collect(events: AsyncIterator[EngineEvent]) -> tuple[list[ChoiceDelta], Usage]:
    deltas: list[ChoiceDelta] = []
    usages: list[Usage] = []
    async for e in events:
        assert not usages, "Usage must be the last event"
        if isinstance(e, Usage):
            usages.append(e)
        else:
            assert isinstance(e, Output) and len(e.choices) == 1
            deltas.extend(e.choices)
    assert len(usages) == 1
    return deltas, usages[0]


def assert_exact(usage: Usage, upstream: RunningServer) -> None:
    u = upstream.app.stats.usages[-1]
    read, created = u["cache_read_input_tokens"], u["cache_creation_input_tokens"]
    assert usage.prompt_tokens == u["input_tokens"] + read + created
    assert usage.completion_tokens == u["output_tokens"]
    assert usage.prompt_tokens_details == (
        {"cached_tokens": read, "cache_creation_tokens": created}
        if created
        else {"cached_tokens": read}
    )


async def test_chat_streams_text_with_the_key_and_version_upstream(
    engine: AnthropicEngine, upstream: RunningServer
) -> None:
    req, raw = chat_body(
        stream=False,
        max_tokens=4,
        temperature=1.5,
        messages=[{"role": "system", "content": "brief"}, user("hi")],
    )
    deltas, usage = await collect(engine.chat(req, raw))
    assert "".join(d.content or "" for d in deltas) == "tok0 tok1 tok2 tok3"
    assert deltas[-1].finish_reason == "length"
    assert_exact(usage, upstream)
    stats = upstream.app.stats
    assert stats.keys[-1] == KEY and stats.versions[-1] == "2023-06-01"
    sent = stats.bodies[-1]
    assert sent["model"] == "claude-fake" and sent["stream"] is True
    assert sent["system"] == [{"type": "text", "text": "brief"}] and sent["temperature"] == 1.0
    assert not stats.rejected


async def test_a_stop_sequence_ends_the_answer(engine: AnthropicEngine) -> None:
    req, raw = chat_body(stop=["tok2"])
    deltas, _ = await collect(engine.chat(req, raw))
    assert "".join(d.content or "" for d in deltas) == "tok0 tok1 "
    assert deltas[-1] == ChoiceDelta(index=0, finish_reason="stop", stop_sequence="tok2")


async def test_tool_calls_stream_their_arguments(
    engine: AnthropicEngine, upstream: RunningServer
) -> None:
    req, raw = chat_body(tools=[WEATHER, TIME], tool_choice="required")
    deltas, usage = await collect(engine.chat(req, raw))
    calls: dict[int, dict[str, Any]] = {}
    pieces = 0
    for d in deltas:
        for tc in d.tool_calls or []:
            cur = calls.setdefault(tc["index"], {"id": tc.get("id"), "name": "", "args": ""})
            cur["name"] += tc.get("function", {}).get("name", "")
            cur["args"] += tc["function"]["arguments"]
            pieces += 1
    assert [c["name"] for c in calls.values()] == ["get_weather", "get_time"]  # parallel
    assert json.loads(calls[0]["args"]) == sample_input(WEATHER["function"]["parameters"])
    assert json.loads(calls[1]["args"]) == {}
    assert pieces > 4  # streamed in several pieces
    assert deltas[-1].finish_reason == "tool_calls"
    assert_exact(usage, upstream)
    # and the answer goes back upstream as a valid conversation
    call_msgs = [
        {"id": c["id"], "type": "function", "function": {"name": c["name"], "arguments": c["args"]}}
        for c in calls.values()
    ]
    req, raw = chat_body(
        tools=[WEATHER, TIME],
        parallel_tool_calls=False,
        messages=[
            user("weather and time?"),
            {"role": "assistant", "content": None, "tool_calls": call_msgs},
            {"role": "tool", "tool_call_id": call_msgs[0]["id"], "content": "sunny"},
            {
                "role": "tool",
                "tool_call_id": call_msgs[1]["id"],
                "content": "boom",
                "is_error": True,
            },
        ],
    )
    deltas, _ = await collect(engine.chat(req, raw))
    assert deltas[-1].finish_reason == "stop" and not upstream.app.stats.rejected
    sent = upstream.app.stats.bodies[-1]
    assert sent["tool_choice"] == {"type": "auto", "disable_parallel_tool_use": True}
    assert sent["messages"][2]["content"][1]["is_error"] is True


async def test_thinking_round_trips_with_its_signature(
    engine: AnthropicEngine, upstream: RunningServer
) -> None:
    thinking = {"type": "enabled", "budget_tokens": 1024}
    req, raw = chat_body(thinking=thinking)
    deltas, _ = await collect(engine.chat(req, raw))
    text = "".join(d.reasoning_content or "" for d in deltas)
    signature = next(d.reasoning_signature for d in deltas if d.reasoning_signature)
    assert signature == signature_of(text)
    blocks = [{"type": "thinking", "thinking": text, "signature": signature}]
    req, raw = chat_body(
        thinking=thinking,
        messages=[
            user("q"),
            {"role": "assistant", "content": "a", "thinking_blocks": blocks},
            user("and?"),
        ],
    )
    await collect(engine.chat(req, raw))
    assert not upstream.app.stats.rejected  # the fake checks the signature it issued


async def test_prompt_caching_usage_is_exact(
    engine: AnthropicEngine, upstream: RunningServer
) -> None:
    cc = {"type": "ephemeral"}
    system = {
        "role": "system",
        "content": [{"type": "text", "text": "a long shared prefix " * 5, "cache_control": cc}],
    }
    _, usage = await collect(engine.chat(*chat_body(messages=[system, user("one")])))
    assert_exact(usage, upstream)
    assert usage.prompt_tokens_details == {"cached_tokens": 0, "cache_creation_tokens": 20}
    _, usage = await collect(engine.chat(*chat_body(messages=[system, user("two")])))
    assert_exact(usage, upstream)
    assert usage.prompt_tokens_details == {"cached_tokens": 20}


async def test_json_response_format_is_the_content(engine: AnthropicEngine) -> None:
    schema = {"type": "object", "properties": {"answer": {"type": "string"}}}
    rf = {"type": "json_schema", "json_schema": {"name": "a", "schema": schema}}
    deltas, _ = await collect(engine.chat(*chat_body(response_format=rf)))
    assert json.loads("".join(d.content or "" for d in deltas)) == {"answer": "answer-value"}
    assert deltas[-1].finish_reason == "stop"


async def test_count_tokens_asks_the_upstream(
    engine: AnthropicEngine, upstream: RunningServer
) -> None:
    req, raw = chat_body(tools=[WEATHER], max_tokens=3)
    n = await engine.count_tokens(req, raw)
    assert n > 0 and upstream.app.stats.count_tokens >= 1
    assert set(upstream.app.stats.bodies[-1]) == {"model", "messages", "tools"}


async def test_chat_only(engine: AnthropicEngine) -> None:
    with pytest.raises(InvalidRequest, match="chat only"):
        async for _ in engine.complete(
            msgspec.json.decode(b'{"prompt": "x"}', type=CompletionRequest), b"{}"
        ):
            pass
    with pytest.raises(InvalidRequest, match="chat only"):
        await engine.embed(msgspec.json.decode(b'{"input": "x"}', type=EmbeddingRequest), b"{}")


@pytest.mark.parametrize(
    ("model", "status", "type_", "retry_after"),
    [
        ("error-429", 429, "rate_limit_error", 7.0),
        ("error-529", 503, "server_error", 2.0),
        ("overloaded-midstream", 503, "server_error", 2.0),
        ("error-401", 502, "server_error", None),
        ("error-500", 502, "server_error", None),
        ("error-400", 400, "invalid_request_error", None),
        ("error-midstream", 502, "server_error", None),
        ("truncated", 502, "server_error", None),
    ],
)
async def test_upstream_errors_map_to_fleet_errors(
    upstream: RunningServer, model: str, status: int, type_: str, retry_after: float | None
) -> None:
    async with started(upstream, model) as eng:
        with pytest.raises(FleetError) as info:
            await collect(eng.chat(*chat_body()))
    err = info.value
    assert (err.status, err.type, err.retry_after) == (status, type_, retry_after)
    assert KEY not in err.message and "api03" not in err.message
    if model == "error-400":
        assert "simulated bad request" in err.message  # scrubbed, not dropped


async def test_the_upstreams_own_400_passes_through(engine: AnthropicEngine) -> None:
    # Messages wants the conversation to start with a user turn; the fake says so
    req, raw = chat_body(messages=[{"role": "assistant", "content": "hi"}, user("x")])
    with pytest.raises(FleetError) as info:
        await collect(engine.chat(req, raw))
    assert info.value.status == 400 and "alternate" in info.value.message


async def test_a_non_streaming_upstream_body_is_read_whole(upstream: RunningServer) -> None:
    async with started(upstream, "json-body") as eng:
        deltas, usage = await collect(eng.chat(*chat_body()))
    assert "".join(d.content or "" for d in deltas).startswith("tok0 tok1")
    assert_exact(usage, upstream)


async def test_closing_the_stream_aborts_the_upstream_request() -> None:
    async with RunningServer(ServerSettings(itl_ms=50, tokens=100, api_key=KEY)) as slow:
        async with started(slow) as eng:
            gen = eng.chat(*chat_body())
            await anext(gen)
            await gen.aclose()
            for _ in range(200):
                if slow.app.stats.aborted:
                    break
                await asyncio.sleep(0.01)
        assert slow.app.stats.aborted == 1 and slow.app.stats.open_streams == 0


async def test_a_wrong_key_is_a_fixed_502(upstream: RunningServer) -> None:
    async with started(upstream, api_key="sk-ant-wrong-key-000000") as eng:
        with pytest.raises(FleetError) as info:
            await collect(eng.chat(*chat_body()))
    assert info.value.status == 502 and "credentials" in info.value.message
    assert "wrong" not in info.value.message


async def test_an_unreachable_upstream_is_a_fixed_502() -> None:
    eng = AnthropicEngine(
        OpenAISettings(
            base_url="http://127.0.0.1:1",
            served_model="m",
            api_key=KEY,
            wait_ready_s=0.2,
            max_connections=8,
        )
    )
    with pytest.raises(FleetError) as info:
        await eng.start()
    assert info.value.status == 502 and KEY not in info.value.message
    await eng.aclose()
    eng._client = None
    with pytest.raises(FleetError) as info:
        await collect(eng.chat(*chat_body()))
    assert info.value.status == 503


def test_the_engine_is_built_with_its_default_upstream() -> None:
    eng = build_engine(EngineSettings(kind="anthropic"), "claude-x")
    assert isinstance(eng, AnthropicEngine)
    assert eng.settings.base_url == "https://api.anthropic.com/v1"
    assert eng.card().engine == "anthropic" and "anthropic.com" not in eng.card().description
    s = EngineSettings(
        kind="anthropic",
        openai=OpenAISettings(base_url="http://up:9/v1/"),
        anthropic=AnthropicSettings(default_max_tokens=64),
    )
    eng = build_engine(s, "m")
    assert isinstance(eng, AnthropicEngine)
    assert eng.settings.base_url == "http://up:9/v1" and eng.anthropic.default_max_tokens == 64
    assert api_root("https://api.anthropic.com/") == "https://api.anthropic.com"
    openai = build_engine(EngineSettings(kind="openai"), "m")
    assert openai.settings.base_url == "http://127.0.0.1:8000/v1"  # type: ignore[attr-defined]


def test_flags_choose_the_engine_and_its_max_tokens() -> None:
    from llmfleet.flags import OPENAI_FLAGS, WORKER_FLAGS, build_parser, settings_from  # noqa: PLC0415
    from worker.settings import WorkerSettings  # noqa: PLC0415

    argv = [
        "worker",
        "--engine",
        "anthropic",
        "--anthropic-max-tokens",
        "512",
        "--upstream-api-key",
        KEY,
        "--upstream-model",
        "claude-sonnet-4-5",
    ]
    args = build_parser().parse_args(argv)
    s = settings_from(args, WorkerSettings("nats://x"), (*WORKER_FLAGS, *OPENAI_FLAGS))
    assert s.engine.kind == "anthropic" and s.engine.anthropic.default_max_tokens == 512
    assert s.engine.openai.api_key == KEY and s.engine.openai.base_url == ""


async def test_readiness_is_an_authenticated_models_request(upstream: RunningServer) -> None:
    # Messages has no unauthenticated health route: the probe sends the key (any answer
    # below 500 is ready; the fake's /v1/models wants the key)
    async with httpx.AsyncClient() as c:
        assert (await c.get(upstream.base_url + "/v1/models")).status_code == 401
    before = len(upstream.app.stats.keys)
    async with started(upstream, api_key="sk-ant-wrong-key-000000"):
        pass  # a wrong key does not stop the start: requests answer 502 then
    assert len(upstream.app.stats.keys) == before  # GETs are not recorded as requests
