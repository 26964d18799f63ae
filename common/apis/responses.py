"""OpenAI Responses <-> the fleet's one request shape (OpenAI chat). Pure: no I/O.

The gateway serves `POST /v1/responses` with it (gateway/front_responses.py):

    ResponsesRequest        the request, decoded once (`decode_request`)
    normalize_input         its `input` as items with ids: what `input_items` lists and a
                            stored response keeps (gateway/responses_store.py)
    responses_to_chat       instructions + the stored history's items + the input items
                            -> one chat body (a dict; gateway.validate checks it)
    ResponseStream          chat deltas -> Responses SSE events, and the final `response`
                            object (streaming or not: one state machine)
    encode_reasoning /      a reasoning item's `encrypted_content`: the thinking blocks
    decode_reasoning        (text + signature, or redacted data) a client sends back

Items become chat messages this way: user/system/developer messages keep their role
(developer becomes system: chat templates rarely know it); consecutive assistant items
(reasoning, message, function calls) form one assistant message, reasoning first
(`reasoning_content` and `thinking_blocks`, common/apis/design.md), text as `content`
(refusal text too), calls as `tool_calls`; a `function_call_output` is a `tool` message.
`instructions` is the first system message, from this request only (never inherited
from the responses it continues, as OpenAI documents).

`encrypted_content` is opaque, not secret: "llmf1." + base64url(JSON of the blocks), the
reasoning the client was shown plus its signatures (the engine's upstream checks those).
One that does not decode is dropped; without it, an item's `content` texts are sent back as
unsigned `reasoning_content`, and a summary-only item is dropped.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Iterable, Sequence
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

from common import protocol as p
from common.errors import FleetError, InvalidRequest
from common.openai_types import Temperature, TopP, decode_error_message

ENCRYPTED_INCLUDE = "reasoning.encrypted_content"
REASONING_PREFIX = "llmf1."
MAX_METADATA = 16  # OpenAI's bounds on `metadata`
MAX_METADATA_KEY = 64
MAX_METADATA_VALUE = 512

# ---- the request ----------------------------------------------------------------------------


class TextConfig(msgspec.Struct, omit_defaults=True):
    format: dict[str, Any] | None = None
    verbosity: str | None = None


class ReasoningConfig(msgspec.Struct, omit_defaults=True):
    effort: str | None = None
    summary: str | None = None
    generate_summary: str | None = None


class ResponsesRequest(msgspec.Struct, omit_defaults=True):
    """`POST /v1/responses`. Unknown fields are ignored; `null` means the default."""

    model: str | None = None
    input: str | list[dict[str, Any]] | None = None
    instructions: str | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    max_output_tokens: Annotated[int, Meta(ge=1)] | None = None
    max_tool_calls: Annotated[int, Meta(ge=1)] | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    text: TextConfig | None = None
    reasoning: ReasoningConfig | None = None
    stream: bool | None = None
    store: bool | None = None
    metadata: dict[str, str] | None = None
    previous_response_id: str | None = None
    include: list[str] | None = None
    background: bool | None = None
    user: str | None = None
    truncation: Literal["auto", "disabled"] | None = None
    service_tier: str | None = None
    conversation: str | dict[str, Any] | None = None
    prompt: dict[str, Any] | None = None

    def stores(self) -> bool:
        return self.store is not False

    def wants_encrypted(self) -> bool:
        return ENCRYPTED_INCLUDE in (self.include or ())


_request_decoder = msgspec.json.Decoder(ResponsesRequest)


def decode_request(body: bytes) -> ResponsesRequest:
    """The request, or InvalidRequest naming the parameter (bad JSON, a wrong type, a field
    this gateway cannot serve)."""
    try:
        req = _request_decoder.decode(body)
    except msgspec.DecodeError as exc:
        message, param = decode_error_message(exc)
        raise InvalidRequest(message, param=param) from exc
    if req.background:
        raise InvalidRequest(
            "Background responses are not supported by this gateway; send background: false.",
            param="background",
        )
    if req.conversation is not None:
        raise InvalidRequest(
            "Conversations are not supported by this gateway; use previous_response_id.",
            param="conversation",
        )
    if req.prompt is not None:
        raise InvalidRequest("Prompt templates are not supported by this gateway.", param="prompt")
    _check_metadata(req.metadata)
    return req


def _check_metadata(metadata: dict[str, str] | None) -> None:
    if not metadata:
        return
    if len(metadata) > MAX_METADATA:
        raise InvalidRequest(f"'metadata' allows at most {MAX_METADATA} keys.", param="metadata")
    for k, v in metadata.items():
        if len(k) > MAX_METADATA_KEY or len(v) > MAX_METADATA_VALUE:
            raise InvalidRequest(
                f"'metadata' keys are at most {MAX_METADATA_KEY} characters and values at "
                f"most {MAX_METADATA_VALUE}.",
                param=f"metadata.{k[:MAX_METADATA_KEY]}",
            )


# ---- input items ----------------------------------------------------------------------------


class _Message(msgspec.Struct):
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[dict[str, Any]]
    id: str | None = None


class _FunctionCall(msgspec.Struct):
    call_id: str
    name: str
    arguments: str
    id: str | None = None


class _FunctionCallOutput(msgspec.Struct):
    call_id: str
    output: str | list[dict[str, Any]]
    id: str | None = None


class _Reasoning(msgspec.Struct):
    id: str | None = None
    summary: list[dict[str, Any]] = []
    content: list[dict[str, Any]] | None = None
    encrypted_content: str | None = None


_ITEM_PREFIX = {
    "message": "msg",
    "function_call": "fc",
    "function_call_output": "fco",
    "reasoning": "rs",
}


def _convert(raw: dict[str, Any], kind: type[msgspec.Struct], where: str) -> Any:
    try:
        return msgspec.convert(raw, kind)
    except msgspec.ValidationError as exc:
        message, param = decode_error_message(exc)
        full = f"{where}.{param}" if param else where
        raise InvalidRequest(message.replace(f"'{param}'", f"'{full}'"), param=full) from exc


def normalize_input(value: str | list[dict[str, Any]] | None, seed: str) -> list[dict[str, Any]]:
    """The request's input as items in OpenAI's item shape, each with an id (`<prefix>_`
    + `seed` + its position, unless it came with one), message content always as parts.
    Raises InvalidRequest naming `input[i]...` for what this gateway cannot serve."""
    if value is None:
        return []
    if isinstance(value, str):
        value = [{"role": "user", "content": value}]
    return [_normalize_item(raw, f"input[{i}]", f"{seed}i{i:04x}") for i, raw in enumerate(value)]


def _normalize_item(raw: dict[str, Any], where: str, seed: str) -> dict[str, Any]:
    kind = raw.get("type", "message")
    prefix = _ITEM_PREFIX.get(kind) if isinstance(kind, str) else None
    if prefix is None:
        raise InvalidRequest(
            f"Input items of type '{kind}' are not supported by this gateway (it serves "
            "message, function_call, function_call_output and reasoning items).",
            param=f"{where}.type",
        )
    fallback = f"{prefix}_{seed}"
    if kind == "message":
        m: _Message = _convert(raw, _Message, where)
        parts = _parts(m.role, m.content, f"{where}.content")
        return {
            "id": m.id or fallback,
            "type": "message",
            "role": m.role,
            "content": parts,
            "status": "completed",
        }
    if kind == "function_call":
        c: _FunctionCall = _convert(raw, _FunctionCall, where)
        return {
            "id": c.id or fallback,
            "type": "function_call",
            "call_id": c.call_id,
            "name": c.name,
            "arguments": c.arguments,
            "status": "completed",
        }
    if kind == "function_call_output":
        o: _FunctionCallOutput = _convert(raw, _FunctionCallOutput, where)
        output: str | list[dict[str, Any]] = o.output
        if isinstance(output, list):
            output = _parts("tool", output, f"{where}.output")
        return {
            "id": o.id or fallback,
            "type": "function_call_output",
            "call_id": o.call_id,
            "output": output,
            "status": "completed",
        }
    r: _Reasoning = _convert(raw, _Reasoning, where)
    item: dict[str, Any] = {"id": r.id or fallback, "type": "reasoning", "summary": r.summary}
    if r.content is not None:
        item["content"] = r.content
    if r.encrypted_content is not None:
        item["encrypted_content"] = r.encrypted_content
    return item


def _parts(role: str, content: str | list[dict[str, Any]], where: str) -> list[dict[str, Any]]:
    """Content as Responses parts (a string becomes one text part)."""
    if isinstance(content, str):
        if role == "assistant":
            return [{"type": "output_text", "text": content, "annotations": []}]
        return [{"type": "input_text", "text": content}]
    return [_part(part, f"{where}[{j}]") for j, part in enumerate(content)]


def _part(part: dict[str, Any], where: str) -> dict[str, Any]:
    kind = part.get("type")
    if kind in ("input_text", "output_text"):
        if not isinstance(part.get("text"), str):
            raise InvalidRequest(f"'{where}.text' must be a string.", param=f"{where}.text")
        return part
    if kind == "refusal":
        if not isinstance(part.get("refusal"), str):
            raise InvalidRequest(f"'{where}.refusal' must be a string.", param=f"{where}.refusal")
        return part
    if kind == "input_image":
        if part.get("file_id") and not part.get("image_url"):
            raise InvalidRequest(
                "Images by file_id are not supported by this gateway (it has no Files API); "
                "send image_url (a URL or a data: URL).",
                param=f"{where}.file_id",
            )
        if not isinstance(part.get("image_url"), str):
            raise InvalidRequest(
                f"'{where}.image_url' must be a string.", param=f"{where}.image_url"
            )
        return part
    raise InvalidRequest(
        f"Content parts of type '{kind}' are not supported by this gateway (it serves "
        "input_text, input_image, output_text and refusal).",
        param=f"{where}.type",
    )


# ---- reasoning round trip -------------------------------------------------------------------


def encode_reasoning(blocks: Sequence[dict[str, Any]]) -> str:
    """`encrypted_content` for thinking blocks (`{"type": "thinking", "thinking",
    "signature"}` or `{"type": "redacted_thinking", "data"}`)."""
    raw = json.dumps(list(blocks), separators=(",", ":")).encode()
    return REASONING_PREFIX + base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_reasoning(value: str) -> list[dict[str, Any]] | None:
    """The blocks of an `encrypted_content` this gateway made, or None (not ours, damaged)."""
    if not value.startswith(REASONING_PREFIX):
        return None
    data = value[len(REASONING_PREFIX) :]
    try:
        blocks = json.loads(base64.urlsafe_b64decode(data + "=" * (-len(data) % 4)))
    except (ValueError, binascii.Error):
        return None
    if not isinstance(blocks, list) or not all(_is_block(b) for b in blocks):
        return None
    return blocks


def _is_block(b: Any) -> bool:
    if not isinstance(b, dict):
        return False
    if b.get("type") == "thinking":
        return isinstance(b.get("thinking"), str) and isinstance(b.get("signature"), str)
    return b.get("type") == "redacted_thinking" and isinstance(b.get("data"), str)


def _item_reasoning(item: dict[str, Any]) -> tuple[str, list[dict[str, Any]]] | None:
    """(reasoning text, signed or redacted blocks) of an input reasoning item, or None."""
    encrypted = item.get("encrypted_content")
    blocks = decode_reasoning(encrypted) if isinstance(encrypted, str) else None
    if blocks is not None:
        text = "".join(b["thinking"] for b in blocks if b["type"] == "thinking")
        kept = [b for b in blocks if b["type"] == "redacted_thinking" or b["signature"]]
        return text, kept
    texts = [
        c.get("text", "")
        for c in item.get("content") or ()
        if isinstance(c, dict) and isinstance(c.get("text"), str)
    ]
    return ("".join(texts), []) if any(texts) else None


# ---- items -> chat messages -----------------------------------------------------------------


class _Turn:
    """One assistant chat message being assembled from consecutive assistant items."""

    __slots__ = ("blocks", "calls", "reasoning", "text")

    def __init__(self) -> None:
        self.reasoning: list[str] = []
        self.blocks: list[dict[str, Any]] = []
        self.text: list[str] = []
        self.calls: list[dict[str, Any]] = []

    def said(self) -> bool:
        return bool(self.text or self.calls)

    def message(self) -> dict[str, Any] | None:
        if not self.said():
            return None  # reasoning alone answers nothing: dropped
        msg: dict[str, Any] = {"role": "assistant", "content": "".join(self.text) or None}
        if msg["content"] is None and not self.calls:
            msg["content"] = ""
        if self.calls:
            msg["tool_calls"] = self.calls
        if self.reasoning:
            msg["reasoning_content"] = "".join(self.reasoning)
        if self.blocks:
            msg["thinking_blocks"] = self.blocks
        return msg


def items_to_messages(items: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Normalized items (history first) as chat messages."""
    out: list[dict[str, Any]] = []
    turn = _Turn()

    def flush() -> _Turn:
        msg = turn.message()
        if msg is not None:
            out.append(msg)
        return _Turn()

    for item in items:
        kind = item.get("type")
        if kind == "reasoning":
            got = _item_reasoning(item)
            if got is None:
                continue
            if turn.said():
                turn = flush()
            turn.reasoning.append(got[0])
            turn.blocks.extend(got[1])
        elif kind == "function_call":
            turn.calls.append(
                {
                    "id": item["call_id"],
                    "type": "function",
                    "function": {"name": item["name"], "arguments": item["arguments"]},
                }
            )
        elif kind == "message" and item["role"] == "assistant":
            if turn.said():
                turn = flush()
            turn.text.extend(_part_text(part) for part in item["content"])
        else:
            turn = flush()
            out.append(_other_message(item))
    flush()
    return out


