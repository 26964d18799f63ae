"""Chat deltas -> Anthropic Messages events and body: the reply of `POST /v1/messages`.

`MessageStream`: one state machine for both shapes. Streaming, it frames `message_start`
(input_tokens an estimate >= 1, `estimate_tokens`; output_tokens 1: the exact counts come in
`message_delta`), `ping`, the content blocks one after another (a block closes when another
kind, or another tool call, starts), `message_delta` (stop reason, exact usage),
`message_stop`. Not streaming, the same blocks make the message body (`message_body`).
Choices other than 0 are ignored (Messages has one). Pure: no I/O. Decisions where chat and
Messages do not line up:

    tool call id missing          "toolu_" + random hex
    tool arguments, body          parsed as JSON; empty -> {}; text that is not a JSON
                                  object is kept, never dropped: {"_raw": "<the text>"}
    tool arguments, stream        every piece is an `input_json_delta`, as it came; a piece
                                  for a call whose block has closed (an engine interleaving
                                  calls) still goes out, at that block's index
    a name piece after the first  added to the body's name (the stream's start is out)
    refusal text                  text
    reasoning_signature           a signature_delta, then the thinking block closes
    redacted_reasoning            a whole redacted_thinking block
"""

from __future__ import annotations

import secrets
from typing import Any

import msgspec

from common.apis.anthropic import AnthropicUsage, stop_reason, to_anthropic_usage
from common.protocol import ChoiceDelta, Usage

_enc = msgspec.json.Encoder()


