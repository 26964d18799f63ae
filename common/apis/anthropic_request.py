"""Anthropic Messages request -> chat body: the inbound request of `POST /v1/messages`.

The gateway decodes the request (`decode_messages`), then translates it (`messages_to_chat`)
to the chat body that goes on the wire. Pure: no I/O. Field by field; every error is
`InvalidRequest` (400, Anthropic's `invalid_request_error` through
`anthropic.error_envelope`) whose message names the field the way Anthropic does
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
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

from common.errors import InvalidRequest

_enc = msgspec.json.Encoder()

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
