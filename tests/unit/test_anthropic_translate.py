"""The inbound Anthropic Messages translation (common/apis/anthropic_request.py,
common/apis/anthropic_stream.py) and its gateway front (gateway/front_messages.py):
requests to chat bodies, chat deltas to events/bodies."""

from __future__ import annotations

import json
from typing import Any

import pytest

from common import protocol as p
from common.apis import anthropic_request as rq
from common.apis import anthropic_stream as st
from common.errors import InvalidRequest, ModelNotFound, ServiceUnavailable
from gateway.auth import ANONYMOUS
from gateway.front_messages import CountTokensFront, MessagesFront
from gateway.settings import Limits

HI = [{"role": "user", "content": "Hello"}]
EPHEMERAL = {"type": "ephemeral"}


def chat(**fields: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {"model": "m", "max_tokens": 16, "messages": HI, **fields}
    return rq.messages_to_chat(rq.decode_messages(json.dumps(doc).encode()))


def bad(doc: dict[str, Any] | bytes, *, count_only: bool = False) -> InvalidRequest:
    raw = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
    with pytest.raises(InvalidRequest) as e:
        rq.messages_to_chat(rq.decode_messages(raw), count_only=count_only)
    return e.value


# ---- requests ------------------------------------------------------------------------------


def test_minimal_request() -> None:
    assert chat() == {"messages": HI, "model": "m", "max_tokens": 16}


def test_scalars_map_to_chat_fields() -> None:
    body = chat(
        stop_sequences=["END", "STOP"],
        temperature=0.5,
        top_p=0.9,
        top_k=40,
        metadata={"user_id": "u-1"},
        stream=True,
        thinking={"type": "enabled", "budget_tokens": 2048},
        service_tier="auto",  # unknown fields are ignored
        container=None,
    )
    assert body["stop"] == ["END", "STOP"]
    assert (body["temperature"], body["top_p"], body["top_k"]) == (0.5, 0.9, 40)
    assert body["user"] == "u-1"
    assert body["stream"] is True
    assert body["thinking"] == {"type": "enabled", "budget_tokens": 2048}
    assert "service_tier" not in body and "container" not in body


def test_system_string_and_blocks() -> None:
    assert chat(system="Be brief.")["messages"][0] == {"role": "system", "content": "Be brief."}
    joined = chat(system=[{"type": "text", "text": "A"}, {"type": "text", "text": "B"}])
    assert joined["messages"][0] == {"role": "system", "content": "A\nB"}
    cached = chat(
        system=[
            {"type": "text", "text": "A"},
            {"type": "text", "text": "B", "cache_control": EPHEMERAL},
        ]
    )
    assert cached["messages"][0] == {
        "role": "system",
        "content": [
            {"type": "text", "text": "A"},
            {"type": "text", "text": "B", "cache_control": EPHEMERAL},
        ],
    }
    assert chat(system="")["messages"] == HI
    assert chat(system=[])["messages"] == HI


def test_user_blocks_text_image_document() -> None:
    content = [
        {"type": "text", "text": "Look:", "cache_control": EPHEMERAL},
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBO"}},
        {"type": "image", "source": {"type": "url", "url": "https://x.test/a.jpg"}},
        {"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": "Doc"}},
    ]
    (msg,) = chat(messages=[{"role": "user", "content": content}])["messages"]
    assert msg == {
        "role": "user",
        "content": [
            {"type": "text", "text": "Look:", "cache_control": EPHEMERAL},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBO"}},
            {"type": "image_url", "image_url": {"url": "https://x.test/a.jpg"}},
            {"type": "text", "text": "Doc"},
        ],
    }


def test_one_plain_text_block_is_a_string() -> None:
    (msg,) = chat(messages=[{"role": "user", "content": [{"type": "text", "text": "Hi"}]}])[
        "messages"
    ]
    assert msg == {"role": "user", "content": "Hi"}


