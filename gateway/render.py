"""OpenAI response bodies and Server-Sent Events, built from reply-stream messages. Pure.

Streaming follows api.openai.com byte for byte: `data: {json}\\n\\n` frames, one id per
stream, a first chunk per choice carrying the role, one chunk per choice delta, the finish
reason in a final empty-delta chunk per choice, `usage: null` on every chunk when
`stream_options.include_usage` is set plus a last chunk with `choices: []` and the usage,
then `data: [DONE]\\n\\n`.
"""

from __future__ import annotations

from typing import Any

import msgspec
from msgspec import UNSET, UnsetType

from common import protocol as p
from common.errors import ErrorBody, ErrorEnvelope

DONE_FRAME = b"data: [DONE]\n\n"
_enc = msgspec.json.Encoder()


class ChunkDelta(msgspec.Struct, omit_defaults=True):
    role: str | None = None
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    refusal: str | UnsetType | None = UNSET
    # A finished Anthropic thinking block's signature, or a redacted block (LiteLLM's
    # name): clients send them back on the assistant message (common/apis/design.md).
    thinking_blocks: list[dict[str, Any]] | None = None


class ChatChunkChoice(msgspec.Struct):
    index: int
    delta: ChunkDelta
    logprobs: dict[str, Any] | None = None
    finish_reason: str | None = None


class ChatChunk(msgspec.Struct, kw_only=True):
    id: str
    object: str = "chat.completion.chunk"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[ChatChunkChoice]
    usage: p.Usage | UnsetType | None = UNSET


class TextChunkChoice(msgspec.Struct):
    index: int
    text: str
    logprobs: dict[str, Any] | None = None
    finish_reason: str | None = None


class TextChunk(msgspec.Struct, kw_only=True):
    id: str
    object: str = "text_completion"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[TextChunkChoice]
    usage: p.Usage | UnsetType | None = UNSET


def frame(obj: msgspec.Struct) -> bytes:
    return b"data: " + _enc.encode(obj) + b"\n\n"


def error_frame(error: ErrorBody) -> bytes:
    return frame(ErrorEnvelope(error=error))


class StreamRenderer:
    """Frames one streaming response (chat or completion)."""

    def __init__(self, *, op: str, rid: str, created: int, model: str, include_usage: bool) -> None:
        self.chat = op == "chat"
        self.rid = rid
        self.created = created
        self.model = model
        self._usage: p.Usage | UnsetType | None = None if include_usage else UNSET
        self.include_usage = include_usage

    def _chat(self, choices: list[ChatChunkChoice]) -> bytes:
        return frame(
            ChatChunk(
                id=self.rid,
                created=self.created,
                model=self.model,
                choices=choices,
                usage=self._usage,
            )
        )

    def _text(self, choices: list[TextChunkChoice]) -> bytes:
        return frame(
            TextChunk(
                id=self.rid,
                created=self.created,
                model=self.model,
                choices=choices,
                usage=self._usage,
            )
        )

    def start(self, n: int) -> bytes:
        """The role chunk(s) that open a chat stream (nothing for completions)."""
        if not self.chat:
            return b""
        return b"".join(
            self._chat([ChatChunkChoice(i, ChunkDelta(role="assistant", content="", refusal=None))])
            for i in range(n)
        )

    def delta(self, msg: p.Delta) -> bytes:
        parts: list[bytes] = []
        for d in msg.choices:
            has_body = (
                bool(d.content)
                or d.reasoning_content is not None
                or d.refusal is not None
                or d.tool_calls
            )
            if self.chat:
                blocks = thinking_blocks(d, "")
                if has_body or d.logprobs is not None or blocks:
                    cd = ChunkDelta(
                        content=d.content or None,
                        reasoning_content=d.reasoning_content,
                        tool_calls=d.tool_calls,
                        thinking_blocks=blocks,
                    )
                    if d.refusal is not None:
                        cd.refusal = d.refusal
                    parts.append(self._chat([ChatChunkChoice(d.index, cd, d.logprobs)]))
                if d.finish_reason is not None:
                    parts.append(
                        self._chat([ChatChunkChoice(d.index, ChunkDelta(), None, d.finish_reason)])
                    )
            else:
                if d.content or d.logprobs is not None:
                    parts.append(
                        self._text([TextChunkChoice(d.index, d.content or "", d.logprobs)])
                    )
                if d.finish_reason is not None:
                    parts.append(self._text([TextChunkChoice(d.index, "", None, d.finish_reason)]))
        return b"".join(parts)

    def finish(self, usage: p.Usage) -> bytes:
        """The usage chunk (if asked for) and `[DONE]`."""
        if not self.include_usage:
            return DONE_FRAME
        if self.chat:
            last = frame(
                ChatChunk(
                    id=self.rid, created=self.created, model=self.model, choices=[], usage=usage
                )
            )
        else:
            last = frame(
                TextChunk(
                    id=self.rid, created=self.created, model=self.model, choices=[], usage=usage
                )
            )
        return last + DONE_FRAME

    def fail(self, error: ErrorBody) -> bytes:
        """A mid-stream error event in the OpenAI shape, then `[DONE]`."""
        return error_frame(error) + DONE_FRAME


# ---- non-streaming ---------------------------------------------------------------------


