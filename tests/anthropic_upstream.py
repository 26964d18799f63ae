"""A fake Anthropic Messages API for tests (raw ASGI on uvicorn), from the public reference.

    python -m tests.anthropic_upstream --port 8001 [--api-key KEY] [--tokens 8]
                                        [--ttft-ms 5 --itl-ms 1]

Endpoints: GET /v1/models, POST /v1/messages (an SSE stream exactly like Anthropic's:
message_start, content_block_start, ping, deltas, content_block_stop, message_delta,
message_stop, each with its `event:` line; or a JSON Message), POST
/v1/messages/count_tokens (`{"input_tokens": N}`), and GET /stats (what it was sent).

It checks what it receives the way the API does, and answers a bad request with 400 and
Anthropic's envelope `{"type": "error", "error": {"type": "invalid_request_error", ...}}`:
    headers   x-api-key (401 authentication_error when --api-key is set and it differs),
              anthropic-version (required), content-type application/json
    body      only the API's top-level fields; model; max_tokens >= 1 (messages only);
              temperature and top_p in 0..1, top_k >= 0; stop_sequences non-empty strings;
              metadata has only user_id; thinking {enabled, budget_tokens >= 1024 and below
              max_tokens} or {disabled}; at most 4 cache_control breakpoints, each ephemeral
    system    a string or text blocks, never a role inside messages
    messages  roles user/assistant strictly alternating, starting with user; content a
              non-empty string or known blocks (text non-empty; image/document sources;
              thinking with a signature this server issued, redacted_thinking; tool_use with
              an object input; tool_result first in its user turn); every tool_result
              answers a tool_use of the turn before, every tool_use (but in the last turn)
              is answered in the next; a final assistant turn has no trailing whitespace
    tools     {name, input_schema of type object, description?, cache_control?};
              tool_choice auto/any/tool(name of a tool)/none, only with tools;
              disable_parallel_tool_use a bool, not on none

Answers are deterministic. Text is "tok0 tok1 ..." (one word per delta) up to max_tokens
(stop_reason max_tokens) or `--tokens` words (end_turn), cut before the first stop
sequence it would contain (stop_sequence). With thinking enabled a thinking block comes
first ("Let me think.", signed). With tools and tool_choice any or tool (or auto, when the
last user text asks to "call a tool", after a short text block), the answer is tool_use
blocks whose input comes from each tool's input_schema, streamed as several
input_json_delta pieces: the named tool, else the first (and the second too, with two
tools and parallel use allowed). Tokens: output is one per delta; input counts the words
of texts plus a few per tool and block (count_tokens gives the same total). Prompt
caching: the prefix up to the last cache_control (tools, then system, then messages) is
written on first sight (cache_creation_input_tokens) and read afterwards
(cache_read_input_tokens); input_tokens is the rest.

Test hooks, by the request's `model`:
    error-400              400 invalid_request_error (its message echoes the x-api-key)
    error-401              401 authentication_error (echoing the key too)
    error-429              429 rate_limit_error with retry-after: 7
    error-529              529 overloaded_error (no retry-after)
    error-500              500 api_error
    error-midstream        2 text deltas, then an `error` event (api_error, echoing the key)
    overloaded-midstream   message_start and ping, then an `error` event overloaded_error
    truncated              2 text deltas, then the body ends (no message_delta)
    json-body              a JSON Message even when asked to stream

/stats: {"requests", "count_tokens", "open_streams", "aborted", "bodies" (the last 20
POST bodies), "keys" and "versions" (the last 20 x-api-key / anthropic-version headers),
"usages" (the last 20 usages answered), "rejected" (the last 20 messages of failed checks)}.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import signal
import subprocess
import sys
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec
import uvicorn

from llmfleet.broker import free_port, wait_for_port
from tests.upstream_server import _QuietServer, stream_sse

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

MESSAGES_FIELDS = {
    "model", "messages", "max_tokens", "system", "stop_sequences", "stream", "temperature",
    "top_p", "top_k", "metadata", "tools", "tool_choice", "thinking", "service_tier",
}  # fmt: skip
COUNT_FIELDS = {"model", "messages", "system", "tools", "tool_choice", "thinking"}
USER_BLOCKS = {"text", "image", "document", "tool_result"}
ASSISTANT_BLOCKS = {"text", "thinking", "redacted_thinking", "tool_use"}
IMAGE_TYPES = {"image/jpeg", "image/png", "image/gif", "image/webp"}
KEEP = 20


class ServerSettings(msgspec.Struct, frozen=True):
    ttft_ms: float = 5.0
    itl_ms: float = 1.0
    tokens: int = 8
    api_key: str | None = None


class Stats(msgspec.Struct):
    requests: int = 0
    count_tokens: int = 0
    open_streams: int = 0
    aborted: int = 0
    bodies: list[dict[str, Any]] = msgspec.field(default_factory=list)
    keys: list[str] = msgspec.field(default_factory=list)
    versions: list[str] = msgspec.field(default_factory=list)
    usages: list[dict[str, int]] = msgspec.field(default_factory=list)
    rejected: list[str] = msgspec.field(default_factory=list)


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        type: str,
        message: str,
        headers: list[tuple[bytes, bytes]] | None = None,
        *,
        simulated: bool = False,
    ) -> None:
        super().__init__(message)
        self.simulated = simulated  # a test hook's, not a check's (not in `rejected`)
        self.status = status
        self.body = {"type": "error", "error": {"type": type, "message": message}}
        self.headers = headers or []


def bad(message: str) -> ApiError:
    return ApiError(400, "invalid_request_error", message)


def _keep(items: list[Any], item: Any) -> None:
    items.append(item)
    del items[:-KEEP]


def signature_of(thinking: str) -> str:
    """The signature this server gives a thinking text (and checks when it comes back)."""
    return "sig-" + hashlib.sha256(thinking.encode()).hexdigest()[:24]


def sse(event: dict[str, Any]) -> bytes:
    return f"event: {event['type']}\ndata: {json.dumps(event)}\n\n".encode()


def words(text: str) -> int:
    return len(text.split())


# ---- request checks ---------------------------------------------------------------------


def _check_cache_control(block: dict[str, Any], where: str, count: list[int]) -> None:
    cc = block.get("cache_control")
    if cc is None:
        return
    if not isinstance(cc, dict) or cc.get("type") != "ephemeral":
        raise bad(f"{where}.cache_control: type must be 'ephemeral'")
    count[0] += 1


def _check_text(block: dict[str, Any], where: str) -> None:
    if not isinstance(block.get("text"), str) or not block["text"]:
        raise bad(f"{where}: text content blocks must be non-empty")


def _check_source(block: dict[str, Any], where: str) -> None:
    src = block.get("source")
    if not isinstance(src, dict):
        raise bad(f"{where}.source: Field required")
    kind = src.get("type")
    if block["type"] == "image":
        ok = (kind == "base64" and src.get("media_type") in IMAGE_TYPES and src.get("data")) or (
            kind == "url" and str(src.get("url", "")).startswith(("http://", "https://"))
        )
    else:
        ok = (
            (kind == "base64" and src.get("media_type") == "application/pdf" and src.get("data"))
            or (kind == "text" and src.get("media_type") == "text/plain")
            or (kind == "url" and isinstance(src.get("url"), str))
        )
    if not ok:
        raise bad(f"{where}.source: invalid {block['type']} source")


def _check_block(block: object, role: str, where: str, count: list[int]) -> None:
    if not isinstance(block, dict):
        raise bad(f"{where}: Input should be an object")
    kind = block.get("type")
    allowed = USER_BLOCKS if role == "user" else ASSISTANT_BLOCKS
    if kind not in allowed:
        raise bad(f"{where}.type: {kind!r} blocks are not allowed in {role} messages")
    _check_cache_control(block, where, count)
    match kind:
        case "text":
            _check_text(block, where)
        case "image" | "document":
            _check_source(block, where)
        case "thinking":
            thinking, sig = block.get("thinking"), block.get("signature")
            if not isinstance(thinking, str) or not isinstance(sig, str):
                raise bad(f"{where}.signature: Field required")
            if sig != signature_of(thinking):
                raise bad(f"{where}: Invalid `signature` in `thinking` block")
        case "redacted_thinking":
            if not isinstance(block.get("data"), str):
                raise bad(f"{where}.data: Field required")
        case "tool_use":
            if not isinstance(block.get("id"), str) or not isinstance(block.get("name"), str):
                raise bad(f"{where}: tool_use needs id and name")
            if not isinstance(block.get("input"), dict):
                raise bad(f"{where}.input: Input should be a valid dictionary")
        case "tool_result":
            if not isinstance(block.get("tool_use_id"), str):
                raise bad(f"{where}.tool_use_id: Field required")
            content = block.get("content", "")
            if isinstance(content, list):
                for j, inner in enumerate(content):
                    if not isinstance(inner, dict) or inner.get("type") not in ("text", "image"):
                        raise bad(f"{where}.content.{j}: text or image blocks only")
                    if inner["type"] == "text":
                        _check_text(inner, f"{where}.content.{j}")
                    else:
                        _check_source(inner, f"{where}.content.{j}")
                    _check_cache_control(inner, f"{where}.content.{j}", count)
            elif not isinstance(content, str):
                raise bad(f"{where}.content: a string or a list of blocks")
            if "is_error" in block and not isinstance(block["is_error"], bool):
                raise bad(f"{where}.is_error: Input should be a valid boolean")


def _blocks(content: object, where: str) -> list[dict[str, Any]]:
    if isinstance(content, str):
        if not content:
            raise bad(f"{where}: messages must have non-empty content")
        return [{"type": "text", "text": content}]
    if not isinstance(content, list) or not content:
        raise bad(f"{where}: messages must have non-empty content")
    return content


def check_messages(messages: object, count: list[int]) -> list[list[dict[str, Any]]]:
    """The checked turns' blocks (see the module docstring); raises ApiError."""
    if not isinstance(messages, list) or not messages:
        raise bad("messages: at least one message is required")
    turns: list[list[dict[str, Any]]] = []
    for i, m in enumerate(messages):
        where = f"messages.{i}"
        if not isinstance(m, dict) or set(m) - {"role", "content"}:
            raise bad(f"{where}: a message has only role and content")
        role = m.get("role")
        if role == "system":
            raise bad(
                f'{where}.role: Unexpected role "system". The Messages API accepts a '
                'top-level `system` parameter, not "system" as an input message role.'
            )
        if role not in ("user", "assistant"):
            raise bad(f"{where}.role: Input should be 'user' or 'assistant'")
        want = "user" if i % 2 == 0 else "assistant"
        if role != want:
            raise bad(f"{where}: roles must alternate between user and assistant, from user")
        blocks = _blocks(m.get("content"), f"{where}.content")
        for j, block in enumerate(blocks):
            _check_block(block, role, f"{where}.content.{j}", count)
        turns.append(blocks)
    for i, blocks in enumerate(turns):
        kinds = [b["type"] for b in blocks]
        if "tool_result" in kinds and kinds[: kinds.count("tool_result")] != ["tool_result"] * (
            kinds.count("tool_result")
        ):
            raise bad(f"messages.{i}: tool_result blocks must come first in the content")
        if i % 2 == 0:  # a user turn: its results answer the turn before
            previous = turns[i - 1] if i else []
            asked = {b["id"] for b in previous if b["type"] == "tool_use"}
            answered = {b["tool_use_id"] for b in blocks if b["type"] == "tool_result"}
            if answered - asked:
                raise bad(
                    f"messages.{i}.content: unexpected `tool_use_id` found in `tool_result` "
                    f"blocks: {sorted(answered - asked)}. Each `tool_result` block must have "
                    "a corresponding `tool_use` block in the previous message."
                )
            if asked - answered:
                raise bad(
                    f"messages.{i - 1}: `tool_use` ids were found without `tool_result` blocks "
                    f"immediately after: {sorted(asked - answered)}"
                )
    last = messages[-1]
    if last["role"] == "assistant":
        tail = turns[-1][-1]
        if tail["type"] == "text" and tail["text"] != tail["text"].rstrip():
            raise bad("final assistant content cannot end with trailing whitespace")
    return turns