def test_tool_results_become_tool_messages_ahead_of_the_turn() -> None:
    turn = [
        {"type": "text", "text": "Here you go"},
        {"type": "tool_result", "tool_use_id": "t1", "content": "42"},
        {
            "type": "tool_result",
            "tool_use_id": "t2",
            "is_error": True,
            "content": [
                {"type": "text", "text": "boom"},
                {"type": "image", "source": {"type": "url", "url": "https://x.test/e.png"}},
            ],
        },
        {"type": "tool_result", "tool_use_id": "t3"},
    ]
    msgs = chat(messages=[{"role": "user", "content": turn}])["messages"]
    assert msgs == [
        {"role": "tool", "tool_call_id": "t1", "content": "42"},
        {
            "role": "tool",
            "tool_call_id": "t2",
            "is_error": True,
            "content": [
                {"type": "text", "text": "boom"},
                {"type": "image_url", "image_url": {"url": "https://x.test/e.png"}},
            ],
        },
        {"role": "tool", "tool_call_id": "t3", "content": ""},
        {"role": "user", "content": "Here you go"},
    ]


def test_only_tool_results_make_no_user_message() -> None:
    turn = [
        {"type": "tool_result", "tool_use_id": "t1", "content": [{"type": "text", "text": "ok"}]}
    ]
    msgs = chat(messages=[{"role": "user", "content": turn}])["messages"]
    assert msgs == [{"role": "tool", "tool_call_id": "t1", "content": "ok"}]


def test_tool_result_cache_control_lands_on_its_last_part() -> None:
    turn = [
        {"type": "tool_result", "tool_use_id": "t1", "content": "42", "cache_control": EPHEMERAL}
    ]
    (msg,) = chat(messages=[{"role": "user", "content": turn}])["messages"]
    assert msg["content"] == [{"type": "text", "text": "42", "cache_control": EPHEMERAL}]


def test_assistant_blocks() -> None:
    turn = [
        {"type": "thinking", "thinking": "Let me", "signature": "sig1"},
        {"type": "redacted_thinking", "data": "opaque"},
        {"type": "thinking", "thinking": " think", "signature": "sig2"},
        {"type": "text", "text": "Calling "},
        {"type": "text", "text": "now."},
        {"type": "tool_use", "id": "toolu_1", "name": "get", "input": {"city": "Oslo"}},
        {"type": "tool_use", "id": "toolu_2", "name": "noop", "input": {}},
    ]
    (_, msg) = chat(messages=[*HI, {"role": "assistant", "content": turn}])["messages"]
    assert msg == {
        "role": "assistant",
        "content": "Calling now.",
        "tool_calls": [
            {
                "id": "toolu_1",
                "type": "function",
                "function": {"name": "get", "arguments": '{"city":"Oslo"}'},
            },
            {"id": "toolu_2", "type": "function", "function": {"name": "noop", "arguments": "{}"}},
        ],
        "reasoning_content": "Let me think",
        "thinking_blocks": [
            {"type": "thinking", "thinking": "Let me", "signature": "sig1"},
            {"type": "redacted_thinking", "data": "opaque"},
            {"type": "thinking", "thinking": " think", "signature": "sig2"},
        ],
    }


def test_assistant_tool_use_only_has_null_content() -> None:
    turn = [{"type": "tool_use", "id": "toolu_1", "name": "get", "input": {}}]
    (_, msg) = chat(messages=[*HI, {"role": "assistant", "content": turn}])["messages"]
    assert msg["content"] is None
    cached = [{"type": "text", "text": "x", "cache_control": EPHEMERAL}]
    (_, msg) = chat(messages=[*HI, {"role": "assistant", "content": cached}])["messages"]
    assert msg["content"] == cached


def test_tools_and_tool_choice() -> None:
    tools = [
        {
            "name": "get",
            "description": "Get it",
            "input_schema": {"type": "object", "properties": {"q": {"type": "string"}}},
            "cache_control": EPHEMERAL,
        },
        {"type": "custom", "name": "other", "input_schema": {"type": "object"}},
    ]
    body = chat(tools=tools, tool_choice={"type": "auto"})
    assert body["tools"] == [
        {
            "type": "function",
            "function": {
                "name": "get",
                "parameters": {"type": "object", "properties": {"q": {"type": "string"}}},
                "description": "Get it",
            },
            "cache_control": EPHEMERAL,
        },
        {"type": "function", "function": {"name": "other", "parameters": {"type": "object"}}},
    ]
    assert body["tool_choice"] == "auto"
    assert "parallel_tool_calls" not in body
    assert chat(tools=tools, tool_choice={"type": "any"})["tool_choice"] == "required"
    assert chat(tools=tools, tool_choice={"type": "none"})["tool_choice"] == "none"
    named = chat(
        tools=tools, tool_choice={"type": "tool", "name": "get", "disable_parallel_tool_use": True}
    )
    assert named["tool_choice"] == {"type": "function", "function": {"name": "get"}}
    assert named["parallel_tool_calls"] is False


