"""Chat deltas -> OpenAI Responses SSE events and the `response` object. Pure: no I/O.

    response_shell      the request's settings, as every `response` object echoes them
    ResponseStream      one response from chat deltas: streaming or not, one state machine
    frame               one SSE event
    to_responses_usage  the chat usage as Responses usage

Reasoning items carry their thinking blocks as `encrypted_content`
(responses_reasoning.py) when the request includes `reasoning.encrypted_content`, and
always in what a stored response keeps (`output(stored=True)`).
"""

from __future__ import annotations

from typing import Any

import msgspec

from common import protocol as p
from common.apis.responses import ReasoningConfig, ResponsesRequest
from common.apis.responses_reasoning import encode_reasoning
from common.errors import FleetError

# ---- the request's settings, echoed ---------------------------------------------------------


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
        shell = self.response(False)  # the same object in both events
        return self._event("response.created", response=shell) + self._event(
            "response.in_progress", response=shell
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
