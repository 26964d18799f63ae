"""Anthropic Messages <-> the fleet's one request shape (OpenAI chat), both directions.

The one place where the two vocabularies meet: the gateway uses it to serve
`POST /v1/messages` (a Messages request becomes a chat body on the wire; the reply stream's
chat deltas become Messages events), and the `anthropic` worker engine uses it to call a
Messages upstream (a chat body becomes a Messages request; the upstream's events become
chat deltas). Pure: no I/O. It is longer than one idea per module because the three parts
(the shared maps, the inbound request, the inbound reply) share one vocabulary.

The shared maps (stop reasons, usage, errors) come first; `anthropic_upstream.py` builds the
outbound direction on them.

The inbound request (`decode_messages`, then `messages_to_chat`), field by field; every
error is `InvalidRequest` (400, Anthropic's `invalid_request_error` through
`error_envelope`) whose message names the field the way Anthropic does
(`messages.0.content.1.source.type: ...`):

    model, stream                 as they are (no model: the gateway's default)
    max_tokens                    required, >= 1 (count_tokens: not required, dropped)
    system                        a system message: a string, or text parts when a block
                                  carries `cache_control` (kept on the part)
    user content                  text -> text part; image (base64 -> data: URL, url -> as
                                  it is) -> image_url part; document with a text source ->
                                  text part (other sources: 400); tool_result -> one `tool`
                                  message each (`tool_call_id`, `is_error`), in order, ahead
                                  of the rest of the turn; its content: a string, or text /
                                  image parts
    assistant content             text -> content; tool_use -> tool_calls (input as JSON
                                  arguments); thinking -> `reasoning_content` (joined) and
                                  `thinking_blocks`; redacted_thinking -> `thinking_blocks`
    blocks in the wrong turn      400 (tool_result, image, document only in user turns;
                                  tool_use, thinking only in assistant turns)
    tools                         function tools (`parameters` = input_schema,
                                  `cache_control` kept); a server tool (a `type` other than
                                  "custom"): 400 naming it
    tool_choice                   auto / any / tool / none -> "auto" / "required" /
                                  {function: name} / "none"; disable_parallel_tool_use ->
                                  parallel_tool_calls false; dropped without tools; a
                                  named tool not among the tools: 400
    stop_sequences                stop
    temperature, top_p, top_k     as they are (top_k: the chat extension field)
    metadata.user_id              user
    thinking                      the chat `thinking` extension field, as it is
    output_config.format,         response_format json_schema (structured outputs)
    output_format
    cache_control (top level)     on the last part of the last message (Anthropic's
                                  "last cacheable block"), unless that part has one
    anything else                 ignored (anthropic-version / beta headers: not checked)

The inbound reply (`MessageStream`): one state machine for both shapes. Streaming, it
frames `message_start` (input_tokens an estimate >= 1, output_tokens 1: the exact counts
come in `message_delta`), `ping`, the content blocks one after another (a block closes when
another kind, or another tool call, starts), `message_delta` (stop reason, exact usage),
`message_stop`. Not streaming, the same blocks make the message body. Choices other than 0
are ignored (Messages has one). Decisions where chat and Messages do not line up:

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

import re
import secrets
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

from common.errors import FleetError, InvalidRequest
from common.protocol import ChoiceDelta, Usage

ANTHROPIC_VERSION = "2023-06-01"  # what the engine sends upstream; inbound accepts any

# ---- stop reasons ---------------------------------------------------------------------------

_STOP_REASONS = {
    "stop": "end_turn",
    "length": "max_tokens",
    "tool_calls": "tool_use",
    "function_call": "tool_use",
    "content_filter": "refusal",
}


def stop_reason(finish_reason: str | None, stop_sequence: str | None, tool_called: bool) -> str:
    """The Messages `stop_reason` for a chat choice's end.

    A tool call anywhere in the answer makes it `tool_use`, whatever the engine's finish
    reason (text followed by a call included); a known stop sequence makes `stop_sequence`.
    """
    if tool_called:
        return "tool_use"
    if finish_reason in (None, "stop") and stop_sequence:
        return "stop_sequence"
    return _STOP_REASONS.get(finish_reason or "stop", "end_turn")


_FINISH_REASONS = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
    "pause_turn": "stop",
}


def finish_reason(stop: str | None) -> str:
    """The chat `finish_reason` for a Messages `stop_reason`."""
    return _FINISH_REASONS.get(stop or "end_turn", "stop")


# ---- usage ----------------------------------------------------------------------------------


class AnthropicUsage(msgspec.Struct, omit_defaults=False):
    input_tokens: int = 0
    output_tokens: int = 0
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = 0


def to_anthropic_usage(u: Usage) -> AnthropicUsage:
    """Chat usage (prompt tokens include cached ones) -> Messages usage (input tokens do
    not: input + cache read + cache creation is the whole prompt)."""
    details = u.prompt_tokens_details if isinstance(u.prompt_tokens_details, dict) else {}
    read = _int(details.get("cached_tokens"))
    created = _int(details.get("cache_creation_tokens"))
    return AnthropicUsage(
        input_tokens=max(0, u.prompt_tokens - read - created),
        output_tokens=u.completion_tokens,
        cache_creation_input_tokens=created,
        cache_read_input_tokens=read,
    )


def from_anthropic_usage(
    input_tokens: int, output_tokens: int, cache_read: int = 0, cache_creation: int = 0
) -> Usage:
    """Messages usage -> chat usage; the cache counts go in `prompt_tokens_details`
    (`cached_tokens`, as OpenAI names reads, and `cache_creation_tokens`)."""
    prompt = input_tokens + cache_read + cache_creation
    details: dict[str, Any] = {"cached_tokens": cache_read}
    if cache_creation:
        details["cache_creation_tokens"] = cache_creation
    return Usage(
        prompt_tokens=prompt,
        completion_tokens=output_tokens,
        total_tokens=prompt + output_tokens,
        prompt_tokens_details=details,
    )


def _int(v: object) -> int:
    return v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else 0


# ---- errors ---------------------------------------------------------------------------------

# Anthropic's error types by HTTP status (docs.anthropic.com, "Errors").
_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    504: "timeout_error",
    529: "overloaded_error",
}


def error_status(status: int) -> int:
    """The status an Anthropic client sees: the fleet's 503 (no capacity in time, queue
    or broker full) is Anthropic's 529 overloaded; everything else keeps its status."""
    return 529 if status == 503 else status


