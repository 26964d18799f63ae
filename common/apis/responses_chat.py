"""OpenAI Responses request (+ stored history) -> the fleet's one request shape, the OpenAI
chat body. Pure: no I/O.

Items become chat messages this way: user/system/developer messages keep their role
(developer becomes system: chat templates rarely know it); consecutive assistant items
(reasoning, message, function calls) form one assistant message, reasoning first
(`reasoning_content` and `thinking_blocks`, common/apis/design.md), text as `content`
(refusal text too), calls as `tool_calls`; a `function_call_output` is a `tool` message.
`instructions` is the first system message, from this request only (never inherited
from the responses it continues, as OpenAI documents).

A reasoning item's `encrypted_content` (responses_reasoning.py) that does not decode is
dropped; without it, an item's `content` texts are sent back as unsigned
`reasoning_content`, and a summary-only item is dropped.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from common.apis.responses import ResponsesRequest
from common.apis.responses_reasoning import decode_reasoning
from common.errors import InvalidRequest

# ---- items -> chat messages -----------------------------------------------------------------


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