def test_tool_choice_without_tools_is_dropped() -> None:
    body = chat(tool_choice={"type": "none"})
    assert "tool_choice" not in body and "tools" not in body
    assert "tool_choice" not in chat(
        tool_choice={"type": "auto", "disable_parallel_tool_use": True}
    )


def test_named_tool_choice_must_name_a_tool() -> None:
    doc = {"max_tokens": 5, "messages": HI, "tool_choice": {"type": "tool", "name": "ghost"}}
    assert bad(doc).param == "tool_choice.name"
    tools = [{"name": "real", "input_schema": {"type": "object"}}]
    err = bad({**doc, "tools": tools})
    assert err.param == "tool_choice.name" and "'ghost'" in err.message


def test_structured_output_becomes_response_format() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    want = {"type": "json_schema", "json_schema": {"name": "output", "schema": schema}}
    fmt = {"type": "json_schema", "schema": schema}
    assert chat(output_config={"format": fmt})["response_format"] == want
    assert chat(output_format=fmt)["response_format"] == want
    assert "response_format" not in chat(output_config={"effort": "high"})


def test_top_level_cache_control_marks_the_last_block() -> None:
    body = chat(cache_control=EPHEMERAL)
    assert body["messages"] == [
        {"role": "user", "content": [{"type": "text", "text": "Hello", "cache_control": EPHEMERAL}]}
    ]


def test_count_only_needs_no_max_tokens_and_drops_generation_fields() -> None:
    doc = {"model": "m", "messages": HI, "stream": True}
    body = rq.messages_to_chat(rq.decode_messages(json.dumps(doc).encode()), count_only=True)
    assert body == {"messages": HI, "model": "m"}


@pytest.mark.parametrize(
    ("doc", "field", "words"),
    [
        ({"model": "m", "messages": HI}, "max_tokens", "Field required"),
        ({"model": "m", "max_tokens": 0, "messages": HI}, "max_tokens", ">= 1"),
        ({"model": "m", "max_tokens": "many", "messages": HI}, "max_tokens", "got `str`"),
        ({"model": "m", "max_tokens": 5}, "messages", "Field required"),
        (
            {"max_tokens": 5, "messages": [{"role": "system", "content": "x"}]},
            "messages.0.role",
            "system",
        ),
        ({"max_tokens": 5, "messages": HI, "temperature": 1.5}, "temperature", "<= 1"),
        ({"max_tokens": 5, "messages": HI, "top_k": -1}, "top_k", ">= 0"),
        ({"max_tokens": 5, "messages": HI, "stop_sequences": "END"}, "stop_sequences", "array"),
        ({"max_tokens": 5, "messages": HI, "tool_choice": "auto"}, "tool_choice", "object"),
        (
            {"max_tokens": 5, "messages": HI, "tool_choice": {"type": "tool"}},
            "tool_choice.name",
            "Field required",
        ),
        (
            {"max_tokens": 5, "messages": [{"role": "user", "content": [{"type": "video"}]}]},
            "messages.0.content.0.type",
            "'video'",
        ),
        (
            {"max_tokens": 5, "messages": [{"role": "user", "content": [{"type": "text"}]}]},
            "messages.0.content.0.text",
            "Field required",
        ),
        (
            {
                "max_tokens": 5,
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {
                                "type": "document",
                                "source": {
                                    "type": "base64",
                                    "media_type": "application/pdf",
                                    "data": "JVBE",
                                },
                            }
                        ],
                    }
                ],
            },
            "messages.0.content.0.source.type",
            "'base64'",
        ),
        (
            {
                "max_tokens": 5,
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "image", "source": {"type": "file", "file_id": "f"}}],
                    }
                ],
            },
            "messages.0.content.0.source.type",
            "'file'",
        ),
        (
            {
                "max_tokens": 5,
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "image", "source": {"type": "base64", "data": "x"}}],
                    }
                ],
            },
            "messages.0.content.0.source",
            "media_type",
        ),
        (
            {
                "max_tokens": 5,
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "tool_use", "id": "t", "name": "f", "input": {}}],
                    }
                ],
            },
            "messages.0.content.0.type",
            "user messages",
        ),
        (
            {
                "max_tokens": 5,
                "messages": [
                    *HI,
                    {"role": "assistant", "content": [{"type": "tool_result", "tool_use_id": "t"}]},
                ],
            },
            "messages.1.content.0.type",
            "assistant messages",
        ),
        (
            {
                "max_tokens": 5,
                "messages": HI,
                "tools": [{"type": "web_search_20250305", "name": "web_search"}],
            },
            "tools.0.type",
            "web_search_20250305",
        ),
        (
            {"max_tokens": 5, "messages": HI, "tools": [{"name": "f"}]},
            "tools.0.input_schema",
            "Field required",
        ),
    ],
)
def test_bad_requests_name_the_field(doc: dict[str, Any], field: str, words: str) -> None:
    err = bad(doc)
    assert err.status == 400
    assert err.param == field
    assert err.message.startswith(field + ": ")
    assert words in err.message