def error_type(status: int) -> str:
    """Anthropic's error type for a status it sees (after `error_status`)."""
    if status in _ERROR_TYPES:
        return _ERROR_TYPES[status]
    if status == 408:
        return "timeout_error"
    return "invalid_request_error" if 400 <= status < 500 else "api_error"


class AnthropicErrorBody(msgspec.Struct):
    type: str
    message: str


class AnthropicError(msgspec.Struct):
    """`{"type": "error", "error": {"type", "message"}}`."""

    error: AnthropicErrorBody
    type: str = "error"


_enc = msgspec.json.Encoder()


def error_envelope(err: FleetError) -> tuple[int, bytes]:
    """(status, body) of a fleet error in Anthropic's envelope."""
    status = error_status(err.status)
    body = AnthropicError(AnthropicErrorBody(error_type(status), err.message))
    return status, _enc.encode(body)


def error_event(err: FleetError) -> bytes:
    """A mid-stream error: `event: error` with the envelope (the status is already out)."""
    status = error_status(err.status)
    body = AnthropicError(AnthropicErrorBody(error_type(status), err.message))
    return b"event: error\ndata: " + _enc.encode(body) + b"\n\n"


_FLEET_STATUS = {529: 503}  # an upstream's overloaded is the fleet's "no capacity now"


def fleet_status(anthropic_status: int) -> int:
    """The fleet status for an upstream's Anthropic status (529 -> 503)."""
    return _FLEET_STATUS.get(anthropic_status, anthropic_status)


# ---- the inbound request: Messages -> chat ------------------------------------------------

CacheControl = dict[str, Any]
Unit = Annotated[float, Meta(ge=0.0, le=1.0)]


class TextBlock(msgspec.Struct, tag="text", tag_field="type", kw_only=True):
    text: str
    cache_control: CacheControl | None = None


class ImageSource(msgspec.Struct, kw_only=True):
    type: str  # base64 | url (file: 400)
    media_type: str | None = None
    data: str | None = None
    url: str | None = None


class ImageBlock(msgspec.Struct, tag="image", tag_field="type", kw_only=True):
    source: ImageSource
    cache_control: CacheControl | None = None


class DocumentSource(msgspec.Struct, kw_only=True):
    type: str  # text (base64, url, content, file: 400)
    media_type: str | None = None
    data: str | None = None


class DocumentBlock(msgspec.Struct, tag="document", tag_field="type", kw_only=True):
    source: DocumentSource
    title: str | None = None
    cache_control: CacheControl | None = None


class ToolUseBlock(msgspec.Struct, tag="tool_use", tag_field="type", kw_only=True):
    id: str
    name: str
    input: dict[str, Any]
    cache_control: CacheControl | None = None