def _part_text(part: dict[str, Any]) -> str:
    text = part.get("text") if part.get("type") != "refusal" else part.get("refusal")
    return text if isinstance(text, str) else ""


def _chat_parts(parts: list[dict[str, Any]]) -> str | list[dict[str, Any]]:
    """Responses parts as chat content: a string when it is all text."""
    if all(part.get("type") != "input_image" for part in parts):
        return "".join(_part_text(part) for part in parts)
    out: list[dict[str, Any]] = []
    for part in parts:
        if part.get("type") == "input_image":
            image: dict[str, Any] = {"url": part["image_url"]}
            if part.get("detail"):
                image["detail"] = part["detail"]
            out.append({"type": "image_url", "image_url": image})
        else:
            out.append({"type": "text", "text": _part_text(part)})
    return out


def _other_message(item: dict[str, Any]) -> dict[str, Any]:
    if item["type"] == "function_call_output":
        output = item["output"]
        content = output if isinstance(output, str) else _chat_parts(output)
        return {"role": "tool", "tool_call_id": item["call_id"], "content": content}
    role = "system" if item["role"] == "developer" else item["role"]
    content = _chat_parts(item["content"])
    if role == "system" and not isinstance(content, str):
        content = "".join(_part_text(part) for part in item["content"])
    return {"role": role, "content": content}