def test_not_json_is_400() -> None:
    err = bad(b"{nope")
    assert "not valid JSON" in err.message
    err = bad(b"[1]")
    assert err.status == 400 and "object" in err.message


# ---- the fronts ------------------------------------------------------------------------------


async def test_messages_front_parses_through_chat_validation() -> None:
    front = MessagesFront()
    assert (front.route, front.charges) == ("messages", True)
    doc = {"max_tokens": 8, "messages": HI, "stream": True}
    parsed = await front.parse(json.dumps(doc).encode(), Limits(), "dflt", ANONYMOUS)
    assert (parsed.op, parsed.model, parsed.stream, parsed.n, parsed.max_completion) == (
        "chat",
        "dflt",
        True,
        1,
        8,
    )
    assert json.loads(parsed.body)["model"] == "dflt"


async def test_messages_front_applies_limits() -> None:
    front = MessagesFront()
    limits = Limits(max_tokens=100, max_stop=1, max_messages=2)
    # max_tokens is a ceiling: above --max-tokens it is lowered to it, not refused.
    parsed = await front.parse(
        json.dumps({"model": "m", "max_tokens": 101, "messages": HI}).encode(),
        limits,
        None,
        ANONYMOUS,
    )
    assert parsed.max_completion == 100 and json.loads(parsed.body)["max_tokens"] == 100
    doc = {"model": "m", "max_tokens": 5, "messages": HI, "stop_sequences": ["a", "b"]}
    with pytest.raises(InvalidRequest, match="stop_sequences") as e:
        await front.parse(json.dumps(doc).encode(), limits, None, ANONYMOUS)
    assert e.value.param == "stop_sequences"
    with pytest.raises(InvalidRequest, match="messages"):
        await front.parse(
            json.dumps({"model": "m", "max_tokens": 5, "messages": HI * 3}).encode(),
            limits,
            None,
            ANONYMOUS,
        )
    with pytest.raises(InvalidRequest, match="model"):
        await front.parse(
            json.dumps({"max_tokens": 5, "messages": HI}).encode(), limits, None, ANONYMOUS
        )


async def test_count_tokens_front() -> None:
    front = CountTokensFront()
    assert (front.route, front.charges) == ("count_tokens", False)
    doc = {"model": "m", "messages": HI, "system": "Sys"}
    parsed = await front.parse(json.dumps(doc).encode(), Limits(), None, ANONYMOUS)
    assert (parsed.op, parsed.stream, parsed.n, parsed.max_completion) == (
        "count_tokens",
        False,
        1,
        0,
    )
    assert json.loads(parsed.body) == {
        "messages": [{"role": "system", "content": "Sys"}, *HI],
        "model": "m",
    }
    r = front.renderer(parsed, "abc", 0)
    r.collect(p.Delta(seq=1, choices=[p.ChoiceDelta(0, "ignored")]))
    assert json.loads(r.body(p.Usage(prompt_tokens=17))) == {"input_tokens": 17}
    assert r.start(1) == b""


