"""common/apis/responses*.py (pure) and the front's pure parts: Responses request -> chat
body, chat deltas -> Responses events and object, checked against the official openai
SDK's own models and its stream accumulator."""

from __future__ import annotations

import json
from typing import Any

import msgspec
import pytest
from openai._models import construct_type_unchecked
from openai._types import omit
from openai.lib.streaming.responses._responses import ResponseStreamState
from openai.types.responses import Response, ResponseStreamEvent

from common import protocol as p
from common.apis.responses import ResponsesRequest, decode_request, normalize_input
from common.apis.responses_chat import items_to_messages, responses_to_chat
from common.apis.responses_reasoning import decode_reasoning, encode_reasoning
from common.apis.responses_stream import ResponseStream, response_shell
from common.errors import GatewayTimeout, InvalidRequest, RateLimited, ServiceUnavailable
from gateway.auth import ANONYMOUS
from gateway.front_responses import ResponsesFront, ResponsesRenderer, list_page
from gateway.settings import Limits

TOOL = {
    "type": "function",
    "name": "get_weather",
    "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    "strict": True,
}


def req(**fields: Any) -> ResponsesRequest:
    return decode_request(json.dumps({"model": "m", **fields}).encode())


def chat(**fields: Any) -> dict[str, Any]:
    r = req(**fields)
    return responses_to_chat(r, normalize_input(r.input, "seed"))


def refused(**fields: Any) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as info:
        chat(**fields)
    return info.value


# ---- the request ------------------------------------------------------------------------


def test_a_string_input_is_one_user_message() -> None:
    assert chat(input="hi") == {
        "messages": [{"role": "user", "content": "hi"}],
        "stream": False,
        "model": "m",
    }


def test_parameters_map_to_chat() -> None:
    body = chat(
        input="hi",
        instructions="Be brief.",
        max_output_tokens=7,
        temperature=0.5,
        top_p=0.9,
        user="u1",
        stream=True,
        tools=[TOOL],
        tool_choice={"type": "function", "name": "get_weather"},
        parallel_tool_calls=False,
        reasoning={"effort": "high", "summary": "auto"},
        text={"format": {"type": "json_schema", "name": "w", "schema": {"type": "object"}}},
        store=False,
        metadata={"k": "v"},
        include=["reasoning.encrypted_content", "message.output_text.logprobs"],
        truncation="auto",
        service_tier="auto",
    )
    assert body == {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "hi"},
        ],
        "stream": True,
        "model": "m",
        "max_completion_tokens": 7,
        "temperature": 0.5,
        "top_p": 0.9,
        "user": "u1",
        "tools": [
            {
                "type": "function",
                "function": {
                    "name": "get_weather",
                    "description": "Weather in a city",
                    "parameters": TOOL["parameters"],
                    "strict": True,
                },
            }
        ],
        "parallel_tool_calls": False,
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "w", "schema": {"type": "object"}},
        },
        "reasoning_effort": "high",
    }


@pytest.mark.parametrize(
    ("fmt", "want"),
    [
        ({"type": "text"}, None),
        ({"type": "json_object"}, {"type": "json_object"}),
        (
            {"type": "json_schema", "name": "x", "schema": {}, "strict": True},
            {"type": "json_schema", "json_schema": {"name": "x", "schema": {}, "strict": True}},
        ),
    ],
)
def test_text_format(fmt: dict[str, Any], want: dict[str, Any] | None) -> None:
    assert chat(input="hi", text={"format": fmt}).get("response_format") == want


@pytest.mark.parametrize("choice", ["auto", "none", "required"])
def test_tool_choice_strings(choice: str) -> None:
    assert chat(input="hi", tools=[TOOL], tool_choice=choice)["tool_choice"] == choice


