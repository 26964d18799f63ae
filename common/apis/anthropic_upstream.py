"""Chat body -> Anthropic Messages request: the request side of the `anthropic` engine.

The wire of the `anthropic` worker engine (worker/engines/anthropic.py does the HTTP). Pure:
no I/O, so the engine and its unit tests share it. Errors in the request are
`InvalidRequest` (400) naming the parameter. The reply side (the upstream's stream events
-> chat deltas) is `anthropic_events.py`.

The request (`chat_to_messages`), field by field:

    system / developer messages  top-level `system`: one text block each, in order, wherever
                                 they stand in the conversation (Messages has no system turn);
                                 `cache_control` kept
    user messages                user turns: text; image_url (data: URL -> base64 source,
                                 http(s) -> url source); file (PDF or text data: URL ->
                                 document); Anthropic-native image/document blocks as they are
    assistant messages           assistant turns: `thinking_blocks` first (thinking with its
                                 signature, redacted_thinking), then text (refusal parts as
                                 text), then one tool_use per tool call, `input` parsed from
                                 the arguments JSON. Thinking without a signature
                                 (`reasoning_content` alone) is dropped: Messages refuses an
                                 unsigned block, and ignores earlier turns' thinking anyway
    tool messages                tool_result blocks (`tool_use_id`, `is_error`), consecutive
                                 ones in one user turn, ahead of any text in that turn
    role function (legacy)       400
    turn shape                   consecutive turns of one role are merged; empty text is
                                 dropped; a final assistant turn (a prefill) loses trailing
                                 whitespace (Messages refuses it); a message-level
                                 `cache_control` goes on the message's last block
    tools                        {name, description, input_schema, cache_control}; a
                                 non-function tool: 400
    tool_choice                  auto / required / none / {function: name} -> auto / any /
                                 none / {tool, name}; dropped without tools;
                                 parallel_tool_calls false -> disable_parallel_tool_use
    stop                         stop_sequences
    max_completion_tokens,       max_tokens, which Messages requires: `default_max_tokens`
    max_tokens                   when the body has none (plus the thinking budget when
                                 thinking is on, which must fit inside it); 0: 400
    temperature                  clamped to Anthropic's 0..1: above 1 becomes 1, no rescaling
                                 (0.7 means the same on both APIs)
    top_p, top_k, thinking       as they are
    user                         metadata.user_id
    response_format              json_schema / json_object: a forced tool `JSON_TOOL` whose
                                 input schema is the response's; the reader turns its input
                                 into the answer's content (finish_reason "stop"). With
                                 tools of the request's own, or with thinking (Messages
                                 refuses a forced tool then): 400. text: nothing
    n > 1, logprobs              400 (Messages makes one choice, without logprobs)
    seed, penalties, logit_bias  dropped: no equivalent
    stream                       not set here: the engine always streams
"""

from __future__ import annotations

import base64
import binascii
import re
from typing import Any

import msgspec

from common.errors import InvalidRequest

DEFAULT_MAX_TOKENS = 4096
JSON_TOOL = "json_response"
"""The tool a `response_format` of JSON becomes: the model must call it, its input is the
answer."""

COUNT_TOKENS_FIELDS = ("model", "messages", "system", "tools", "tool_choice", "thinking")
"""What `POST /v1/messages/count_tokens` accepts (it refuses generation parameters)."""

_DATA_URL = re.compile(r"data:([^;,]+)((?:;[^;,=]+=[^;,]+)*);base64,(.*)", re.DOTALL)


def _bad(message: str, param: str) -> InvalidRequest:
    return InvalidRequest(message, param=param)


# ---- request --------------------------------------------------------------------------------


