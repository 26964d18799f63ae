"""The Anthropic Messages API: `POST /v1/messages` and `POST /v1/messages/count_tokens`.

Both translate the Messages request to a chat body (`common.apis.anthropic_request`), then
run it through the same chat validation as `/v1/chat/completions` (deployment limits: max
tokens, messages, stop sequences); the reply is built by `common.apis.anthropic_stream`.
Errors are in Anthropic's envelope (`error_envelope`: the fleet's 503 is 529
overloaded_error). `count_tokens` goes to a worker as the wire op `count_tokens` (its `done`
usage is the prompt's size) and is not charged.

    MessagesFront      messages       chat           MessagesRenderer (MessageStream)
    CountTokensFront   count_tokens   count_tokens   CountTokensRenderer
"""

from __future__ import annotations

import msgspec

from common import protocol as p
from common.apis import anthropic, anthropic_request, anthropic_stream
from common.errors import FleetError, InvalidRequest
from gateway.auth import Principal
from gateway.fronts import Renderer
from gateway.http import Envelope
from gateway.settings import Limits
from gateway.validate import Parsed, parse

_enc = msgspec.json.Encoder()


def _validated(chat: dict[str, object], limits: Limits, default_model: str | None) -> Parsed:
    """The chat body through chat validation, its errors named as Messages names them."""
    try:
        return parse("chat", _enc.encode(chat), limits, default_model)
    except InvalidRequest as err:
        if err.param == "stop":
            raise InvalidRequest(
                f"stop_sequences: at most {limits.max_stop} sequences are allowed.",
                param="stop_sequences",
            ) from err
        raise


MIN_THINKING_BUDGET = 1024  # Anthropic's smallest `thinking.budget_tokens`


def _fit_thinking(chat: dict[str, object], most: int) -> None:
    thinking = chat.get("thinking")
    if not isinstance(thinking, dict):
        return
    budget = thinking.get("budget_tokens")
    if not isinstance(budget, int) or budget < most:
        return
    if most - 1 < MIN_THINKING_BUDGET:
        del chat["thinking"]
    else:
        chat["thinking"] = {**thinking, "budget_tokens": most - 1}


class MessagesRenderer:
    """One Messages response: SSE events when streaming, else the message body."""

    def __init__(self, parsed: Parsed, rid: str) -> None:
        estimate = anthropic_stream.estimate_tokens(parsed.body)
        self.stream = anthropic_stream.MessageStream(
            "msg_" + rid, parsed.model, estimate, frames=parsed.stream
        )

    def start(self, n: int) -> bytes:
        return self.stream.start()

    def delta(self, msg: p.Delta) -> bytes:
        return b"".join(self.stream.feed(d) for d in msg.choices)

    def finish(self, usage: p.Usage) -> bytes:
        return self.stream.finish(usage)

    def fail(self, err: FleetError) -> bytes:
        return anthropic.error_event(err)  # the open block stays open, as Anthropic's does

    def collect(self, msg: p.Delta | p.Embedding) -> None:
        if isinstance(msg, p.Delta):
            for d in msg.choices:
                self.stream.feed(d)

    def body(self, usage: p.Usage) -> bytes:
        return anthropic_stream.message_body(self.stream.message(usage))


class MessagesFront:
    """`POST /v1/messages`."""

    route = "messages"
    envelope: Envelope = staticmethod(anthropic.error_envelope)
    charges = True

    async def parse(
        self, body: bytes, limits: Limits, default_model: str | None, principal: Principal
    ) -> Parsed:
        chat = anthropic_request.messages_to_chat(anthropic_request.decode_messages(body))
        # `max_tokens` is required and is a ceiling: clients pick it for Claude (Claude
        # Code sends 32000 or 64000), so above the gateway's --max-tokens-limit it is
        # lowered to that (an answer that reaches it stops with `max_tokens`), not refused.
        # Thinking's budget must stay below it: lowered with it (under Anthropic's
        # minimum of 1024 there is no room left to think, and thinking is turned off).
        most = chat.get("max_tokens")
        if isinstance(most, int) and most > limits.max_tokens:
            chat["max_tokens"] = most = limits.max_tokens
            _fit_thinking(chat, most)
        return _validated(chat, limits, default_model)

    def renderer(self, parsed: Parsed, rid: str, created: int) -> Renderer:
        return MessagesRenderer(parsed, rid)

    async def completed(self, renderer: Renderer, usage: p.Usage) -> None:
        return None


class CountTokensRenderer:
    """`{"input_tokens": N}`: the worker's prompt count. Never streams."""

    def start(self, n: int) -> bytes:
        return b""

    def delta(self, msg: p.Delta) -> bytes:
        return b""

    def finish(self, usage: p.Usage) -> bytes:
        return b""

    def fail(self, err: FleetError) -> bytes:
        return b""

    def collect(self, msg: p.Delta | p.Embedding) -> None:
        return None

    def body(self, usage: p.Usage) -> bytes:
        return _enc.encode({"input_tokens": usage.prompt_tokens})


class CountTokensFront:
    """`POST /v1/messages/count_tokens`: the same request (max_tokens not required), the
    wire op `count_tokens`; not charged against the key's limits."""

    route = "count_tokens"
    envelope: Envelope = staticmethod(anthropic.error_envelope)
    charges = False

    async def parse(
        self, body: bytes, limits: Limits, default_model: str | None, principal: Principal
    ) -> Parsed:
        req = anthropic_request.decode_messages(body)
        chat = anthropic_request.messages_to_chat(req, count_only=True)
        parsed = _validated(chat, limits, default_model)
        return msgspec.structs.replace(
            parsed, op="count_tokens", stream=False, include_usage=False, n=1, max_completion=0
        )

    def renderer(self, parsed: Parsed, rid: str, created: int) -> Renderer:
        return CountTokensRenderer()

    async def completed(self, renderer: Renderer, usage: p.Usage) -> None:
        return None
