from __future__ import annotations

import json

from common import protocol as p
from common.errors import ErrorBody
from gateway.render import DONE_FRAME, Assembler, StreamRenderer
from tests.sse import sse_events


def test_chat_stream_framing_with_usage() -> None:
    r = StreamRenderer(op="chat", rid="chatcmpl-1", created=5, model="m", include_usage=True)
    start = sse_events(strict=True, raw=r.start(1))
    assert start == [
        {
            "id": "chatcmpl-1",
            "object": "chat.completion.chunk",
            "created": 5,
            "model": "m",
            "system_fingerprint": None,
            "choices": [
                {
                    "index": 0,
                    "delta": {"role": "assistant", "content": "", "refusal": None},
                    "logprobs": None,
                    "finish_reason": None,
                }
            ],
            "usage": None,
        }
    ]
    body = sse_events(
        strict=True,
        raw=r.delta(p.Delta(seq=1, choices=[p.ChoiceDelta(0, "Hi", finish_reason="stop")])),
    )
    assert [c["choices"][0]["delta"] for c in body] == [{"content": "Hi"}, {}]  # type: ignore[index]
    assert [c["choices"][0]["finish_reason"] for c in body] == [None, "stop"]  # type: ignore[index]
    end = sse_events(strict=True, raw=r.finish(p.Usage(1, 2, 3)))
    assert end[-1] == "[DONE]"
    assert end[0]["choices"] == []  # type: ignore[index]
    assert end[0]["usage"] == {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}  # type: ignore[index]


def test_stream_without_usage_has_no_usage_key_and_ends_with_done() -> None:
    r = StreamRenderer(op="completion", rid="cmpl-1", created=5, model="m", include_usage=False)
    assert r.start(2) == b""
    (chunk,) = sse_events(strict=True, raw=r.delta(p.Delta(seq=1, choices=[p.ChoiceDelta(1, "x")])))
    assert "usage" not in chunk  # type: ignore[operator]
    assert chunk["object"] == "text_completion"  # type: ignore[index]
    assert chunk["choices"] == [  # type: ignore[index]
        {"index": 1, "text": "x", "logprobs": None, "finish_reason": None}
    ]
    assert r.finish(p.Usage()) == DONE_FRAME


def test_error_frame_then_done() -> None:
    r = StreamRenderer(op="chat", rid="x", created=1, model="m", include_usage=False)
    frames = sse_events(
        strict=True, raw=r.fail(ErrorBody(message="boom", type="server_error", code="c"))
    )
    assert frames == [
        {"error": {"message": "boom", "type": "server_error", "param": None, "code": "c"}},
        "[DONE]",
    ]


def test_assembler_chat_with_tool_calls() -> None:
    a = Assembler(1)
    a.add(p.Delta(seq=1, choices=[p.ChoiceDelta(0, tool_calls=[
        {"index": 0, "id": "call_1", "type": "function",
         "function": {"name": "get", "arguments": '{"a"'}}])]))  # fmt: skip
    a.add(p.Delta(seq=2, choices=[p.ChoiceDelta(0, tool_calls=[
        {"index": 0, "function": {"arguments": ": 1}"}}])]))  # fmt: skip
    a.add(p.Delta(seq=3, choices=[p.ChoiceDelta(0, finish_reason="tool_calls")]))
    body = json.loads(a.chat_body("id", 1, "m", p.Usage(1, 1, 2)))
    msg = body["choices"][0]["message"]
    assert msg["content"] is None
    assert msg["tool_calls"] == [
        {"id": "call_1", "type": "function", "function": {"name": "get", "arguments": '{"a": 1}'}}
    ]
    assert body["choices"][0]["finish_reason"] == "tool_calls"


def test_assembler_text_and_embeddings() -> None:
    a = Assembler(2)
    a.add(p.Delta(seq=1, choices=[p.ChoiceDelta(0, "a"), p.ChoiceDelta(1, "b")]))
    a.add(p.Delta(seq=2, choices=[p.ChoiceDelta(0, "c", finish_reason="length")]))
    body = json.loads(a.completion_body("cmpl", 1, "m", p.Usage(1, 3, 4)))
    assert [c["text"] for c in body["choices"]] == ["ac", "b"]
    assert [c["finish_reason"] for c in body["choices"]] == ["length", "stop"]
    e = Assembler(1)
    e.add_embedding(p.Embedding(seq=2, index=1, embedding=[1.0]))
    e.add_embedding(p.Embedding(seq=1, index=0, embedding="AAAA"))
    emb = json.loads(e.embedding_body("m", p.Usage(3, 0, 3)))
    assert [d["index"] for d in emb["data"]] == [0, 1]
    assert emb["usage"] == {"prompt_tokens": 3, "total_tokens": 3}


def test_thinking_blocks_carry_signatures_for_chat_clients() -> None:
    a = Assembler(1)
    a.add(p.Delta(seq=1, choices=[p.ChoiceDelta(0, reasoning_content="Let me ")]))
    a.add(p.Delta(seq=2, choices=[p.ChoiceDelta(0, reasoning_content="think.")]))
    a.add(p.Delta(seq=3, choices=[p.ChoiceDelta(0, reasoning_signature="sig1")]))
    a.add(p.Delta(seq=4, choices=[p.ChoiceDelta(0, redacted_reasoning="opaque")]))
    a.add(p.Delta(seq=5, choices=[p.ChoiceDelta(0, content="Hi", finish_reason="stop")]))
    msg = json.loads(a.chat_body("id", 1, "m", p.Usage()))["choices"][0]["message"]
    assert msg["reasoning_content"] == "Let me think."
    assert msg["thinking_blocks"] == [
        {"type": "thinking", "thinking": "Let me think.", "signature": "sig1"},
        {"type": "redacted_thinking", "data": "opaque"},
    ]
    s = StreamRenderer(op="chat", rid="x", created=1, model="m", include_usage=False)
    frame = s.delta(p.Delta(seq=3, choices=[p.ChoiceDelta(0, reasoning_signature="sig1")]))
    chunk = json.loads(frame[len(b"data: ") :])
    assert chunk["choices"][0]["delta"]["thinking_blocks"] == [
        {"type": "thinking", "thinking": "", "signature": "sig1"}
    ]