ToolResultPart = TextBlock | ImageBlock | DocumentBlock


class ToolResultBlock(msgspec.Struct, tag="tool_result", tag_field="type", kw_only=True):
    tool_use_id: str
    content: str | list[ToolResultPart] | None = None
    is_error: bool | None = None
    cache_control: CacheControl | None = None


class ThinkingBlock(msgspec.Struct, tag="thinking", tag_field="type", kw_only=True):
    thinking: str
    signature: str = ""


class RedactedThinkingBlock(msgspec.Struct, tag="redacted_thinking", tag_field="type"):
    data: str


InBlock = (
    TextBlock
    | ImageBlock
    | DocumentBlock
    | ToolUseBlock
    | ToolResultBlock
    | ThinkingBlock
    | RedactedThinkingBlock
)


class InMessage(msgspec.Struct, kw_only=True):
    role: Literal["user", "assistant"]
    content: str | list[InBlock]


class ToolDef(msgspec.Struct, kw_only=True):
    name: str
    description: str | None = None
    input_schema: dict[str, Any] | None = None  # required for custom tools (checked)
    cache_control: CacheControl | None = None
    type: str | None = None  # None or "custom"; anything else is a server tool


class _Choice(msgspec.Struct, tag_field="type", kw_only=True):
    disable_parallel_tool_use: bool | None = None


class ChoiceAuto(_Choice, tag="auto"):
    pass


class ChoiceAny(_Choice, tag="any"):
    pass


class ChoiceTool(_Choice, tag="tool"):
    name: str


class ChoiceNone(_Choice, tag="none"):
    pass


class Metadata(msgspec.Struct, kw_only=True):
    user_id: str | None = None


class OutputFormat(msgspec.Struct, kw_only=True):
    type: Literal["json_schema"]
    schema: dict[str, Any]


class OutputConfig(msgspec.Struct, kw_only=True):
    format: OutputFormat | None = None


class MessagesRequest(msgspec.Struct, kw_only=True):
    """`POST /v1/messages` (and `/count_tokens`); unknown fields are ignored."""

    messages: list[InMessage]
    model: str | None = None
    max_tokens: Annotated[int, Meta(ge=1)] | None = None  # required by messages_to_chat
    system: str | list[TextBlock] | None = None
    stop_sequences: list[str] | None = None
    stream: bool | None = None
    temperature: Unit | None = None
    top_p: Unit | None = None
    top_k: Annotated[int, Meta(ge=0)] | None = None
    tools: list[ToolDef] | None = None
    tool_choice: ChoiceAuto | ChoiceAny | ChoiceTool | ChoiceNone | None = None
    metadata: Metadata | None = None
    thinking: dict[str, Any] | None = None
    output_config: OutputConfig | None = None
    output_format: OutputFormat | None = None  # the structured-outputs beta's name
    cache_control: CacheControl | None = None


_request_decoder = msgspec.json.Decoder(MessagesRequest)
_MISSING = re.compile(r"Object missing required field `([^`]+)`")
_INDEX = re.compile(r"\[(\d+)\]")


def _path(raw: str) -> str:
    """msgspec's `$.messages[0].content` -> Anthropic's `messages.0.content`."""
    return _INDEX.sub(r".\1", raw.removeprefix("$").lstrip(".")).lstrip(".")


def _invalid(message: str, field: str) -> InvalidRequest:
    return InvalidRequest(f"{field}: {message}" if field else message, param=field or None)


def decode_messages(body: bytes) -> MessagesRequest:
    """The typed request; raises InvalidRequest naming the field that is wrong."""
    try:
        return _request_decoder.decode(body)
    except msgspec.ValidationError as exc:
        text = str(exc)
        message, _, where = text.partition(" - at `")
        field = _path(where.rstrip("`"))
        missing = _MISSING.fullmatch(message)
        if missing:
            field = f"{field}.{missing.group(1)}" if field else missing.group(1)
            message = "Field required"
        raise _invalid(message, field) from exc
    except msgspec.DecodeError as exc:
        raise InvalidRequest(f"The request body is not valid JSON: {exc}") from exc


def _part(part: dict[str, Any], cache: CacheControl | None) -> dict[str, Any]:
    if cache is not None:
        part["cache_control"] = cache
    return part


def _text_part(text: str, cache: CacheControl | None = None) -> dict[str, Any]:
    return _part({"type": "text", "text": text}, cache)