# ---- the chat body --------------------------------------------------------------------------


def chat_tools(tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for i, tool in enumerate(tools):
        kind = tool.get("type")
        if kind != "function":
            raise InvalidRequest(
                f"Tools of type '{kind}' are not supported by this gateway; only 'function' "
                "tools are.",
                param=f"tools[{i}].type",
            )
        name = tool.get("name")
        if not isinstance(name, str) or not name:
            raise InvalidRequest(f"'tools[{i}].name' is required.", param=f"tools[{i}].name")
        fn: dict[str, Any] = {"name": name}
        for key in ("description", "parameters", "strict"):
            if tool.get(key) is not None:
                fn[key] = tool[key]
        out.append({"type": "function", "function": fn})
    return out


def chat_tool_choice(choice: str | dict[str, Any]) -> str | dict[str, Any]:
    if isinstance(choice, str):
        if choice not in ("auto", "none", "required"):
            raise InvalidRequest(
                f"Invalid value for 'tool_choice': '{choice}' (auto, none, required, or "
                "{'type': 'function', 'name': ...}).",
                param="tool_choice",
            )
        return choice
    name = choice.get("name") or (choice.get("function") or {}).get("name")
    if choice.get("type") != "function" or not isinstance(name, str):
        raise InvalidRequest(
            f"tool_choice of type '{choice.get('type')}' is not supported by this gateway; "
            "use auto, none, required or {'type': 'function', 'name': ...}.",
            param="tool_choice",
        )
    return {"type": "function", "function": {"name": name}}


def chat_response_format(fmt: dict[str, Any]) -> dict[str, Any] | None:
    kind = fmt.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "json_object"}
    if kind == "json_schema":
        if not isinstance(fmt.get("schema"), dict):
            raise InvalidRequest(
                "'text.format.schema' is required for json_schema.", param="text.format.schema"
            )
        schema: dict[str, Any] = {"name": fmt.get("name") or "response", "schema": fmt["schema"]}
        for key in ("strict", "description"):
            if fmt.get(key) is not None:
                schema[key] = fmt[key]
        return {"type": "json_schema", "json_schema": schema}
    raise InvalidRequest(
        f"Invalid value for 'text.format.type': '{kind}' (text, json_object or json_schema).",
        param="text.format.type",
    )