def chat_to_messages(
    chat: dict[str, Any], model: str, *, default_max_tokens: int = DEFAULT_MAX_TOKENS
) -> dict[str, Any]:
    """The Messages request for a chat body (the wire's shape), for upstream `model`.

    Raises InvalidRequest for what Messages cannot express (see the module docstring).
    """
    if _int(chat.get("n"), 1) > 1:
        raise _bad("The anthropic engine makes one choice per request: n must be 1.", "n")
    if chat.get("logprobs"):
        raise _bad("The anthropic engine cannot return logprobs.", "logprobs")
    system, turns = _conversation(chat.get("messages"))
    body: dict[str, Any] = {"model": model, "messages": turns}
    if system:
        body["system"] = system
    thinking = chat.get("thinking")
    body["max_tokens"] = _max_tokens(chat, thinking, default_max_tokens)
    if chat.get("stop") is not None:
        stops = _stop_sequences(chat["stop"])
        if stops:
            body["stop_sequences"] = stops
    temperature = chat.get("temperature")
    if isinstance(temperature, int | float) and not isinstance(temperature, bool):
        body["temperature"] = min(float(temperature), 1.0)
    for name in ("top_p", "top_k"):
        if chat.get(name) is not None:
            body[name] = chat[name]
    if thinking is not None:
        body["thinking"] = thinking
    if isinstance(chat.get("user"), str) and chat["user"]:
        body["metadata"] = {"user_id": chat["user"]}
    _tools(chat, body)
    return body


def count_tokens_body(messages_body: dict[str, Any]) -> dict[str, Any]:
    """The part of a Messages request that `count_tokens` takes."""
    return {k: messages_body[k] for k in COUNT_TOKENS_FIELDS if k in messages_body}


def wants_json_output(chat: dict[str, Any]) -> bool:
    """Whether `chat_to_messages` turned the body's `response_format` into `JSON_TOOL`."""
    rf = chat.get("response_format")
    return isinstance(rf, dict) and rf.get("type") in ("json_schema", "json_object")


def _int(value: object, default: int) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else default


def _max_tokens(chat: dict[str, Any], thinking: object, default: int) -> int:
    limit = chat.get("max_completion_tokens")
    if limit is None:
        limit = chat.get("max_tokens")
    if limit is None:
        budget = 0
        if isinstance(thinking, dict) and thinking.get("type") == "enabled":
            budget = _int(thinking.get("budget_tokens"), 0)
        return default + max(0, budget)
    if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
        param = "max_completion_tokens" if "max_completion_tokens" in chat else "max_tokens"
        raise _bad("The anthropic engine needs a max tokens of at least 1.", param)
    return limit


def _stop_sequences(stop: object) -> list[str]:
    if isinstance(stop, str):
        return [stop] if stop else []
    if isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        return [s for s in stop if s]
    raise _bad("stop must be a string or a list of strings.", "stop")


def _tools(chat: dict[str, Any], body: dict[str, Any]) -> None:
    """`tools` and `tool_choice` (and `response_format`, which becomes a forced tool)."""
    raw_tools = chat.get("tools") or []
    if not isinstance(raw_tools, list):
        raise _bad("tools must be a list.", "tools")
    tools = [_tool(t, i) for i, t in enumerate(raw_tools)]
    if wants_json_output(chat):
        if tools:
            raise _bad(
                "The anthropic engine serves response_format JSON with a forced tool, so a "
                "request cannot also carry tools.",
                "response_format",
            )
        thinking = chat.get("thinking")
        if isinstance(thinking, dict) and thinking.get("type") == "enabled":
            raise _bad(
                "The anthropic engine cannot combine response_format JSON with thinking.",
                "response_format",
            )
        body["tools"] = [_json_tool(chat["response_format"])]
        body["tool_choice"] = {"type": "tool", "name": JSON_TOOL}
        return
    if not tools:
        return
    body["tools"] = tools
    choice = _tool_choice(chat.get("tool_choice"))
    if chat.get("parallel_tool_calls") is False:
        choice = choice or {"type": "auto"}
        if choice["type"] != "none":
            choice["disable_parallel_tool_use"] = True
    if choice is not None:
        body["tool_choice"] = choice