def test_error_envelopes() -> None:
    front = MessagesFront()
    status, body = front.envelope(InvalidRequest("max_tokens: Field required"))
    assert status == 400
    assert json.loads(body) == {
        "type": "error",
        "error": {"type": "invalid_request_error", "message": "max_tokens: Field required"},
    }
    assert front.envelope(ModelNotFound("nope"))[0] == 404
    assert (
        json.loads(front.envelope(ModelNotFound("nope"))[1])["error"]["type"] == "not_found_error"
    )
    status, body = CountTokensFront().envelope(ServiceUnavailable("busy"))
    assert status == 529 and json.loads(body)["error"]["type"] == "overloaded_error"


# ---- the reply -------------------------------------------------------------------------------


def events(raw: bytes) -> list[dict[str, Any]]:
    """Parse `event: X\\ndata: {...}\\n\\n` frames strictly; the event name matches `type`."""
    assert raw == b"" or raw.endswith(b"\n\n")
    out = []
    for frame in raw.split(b"\n\n")[:-1]:
        head, data = frame.split(b"\n")
        assert head.startswith(b"event: ") and data.startswith(b"data: ")
        doc = json.loads(data[len(b"data: ") :])
        assert doc["type"] == head[len(b"event: ") :].decode()
        out.append(doc)
    return out


def d(**fields: Any) -> p.ChoiceDelta:
    return p.ChoiceDelta(0, **fields)


def call(
    index: int, *, id: str | None = None, name: str | None = None, args: str | None = None
) -> dict[str, Any]:
    frag: dict[str, Any] = {"index": index}
    fn: dict[str, Any] = {}
    if id is not None:
        frag["id"], frag["type"] = id, "function"
    if name is not None:
        fn["name"] = name
    if args is not None:
        fn["arguments"] = args
    frag["function"] = fn
    return frag


def run(
    deltas: list[p.ChoiceDelta], usage: p.Usage | None = None
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The stream's events and the non-streaming body for the same deltas."""
    usage = usage or p.Usage(10, 5, 15)
    s = st.MessageStream("msg_r", "claude-x", 42, frames=True)
    raw = s.start() + b"".join(s.feed(x) for x in deltas) + s.finish(usage)
    b = st.MessageStream("msg_r", "claude-x", 42, frames=False)
    assert b.start() == b""
    assert all(b.feed(x) == b"" for x in deltas)
    assert b.finish(usage) == b""
    return events(raw), json.loads(st.message_body(b.message(usage)))


def shape(evs: list[dict[str, Any]]) -> list[str]:
    out = []
    for e in evs:
        if e["type"] == "content_block_start":
            out.append("start:" + e["content_block"]["type"])
        elif e["type"] == "content_block_delta":
            out.append(e["delta"]["type"])
        elif e["type"] == "content_block_stop":
            out.append("stop")
        else:
            out.append(e["type"])
    return out


def test_text_stream_and_body() -> None:
    evs, body = run([d(content="Hel"), d(content=""), d(content="lo"), d(finish_reason="stop")])
    assert shape(evs) == [
        "message_start",
        "ping",
        "start:text",
        "text_delta",
        "text_delta",
        "stop",
        "message_delta",
        "message_stop",
    ]
    assert evs[0]["message"] == {
        "id": "msg_r",
        "type": "message",
        "role": "assistant",
        "model": "claude-x",
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": {
            "input_tokens": 42,
            "output_tokens": 1,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 0,
        },
    }
    assert evs[2] == {
        "type": "content_block_start",
        "index": 0,
        "content_block": {"type": "text", "text": ""},
    }
    assert evs[3] == {
        "type": "content_block_delta",
        "index": 0,
        "delta": {"type": "text_delta", "text": "Hel"},
    }
    assert evs[5] == {"type": "content_block_stop", "index": 0}
    assert evs[6] == {
        "type": "message_delta",
        "delta": {"stop_reason": "end_turn", "stop_sequence": None},
        "usage": {
            "input_tokens": 10,
            "output_tokens": 5,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 0,
        },
    }
    assert body == {
        "id": "msg_r",
        "type": "message",
        "role": "assistant",
        "model": "claude-x",
        "content": [{"type": "text", "text": "Hello"}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": {
            "input_tokens": 10,
            "output_tokens": 5,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 0,
        },
    }