@pytest.mark.parametrize(
    ("fields", "param", "says"),
    [
        ({"background": True}, "background", "Background"),
        ({"tools": [{"type": "web_search"}]}, "tools[0].type", "'web_search'"),
        ({"tools": [TOOL, {"type": "file_search"}]}, "tools[1].type", "'file_search'"),
        ({"tools": [{"type": "function"}]}, "tools[0].name", "name"),
        ({"tool_choice": {"type": "web_search"}}, "tool_choice", "web_search"),
        ({"tool_choice": "sometimes"}, "tool_choice", "sometimes"),
        ({"text": {"format": {"type": "yaml"}}}, "text.format.type", "yaml"),
        ({"text": {"format": {"type": "json_schema"}}}, "text.format.schema", "schema"),
        ({"temperature": 3}, "temperature", "temperature"),
        ({"max_output_tokens": 0}, "max_output_tokens", "max_output_tokens"),
        ({"metadata": {f"k{i}": "v" for i in range(17)}}, "metadata", "16"),
        ({"conversation": "conv_1"}, "conversation", "previous_response_id"),
        ({"input": [{"type": "item_reference", "id": "x"}]}, "input[0].type", "item_reference"),
        ({"input": [{"role": "robot", "content": "x"}]}, "input[0].role", "role"),
        ({"input": [{"type": "function_call", "name": "f"}]}, "input[0].call_id", "call_id"),
        (
            {"input": [{"role": "user", "content": [{"type": "input_image", "file_id": "f"}]}]},
            "input[0].content[0].file_id",
            "image_url",
        ),
        (
            {"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]},
            "input[0].content[0].type",
            "input_file",
        ),
    ],
)
def test_what_cannot_be_served_is_a_400_naming_the_param(
    fields: dict[str, Any], param: str, says: str
) -> None:
    err = refused(**{"input": "hi", **fields})
    assert err.status == 400
    assert err.param == param
    assert says in err.message


def test_items_are_normalized_with_ids() -> None:
    items = normalize_input(
        [
            {"role": "user", "content": "q"},
            {"role": "assistant", "content": "a", "id": "msg_given"},
            {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
            {"type": "function_call_output", "call_id": "c1", "output": "42"},
        ],
        "abc",
    )
    assert [i["id"] for i in items] == ["msg_abci0000", "msg_given", "fc_abci0002", "fco_abci0003"]
    assert items[0]["content"] == [{"type": "input_text", "text": "q"}]
    assert items[1]["content"] == [{"type": "output_text", "text": "a", "annotations": []}]
    assert all(i["status"] == "completed" for i in items)


def test_assistant_items_form_one_turn_and_outputs_become_tool_messages() -> None:
    blocks = [{"type": "thinking", "thinking": "hmm", "signature": "sig1"}]
    body = chat(
        instructions="sys",
        input=[
            {"role": "developer", "content": "dev rules"},
            {"role": "user", "content": [{"type": "input_text", "text": "look: "},
                                         {"type": "input_image", "image_url": "data:x",
                                          "detail": "low"}]},
            {"type": "reasoning", "id": "rs_1", "summary": [],
             "encrypted_content": encode_reasoning(blocks)},
            {"role": "assistant", "content": [{"type": "output_text", "text": "Let me check."}]},
            {"type": "function_call", "call_id": "c1", "name": "f", "arguments": '{"a":1}'},
            {"type": "function_call", "call_id": "c2", "name": "g", "arguments": "{}"},
            {"type": "function_call_output", "call_id": "c1", "output": "one"},
            {"type": "function_call_output", "call_id": "c2",
             "output": [{"type": "input_text", "text": "two"}]},
            {"role": "assistant", "content": [{"type": "refusal", "refusal": "No."}]},
        ],
    )  # fmt: skip
    assert body["messages"] == [
        {"role": "system", "content": "sys"},
        {"role": "system", "content": "dev rules"},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "look: "},
                {"type": "image_url", "image_url": {"url": "data:x", "detail": "low"}},
            ],
        },
        {
            "role": "assistant",
            "content": "Let me check.",
            "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"a":1}'}},
                {"id": "c2", "type": "function", "function": {"name": "g", "arguments": "{}"}},
            ],
            "reasoning_content": "hmm",
            "thinking_blocks": blocks,
        },
        {"role": "tool", "tool_call_id": "c1", "content": "one"},
        {"role": "tool", "tool_call_id": "c2", "content": "two"},
        {"role": "assistant", "content": "No."},
    ]


def test_a_call_without_text_has_no_content() -> None:
    msgs = items_to_messages(
        [{"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}"}]
    )
    assert msgs == [
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}
            ],
        }
    ]