def _tool(t: object, i: int) -> dict[str, Any]:
    param = f"tools[{i}]"
    if not isinstance(t, dict) or t.get("type", "function") != "function":
        raise _bad("The anthropic engine serves function tools only.", param)
    fn = t.get("function")
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
        raise _bad("A function tool needs a name.", f"{param}.function.name")
    schema = fn.get("parameters")
    if schema is None:
        schema = {"type": "object", "properties": {}}
    if not isinstance(schema, dict):
        raise _bad("Function parameters must be a JSON Schema object.", f"{param}.function")
    if "type" not in schema:
        schema = {"type": "object", **schema}
    out: dict[str, Any] = {"name": fn["name"], "input_schema": schema}
    if isinstance(fn.get("description"), str) and fn["description"]:
        out["description"] = fn["description"]
    if t.get("cache_control") is not None:
        out["cache_control"] = t["cache_control"]
    return out


def _json_tool(rf: dict[str, Any]) -> dict[str, Any]:
    schema: object = {"type": "object"}
    description = "Reply with the answer as this tool's input."
    if rf.get("type") == "json_schema":
        js = rf.get("json_schema")
        if not isinstance(js, dict) or not isinstance(js.get("schema", {}), dict):
            raise _bad("json_schema needs a schema object.", "response_format.json_schema")
        schema = js.get("schema") or {"type": "object"}
        if isinstance(js.get("description"), str) and js["description"]:
            description = js["description"]
    if not isinstance(schema, dict) or schema.get("type", "object") != "object":
        raise _bad(
            "The anthropic engine needs an object at the root of the JSON schema.",
            "response_format.json_schema.schema",
        )
    return {"name": JSON_TOOL, "description": description, "input_schema": schema}


_CHOICES = {"auto": "auto", "required": "any", "none": "none"}


def _tool_choice(choice: object) -> dict[str, Any] | None:
    if choice is None:
        return None
    if isinstance(choice, str) and choice in _CHOICES:
        return {"type": _CHOICES[choice]}
    if isinstance(choice, dict):
        fn = choice.get("function")
        name = fn.get("name") if isinstance(fn, dict) else None
        if choice.get("type") == "function" and isinstance(name, str) and name:
            return {"type": "tool", "name": name}
        if choice.get("type") in ("auto", "any", "none", "tool"):  # Anthropic's own
            return dict(choice)
    raise _bad("tool_choice must be auto, required, none or a named function.", "tool_choice")


# ---- the conversation -----------------------------------------------------------------------


def _conversation(messages: object) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(system blocks, turns) of the chat messages."""
    if not isinstance(messages, list) or not messages:
        raise _bad("messages must be a non-empty list.", "messages")
    system: list[dict[str, Any]] = []
    turns: list[dict[str, Any]] = []
    for i, m in enumerate(messages):
        param = f"messages[{i}]"
        if not isinstance(m, dict):
            raise _bad("A message must be an object.", param)
        role = m.get("role")
        match role:
            case "system" | "developer":
                system.extend(_with_message_cache(m, _text_blocks(m.get("content"), param)))
            case "user":
                _append(turns, "user", _with_message_cache(m, _user_blocks(m, param)))
            case "assistant":
                _append(turns, "assistant", _with_message_cache(m, _assistant_blocks(m, param)))
            case "tool":
                _append(turns, "user", [_tool_result(m, param)])
            case "function":
                raise _bad(
                    "The anthropic engine does not take function messages; use tools.",
                    f"{param}.role",
                )
            case _:
                raise _bad(f"Unknown role {role!r}.", f"{param}.role")
    for turn in turns:
        first = ("tool_result",) if turn["role"] == "user" else ("thinking", "redacted_thinking")
        # stable: the named blocks first, everything else in its order
        turn["content"].sort(key=lambda b: b.get("type") not in first)
    _trim_prefill(turns)
    return system, turns


def _append(turns: list[dict[str, Any]], role: str, blocks: list[dict[str, Any]]) -> None:
    if not blocks:
        return
    if turns and turns[-1]["role"] == role:
        turns[-1]["content"].extend(blocks)
    else:
        turns.append({"role": role, "content": blocks})


def _trim_prefill(turns: list[dict[str, Any]]) -> None:
    if not turns or turns[-1]["role"] != "assistant":
        return
    blocks = turns[-1]["content"]
    if blocks and blocks[-1].get("type") == "text":
        text = blocks[-1]["text"].rstrip()
        if text:
            blocks[-1] = {**blocks[-1], "text": text}
        else:
            blocks.pop()
    if not blocks:
        turns.pop()


def _with_message_cache(m: dict[str, Any], blocks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A message-level `cache_control` (LiteLLM's shorthand) on the message's last block."""
    cc = m.get("cache_control")
    if cc is not None and blocks and "cache_control" not in blocks[-1]:
        blocks[-1] = {**blocks[-1], "cache_control": cc}
    return blocks