def check_system(system: object, count: list[int]) -> list[dict[str, Any]]:
    if system is None:
        return []
    if isinstance(system, str):
        return [{"type": "text", "text": system}] if system else []
    if not isinstance(system, list):
        raise bad("system: a string or a list of text blocks")
    for j, block in enumerate(system):
        if not isinstance(block, dict) or block.get("type") != "text":
            raise bad(f"system.{j}: text blocks only")
        _check_text(block, f"system.{j}")
        _check_cache_control(block, f"system.{j}", count)
    return system


def check_tools(body: dict[str, Any], count: list[int]) -> list[dict[str, Any]]:
    tools = body.get("tools") or []
    if not isinstance(tools, list):
        raise bad("tools: Input should be a valid list")
    names = []
    for j, t in enumerate(tools):
        where = f"tools.{j}"
        if not isinstance(t, dict) or set(t) - {"name", "description", "input_schema",
                                                  "cache_control", "type"}:  # fmt: skip
            raise bad(f"{where}: Extra inputs are not permitted")
        if not isinstance(t.get("name"), str) or not t["name"]:
            raise bad(f"{where}.name: Field required")
        schema = t.get("input_schema")
        if not isinstance(schema, dict) or schema.get("type") != "object":
            raise bad(f"{where}.input_schema.type: Input should be 'object'")
        _check_cache_control(t, where, count)
        names.append(t["name"])
    choice = body.get("tool_choice")
    if choice is not None:
        if not tools:
            raise bad("tool_choice may only be specified while providing tools")
        kind = choice.get("type") if isinstance(choice, dict) else None
        if kind not in ("auto", "any", "tool", "none"):
            raise bad("tool_choice.type: Input should be 'auto', 'any', 'tool' or 'none'")
        if kind == "tool" and choice.get("name") not in names:
            raise bad(f"tool_choice.name: no tool named {choice.get('name')!r}")
        if "disable_parallel_tool_use" in choice and (
            kind == "none" or not isinstance(choice["disable_parallel_tool_use"], bool)
        ):
            raise bad("tool_choice.disable_parallel_tool_use: not allowed here")
    return tools