def estimate_tokens(body: bytes) -> int:
    """A rough prompt size for `message_start` (about 4 bytes a token), never 0: the
    exact count comes in `message_delta` (clients such as Claude Code break on zeros)."""
    return max(1, len(body) // 4)


class TextOut(msgspec.Struct, tag="text", tag_field="type"):
    text: str


class ThinkingOut(msgspec.Struct, tag="thinking", tag_field="type"):
    thinking: str
    signature: str


class RedactedThinkingOut(msgspec.Struct, tag="redacted_thinking", tag_field="type"):
    data: str


class ToolUseOut(msgspec.Struct, tag="tool_use", tag_field="type"):
    id: str
    name: str
    input: Any


OutBlock = TextOut | ThinkingOut | RedactedThinkingOut | ToolUseOut


class Message(msgspec.Struct, kw_only=True):
    """The Messages response body (and, empty, `message_start`'s message)."""

    id: str
    type: str = "message"
    role: str = "assistant"
    model: str
    content: list[OutBlock]
    stop_reason: str | None = None
    stop_sequence: str | None = None
    usage: AnthropicUsage


class TextDelta(msgspec.Struct, tag="text_delta", tag_field="type"):
    text: str


class ThinkingDelta(msgspec.Struct, tag="thinking_delta", tag_field="type"):
    thinking: str


class SignatureDelta(msgspec.Struct, tag="signature_delta", tag_field="type"):
    signature: str


class InputJsonDelta(msgspec.Struct, tag="input_json_delta", tag_field="type"):
    partial_json: str


class MessageStart(msgspec.Struct, tag="message_start", tag_field="type"):
    message: Message


class Ping(msgspec.Struct, tag="ping", tag_field="type"):
    pass


class BlockStart(msgspec.Struct, tag="content_block_start", tag_field="type"):
    index: int
    content_block: OutBlock


class BlockDelta(msgspec.Struct, tag="content_block_delta", tag_field="type"):
    index: int
    delta: TextDelta | ThinkingDelta | SignatureDelta | InputJsonDelta


class BlockStop(msgspec.Struct, tag="content_block_stop", tag_field="type"):
    index: int


class StopDelta(msgspec.Struct):
    stop_reason: str
    stop_sequence: str | None


class MessageDelta(msgspec.Struct, tag="message_delta", tag_field="type"):
    delta: StopDelta
    usage: AnthropicUsage


class MessageStop(msgspec.Struct, tag="message_stop", tag_field="type"):
    pass


Event = MessageStart | Ping | BlockStart | BlockDelta | BlockStop | MessageDelta | MessageStop


def sse(event: Event) -> bytes:
    """One frame: `event: <type>\\ndata: <json>\\n\\n`."""
    kind = type(event).__struct_config__.tag
    return b"event: " + str(kind).encode() + b"\ndata: " + _enc.encode(event) + b"\n\n"


class _Block:
    """A content block being built: its pieces until the body is made."""

    __slots__ = ("call", "data", "id", "index", "kind", "name", "pieces", "signature")

    def __init__(self, kind: str, index: int, *, call: int | None = None) -> None:
        self.kind = kind  # text | thinking | redacted_thinking | tool_use
        self.index = index
        self.pieces: list[str] = []  # text, thinking, or argument JSON
        self.signature = ""
        self.data = ""
        self.id = ""
        self.name = ""
        self.call = call  # the chat tool call's index (tool_use)

    def out(self) -> OutBlock:
        text = "".join(self.pieces)
        if self.kind == "text":
            return TextOut(text)
        if self.kind == "thinking":
            return ThinkingOut(text, self.signature)
        if self.kind == "redacted_thinking":
            return RedactedThinkingOut(self.data)
        return ToolUseOut(self.id, self.name, tool_input(text))


def tool_input(arguments: str) -> Any:
    """A tool call's `input`: its arguments parsed; none -> {}; anything that is not a JSON
    object -> {"_raw": arguments} (kept, so the client sees what the model said)."""
    if not arguments.strip():
        return {}
    try:
        value = msgspec.json.decode(arguments)
    except msgspec.DecodeError:
        return {"_raw": arguments}
    return value if isinstance(value, dict) else {"_raw": arguments}


def _str(v: object) -> str:
    return v if isinstance(v, str) else ""


def _new_tool_id() -> str:
    return "toolu_" + secrets.token_hex(12)


class MessageStream:
    """One Messages answer built from chat deltas (choice 0).

    `frames`: streaming (each call returns the SSE frames it produced); otherwise the calls
    return b"" and `message()` is the body. Owned by one response: not shared, no I/O.
    """

    def __init__(self, msg_id: str, model: str, input_estimate: int, *, frames: bool) -> None:
        self.msg_id = msg_id
        self.model = model
        self.input_estimate = max(1, input_estimate)
        self.frames = frames
        self.blocks: list[_Block] = []
        self.open: _Block | None = None
        self.calls: dict[int, _Block] = {}  # chat tool call index -> its block
        self.finish_reason: str | None = None
        self.stop_sequence: str | None = None
        self._out: list[bytes] = []

    # ---- events ------------------------------------------------------------------------

    def _emit(self, event: Event) -> None:
        if self.frames:
            self._out.append(sse(event))

    def _flush(self) -> bytes:
        out = b"".join(self._out)
        self._out.clear()
        return out

    def _open(self, kind: str, start: OutBlock, *, call: int | None = None) -> _Block:
        self._close()
        block = _Block(kind, len(self.blocks), call=call)
        self.blocks.append(block)
        self.open = block
        self._emit(BlockStart(block.index, start))
        return block

    def _close(self) -> None:
        if self.open is not None:
            self._emit(BlockStop(self.open.index))
            self.open = None

    def _current(self, kind: str) -> _Block:
        if self.open is not None and self.open.kind == kind:
            return self.open
        start: OutBlock = TextOut("") if kind == "text" else ThinkingOut("", "")
        return self._open(kind, start)

    # ---- the answer ----------------------------------------------------------------------

    def start(self) -> bytes:
        """`message_start` (an estimated input, output 1) and `ping`."""
        usage = AnthropicUsage(input_tokens=self.input_estimate, output_tokens=1)
        self._emit(MessageStart(Message(id=self.msg_id, model=self.model, content=[], usage=usage)))
        self._emit(Ping())
        return self._flush()

    def feed(self, d: ChoiceDelta) -> bytes:
        """One choice delta; the frames it makes (thinking, signature, redacted, text,
        tool calls: the order a delta's fields are read in)."""
        if d.index != 0:
            return b""
        if d.reasoning_content:
            block = self._current("thinking")
            block.pieces.append(d.reasoning_content)
            self._emit(BlockDelta(block.index, ThinkingDelta(d.reasoning_content)))
        if d.reasoning_signature is not None:
            block = self._current("thinking")
            block.signature = d.reasoning_signature
            self._emit(BlockDelta(block.index, SignatureDelta(d.reasoning_signature)))
            self._close()
        if d.redacted_reasoning is not None:
            self._open("redacted_thinking", RedactedThinkingOut(d.redacted_reasoning))
            self.blocks[-1].data = d.redacted_reasoning
            self._close()
        for text in (d.content, d.refusal):
            if text:
                block = self._current("text")
                block.pieces.append(text)
                self._emit(BlockDelta(block.index, TextDelta(text)))
        for frag in d.tool_calls or ():
            self._tool_fragment(frag)
        if d.finish_reason is not None:
            self.finish_reason = d.finish_reason
        if d.stop_sequence:
            self.stop_sequence = d.stop_sequence
        return self._flush()

    def _tool_fragment(self, frag: dict[str, Any]) -> None:
        raw_index = frag.get("index")
        call = raw_index if isinstance(raw_index, int) else None
        fid = _str(frag.get("id")) or None
        fn = frag.get("function")
        fn = fn if isinstance(fn, dict) else {}
        name = _str(fn.get("name"))
        args = fn.get("arguments")
        if args is not None and not isinstance(args, str):
            args = _enc.encode(args).decode()  # an engine that sent an object
        block = self._tool_block(call, fid)
        if block is None:
            tool_id = fid or _new_tool_id()
            block = self._open("tool_use", ToolUseOut(tool_id, name, {}), call=call)
            block.id, block.name = tool_id, name
            if call is not None:
                self.calls[call] = block
        elif name and name != block.name:
            block.name += name  # a name in pieces: only the body can have the rest
        if args:
            block.pieces.append(args)
            self._emit(BlockDelta(block.index, InputJsonDelta(args)))

    def _tool_block(self, call: int | None, fid: str | None) -> _Block | None:
        """The block a fragment continues, or None when it starts a call."""
        if call is None:
            cur = self.open
            if cur is not None and cur.kind == "tool_use" and (not fid or fid == cur.id):
                return cur
            return None
        block = self.calls.get(call)
        if block is None or (fid and fid != block.id):
            return None
        return block

    def finish(self, usage: Usage) -> bytes:
        """Closes the open block; `message_delta` (stop reason, exact usage), `message_stop`."""
        self._close()
        stop, sequence = self._stop()
        self._emit(MessageDelta(StopDelta(stop, sequence), to_anthropic_usage(usage)))
        self._emit(MessageStop())
        return self._flush()

    def _stop(self) -> tuple[str, str | None]:
        called = any(b.kind == "tool_use" for b in self.blocks)
        stop = stop_reason(self.finish_reason, self.stop_sequence, called)
        return stop, self.stop_sequence if stop == "stop_sequence" else None

    def message(self, usage: Usage) -> Message:
        """The whole answer as the Messages response body."""
        stop, sequence = self._stop()
        return Message(
            id=self.msg_id,
            model=self.model,
            content=[b.out() for b in self.blocks],
            stop_reason=stop,
            stop_sequence=sequence,
            usage=to_anthropic_usage(usage),
        )


def message_body(message: Message) -> bytes:
    return _enc.encode(message)