def _text_block(text: str, part: dict[str, Any] | None = None) -> dict[str, Any]:
    block: dict[str, Any] = {"type": "text", "text": text}
    if part is not None and part.get("cache_control") is not None:
        block["cache_control"] = part["cache_control"]
    return block


def _text_blocks(content: object, param: str) -> list[dict[str, Any]]:
    """Text content (a string or text parts) as text blocks, empty ones left out."""
    if content is None:
        return []
    if isinstance(content, str):
        return [_text_block(content)] if content else []
    if not isinstance(content, list):
        raise _bad("content must be a string or a list of parts.", f"{param}.content")
    out = []
    for j, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") not in ("text", "refusal"):
            raise _bad("Only text parts are allowed here.", f"{param}.content[{j}]")
        text = part.get("text") if part["type"] == "text" else part.get("refusal")
        if not isinstance(text, str):
            raise _bad("A text part needs its text.", f"{param}.content[{j}]")
        if text:
            out.append(_text_block(text, part))
    return out


def _user_blocks(m: dict[str, Any], param: str) -> list[dict[str, Any]]:
    content = m.get("content")
    if not isinstance(content, list):
        return _text_blocks(content, param)
    out = []
    for j, part in enumerate(content):
        p = f"{param}.content[{j}]"
        if not isinstance(part, dict):
            raise _bad("A content part must be an object.", p)
        match part.get("type"):
            case "text":
                out.extend(_text_blocks([part], param))
            case "image_url":
                out.append(_image(part, p))
            case "file":
                out.append(_document(part, p))
            case "image" | "document" if isinstance(part.get("source"), dict):
                out.append(part)  # already an Anthropic block
            case other:
                raise _bad(f"The anthropic engine cannot send {other!r} parts.", f"{p}.type")
    return out


def _cached(block: dict[str, Any], part: dict[str, Any]) -> dict[str, Any]:
    if part.get("cache_control") is not None:
        block["cache_control"] = part["cache_control"]
    return block


def _image(part: dict[str, Any], param: str) -> dict[str, Any]:
    ref = part.get("image_url")
    url = ref.get("url") if isinstance(ref, dict) else ref
    if not isinstance(url, str):
        raise _bad("An image_url part needs a url.", f"{param}.image_url")
    if url.startswith("data:"):
        media_type, data = _data_url(url, f"{param}.image_url.url")
        source = {"type": "base64", "media_type": media_type, "data": data}
    elif url.startswith(("https://", "http://")):
        source = {"type": "url", "url": url}
    else:
        raise _bad("An image url must be a data: or http(s) URL.", f"{param}.image_url.url")
    return _cached({"type": "image", "source": source}, part)


def _document(part: dict[str, Any], param: str) -> dict[str, Any]:
    f = part.get("file")
    data_url = f.get("file_data") if isinstance(f, dict) else None
    if not isinstance(data_url, str):
        raise _bad("The anthropic engine takes files as file_data (data: URLs).", f"{param}.file")
    media_type, data = _data_url(data_url, f"{param}.file.file_data")
    if media_type == "application/pdf":
        source = {"type": "base64", "media_type": media_type, "data": data}
    elif media_type == "text/plain":
        try:
            text = base64.b64decode(data, validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError) as exc:
            raise _bad("The file is not base64 UTF-8 text.", f"{param}.file.file_data") from exc
        source = {"type": "text", "media_type": media_type, "data": text}
    else:
        raise _bad(
            f"The anthropic engine takes PDF and text files, not {media_type}.",
            f"{param}.file.file_data",
        )
    block: dict[str, Any] = {"type": "document", "source": source}
    if isinstance(f, dict) and isinstance(f.get("filename"), str) and f["filename"]:
        block["title"] = f["filename"]
    return _cached(block, part)