def check_body(body: dict[str, Any], *, count_only: bool) -> None:
    extra = set(body) - (COUNT_FIELDS if count_only else MESSAGES_FIELDS)
    if extra:
        raise bad(f"{sorted(extra)[0]}: Extra inputs are not permitted")
    if not isinstance(body.get("model"), str) or not body["model"]:
        raise bad("model: Field required")
    if not count_only:
        mt = body.get("max_tokens")
        if not isinstance(mt, int) or isinstance(mt, bool) or mt < 1:
            raise bad("max_tokens: Field required (an integer >= 1)")
        for name in ("temperature", "top_p"):
            v = body.get(name)
            if v is not None and not (isinstance(v, int | float) and 0 <= v <= 1):
                raise bad(f"{name}: Input should be less than or equal to 1")
        top_k = body.get("top_k")
        if top_k is not None and not (isinstance(top_k, int) and top_k >= 0):
            raise bad("top_k: Input should be greater than or equal to 0")
        stops = body.get("stop_sequences")
        if stops is not None and not (
            isinstance(stops, list) and all(isinstance(s, str) and s.strip() for s in stops)
        ):
            raise bad("stop_sequences: each must be a string with non-whitespace")
        meta = body.get("metadata")
        if meta is not None and (not isinstance(meta, dict) or set(meta) - {"user_id"}):
            raise bad("metadata: Extra inputs are not permitted")
    thinking = body.get("thinking")
    if thinking is not None:
        kind = thinking.get("type") if isinstance(thinking, dict) else None
        if kind == "enabled":
            budget = thinking.get("budget_tokens")
            if not isinstance(budget, int) or budget < 1024:
                raise bad("thinking.enabled.budget_tokens: Input should be >= 1024")
            if not count_only and budget >= body["max_tokens"]:
                raise bad("`max_tokens` must be greater than `thinking.budget_tokens`")
        elif kind != "disabled":
            raise bad("thinking.type: Input should be 'enabled' or 'disabled'")
    count = [0]
    check_tools(body, count)
    check_system(body.get("system"), count)
    check_messages(body.get("messages"), count)
    if count[0] > 4:
        raise bad("A maximum of 4 blocks with cache_control may be provided.")