def test_input_estimate_is_never_zero() -> None:
    s = st.MessageStream("msg_r", "m", 0, frames=True)
    assert events(s.start())[0]["message"]["usage"]["input_tokens"] == 1
    assert st.estimate_tokens(b"") == 1
    assert st.estimate_tokens(b"x" * 400) == 100


def test_stop_reasons() -> None:
    assert run([d(content="a", finish_reason="length")])[1]["stop_reason"] == "max_tokens"
    evs, body = run([d(content="a", finish_reason="stop", stop_sequence="END")])
    assert (body["stop_reason"], body["stop_sequence"]) == ("stop_sequence", "END")
    assert evs[-2]["delta"] == {"stop_reason": "stop_sequence", "stop_sequence": "END"}
    assert run([d(content="a", finish_reason="content_filter")])[1]["stop_reason"] == "refusal"
    assert run([d(content="a")])[1]["stop_reason"] == "end_turn"  # no finish reason at all


def test_usage_with_cache_tokens() -> None:
    usage = p.Usage(
        100, 7, 107, prompt_tokens_details={"cached_tokens": 60, "cache_creation_tokens": 30}
    )
    evs, body = run([d(content="x", finish_reason="stop")], usage)
    want = {
        "input_tokens": 10,
        "output_tokens": 7,
        "cache_creation_input_tokens": 30,
        "cache_read_input_tokens": 60,
    }
    assert evs[-2]["usage"] == want
    assert body["usage"] == want


def test_tool_call_in_fragments_streams_every_piece() -> None:
    deltas = [
        d(tool_calls=[call(0, id="call_1", name="get_weather", args="")]),
        d(tool_calls=[call(0, args='{"ci')]),
        d(tool_calls=[call(0, args='ty": "Os')]),
        d(tool_calls=[call(0, args='lo"}')]),
        d(finish_reason="tool_calls"),
    ]
    evs, body = run(deltas)
    assert shape(evs)[2:] == [
        "start:tool_use",
        "input_json_delta",
        "input_json_delta",
        "input_json_delta",
        "stop",
        "message_delta",
        "message_stop",
    ]
    assert evs[2]["content_block"] == {
        "type": "tool_use",
        "id": "call_1",
        "name": "get_weather",
        "input": {},
    }
    pieces = [e["delta"]["partial_json"] for e in evs if e["type"] == "content_block_delta"]
    assert "".join(pieces) == '{"city": "Oslo"}'
    assert body["content"] == [
        {"type": "tool_use", "id": "call_1", "name": "get_weather", "input": {"city": "Oslo"}}
    ]
    assert body["stop_reason"] == "tool_use"


def test_whole_tool_call_in_one_delta_and_missing_id() -> None:
    whole = {
        "index": 0,
        "type": "function",
        "function": {"name": "f", "arguments": '{"a": [1, 2]}'},
    }
    evs, body = run([d(tool_calls=[whole], finish_reason="tool_calls")])
    tool_id = evs[2]["content_block"]["id"]
    assert tool_id.startswith("toolu_") and len(tool_id) > len("toolu_")
    assert evs[3]["delta"] == {"type": "input_json_delta", "partial_json": '{"a": [1, 2]}'}
    (block,) = body["content"]
    assert block["id"].startswith("toolu_") and block["input"] == {"a": [1, 2]}


