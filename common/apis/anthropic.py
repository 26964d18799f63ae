"""Anthropic Messages <-> the fleet's one request shape (OpenAI chat): the shared maps.

The Messages API meets the chat wire in four modules of this package, both directions
built on the maps here (stop reasons, usage, errors, the upstream API version):

    anthropic_request.py   Messages request -> chat body         (gateway, POST /v1/messages)
    anthropic_stream.py    chat deltas -> Messages events, body  (gateway, the reply)
    anthropic_upstream.py  chat body -> Messages request         (the `anthropic` engine)
    anthropic_events.py    Messages stream events -> chat deltas (the `anthropic` engine)

Pure: no I/O.
"""

from __future__ import annotations

from typing import Any

import msgspec

from common.errors import FleetError
from common.protocol import Usage

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