def _image_part(block: ImageBlock, field: str) -> dict[str, Any]:
    src = block.source
    if src.type == "base64":
        if not src.data or not src.media_type:
            raise _invalid("a base64 image needs 'media_type' and 'data'.", f"{field}.source")
        url = f"data:{src.media_type};base64,{src.data}"
    elif src.type == "url":
        if not src.url:
            raise _invalid("a url image needs 'url'.", f"{field}.source.url")
        url = src.url
    else:
        raise _invalid(
            f"image source type '{src.type}' is not supported here (base64 or url).",
            f"{field}.source.type",
        )
    return _part({"type": "image_url", "image_url": {"url": url}}, block.cache_control)


def _document_part(block: DocumentBlock, field: str) -> dict[str, Any]:
    src = block.source
    if src.type != "text" or src.data is None:
        raise _invalid(
            f"document source type '{src.type}' is not supported here (only 'text', with 'data').",
            f"{field}.source.type",
        )
    return _text_part(src.data, block.cache_control)


def _user_part(block: InBlock, field: str) -> dict[str, Any]:
    if isinstance(block, TextBlock):
        return _text_part(block.text, block.cache_control)
    if isinstance(block, ImageBlock):
        return _image_part(block, field)
    if isinstance(block, DocumentBlock):
        return _document_part(block, field)
    kind = type(block).__struct_config__.tag
    raise _invalid(f"'{kind}' blocks are not allowed in user messages.", f"{field}.type")


def _content(parts: list[dict[str, Any]]) -> str | list[dict[str, Any]]:
    """One plain text part is a string; anything else stays a list of parts."""
    if len(parts) == 1 and parts[0]["type"] == "text" and "cache_control" not in parts[0]:
        text: str = parts[0]["text"]
        return text
    return parts


def _tool_message(block: ToolResultBlock, field: str) -> dict[str, Any]:
    content: str | list[dict[str, Any]]
    if block.content is None:
        content = ""
    elif isinstance(block.content, str):
        content = block.content
    else:
        parts = [_user_part(b, f"{field}.content.{i}") for i, b in enumerate(block.content)]
        content = _content(parts) if parts else ""
    msg: dict[str, Any] = {"role": "tool", "tool_call_id": block.tool_use_id, "content": content}
    if block.is_error:
        msg["is_error"] = True
    if block.cache_control is not None:
        if isinstance(content, str):
            content = [_text_part(content)]
        if content:
            content[-1].setdefault("cache_control", block.cache_control)
        msg["content"] = content
    return msg


def _user_messages(blocks: list[InBlock], field: str) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    parts: list[dict[str, Any]] = []
    for i, block in enumerate(blocks):
        here = f"{field}.{i}"
        if isinstance(block, ToolResultBlock):
            out.append(_tool_message(block, here))
        else:
            parts.append(_user_part(block, here))
    if parts or not out:
        out.append({"role": "user", "content": _content(parts) if parts else ""})
    return out


def _assistant_message(blocks: list[InBlock], field: str) -> dict[str, Any]:
    parts: list[dict[str, Any]] = []
    calls: list[dict[str, Any]] = []
    reasoning: list[str] = []
    thinking: list[dict[str, Any]] = []
    for i, block in enumerate(blocks):
        if isinstance(block, TextBlock):
            parts.append(_text_part(block.text, block.cache_control))
        elif isinstance(block, ToolUseBlock):
            arguments = _enc.encode(block.input).decode()
            fn = {"name": block.name, "arguments": arguments}
            calls.append({"id": block.id, "type": "function", "function": fn})
        elif isinstance(block, ThinkingBlock):
            reasoning.append(block.thinking)
            thinking.append(
                {"type": "thinking", "thinking": block.thinking, "signature": block.signature}
            )
        elif isinstance(block, RedactedThinkingBlock):
            thinking.append({"type": "redacted_thinking", "data": block.data})
        else:
            kind = type(block).__struct_config__.tag
            raise _invalid(
                f"'{kind}' blocks are not allowed in assistant messages.", f"{field}.{i}.type"
            )
    msg: dict[str, Any] = {"role": "assistant"}
    if any("cache_control" in p for p in parts):
        msg["content"] = parts
    elif parts:
        msg["content"] = "".join(p["text"] for p in parts)
    else:
        msg["content"] = None if calls else ""
    if calls:
        msg["tool_calls"] = calls
    if reasoning:
        msg["reasoning_content"] = "".join(reasoning)
    if thinking:
        msg["thinking_blocks"] = thinking
    return msg


def _system(system: str | list[TextBlock]) -> dict[str, Any] | None:
    if isinstance(system, str):
        return {"role": "system", "content": system} if system else None
    if not system:
        return None
    if any(b.cache_control is not None for b in system):
        return {"role": "system", "content": [_text_part(b.text, b.cache_control) for b in system]}
    return {"role": "system", "content": "\n".join(b.text for b in system)}