def test_text_then_tools_is_tool_use_with_sequential_blocks() -> None:
    deltas = [
        d(content="Checking."),
        d(
            tool_calls=[
                call(0, id="c0", name="a", args='{"x": 1}'),
                call(1, id="c1", name="b", args="{"),
            ]
        ),
        d(tool_calls=[call(1, args="}")]),
        d(finish_reason="stop"),  # an engine that says "stop" after calls: still tool_use
    ]
    evs, body = run(deltas)
    assert shape(evs)[2:-2] == [
        "start:text",
        "text_delta",
        "stop",
        "start:tool_use",
        "input_json_delta",
        "stop",
        "start:tool_use",
        "input_json_delta",
        "input_json_delta",
        "stop",
    ]
    assert [e["index"] for e in evs if e["type"] == "content_block_start"] == [0, 1, 2]
    assert body["content"] == [
        {"type": "text", "text": "Checking."},
        {"type": "tool_use", "id": "c0", "name": "a", "input": {"x": 1}},
        {"type": "tool_use", "id": "c1", "name": "b", "input": {}},
    ]
    assert body["stop_reason"] == "tool_use"
    assert evs[-2]["delta"]["stop_reason"] == "tool_use"


def test_calls_without_index_are_told_apart_by_id() -> None:
    deltas = [
        d(tool_calls=[{"id": "a", "function": {"name": "f", "arguments": "{}"}}]),
        d(tool_calls=[{"id": "b", "function": {"name": "g", "arguments": '{"k"'}}]),
        d(tool_calls=[{"function": {"arguments": ": 2}"}}]),
    ]
    _, body = run(deltas)
    assert [(b["id"], b["name"], b["input"]) for b in body["content"]] == [
        ("a", "f", {}),
        ("b", "g", {"k": 2}),
    ]


def test_interleaved_call_piece_is_not_lost() -> None:
    deltas = [
        d(tool_calls=[call(0, id="c0", name="a", args='{"x": ')]),
        d(tool_calls=[call(1, id="c1", name="b", args="{}")]),
        d(tool_calls=[call(0, args="1}")]),  # back to the closed call 0
    ]
    evs, body = run(deltas)
    late = [e for e in evs if e["type"] == "content_block_delta"][-1]
    assert late == {
        "type": "content_block_delta",
        "index": 0,
        "delta": {"type": "input_json_delta", "partial_json": "1}"},
    }
    assert body["content"][0]["input"] == {"x": 1}


def test_tool_arguments_that_are_not_an_object_are_kept_raw() -> None:
    assert st.tool_input("") == {}
    assert st.tool_input("  ") == {}
    assert st.tool_input('{"a": 1}') == {"a": 1}
    assert st.tool_input('{"a": ') == {"_raw": '{"a": '}
    assert st.tool_input("[1]") == {"_raw": "[1]"}
    _, body = run([d(tool_calls=[call(0, id="c", name="f", args="not json")])])
    assert body["content"][0]["input"] == {"_raw": "not json"}


def test_object_arguments_from_an_engine_are_encoded() -> None:
    frag = {"index": 0, "id": "c", "function": {"name": "f", "arguments": {"a": 1}}}
    evs, body = run([d(tool_calls=[frag])])
    assert evs[3]["delta"]["partial_json"] == '{"a":1}'
    assert body["content"][0]["input"] == {"a": 1}


def test_thinking_signature_and_redacted_blocks() -> None:
    deltas = [
        d(reasoning_content="Hmm, "),
        d(reasoning_content="let me see."),
        d(reasoning_signature="SIG"),
        d(redacted_reasoning="OPAQUE"),
        d(reasoning_content="More."),
        d(content="Answer", finish_reason="stop"),
    ]
    evs, body = run(deltas)
    assert shape(evs)[2:-2] == [
        "start:thinking",
        "thinking_delta",
        "thinking_delta",
        "signature_delta",
        "stop",
        "start:redacted_thinking",
        "stop",
        "start:thinking",
        "thinking_delta",
        "stop",
        "start:text",
        "text_delta",
        "stop",
    ]
    assert evs[2]["content_block"] == {"type": "thinking", "thinking": "", "signature": ""}
    assert evs[5]["delta"] == {"type": "signature_delta", "signature": "SIG"}
    assert evs[7]["content_block"] == {"type": "redacted_thinking", "data": "OPAQUE"}
    assert body["content"] == [
        {"type": "thinking", "thinking": "Hmm, let me see.", "signature": "SIG"},
        {"type": "redacted_thinking", "data": "OPAQUE"},
        {"type": "thinking", "thinking": "More.", "signature": ""},
        {"type": "text", "text": "Answer"},
    ]
    assert body["stop_reason"] == "end_turn"