def responses_to_chat(
    req: ResponsesRequest,
    items: list[dict[str, Any]],
    history: Iterable[dict[str, Any]] = (),
) -> dict[str, Any]:
    """The chat body for `req`: its instructions, then `history` (the stored items of the
    responses it continues, oldest first), then its own (normalized) `items`."""
    messages: list[dict[str, Any]] = []
    if req.instructions:
        messages.append({"role": "system", "content": req.instructions})
    messages.extend(items_to_messages([*history, *items]))
    body: dict[str, Any] = {"messages": messages, "stream": bool(req.stream)}
    if req.model:
        body["model"] = req.model
    optional = {
        "max_completion_tokens": req.max_output_tokens,
        "temperature": req.temperature,
        "top_p": req.top_p,
        "user": req.user,
    }
    body.update({k: v for k, v in optional.items() if v is not None})
    if req.tools:
        body["tools"] = chat_tools(req.tools)
        if req.parallel_tool_calls is not None:
            body["parallel_tool_calls"] = req.parallel_tool_calls
    if req.tool_choice is not None:
        body["tool_choice"] = chat_tool_choice(req.tool_choice)
    if req.text is not None and req.text.format is not None:
        fmt = chat_response_format(req.text.format)
        if fmt is not None:
            body["response_format"] = fmt
    if req.reasoning is not None and req.reasoning.effort:
        body["reasoning_effort"] = req.reasoning.effort
    return body