def test_two_assistant_messages_stay_two() -> None:
    msgs = items_to_messages(
        normalize_input(
            [{"role": "assistant", "content": "a"}, {"role": "assistant", "content": "b"}], "s"
        )
    )
    assert [m["content"] for m in msgs] == ["a", "b"]


# ---- reasoning round trip -----------------------------------------------------------------


def test_reasoning_round_trip() -> None:
    blocks = [
        {"type": "thinking", "thinking": "a", "signature": "s1"},
        {"type": "redacted_thinking", "data": "opaque"},
        {"type": "thinking", "thinking": "b", "signature": ""},  # unsigned (not Anthropic's)
    ]
    enc = encode_reasoning(blocks)
    assert enc.startswith("llmf1.") and "=" not in enc
    assert decode_reasoning(enc) == blocks
    [msg] = items_to_messages(
        [
            {"type": "reasoning", "summary": [], "encrypted_content": enc},
            {"type": "message", "role": "assistant",
             "content": [{"type": "output_text", "text": "x"}]},
        ]
    )  # fmt: skip
    assert msg["reasoning_content"] == "ab"
    assert msg["thinking_blocks"] == blocks[:2]  # only what an upstream can check


@pytest.mark.parametrize(
    "bad",
    ["gAAAAABopenai-encrypted", "llmf1.!!!", "llmf1." + "e30", encode_reasoning([{"type": "x"}])],
)
def test_reasoning_that_does_not_decode_is_dropped(bad: str) -> None:
    assert decode_reasoning(bad) is None
    msgs = items_to_messages(
        [
            {"type": "reasoning", "summary": [{"type": "summary_text", "text": "s"}],
             "encrypted_content": bad},
            {"type": "message", "role": "assistant",
             "content": [{"type": "output_text", "text": "x"}]},
        ]
    )  # fmt: skip
    assert msgs == [{"role": "assistant", "content": "x"}]


def test_reasoning_content_without_encrypted_content_is_sent_unsigned() -> None:
    [msg] = items_to_messages(
        [
            {"type": "reasoning", "summary": [],
             "content": [{"type": "reasoning_text", "text": "because"}]},
            {"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}"},
        ]
    )  # fmt: skip
    assert msg["reasoning_content"] == "because"
    assert "thinking_blocks" not in msg


def test_reasoning_alone_is_dropped() -> None:
    enc = encode_reasoning([{"type": "thinking", "thinking": "t", "signature": "s"}])
    msgs = items_to_messages(
        [
            {"type": "reasoning", "summary": [], "encrypted_content": enc},
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "q"}]},
        ]
    )
    assert msgs == [{"role": "user", "content": "q"}]


def test_history_comes_before_the_input_and_instructions_are_not_inherited() -> None:
    r = req(input="second", instructions="now")
    history = [
        *normalize_input("first", "h"),
        {"id": "msg_x", "type": "message", "role": "assistant", "status": "completed",
         "content": [{"type": "output_text", "text": "answer", "annotations": []}]},
    ]  # fmt: skip
    body = responses_to_chat(r, normalize_input(r.input, "s"), history)
    assert body["messages"] == [
        {"role": "system", "content": "now"},
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": "answer"},
        {"role": "user", "content": "second"},
    ]


# ---- the reply ------------------------------------------------------------------------------


def d(**fields: Any) -> p.Delta:
    return p.Delta(seq=1, choices=[p.ChoiceDelta(0, **fields)])


def call(index: int, args: str, cid: str | None = None, name: str | None = None) -> p.Delta:
    frag: dict[str, Any] = {"index": index, "function": {"arguments": args}}
    if cid is not None:
        frag["id"], frag["type"], frag["function"]["name"] = cid, "function", name
    return d(tool_calls=[frag])


def events(raw: bytes) -> list[dict[str, Any]]:
    out = []
    for fr in raw.split(b"\n\n"):
        if not fr:
            continue
        head, data = fr.split(b"\n", 1)
        event = json.loads(data.removeprefix(b"data: "))
        assert head == b"event: " + event["type"].encode()
        out.append(event)
    return out