# ---- tokens -------------------------------------------------------------------------------


def _block_tokens(block: dict[str, Any]) -> int:
    match block.get("type"):
        case "text":
            return words(block["text"])
        case "thinking":
            return words(block["thinking"])
        case "tool_use":
            return 3 + words(json.dumps(block["input"]))
        case "tool_result":
            content = block.get("content", "")
            if isinstance(content, str):
                return 2 + words(content)
            return 2 + sum(_block_tokens(b) for b in content)
        case _:
            return 5  # an image, a document, a redacted block


def token_units(body: dict[str, Any]) -> list[tuple[int, bool, Any]]:
    """The prompt in Anthropic's cache order (tools, system, messages): (tokens, whether it
    carries cache_control, the unit itself)."""
    units: list[tuple[int, bool, Any]] = []
    for t in body.get("tools") or []:
        units.append((5 + words(json.dumps(t.get("input_schema"))), "cache_control" in t, t))
    system = body.get("system")
    for b in [{"type": "text", "text": system}] if isinstance(system, str) else system or []:
        units.append((words(b["text"]), "cache_control" in b, b))
    for m in body["messages"]:
        units.append((1, False, m["role"]))
        content = m["content"]
        for b in [{"type": "text", "text": content}] if isinstance(content, str) else content:
            units.append((_block_tokens(b), "cache_control" in b, b))
    return units


