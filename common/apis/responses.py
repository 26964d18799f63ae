"""OpenAI Responses: the request, decoded and validated once at the boundary. Pure: no I/O.

The gateway serves `POST /v1/responses` (gateway/front_responses.py) with four modules:

    responses.py            this one: `ResponsesRequest` (`decode_request`) and
                            `normalize_input`, its `input` as items with ids: what
                            `input_items` lists and a stored response keeps
                            (gateway/responses_store.py)
    responses_chat.py       `responses_to_chat`: instructions + the stored history's items
                            + the input items -> one chat body (a dict; gateway.validate
                            checks it)
    responses_stream.py     `ResponseStream`: chat deltas -> Responses SSE events, and the
                            final `response` object (streaming or not: one state machine);
                            `response_shell`, the request's settings it echoes
    responses_reasoning.py  a reasoning item's `encrypted_content`: the thinking blocks
                            (text + signature, or redacted data) a client sends back

Imports run one way: responses_chat and responses_stream build on this module and on
responses_reasoning; neither imports the other.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

from common.errors import InvalidRequest
from common.openai_types import Temperature, TopP, decode_error_message

ENCRYPTED_INCLUDE = "reasoning.encrypted_content"
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