def response_shell(req: ResponsesRequest, model: str, stored: bool) -> dict[str, Any]:
    """The request's settings as every `response` object echoes them."""
    reasoning = req.reasoning or ReasoningConfig()
    text: dict[str, Any] = {"format": (req.text and req.text.format) or {"type": "text"}}
    if req.text is not None and req.text.verbosity:
        text["verbosity"] = req.text.verbosity
    return {
        "background": False,
        "instructions": req.instructions,
        "max_output_tokens": req.max_output_tokens,
        "max_tool_calls": req.max_tool_calls,
        "metadata": req.metadata or {},
        "model": model,
        "parallel_tool_calls": req.parallel_tool_calls is not False,
        "previous_response_id": req.previous_response_id,
        "reasoning": {"effort": reasoning.effort, "summary": reasoning.summary},
        "service_tier": req.service_tier,
        "store": stored,
        "temperature": req.temperature,
        "text": text,
        "tool_choice": req.tool_choice or "auto",
        "tools": req.tools or [],
        "top_p": req.top_p,
        "truncation": req.truncation or "disabled",
        "user": req.user,
    }


# ---- the reply: chat deltas -> events and the response object --------------------------------


def to_responses_usage(u: p.Usage) -> dict[str, Any]:
    prompt = u.prompt_tokens_details if isinstance(u.prompt_tokens_details, dict) else {}
    completion = (
        u.completion_tokens_details if isinstance(u.completion_tokens_details, dict) else {}
    )
    return {
        "input_tokens": u.prompt_tokens,
        "input_tokens_details": {
            "cached_tokens": int(prompt.get("cached_tokens") or 0),
            "cache_write_tokens": int(prompt.get("cache_creation_tokens") or 0),
        },
        "output_tokens": u.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": int(completion.get("reasoning_tokens") or 0)},
        "total_tokens": u.total_tokens or u.prompt_tokens + u.completion_tokens,
    }


# `response.error.code` takes OpenAI's closed set (the SDK's ResponseError); the fleet's
# own error type goes in `type`.
_FAILED_CODES = {429: "rate_limit_exceeded", 400: "invalid_prompt", 413: "invalid_prompt"}
_INCOMPLETE = {"length": "max_output_tokens", "content_filter": "content_filter"}
_enc = msgspec.json.Encoder()


def frame(kind: str, event: dict[str, Any]) -> bytes:
    """One SSE event: `event: <type>` and its JSON."""
    return b"event: " + kind.encode() + b"\ndata: " + _enc.encode(event) + b"\n\n"