def test_signature_alone_makes_an_empty_thinking_block() -> None:
    evs, body = run([d(content="x"), d(reasoning_signature="S")])
    assert shape(evs)[2:-2] == [
        "start:text",
        "text_delta",
        "stop",
        "start:thinking",
        "signature_delta",
        "stop",
    ]
    assert body["content"][1] == {"type": "thinking", "thinking": "", "signature": "S"}


def test_refusal_is_text_and_other_choices_are_ignored() -> None:
    _, body = run([d(refusal="I can't."), p.ChoiceDelta(1, content="other choice")])
    assert body["content"] == [{"type": "text", "text": "I can't."}]


def test_empty_answer() -> None:
    evs, body = run([d(finish_reason="stop")])
    assert shape(evs) == ["message_start", "ping", "message_delta", "message_stop"]
    assert body["content"] == []


def test_renderer_streams_and_fails_with_an_error_event() -> None:
    parsed_doc = {"model": "claude-x", "max_tokens": 5, "messages": HI, "stream": True}
    from gateway.front_messages import MessagesRenderer  # noqa: PLC0415
    from gateway.validate import parse  # noqa: PLC0415

    parsed = parse(
        "chat",
        json.dumps(
            rq.messages_to_chat(rq.decode_messages(json.dumps(parsed_doc).encode()))
        ).encode(),
        Limits(),
    )
    r = MessagesFront().renderer(parsed, "rid1", 0)
    assert isinstance(r, MessagesRenderer)
    start = events(r.start(1))
    assert start[0]["message"]["id"] == "msg_rid1"
    assert start[0]["message"]["model"] == "claude-x"
    assert start[0]["message"]["usage"]["input_tokens"] >= 1
    out = events(r.delta(p.Delta(seq=1, choices=[d(content="Hi")])))
    assert shape(out) == ["start:text", "text_delta"]
    err = events(r.fail(ServiceUnavailable("no capacity")))
    assert err == [
        {"type": "error", "error": {"type": "overloaded_error", "message": "no capacity"}}
    ]


def test_renderer_body_when_not_streaming() -> None:
    from gateway.validate import parse  # noqa: PLC0415

    doc = {"model": "claude-x", "max_tokens": 5, "messages": HI}
    parsed = parse(
        "chat",
        json.dumps(rq.messages_to_chat(rq.decode_messages(json.dumps(doc).encode()))).encode(),
        Limits(),
    )
    r = MessagesFront().renderer(parsed, "rid2", 0)
    r.collect(
        p.Delta(
            seq=1,
            choices=[d(content="Hi "), d(tool_calls=[call(0, id="t", name="f", args='{"q": 1}')])],
        )
    )
    r.collect(p.Delta(seq=2, choices=[d(finish_reason="tool_calls")]))
    body = json.loads(r.body(p.Usage(3, 4, 7)))
    assert body["id"] == "msg_rid2"
    assert body["content"] == [
        {"type": "text", "text": "Hi "},
        {"type": "tool_use", "id": "t", "name": "f", "input": {"q": 1}},
    ]
    assert body["stop_reason"] == "tool_use"
    assert body["usage"]["output_tokens"] == 4


async def test_lowered_max_tokens_lowers_the_thinking_budget() -> None:
    front = MessagesFront()
    for budget, most, want in (
        (63999, 5000, {"type": "enabled", "budget_tokens": 4999}),
        (2000, 1000, None),
        (500, 5000, None),
    ):
        doc = {
            "model": "m",
            "max_tokens": 64000,
            "messages": HI,
            "thinking": {"type": "enabled", "budget_tokens": budget},
        }
        parsed = await front.parse(
            json.dumps(doc).encode(), Limits(max_tokens=most), None, ANONYMOUS
        )
        body = json.loads(parsed.body)
        if budget < most:
            assert body["thinking"]["budget_tokens"] == budget
        else:
            assert body.get("thinking") == want