def run(
    deltas: list[p.Delta],
    usage: p.Usage | None = None,
    encrypted: bool = False,
    **fields: Any,
) -> tuple[ResponseStream, list[dict[str, Any]]]:
    r = req(input="hi", **fields)
    s = ResponseStream(response_shell(r, "m", True), "abc", 100, encrypted=encrypted)
    raw = s.start() + b"".join(s.delta(x) for x in deltas) + s.close(usage or p.Usage(3, 5, 8), 101)
    evs = events(raw)
    assert [e["sequence_number"] for e in evs] == list(range(len(evs)))
    return s, evs


def sdk_final(evs: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> Any:
    """What the openai SDK's `responses.stream` makes of the events."""
    state: ResponseStreamState[Any] = ResponseStreamState(
        input_tools=tools if tools is not None else omit, text_format=omit
    )
    for e in evs:
        state.handle_event(construct_type_unchecked(type_=ResponseStreamEvent, value=e))  # type: ignore[arg-type]
    return state._completed_response


def test_text_stream_events_and_object() -> None:
    _, evs = run([d(content="Hel"), d(content="lo"), d(finish_reason="stop")])
    assert [e["type"] for e in evs] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert evs[0]["response"]["status"] == "in_progress" and evs[0]["response"]["output"] == []
    assert evs[6]["text"] == "Hello"
    final = evs[-1]["response"]
    r = Response.model_validate(final)  # every field the SDK's model requires, typed right
    assert r.id == "resp_abc" and r.object == "response" and r.status == "completed"
    assert r.output_text == "Hello" and r.model == "m" and r.store is True
    assert r.output[0].id.startswith("msg_")
    assert r.usage is not None and (r.usage.input_tokens, r.usage.output_tokens) == (3, 5)
    assert r.completed_at == 101 and r.background is False
    assert sdk_final(evs).output_text == "Hello"


def test_reasoning_then_text_then_calls() -> None:
    _, evs = run(
        [
            d(reasoning_content="think "),
            d(reasoning_content="hard"),
            d(reasoning_signature="sig"),
            d(reasoning_content="more"),
            d(redacted_reasoning="opaque"),
            d(content="Checking."),
            call(0, '{"city"', "call_a", "get_weather"),
            call(1, "{", "call_b", "get_weather"),
            call(0, ': "Paris"}'),  # interleaved fragments of two calls
            call(1, "}"),
            d(finish_reason="tool_calls"),
        ],
        encrypted=True,
        tools=[TOOL],
    )
    types = [e["type"] for e in evs]
    assert types.count("response.reasoning_text.delta") == 3
    assert types.count("response.function_call_arguments.delta") == 4
    final = Response.model_validate(evs[-1]["response"])
    rs, msg, fa, fb = final.output
    assert rs.type == "reasoning" and [c.text for c in rs.content or []] == ["think hard", "more"]
    assert rs.encrypted_content is not None
    assert decode_reasoning(rs.encrypted_content) == [
        {"type": "thinking", "thinking": "think hard", "signature": "sig"},
        {"type": "thinking", "thinking": "more", "signature": ""},
        {"type": "redacted_thinking", "data": "opaque"},
    ]
    assert msg.type == "message" and msg.content[0].type == "output_text"
    assert (fa.type, fa.call_id, fa.name, fa.arguments) == (
        "function_call",
        "call_a",
        "get_weather",
        '{"city": "Paris"}',
    )
    assert fb.type == "function_call" and fb.arguments == "{}"
    done = [e for e in evs if e["type"] == "response.function_call_arguments.done"]
    assert [e["arguments"] for e in done] == ['{"city": "Paris"}', "{}"]
    sdk = sdk_final(evs, [TOOL])
    assert [o.type for o in sdk.output] == [
        "reasoning",
        "message",
        "function_call",
        "function_call",
    ]
    assert sdk.output[2].parsed_arguments == {"city": "Paris"}  # strict tool: parsed


def test_encrypted_content_only_when_included_but_always_stored() -> None:
    s, evs = run([d(reasoning_content="r"), d(reasoning_signature="s"), d(content="x")])
    assert "encrypted_content" not in evs[-1]["response"]["output"][0]
    assert "encrypted_content" not in s.response()["output"][0]
    stored = s.output(stored=True)[0]
    assert decode_reasoning(stored["encrypted_content"]) == [
        {"type": "thinking", "thinking": "r", "signature": "s"}
    ]
    # stored output, sent back as history, becomes the assistant turn's thinking blocks
    [msg] = items_to_messages(s.output(stored=True))
    assert msg["thinking_blocks"] == [{"type": "thinking", "thinking": "r", "signature": "s"}]


def test_refusal_is_a_part_of_its_own() -> None:
    _, evs = run([d(content="I"), d(refusal="can't")])
    types = [e["type"] for e in evs]
    assert "response.refusal.delta" in types and "response.refusal.done" in types
    final = Response.model_validate(evs[-1]["response"])
    assert [c.type for c in final.output[0].content] == ["output_text", "refusal"]


def test_cut_by_max_output_tokens_is_incomplete() -> None:
    _, evs = run([d(content="a b"), d(finish_reason="length")], max_output_tokens=2)
    last = evs[-1]
    assert last["type"] == "response.incomplete"
    r = Response.model_validate(last["response"])
    assert r.status == "incomplete" and r.incomplete_details is not None
    assert r.incomplete_details.reason == "max_output_tokens"
    assert r.output[0].status == "incomplete" and r.max_output_tokens == 2
    assert r.completed_at is None


def test_usage_details() -> None:
    usage = p.Usage(
        10,
        6,
        16,
        prompt_tokens_details={"cached_tokens": 4, "cache_creation_tokens": 2},
        completion_tokens_details={"reasoning_tokens": 3},
    )
    s, _ = run([d(content="x")], usage)
    assert s.response()["usage"] == {
        "input_tokens": 10,
        "input_tokens_details": {"cached_tokens": 4, "cache_write_tokens": 2},
        "output_tokens": 6,
        "output_tokens_details": {"reasoning_tokens": 3},
        "total_tokens": 16,
    }


@pytest.mark.parametrize(
    ("err", "code"),
    [
        (RateLimited("slow down"), "rate_limit_exceeded"),
        (ServiceUnavailable("gone"), "server_error"),
        (GatewayTimeout("late"), "server_error"),
    ],
)
def test_a_failure_is_response_failed(err: Any, code: str) -> None:
    r = req(input="hi")
    s = ResponseStream(response_shell(r, "m", True), "abc", 100)
    raw = s.start() + s.delta(d(content="part")) + s.fail(err)
    evs = events(raw)
    assert evs[-1]["type"] == "response.failed"
    failed = Response.model_validate(evs[-1]["response"])
    assert failed.status == "failed" and failed.error is not None
    assert (failed.error.code, failed.error.message) == (code, err.message)
    assert failed.error.type == err.type
    assert failed.output[0].status == "incomplete"


def test_a_failure_after_close_still_says_so_once() -> None:
    r = req(input="hi")
    s = ResponseStream(response_shell(r, "m", True), "abc", 100)
    s.start()
    s.delta(d(content="x"))
    assert events(s.close(p.Usage(1, 1, 2), 5))[-1]["type"] == "response.completed"
    [failed] = events(s.fail(ServiceUnavailable("audit")))
    assert failed["type"] == "response.failed" and failed["response"]["status"] == "failed"
    assert s.fail(ServiceUnavailable("again")) == b""


def test_close_is_idempotent_and_quiet_streams_build_no_bytes() -> None:
    r = req(input="hi")
    s = ResponseStream(response_shell(r, "m", True), "abc", 100, emit=False)
    assert s.start() == b"" and s.delta(d(content="x")) == b""
    assert s.close(p.Usage(1, 1, 2), 5) == b""
    assert s.close(p.Usage(9, 9, 18), 6) == b""
    assert s.response()["usage"]["total_tokens"] == 2
    assert s.response()["output"][0]["content"][0]["text"] == "x"


def test_the_response_echoes_the_request() -> None:
    r = req(
        input="hi",
        instructions="ins",
        tools=[TOOL],
        tool_choice="required",
        temperature=0.2,
        metadata={"a": "b"},
        previous_response_id="resp_prev",
        reasoning={"effort": "low"},
        text={"format": {"type": "json_object"}},
        user="u",
    )
    obj = ResponseStream(response_shell(r, "m", False), "abc", 100).response()
    resp = Response.model_validate(obj)
    assert resp.instructions == "ins" and resp.tool_choice == "required"
    assert resp.tools[0].type == "function" and resp.temperature == 0.2
    assert resp.metadata == {"a": "b"} and resp.previous_response_id == "resp_prev"
    assert resp.reasoning is not None and resp.reasoning.effort == "low"
    assert resp.text is not None and resp.text.format is not None
    assert resp.text.format.type == "json_object"
    assert resp.store is False and resp.user == "u" and resp.parallel_tool_calls is True
    assert resp.truncation == "disabled"


# ---- the front's pure parts ----------------------------------------------------------------


LIMITS = Limits()


async def parse(body: dict[str, Any], limits: Limits = LIMITS, default: str | None = None) -> Any:
    front = ResponsesFront(None)
    parsed = await front.parse(json.dumps(body).encode(), limits, default, ANONYMOUS)
    return front, parsed


async def test_front_parses_to_a_chat_request() -> None:
    front, parsed = await parse(
        {"input": "hi", "stream": True, "max_output_tokens": 5}, default="d"
    )
    assert (parsed.op, parsed.model, parsed.stream, parsed.n) == ("chat", "d", True, 1)
    assert parsed.max_completion == 5
    body = json.loads(parsed.body)
    assert body["model"] == "d" and body["messages"] == [{"role": "user", "content": "hi"}]
    assert front.items[0]["type"] == "message"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "m"}, "input"),  # nothing to answer
        ({"model": "m", "input": "hi", "max_output_tokens": 10**6}, "max_output_tokens"),
        ({"input": "hi"}, "model"),
        ({"model": "m", "input": "hi", "previous_response_id": "resp_x"}, "previous_response_id"),
    ],
)
async def test_front_errors_speak_responses(body: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        await parse(body)
    assert info.value.param == param
    if param == "previous_response_id":  # no store: like an id that never existed
        assert info.value.code == "previous_response_not_found"
        assert info.value.message == "Previous response with id 'resp_x' not found."
    if param == "input":
        assert "'input'" in info.value.message


async def test_front_limits_apply_to_the_whole_conversation() -> None:
    items = [{"role": "user", "content": str(i)} for i in range(5)]
    with pytest.raises(InvalidRequest) as info:
        await parse({"model": "m", "input": items}, Limits(max_messages=4))
    assert info.value.param == "input"


async def test_without_a_store_the_response_says_it_is_not_stored() -> None:
    front, parsed = await parse({"model": "m", "input": "hi"})
    renderer = front.renderer(parsed, "abc", 1)
    assert isinstance(renderer, ResponsesRenderer)
    renderer.collect(d(content="x"))
    obj = msgspec.json.decode(renderer.body(p.Usage(1, 1, 2)))
    assert obj["store"] is False and obj["output"][0]["content"][0]["text"] == "x"
    await front.completed(renderer, p.Usage(1, 1, 2))  # nothing to store: no error


def test_list_page() -> None:
    items = [{"id": f"i{n}"} for n in range(5)]

    def ids(**q: str) -> tuple[list[str], bool, str | None, str | None]:
        page = list_page(items, {k: [v] for k, v in q.items()})
        assert page["object"] == "list"
        return [i["id"] for i in page["data"]], page["has_more"], page["first_id"], page["last_id"]

    assert ids() == (["i4", "i3", "i2", "i1", "i0"], False, "i4", "i0")  # desc by default
    assert ids(order="asc", limit="2") == (["i0", "i1"], True, "i0", "i1")
    assert ids(order="asc", limit="2", after="i1") == (["i2", "i3"], True, "i2", "i3")
    assert ids(after="i1") == (["i0"], False, "i0", "i0")
    assert ids(after="i0") == ([], False, None, None)
    for bad in ({"limit": "0"}, {"limit": "101"}, {"limit": "x"}, {"order": "up"}, {"after": "no"}):
        with pytest.raises(InvalidRequest) as info:
            list_page(items, {k: [v] for k, v in bad.items()})
        assert info.value.param == next(iter(bad))