class _Item:
    """One output item while it streams."""

    kind = ""

    def __init__(self, item_id: str, index: int) -> None:
        self.id = item_id
        self.index = index
        self.done = False
        self.status = "in_progress"  # set when it is done: completed | incomplete

    def shape(self, status: str, full: bool) -> dict[str, Any]:
        raise NotImplementedError


class _MessageItem(_Item):
    kind = "message"

    def __init__(self, item_id: str, index: int) -> None:
        super().__init__(item_id, index)
        self.parts: list[list[str]] = []  # [kind, text]: output_text | refusal
        self.open = False  # the last part still takes deltas

    def shape(self, status: str, full: bool) -> dict[str, Any]:
        content = [_content_part(k, t) for k, t in self.parts] if full else []
        return {
            "id": self.id,
            "type": "message",
            "status": status,
            "role": "assistant",
            "content": content,
        }


def _content_part(kind: str, text: str) -> dict[str, Any]:
    if kind == "refusal":
        return {"type": "refusal", "refusal": text}
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


class _ReasoningItem(_Item):
    kind = "reasoning"

    def __init__(self, item_id: str, index: int, encrypted: bool) -> None:
        super().__init__(item_id, index)
        self.blocks: list[dict[str, Any]] = []  # thinking (text, signature) or redacted
        self.open = False  # the last thinking block still takes text
        self.encrypted = encrypted

    def texts(self) -> list[str]:
        return [b["thinking"] for b in self.blocks if b["type"] == "thinking"]

    def shape(self, status: str, full: bool, encrypted: bool | None = None) -> dict[str, Any]:
        item: dict[str, Any] = {"id": self.id, "type": "reasoning", "summary": []}
        item["content"] = (
            [{"type": "reasoning_text", "text": t} for t in self.texts()] if full else []
        )
        if (self.encrypted if encrypted is None else encrypted) and full and self.blocks:
            item["encrypted_content"] = encode_reasoning(self.blocks)
        return item


class _CallItem(_Item):
    kind = "function_call"

    def __init__(self, item_id: str, index: int, call_id: str, name: str) -> None:
        super().__init__(item_id, index)
        self.call_id = call_id
        self.name = name
        self.arguments = ""

    def shape(self, status: str, full: bool) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": "function_call",
            "status": status,
            "arguments": self.arguments if full else "",
            "call_id": self.call_id,
            "name": self.name,
        }