# ---- the app ------------------------------------------------------------------------------


_SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"request-id", b"req_fake"),
]


class App:
    """The ASGI app; `stats` is live (read it directly or via GET /stats)."""

    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        self.stats = Stats()
        self._cached: set[str] = set()  # prompt-cache prefixes written so far

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        path: str = scope["path"].rstrip("/")
        method: str = scope["method"]
        try:
            if path == "/stats":
                await self._send_json(send, 200, msgspec.to_builtins(self.stats))
                return
            headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
            self._check_headers(headers, method)
            routes = {
                "/v1/models": ("GET", self._models),
                "/v1/messages": ("POST", self._messages),
                "/v1/messages/count_tokens": ("POST", self._count_tokens),
            }
            if path not in routes:
                raise ApiError(404, "not_found_error", f"Not found: {path}")
            want, handler = routes[path]
            if method != want:
                raise ApiError(405, "invalid_request_error", "Method not allowed")
            body: dict[str, Any] = {}
            if method == "POST":
                body = await self._read_body(receive)
                body["__key"] = headers.get("x-api-key", "")  # for the echoing hooks
                self._hooks(body)
            await handler(body, receive, send)
        except ApiError as exc:
            if exc.status == 400 and not exc.simulated:
                _keep(self.stats.rejected, exc.body["error"]["message"])
            await self._send_json(send, exc.status, exc.body, exc.headers)

    def _check_headers(self, headers: dict[str, str], method: str) -> None:
        key = headers.get("x-api-key")
        if method == "POST":
            self.stats.requests += 1
            _keep(self.stats.keys, key or "")
            _keep(self.stats.versions, headers.get("anthropic-version", ""))
        if self.settings.api_key is not None and key != self.settings.api_key:
            raise ApiError(401, "authentication_error", "invalid x-api-key")
        if "anthropic-version" not in headers:
            raise bad("anthropic-version: header is required")
        if method == "POST" and not headers.get("content-type", "").startswith("application/json"):
            raise bad("content-type must be application/json")

    @staticmethod
    async def _read_body(receive: Receive) -> dict[str, Any]:
        data = bytearray()
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                raise bad("client went away")
            data += msg.get("body", b"")
            if not msg.get("more_body", False):
                break
        try:
            body = json.loads(data)
        except ValueError as exc:
            raise bad(f"There was an issue with your request body: {exc}") from exc
        if not isinstance(body, dict):
            raise bad("the body must be a JSON object")
        return body

    def _hooks(self, body: dict[str, Any]) -> None:
        key = body["__key"]
        match body.get("model"):
            case "error-400":
                raise ApiError(
                    400,
                    "invalid_request_error",
                    f"simulated bad request (your x-api-key: {key})",
                    simulated=True,
                )
            case "error-401":
                raise ApiError(401, "authentication_error", f"invalid x-api-key {key}")
            case "error-429":
                raise ApiError(
                    429,
                    "rate_limit_error",
                    "Number of request tokens has exceeded your per-minute rate limit",
                    [(b"retry-after", b"7")],
                )
            case "error-529":
                raise ApiError(529, "overloaded_error", "Overloaded")
            case "error-500":
                raise ApiError(500, "api_error", "Internal server error")

    @staticmethod
    async def _send_json(
        send: Send, status: int, obj: Any, extra: list[tuple[bytes, bytes]] | None = None
    ) -> None:
        payload = json.dumps(obj).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(payload)).encode()),
            (b"request-id", b"req_fake"),
            *(extra or []),
        ]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": payload})

    # ---- endpoints ----------------------------------------------------------------------

    async def _models(self, body: Any, receive: Receive, send: Send) -> None:
        card = {"type": "model", "id": "claude-fake", "display_name": "Claude Fake"}
        await self._send_json(send, 200, {"data": [card], "has_more": False})

    async def _count_tokens(self, body: dict[str, Any], receive: Receive, send: Send) -> None:
        body.pop("__key")
        self.stats.count_tokens += 1
        _keep(self.stats.bodies, body)
        check_body(body, count_only=True)
        total = sum(n for n, _, _ in token_units(body))
        await self._send_json(send, 200, {"input_tokens": total})

    def _usage_in(self, body: dict[str, Any]) -> dict[str, int]:
        units = token_units(body)
        total = sum(n for n, _, _ in units)
        marks = [i for i, (_, cached, _) in enumerate(units) if cached]
        read = created = 0
        if marks:
            prefix = units[: marks[-1] + 1]
            size = sum(n for n, _, _ in prefix)
            key = hashlib.sha256(json.dumps([u for _, _, u in prefix]).encode()).hexdigest()
            if key in self._cached:
                read = size
            else:
                created = size
                self._cached.add(key)
        return {
            "input_tokens": total - read - created,
            "cache_creation_input_tokens": created,
            "cache_read_input_tokens": read,
        }

    async def _messages(self, body: dict[str, Any], receive: Receive, send: Send) -> None:
        key = body.pop("__key")
        _keep(self.stats.bodies, body)
        check_body(body, count_only=False)
        usage = self._usage_in(body)
        blocks, stop, stop_sequence = self._answer(body)
        model = body["model"]
        if model in ("error-midstream", "truncated"):
            blocks, stop = [("text", ["tok0", " tok1"])], "end_turn"
        output = sum(_output_tokens(kind, parts) for kind, parts in blocks)
        final_usage = {**usage, "output_tokens": output}
        if model not in ("error-midstream", "overloaded-midstream", "truncated"):
            _keep(self.stats.usages, final_usage)
        msg_id = "msg_" + hashlib.sha256(json.dumps(body).encode()).hexdigest()[:20]
        if not body.get("stream") or model == "json-body":
            await asyncio.sleep(self.settings.ttft_ms / 1000.0)
            await self._send_json(
                send,
                200,
                {
                    "id": msg_id,
                    "type": "message",
                    "role": "assistant",
                    "model": model,
                    "content": _whole_blocks(blocks),
                    "stop_reason": stop,
                    "stop_sequence": stop_sequence,
                    "usage": final_usage,
                },
            )
            return
        await self._stream(
            self._events(msg_id, model, blocks, (stop, stop_sequence), usage, output, key),
            receive,
            send,
        )

    def _answer(self, body: dict[str, Any]) -> tuple[list[tuple[str, list[Any]]], str, str | None]:
        """(blocks, stop_reason, stop_sequence). A block is (kind, pieces): text pieces,
        thinking pieces then ("signature", [sig]), or ("tool_use", [id, name, *json pieces])."""
        blocks: list[tuple[str, list[Any]]] = []
        thinking = body.get("thinking")
        if isinstance(thinking, dict) and thinking.get("type") == "enabled":
            pieces = ["Let", " me", " think."]
            blocks += [("thinking", pieces), ("signature", [signature_of("".join(pieces))])]
        tools = body.get("tools") or []
        choice = body.get("tool_choice") or {"type": "auto"}
        last = body["messages"][-1]
        last_text = (
            last["content"]
            if isinstance(last["content"], str)
            else " ".join(b.get("text", "") for b in last["content"] if isinstance(b, dict))
        )
        auto_call = choice["type"] == "auto" and "call a tool" in last_text
        if tools and (choice["type"] in ("any", "tool") or auto_call):
            if auto_call:
                blocks.append(("text", ["Let", " me", " check."]))
            if choice["type"] == "tool":
                chosen = [t for t in tools if t["name"] == choice["name"]]
            elif len(tools) > 1 and not choice.get("disable_parallel_tool_use"):
                chosen = tools[:2]
            else:
                chosen = tools[:1]
            for n, tool in enumerate(chosen):
                args = json.dumps(sample_input(tool["input_schema"]))
                pieces = ["", *[args[i : i + 6] for i in range(0, len(args), 6)]]
                call_id = f"toolu_{hashlib.sha256(args.encode()).hexdigest()[:12]}{n}"
                blocks.append(("tool_use", [call_id, tool["name"], *pieces]))
            return blocks, "tool_use", None
        limit = body["max_tokens"]
        count, stop = (
            (limit, "max_tokens")
            if limit <= self.settings.tokens
            else (self.settings.tokens, "end_turn")
        )
        text = ""
        pieces: list[Any] = []
        for i in range(count):
            piece = ("" if i == 0 else " ") + f"tok{i}"
            for s in body.get("stop_sequences") or []:
                at = (text + piece).find(s)
                if at >= 0:
                    cut = (text + piece)[:at][len(text) :]
                    if cut:
                        pieces.append(cut)
                    blocks.append(("text", pieces))
                    return blocks, "stop_sequence", s
            text += piece
            pieces.append(piece)
        blocks.append(("text", pieces))
        return blocks, stop, None

    async def _events(
        self,
        msg_id: str,
        model: str,
        blocks: list[tuple[str, list[Any]]],
        end: tuple[str, str | None],
        usage: dict[str, int],
        output: int,
        key: str,
    ) -> AsyncGenerator[bytes, None]:
        stop, stop_sequence = end
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        n = 0

        async def tick() -> None:
            nonlocal n
            delay = t0 + (self.settings.ttft_ms + n * self.settings.itl_ms) / 1000 - loop.time()
            n += 1
            if delay > 0:
                await asyncio.sleep(delay)

        message = {
            "id": msg_id, "type": "message", "role": "assistant", "model": model, "content": [],
            "stop_reason": None, "stop_sequence": None, "usage": {**usage, "output_tokens": 1},
        }  # fmt: skip
        yield sse({"type": "message_start", "message": message})
        if model == "overloaded-midstream":
            yield sse({"type": "ping"})
            yield sse(
                {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
            )
            return
        index = 0
        for kind, pieces in blocks:
            if kind == "signature":
                yield sse(_delta(index, {"type": "signature_delta", "signature": pieces[0]}))
                yield sse({"type": "content_block_stop", "index": index})
                index += 1
                continue
            if kind == "text":
                start: dict[str, Any] = {"type": "text", "text": ""}
            elif kind == "thinking":
                start = {"type": "thinking", "thinking": ""}
            else:
                start = {"type": "tool_use", "id": pieces[0], "name": pieces[1], "input": {}}
            yield sse({"type": "content_block_start", "index": index, "content_block": start})
            if index == 0:
                yield sse({"type": "ping"})
            for piece in pieces[2:] if kind == "tool_use" else pieces:
                await tick()
                if kind == "text":
                    yield sse(_delta(index, {"type": "text_delta", "text": piece}))
                elif kind == "thinking":
                    yield sse(_delta(index, {"type": "thinking_delta", "thinking": piece}))
                else:
                    yield sse(_delta(index, {"type": "input_json_delta", "partial_json": piece}))
            if model == "error-midstream":
                text = f"simulated failure (x-api-key {key})"
                yield sse({"type": "error", "error": {"type": "api_error", "message": text}})
                return
            if model == "truncated":
                return
            if kind != "thinking":  # a thinking block ends after its signature
                yield sse({"type": "content_block_stop", "index": index})
                index += 1
        yield sse(
            {
                "type": "message_delta",
                "delta": {"stop_reason": stop, "stop_sequence": stop_sequence},
                "usage": {"output_tokens": output},
            }
        )
        yield sse({"type": "message_stop"})

    async def _stream(
        self, events: AsyncGenerator[bytes, None], receive: Receive, send: Send
    ) -> None:
        await stream_sse(self.stats, events, receive, send, _SSE_HEADERS)


def _output_tokens(kind: str, pieces: list[Any]) -> int:
    if kind == "signature":
        return 0
    if kind == "tool_use":
        return sum(1 for p in pieces[2:] if p)
    return len(pieces)


def _delta(index: int, delta: dict[str, Any]) -> dict[str, Any]:
    return {"type": "content_block_delta", "index": index, "delta": delta}


def _whole_blocks(blocks: list[tuple[str, list[Any]]]) -> list[dict[str, Any]]:
    """The answer's blocks as a JSON Message's `content`."""
    out: list[dict[str, Any]] = []
    for kind, pieces in blocks:
        if kind == "text":
            out.append({"type": "text", "text": "".join(pieces)})
        elif kind == "thinking":
            out.append({"type": "thinking", "thinking": "".join(pieces), "signature": ""})
        elif kind == "signature":
            out[-1]["signature"] = pieces[0]
        else:
            args = json.loads("".join(pieces[2:]))
            out.append({"type": "tool_use", "id": pieces[0], "name": pieces[1], "input": args})
    return out


def sample_input(schema: dict[str, Any]) -> dict[str, Any]:
    """A tool input that fits `schema` (its properties, in order)."""
    out: dict[str, Any] = {}
    for name, prop in (schema.get("properties") or {}).items():
        kind = prop.get("type") if isinstance(prop, dict) else None
        if isinstance(prop, dict) and prop.get("enum"):
            out[name] = prop["enum"][0]
        elif kind == "string":
            out[name] = f"{name}-value"
        elif kind == "integer":
            out[name] = 7
        elif kind == "number":
            out[name] = 1.5
        elif kind == "boolean":
            out[name] = True
        elif kind == "array":
            out[name] = []
        elif kind == "object":
            out[name] = sample_input(prop)
        else:
            out[name] = None
    return out


# ---- running it ---------------------------------------------------------------------------


class RunningServer:
    """The app with uvicorn on a free loopback port, in this event loop; `base_url` is the
    API root (http://127.0.0.1:PORT). An async context manager."""

    def __init__(self, settings: ServerSettings | None = None) -> None:
        self.app = App(settings or ServerSettings())
        config = uvicorn.Config(
            self.app, host="127.0.0.1", port=0, log_config=None, log_level="warning",
            access_log=False, lifespan="off", ws="none",
        )  # fmt: skip
        self._server = _QuietServer(config)
        self._task: asyncio.Task[None] | None = None
        self.base_url = ""

    async def __aenter__(self) -> RunningServer:
        self._task = asyncio.create_task(self._server.serve())
        while not self._server.started:
            if self._task.done():
                await self._task
                raise RuntimeError("fake Messages server failed to start")
            await asyncio.sleep(0.01)
        host, port = self._server.servers[0].sockets[0].getsockname()[:2]
        self.base_url = f"http://{host}:{port}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._server.should_exit = True
            await self._task
            self._task = None


@contextlib.contextmanager
def upstream_process(workdir: Path, *flags: str) -> Iterator[str]:
    """This server as a real process; yields its API root (http://127.0.0.1:PORT)."""
    port = free_port()
    root = Path(__file__).resolve().parent.parent
    with (workdir / "anthropic-upstream.log").open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.anthropic_upstream", "--port", str(port), *flags],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=root,
        )
    try:
        wait_for_port("127.0.0.1", port, 15.0, proc)  # type: ignore[arg-type]
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8001)
    p.add_argument("--ttft-ms", type=float, default=5.0)
    p.add_argument("--itl-ms", type=float, default=1.0)
    p.add_argument("--tokens", type=int, default=8)
    p.add_argument("--api-key", default=None)
    a = p.parse_args()
    settings = ServerSettings(
        ttft_ms=a.ttft_ms, itl_ms=a.itl_ms, tokens=a.tokens, api_key=a.api_key
    )
    uvicorn.run(
        App(settings), host=a.host, port=a.port, log_level="warning", access_log=False,
        lifespan="off", ws="none",
    )  # fmt: skip


if __name__ == "__main__":
    main()