def _data_url(url: str, param: str) -> tuple[str, str]:
    """(media type, base64 data) of a base64 data: URL."""
    match = _DATA_URL.fullmatch(url)
    if match is None:
        raise _bad("A data: URL must be base64 (data:<type>;base64,...).", param)
    return match.group(1), match.group(3)


def _assistant_blocks(m: dict[str, Any], param: str) -> list[dict[str, Any]]:
    blocks = _thinking_blocks(m.get("thinking_blocks"), param)
    blocks.extend(_text_blocks(m.get("content"), param))
    calls = m.get("tool_calls") or []
    if not isinstance(calls, list):
        raise _bad("tool_calls must be a list.", f"{param}.tool_calls")
    blocks.extend(_tool_use(tc, f"{param}.tool_calls[{k}]") for k, tc in enumerate(calls))
    return blocks


def _thinking_blocks(raw: object, param: str) -> list[dict[str, Any]]:
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise _bad("thinking_blocks must be a list.", f"{param}.thinking_blocks")
    out: list[dict[str, Any]] = []
    for j, b in enumerate(raw):
        p = f"{param}.thinking_blocks[{j}]"
        kind = b.get("type") if isinstance(b, dict) else None
        if kind == "thinking" and isinstance(b, dict):
            thinking, signature = b.get("thinking"), b.get("signature")
            if isinstance(thinking, str) and isinstance(signature, str) and signature:
                out.append({"type": "thinking", "thinking": thinking, "signature": signature})
        elif kind == "redacted_thinking" and isinstance(b, dict):
            if not isinstance(b.get("data"), str):
                raise _bad("A redacted_thinking block needs its data.", p)
            out.append({"type": "redacted_thinking", "data": b["data"]})
        else:
            raise _bad("A thinking block is thinking or redacted_thinking.", p)
    return out


def _tool_use(tc: object, param: str) -> dict[str, Any]:
    fn = tc.get("function") if isinstance(tc, dict) else None
    if not isinstance(tc, dict) or not isinstance(fn, dict):
        raise _bad("A tool call needs a function.", param)
    if not isinstance(tc.get("id"), str) or not tc["id"]:
        raise _bad("A tool call needs an id.", f"{param}.id")
    if not isinstance(fn.get("name"), str) or not fn["name"]:
        raise _bad("A tool call needs a function name.", f"{param}.function.name")
    args = fn.get("arguments") or "{}"
    try:
        parsed = msgspec.json.decode(args) if isinstance(args, str) else args
    except msgspec.DecodeError as exc:
        raise _bad("Tool call arguments are not JSON.", f"{param}.function.arguments") from exc
    if not isinstance(parsed, dict):
        raise _bad("Tool call arguments must be a JSON object.", f"{param}.function.arguments")
    return {"type": "tool_use", "id": tc["id"], "name": fn["name"], "input": parsed}


def _tool_result(m: dict[str, Any], param: str) -> dict[str, Any]:
    if not isinstance(m.get("tool_call_id"), str) or not m["tool_call_id"]:
        raise _bad("A tool message needs its tool_call_id.", f"{param}.tool_call_id")
    content = m.get("content")
    if isinstance(content, list):
        blocks = []
        for j, part in enumerate(content):
            p = f"{param}.content[{j}]"
            if isinstance(part, dict) and part.get("type") == "image_url":
                blocks.append(_image(part, p))
            else:
                blocks.extend(_text_blocks([part], param))
    else:
        blocks = _text_blocks(content, param)
    block: dict[str, Any] = {"type": "tool_result", "tool_use_id": m["tool_call_id"]}
    if blocks:
        block["content"] = blocks
    if m.get("is_error") is True:
        block["is_error"] = True
    return _with_message_cache(m, [block])[0]