def _tools(tools: list[ToolDef]) -> list[dict[str, Any]]:
    out = []
    for i, tool in enumerate(tools):
        if tool.type not in (None, "custom"):
            raise _invalid(
                f"tool '{tool.name}' of type '{tool.type}' is a server tool; only custom "
                "tools (name, description, input_schema) are supported here.",
                f"tools.{i}.type",
            )
        if tool.input_schema is None:
            raise _invalid("Field required", f"tools.{i}.input_schema")
        fn: dict[str, Any] = {"name": tool.name, "parameters": tool.input_schema}
        if tool.description is not None:
            fn["description"] = tool.description
        out.append(_part({"type": "function", "function": fn}, tool.cache_control))
    return out


def _tool_choice(choice: _Choice) -> str | dict[str, Any]:
    if isinstance(choice, ChoiceTool):
        return {"type": "function", "function": {"name": choice.name}}
    if isinstance(choice, ChoiceAny):
        return "required"
    return "none" if isinstance(choice, ChoiceNone) else "auto"


def _cache_last(messages: list[dict[str, Any]], cache: CacheControl) -> None:
    """The top-level `cache_control`: on the last part of the last message."""
    last = messages[-1]
    content = last.get("content")
    if isinstance(content, str) or content is None:
        if not content:
            return
        last["content"] = content = [_text_part(content)]
    if content:
        content[-1].setdefault("cache_control", cache)


def _chat_messages(req: MessagesRequest) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = []
    if req.system is not None and (system := _system(req.system)) is not None:
        messages.append(system)
    for i, m in enumerate(req.messages):
        field = f"messages.{i}.content"
        if isinstance(m.content, str):
            messages.append({"role": m.role, "content": m.content})
        elif m.role == "user":
            messages.extend(_user_messages(m.content, field))
        else:
            messages.append(_assistant_message(m.content, field))
    if req.cache_control is not None and messages:
        _cache_last(messages, req.cache_control)
    return messages


def messages_to_chat(req: MessagesRequest, *, count_only: bool = False) -> dict[str, Any]:
    """The chat body for a Messages request (see the module docstring, field by field).

    `count_only` (count_tokens): `max_tokens` is not required, and generation parameters
    (`max_tokens`, `stream`) are left out. Raises InvalidRequest naming the field.
    """
    if req.max_tokens is None and not count_only:
        raise _invalid("Field required", "max_tokens")
    messages = _chat_messages(req)
    body: dict[str, Any] = {"messages": messages}
    if req.model:
        body["model"] = req.model
    if not count_only:
        body["max_tokens"] = req.max_tokens
        if req.stream:
            body["stream"] = True
    _add_tools(body, req)
    if req.stop_sequences:
        body["stop"] = req.stop_sequences
    for name in ("temperature", "top_p", "top_k", "thinking"):
        if (value := getattr(req, name)) is not None:
            body[name] = value
    if req.metadata is not None and req.metadata.user_id:
        body["user"] = req.metadata.user_id
    fmt = req.output_config.format if req.output_config is not None else None
    fmt = fmt or req.output_format
    if fmt is not None:
        schema = {"name": "output", "schema": fmt.schema}
        body["response_format"] = {"type": "json_schema", "json_schema": schema}
    return body


def _add_tools(body: dict[str, Any], req: MessagesRequest) -> None:
    """`tools` and `tool_choice`; a choice without tools is dropped (chat servers refuse
    one), a named tool that is not among them is a 400."""
    if not req.tools:
        if isinstance(req.tool_choice, ChoiceTool):
            raise _invalid("tool_choice names a tool but 'tools' is empty.", "tool_choice.name")
        return
    body["tools"] = _tools(req.tools)
    if isinstance(req.tool_choice, ChoiceTool) and all(
        t.name != req.tool_choice.name for t in req.tools
    ):
        raise _invalid(f"tool '{req.tool_choice.name}' is not in 'tools'.", "tool_choice.name")
    if req.tool_choice is not None:
        body["tool_choice"] = _tool_choice(req.tool_choice)
        if req.tool_choice.disable_parallel_tool_use:
            body["parallel_tool_calls"] = False


def estimate_tokens(body: bytes) -> int:
    """A rough prompt size for `message_start` (about 4 bytes a token), never 0: the
    exact count comes in `message_delta` (clients such as Claude Code break on zeros)."""
    return max(1, len(body) // 4)


# ---- the inbound reply: chat deltas -> Messages events and body ----------------------------


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
