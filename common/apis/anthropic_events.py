"""Anthropic Messages stream events -> chat deltas: the reply side of the `anthropic` engine.

Pure: no I/O (worker/engines/anthropic.py does the HTTP). `EventReader` reads an upstream's
events (or a whole message body, from an upstream that did not stream) into chat deltas;
an `error` event, or one it cannot read, raises `MessagesStreamError`, which the engine
translates (and scrubs) at its one seam. The event table is `EventReader`'s docstring.
"""

from __future__ import annotations

from typing import Any

import msgspec

from common.apis.anthropic import finish_reason, from_anthropic_usage
from common.apis.anthropic_upstream import JSON_TOOL
from common.protocol import ChoiceDelta, Usage

_json = msgspec.json.Encoder()


class MessagesStreamError(Exception):
    """An `error` event (or an unreadable one): Anthropic's error type and message, and
    whether the stream had produced output before it (then it cannot be retried)."""

    def __init__(self, error_type: str, message: str, *, after_output: bool) -> None:
        super().__init__(message)
        self.error_type = error_type
        self.message = message
        self.after_output = after_output


class _Block(msgspec.Struct):
    type: str = ""
    text: str = ""
    thinking: str = ""
    signature: str = ""
    data: str = ""
    id: str = ""
    name: str = ""
    input: dict[str, Any] | None = None


class _Delta(msgspec.Struct):
    type: str = ""
    text: str = ""
    thinking: str = ""
    signature: str = ""
    partial_json: str = ""
    stop_reason: str | None = None
    stop_sequence: str | None = None


class _Usage(msgspec.Struct):
    input_tokens: int | None = None
    output_tokens: int | None = None
    cache_creation_input_tokens: int | None = None
    cache_read_input_tokens: int | None = None


class _Message(msgspec.Struct):
    usage: _Usage | None = None


class _ErrorBody(msgspec.Struct):
    type: str = "api_error"
    message: str = ""


class _Event(msgspec.Struct):
    """Any Messages stream event (or a whole `message` body); unknown fields ignored."""

    type: str
    index: int = 0
    message: _Message | None = None
    content_block: _Block | None = None
    delta: _Delta | None = None
    usage: _Usage | None = None
    error: _ErrorBody | None = None
    # a whole message (`type: "message"`), from an upstream that did not stream
    content: list[_Block] = []
    stop_reason: str | None = None
    stop_sequence: str | None = None


_event_decoder = msgspec.json.Decoder(_Event)