class ResponseStream:
    """One response from chat deltas (choice 0; a Responses request has one choice).

    `start()`, then `delta(msg)` per reply message, then `close(usage)` or `fail(...)`,
    each returning the SSE bytes (with `emit=False`, no bytes are built: the non-streaming
    answer is `response` after `close`). `close` is idempotent. Items open while text or
    calls keep coming; an item closes when a different kind of output starts (a call stays
    open while other calls stream, so interleaved call fragments are fine) or at the end.
    """

    def __init__(
        self,
        shell: dict[str, Any],
        rid: str,
        created: int,
        *,
        encrypted: bool = False,
        emit: bool = True,
    ) -> None:
        self.id = "resp_" + rid
        self.rid = rid
        self.shell = shell
        self.created = created
        self.encrypted = encrypted
        self.emit = emit
        self.seq = 0
        self.items: list[_Item] = []
        self.current: _MessageItem | _ReasoningItem | None = None
        self.calls: dict[int, _CallItem] = {}  # chat tool-call index -> its item
        self.finish_reason: str | None = None
        self.status = "in_progress"
        self.usage: dict[str, Any] | None = None
        self.error: dict[str, Any] | None = None
        self.completed_at: int | None = None
        self._closed: bytes | None = None

    # ---- the response object --------------------------------------------------------

    def _incomplete(self) -> dict[str, Any] | None:
        if self.status != "incomplete":
            return None
        return {"reason": _INCOMPLETE.get(self.finish_reason or "", "max_output_tokens")}

    def response(self, full: bool = True) -> dict[str, Any]:
        """The `response` object as it stands (`full`: with its output so far)."""
        obj: dict[str, Any] = {
            "id": self.id,
            "object": "response",
            "created_at": self.created,
            "status": self.status,
            "completed_at": self.completed_at,
            "error": self.error,
            "incomplete_details": self._incomplete(),
            **self.shell,
            "output": self.output() if full else [],
            "usage": self.usage,
        }
        return obj

    def output(self, *, stored: bool = False) -> list[dict[str, Any]]:
        """The output items; `stored`: reasoning always with its `encrypted_content` (a
        stored response's history sends the signatures back)."""
        out = []
        for item in self.items:
            status = self._item_status(item)
            if stored and isinstance(item, _ReasoningItem):
                out.append(item.shape(status, True, encrypted=True))
            else:
                out.append(item.shape(status, True))
        return out

    def _item_status(self, item: _Item) -> str:
        if item.done:
            return item.status
        return "in_progress" if self.status == "in_progress" else "incomplete"

    # ---- events ---------------------------------------------------------------------

    def _event(self, kind: str, **fields: Any) -> bytes:
        seq = self.seq
        self.seq += 1
        if not self.emit:
            return b""
        return frame(kind, {"type": kind, "sequence_number": seq, **fields})

    def start(self) -> bytes:
        return self._event("response.created", response=self.response(False)) + self._event(
            "response.in_progress", response=self.response(False)
        )

    def delta(self, msg: p.Delta) -> bytes:
        out: list[bytes] = []
        for d in msg.choices:
            if d.index != 0:
                continue
            if d.reasoning_content:
                self._reasoning(d.reasoning_content, out)
            if d.reasoning_signature is not None:
                self._sign(d.reasoning_signature, out)
            if d.redacted_reasoning is not None:
                self._redacted(d.redacted_reasoning, out)
            if d.content:
                self._text("output_text", d.content, out)
            if d.refusal:
                self._text("refusal", d.refusal, out)
            for frag in d.tool_calls or ():
                self._call(frag, out)
            if d.finish_reason is not None:
                self.finish_reason = d.finish_reason
        return b"".join(out)

    def close(self, usage: p.Usage, now: int | None = None) -> bytes:
        """Every open item done, then `response.completed` (or `response.incomplete`:
        cut by max_output_tokens or a content filter). Idempotent."""
        if self._closed is not None:
            return self._closed
        if self.status == "failed":
            return b""
        self.status = "incomplete" if self.finish_reason in _INCOMPLETE else "completed"
        self.usage = to_responses_usage(usage)
        self.completed_at = now if self.status == "completed" else None
        out: list[bytes] = []
        self._close_current(out)
        self._close_calls(out)
        kind = "response.completed" if self.status == "completed" else "response.incomplete"
        out.append(self._event(kind, response=self.response()))
        self._closed = b"".join(out)
        return self._closed

    def fail(self, err: FleetError) -> bytes:
        """`response.failed`, with what was produced so far. Also after `close` (the
        gateway failed the answer after building its last event, e.g. its audit event
        could not be stored): the client gets both, the failure last. Once only."""
        if self.status == "failed":
            return b""
        self.status = "failed"
        code = _FAILED_CODES.get(err.status, "server_error")
        self.error = {"code": code, "message": err.message, "type": err.type}
        return self._event("response.failed", response=self.response())

    # ---- items ----------------------------------------------------------------------

    def _item_id(self, prefix: str) -> str:
        return f"{prefix}_{self.rid}{len(self.items):04x}"

    def _add(self, item: _Item, out: list[bytes]) -> None:
        self.items.append(item)
        out.append(
            self._event(
                "response.output_item.added",
                output_index=item.index,
                item=item.shape("in_progress", False),
            )
        )

    def _done(self, item: _Item, out: list[bytes]) -> None:
        item.done = True
        item.status = "incomplete" if self.status == "incomplete" else "completed"
        shaped = item.shape(item.status, True)
        out.append(self._event("response.output_item.done", output_index=item.index, item=shaped))

    def _close_current(self, out: list[bytes]) -> None:
        cur = self.current
        if cur is None:
            return
        if isinstance(cur, _MessageItem):
            self._close_part(cur, out)
        else:
            self._close_thought(cur, out)
        self._done(cur, out)
        self.current = None

    def _close_calls(self, out: list[bytes]) -> None:
        for call in self.calls.values():
            if not call.done:
                out.append(
                    self._event(
                        "response.function_call_arguments.done",
                        item_id=call.id,
                        output_index=call.index,
                        name=call.name,
                        arguments=call.arguments,
                    )
                )
                self._done(call, out)

    def _part_event(self, kind: str, item: _Item, content_index: int, **fields: Any) -> bytes:
        return self._event(
            kind, item_id=item.id, output_index=item.index, content_index=content_index, **fields
        )

    # text and refusals

    def _text(self, kind: str, text: str, out: list[bytes]) -> None:
        msg = self.current
        if not isinstance(msg, _MessageItem):
            self._close_current(out)
            self._close_calls(out)
            msg = _MessageItem(self._item_id("msg"), len(self.items))
            self._add(msg, out)
            self.current = msg
        if not msg.open or msg.parts[-1][0] != kind:
            self._close_part(msg, out)
            msg.parts.append([kind, ""])
            msg.open = True
            out.append(
                self._part_event(
                    "response.content_part.added",
                    msg,
                    len(msg.parts) - 1,
                    part=_content_part(kind, ""),
                )
            )
        msg.parts[-1][1] += text
        ci = len(msg.parts) - 1
        if kind == "refusal":
            out.append(self._part_event("response.refusal.delta", msg, ci, delta=text))
        else:
            out.append(
                self._part_event("response.output_text.delta", msg, ci, delta=text, logprobs=[])
            )

    def _close_part(self, msg: _MessageItem, out: list[bytes]) -> None:
        if not msg.open:
            return
        msg.open = False
        kind, text = msg.parts[-1]
        ci = len(msg.parts) - 1
        if kind == "refusal":
            out.append(self._part_event("response.refusal.done", msg, ci, refusal=text))
        else:
            out.append(
                self._part_event("response.output_text.done", msg, ci, text=text, logprobs=[])
            )
        part = _content_part(kind, text)
        out.append(self._part_event("response.content_part.done", msg, ci, part=part))

    # reasoning

    def _thinking(self, out: list[bytes]) -> _ReasoningItem:
        item = self.current
        if not isinstance(item, _ReasoningItem):
            self._close_current(out)
            self._close_calls(out)
            item = _ReasoningItem(self._item_id("rs"), len(self.items), self.encrypted)
            self._add(item, out)
            self.current = item
        return item

    def _reasoning(self, text: str, out: list[bytes]) -> None:
        item = self._thinking(out)
        if not item.open:
            item.blocks.append({"type": "thinking", "thinking": "", "signature": ""})
            item.open = True
            ci = len(item.texts()) - 1
            part = {"type": "reasoning_text", "text": ""}
            out.append(self._part_event("response.content_part.added", item, ci, part=part))
        item.blocks[-1]["thinking"] += text
        ci = len(item.texts()) - 1
        out.append(self._part_event("response.reasoning_text.delta", item, ci, delta=text))

    def _sign(self, signature: str, out: list[bytes]) -> None:
        item = self._thinking(out)
        if not item.open:  # a signed block without text
            self._reasoning("", out)
        item.blocks[-1]["signature"] = signature
        self._close_thought(item, out)

    def _redacted(self, data: str, out: list[bytes]) -> None:
        item = self._thinking(out)
        self._close_thought(item, out)
        item.blocks.append({"type": "redacted_thinking", "data": data})

    def _close_thought(self, item: _ReasoningItem, out: list[bytes]) -> None:
        if not item.open:
            return
        item.open = False
        ci = len(item.texts()) - 1
        text = item.blocks[-1]["thinking"]
        out.append(self._part_event("response.reasoning_text.done", item, ci, text=text))
        part = {"type": "reasoning_text", "text": text}
        out.append(self._part_event("response.content_part.done", item, ci, part=part))

    # function calls

    def _call(self, frag: dict[str, Any], out: list[bytes]) -> None:
        index = frag.get("index", 0)
        index = index if isinstance(index, int) else 0
        fn = frag.get("function") or {}
        call = self.calls.get(index)
        if call is None:
            self._close_current(out)
            n = len(self.items)
            call_id = frag.get("id") or f"call_{self.rid}{n:04x}"
            call = _CallItem(self._item_id("fc"), n, str(call_id), str(fn.get("name") or ""))
            self.calls[index] = call
            self._add(call, out)
        elif call.done:
            return  # a fragment after the call was closed: nothing can carry it any more
        elif fn.get("name") and not call.name:
            call.name = str(fn["name"])
        args = fn.get("arguments")
        if isinstance(args, str) and args:
            call.arguments += args
            out.append(
                self._event(
                    "response.function_call_arguments.delta",
                    item_id=call.id,
                    output_index=call.index,
                    delta=args,
                )
            )