def thinking_blocks(d: p.ChoiceDelta, thinking: str) -> list[dict[str, Any]] | None:
    """The thinking blocks a delta closes: a signed one (its text is `thinking`, the
    reasoning since the last block), a redacted one."""
    if d.reasoning_signature is None and d.redacted_reasoning is None:
        return None
    blocks: list[dict[str, Any]] = []
    if d.reasoning_signature is not None:
        sig = d.reasoning_signature
        blocks.append({"type": "thinking", "thinking": thinking, "signature": sig})
    if d.redacted_reasoning is not None:
        blocks.append({"type": "redacted_thinking", "data": d.redacted_reasoning})
    return blocks


class _ChoiceAcc:
    __slots__ = (
        "block_start",
        "blocks",
        "content",
        "finish_reason",
        "logprobs",
        "reasoning",
        "refusal",
        "tool_calls",
    )

    def __init__(self) -> None:
        self.content: list[str] = []
        self.refusal: list[str] | None = None
        self.reasoning: list[str] | None = None
        self.blocks: list[dict[str, Any]] = []  # thinking blocks (signed or redacted)
        self.block_start = 0  # reasoning pieces before it belong to earlier blocks
        self.tool_calls: dict[int, dict[str, Any]] = {}
        self.finish_reason: str | None = None
        self.logprobs: dict[str, Any] | None = None


def _merge_tool_call(acc: dict[int, dict[str, Any]], frag: dict[str, Any]) -> None:
    idx = int(frag.get("index", len(acc)))
    cur = acc.setdefault(
        idx, {"id": None, "type": "function", "function": {"name": "", "arguments": ""}}
    )
    if frag.get("id"):
        cur["id"] = frag["id"]
    if frag.get("type"):
        cur["type"] = frag["type"]
    fn = frag.get("function") or {}
    if fn.get("name"):
        cur["function"]["name"] += fn["name"]
    if fn.get("arguments"):
        cur["function"]["arguments"] += fn["arguments"]


class Assembler:
    """Collects a reply stream into one non-streaming response."""

    def __init__(self, n: int) -> None:
        self.choices = [_ChoiceAcc() for _ in range(n)]
        self.embeddings: dict[int, list[float] | str] = {}

    def add(self, msg: p.Delta) -> None:
        for d in msg.choices:
            if d.index >= len(self.choices):
                self.choices.extend(_ChoiceAcc() for _ in range(d.index + 1 - len(self.choices)))
            acc = self.choices[d.index]
            if d.content:
                acc.content.append(d.content)
            if d.reasoning_content is not None:
                acc.reasoning = [*(acc.reasoning or []), d.reasoning_content]
            if d.reasoning_signature is not None or d.redacted_reasoning is not None:
                pieces = acc.reasoning or []
                acc.blocks.extend(thinking_blocks(d, "".join(pieces[acc.block_start :])) or [])
                acc.block_start = len(pieces)
            if d.refusal is not None:
                acc.refusal = [*(acc.refusal or []), d.refusal]
            for tc in d.tool_calls or []:
                _merge_tool_call(acc.tool_calls, tc)
            if d.logprobs is not None:
                acc.logprobs = acc.logprobs or {}
                for key, val in d.logprobs.items():
                    if isinstance(val, list):
                        acc.logprobs.setdefault(key, []).extend(val)
                    else:
                        acc.logprobs[key] = val
            if d.finish_reason is not None:
                acc.finish_reason = d.finish_reason

    def add_embedding(self, msg: p.Embedding) -> None:
        self.embeddings[msg.index] = msg.embedding

    def chat_body(self, rid: str, created: int, model: str, usage: p.Usage) -> bytes:
        choices = []
        for i, acc in enumerate(self.choices):
            message: dict[str, Any] = {
                "role": "assistant",
                "content": "".join(acc.content) if acc.content or not acc.tool_calls else None,
                "refusal": "".join(acc.refusal) if acc.refusal is not None else None,
            }
            if acc.reasoning is not None:
                message["reasoning_content"] = "".join(acc.reasoning)
            if acc.blocks:
                message["thinking_blocks"] = acc.blocks
            if acc.tool_calls:
                message["tool_calls"] = [acc.tool_calls[k] for k in sorted(acc.tool_calls)]
            choices.append(
                {
                    "index": i,
                    "message": message,
                    "logprobs": acc.logprobs,
                    "finish_reason": acc.finish_reason or "stop",
                }
            )
        return _enc.encode(
            {
                "id": rid,
                "object": "chat.completion",
                "created": created,
                "model": model,
                "choices": choices,
                "usage": usage,
                "system_fingerprint": None,
            }
        )

    def completion_body(self, rid: str, created: int, model: str, usage: p.Usage) -> bytes:
        choices = [
            {
                "text": "".join(acc.content),
                "index": i,
                "logprobs": acc.logprobs,
                "finish_reason": acc.finish_reason or "stop",
            }
            for i, acc in enumerate(self.choices)
        ]
        return _enc.encode(
            {
                "id": rid,
                "object": "text_completion",
                "created": created,
                "model": model,
                "choices": choices,
                "usage": usage,
                "system_fingerprint": None,
            }
        )

    def embedding_body(self, model: str, usage: p.Usage) -> bytes:
        data = [
            {"object": "embedding", "index": i, "embedding": self.embeddings[i]}
            for i in sorted(self.embeddings)
        ]
        return _enc.encode(
            {
                "object": "list",
                "data": data,
                "model": model,
                "usage": {"prompt_tokens": usage.prompt_tokens, "total_tokens": usage.total_tokens},
            }
        )


def models_body(entries: list[dict[str, Any]]) -> bytes:
    return _enc.encode({"object": "list", "data": entries})


def json_bytes(obj: Any) -> bytes:
    return _enc.encode(obj)