class EventReader:
    """One Messages stream, event by event, as chat deltas (choice 0).

    `feed(payload)` takes one event's JSON (an SSE `data:`) and returns the deltas it
    carries, often none:

        content_block_start text / thinking    its text, if any (usually none)
        content_block_start redacted_thinking  `redacted_reasoning` (the data)
        content_block_start tool_use           a tool call opening: {index: k, id, type:
                                               function, function: {name, arguments: ""}}
                                               (k counts the stream's tool_use blocks)
        text_delta / thinking_delta            `content` / `reasoning_content`
        signature_delta                        `reasoning_signature` (ends the block)
        input_json_delta                       {index: k, function: {arguments: piece}}
        content_block_stop                     for a tool call that got no arguments: "{}"
        message_delta                          `finish_reason` (via `finish_reason`) and the
                                               `stop_sequence` that ended it
        message_start, message_stop, ping      nothing (usage and state only)
        error                                  raises MessagesStreamError
        a whole `message` body                 all of the above at once

    Server tool blocks and citations have no chat equivalent and are skipped. With
    `json_output` (the request's response_format became `JSON_TOOL`), that tool's input is
    the answer's content and its `tool_use` stop is a plain "stop".

    `usage()` is exact: input and cache counts from message_start, output from the last
    message_delta (whose counts are cumulative, and win where they are given).
    """

    def __init__(self, *, json_output: bool = False) -> None:
        self.json_output = json_output
        self.started = False  # message_start seen
        self.finished = False  # a stop_reason seen
        self.done = False  # message_stop seen: nothing more will come
        self.output = False  # a delta was returned
        self._blocks: dict[int, tuple[str, int]] = {}  # event index -> (kind, tool index)
        self._args: set[int] = set()  # event indexes of tool blocks that have input
        self._tools = 0
        self._input = self._output = self._cache_read = self._cache_creation = 0

    def feed(self, payload: bytes) -> list[ChoiceDelta]:
        try:
            ev = _event_decoder.decode(payload)
        except msgspec.MsgspecError as exc:
            raise MessagesStreamError(
                "api_error", "unreadable stream event", after_output=self.output
            ) from exc
        out = self._event(ev)
        if out:
            self.output = True
        return out

    def usage(self) -> Usage:
        return from_anthropic_usage(
            self._input, self._output, self._cache_read, self._cache_creation
        )

    def _event(self, ev: _Event) -> list[ChoiceDelta]:
        match ev.type:
            case "message_start":
                self.started = True
                if ev.message is not None:
                    self._count(ev.message.usage)
            case "content_block_start" if ev.content_block is not None:
                return self._start(ev.index, ev.content_block)
            case "content_block_delta" if ev.delta is not None:
                return self._delta(ev.index, ev.delta)
            case "content_block_stop":
                return self._stop(ev.index)
            case "message_delta":
                self._count(ev.usage)
                if ev.delta is not None and ev.delta.stop_reason is not None:
                    return self._finish(ev.delta.stop_reason, ev.delta.stop_sequence)
            case "message_stop":
                self.done = True
            case "error":
                err = ev.error or _ErrorBody()
                raise MessagesStreamError(err.type, err.message, after_output=self.output)
            case "message":
                return self._whole(ev)
        return []

    def _count(self, u: _Usage | None) -> None:
        if u is None:
            return
        self._input = u.input_tokens if u.input_tokens is not None else self._input
        self._output = u.output_tokens if u.output_tokens is not None else self._output
        if u.cache_read_input_tokens is not None:
            self._cache_read = u.cache_read_input_tokens
        if u.cache_creation_input_tokens is not None:
            self._cache_creation = u.cache_creation_input_tokens

    def _start(self, index: int, b: _Block) -> list[ChoiceDelta]:
        match b.type:
            case "text":
                self._blocks[index] = ("text", 0)
                return [ChoiceDelta(index=0, content=b.text)] if b.text else []
            case "thinking":
                self._blocks[index] = ("thinking", 0)
                out = [ChoiceDelta(index=0, reasoning_content=b.thinking)] if b.thinking else []
                if b.signature:
                    out.append(ChoiceDelta(index=0, reasoning_signature=b.signature))
                return out
            case "redacted_thinking":
                self._blocks[index] = ("redacted", 0)
                return [ChoiceDelta(index=0, redacted_reasoning=b.data)]
            case "tool_use" if self.json_output and b.name == JSON_TOOL:
                self._blocks[index] = ("json", 0)
                text = self._input_of(index, b)
                return [ChoiceDelta(index=0, content=text)] if text else []
            case "tool_use":
                k = self._tools
                self._tools += 1
                self._blocks[index] = ("tool", k)
                args = self._input_of(index, b)
                call = {
                    "index": k,
                    "id": b.id,
                    "type": "function",
                    "function": {"name": b.name, "arguments": args},
                }
                return [ChoiceDelta(index=0, tool_calls=[call])]
        return []  # server tools, search results: no chat equivalent

    def _input_of(self, index: int, b: _Block) -> str:
        """A tool block's input given at its start (a whole message); a stream's start
        carries `{}`, its input comes in pieces."""
        if not b.input:
            return ""
        self._args.add(index)
        return _json.encode(b.input).decode()

    def _delta(self, index: int, d: _Delta) -> list[ChoiceDelta]:
        kind, k = self._blocks.get(index, ("", 0))
        match d.type:
            case "text_delta" if kind == "text" and d.text:
                return [ChoiceDelta(index=0, content=d.text)]
            case "thinking_delta" if kind == "thinking" and d.thinking:
                return [ChoiceDelta(index=0, reasoning_content=d.thinking)]
            case "signature_delta" if kind == "thinking" and d.signature:
                return [ChoiceDelta(index=0, reasoning_signature=d.signature)]
            case "input_json_delta" if kind == "json" and d.partial_json:
                self._args.add(index)
                return [ChoiceDelta(index=0, content=d.partial_json)]
            case "input_json_delta" if kind == "tool" and d.partial_json:
                self._args.add(index)
                call = {"index": k, "function": {"arguments": d.partial_json}}
                return [ChoiceDelta(index=0, tool_calls=[call])]
        return []

    def _stop(self, index: int) -> list[ChoiceDelta]:
        kind, k = self._blocks.get(index, ("", 0))
        if kind not in ("tool", "json") or index in self._args:
            return []
        self._args.add(index)  # no input at all: "{}", as OpenAI sends for no arguments
        if kind == "json":
            return [ChoiceDelta(index=0, content="{}")]
        return [ChoiceDelta(index=0, tool_calls=[{"index": k, "function": {"arguments": "{}"}}])]

    def _finish(self, stop: str, stop_sequence: str | None) -> list[ChoiceDelta]:
        self.finished = True
        reason = "stop" if self.json_output and stop == "tool_use" else finish_reason(stop)
        sequence = stop_sequence if stop == "stop_sequence" and stop_sequence else None
        return [ChoiceDelta(index=0, finish_reason=reason, stop_sequence=sequence)]

    def _whole(self, ev: _Event) -> list[ChoiceDelta]:
        self.started = True
        self._count(ev.usage)
        out: list[ChoiceDelta] = []
        for i, b in enumerate(ev.content):
            out.extend(self._start(i, b))
            out.extend(self._stop(i))
        out.extend(self._finish(ev.stop_reason or "end_turn", ev.stop_sequence))
        self.done = True
        return out
