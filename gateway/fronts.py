"""The HTTP APIs the gateway speaks, each a `Front` over the fleet's one request path.

A front turns its API's request body into a `Parsed` wire request (OpenAI chat,
completion or embedding bodies go as they are; Anthropic Messages and OpenAI Responses are
translated to a chat body by `common.apis`), and its `Renderer` turns the reply stream
(chat deltas) back into its API's SSE events or JSON body. Everything between (governance,
the queue, workers, failover, audit) is the same `gateway.request.Call` for every front.

    front            route          wire op        envelope
    OpenAIFront      chat           chat           OpenAI
                     completion     completion
                     embedding      embedding
    MessagesFront    messages       chat           Anthropic   (gateway/front_messages.py)
    CountTokensFront count_tokens   count_tokens   Anthropic   (gateway/front_messages.py)
    ResponsesFront   responses      chat           OpenAI      (gateway/front_responses.py)
"""

from __future__ import annotations

from typing import Protocol

from common import protocol as p
from common.errors import FleetError
from gateway import render
from gateway.auth import Principal
from gateway.http import Envelope, openai_envelope
from gateway.settings import Limits
from gateway.validate import Parsed, parse


class Renderer(Protocol):
    """One response in its API's shape. Streaming: `start`, then `delta` per message,
    then `finish` or `fail`, each returning bytes to write. Not streaming: `collect` per
    message, then `body`."""

    def start(self, n: int) -> bytes: ...

    def delta(self, msg: p.Delta) -> bytes: ...

    def finish(self, usage: p.Usage) -> bytes: ...

    def fail(self, err: FleetError) -> bytes: ...

    def collect(self, msg: p.Delta | p.Embedding) -> None: ...

    def body(self, usage: p.Usage) -> bytes: ...


class Front(Protocol):
    route: str  # the audit event's route and the metrics' operation
    envelope: Envelope  # how its errors look (status and body)
    charges: bool  # usage counts against the key's token limits and budgets

    async def parse(
        self, body: bytes, limits: Limits, default_model: str | None, principal: Principal
    ) -> Parsed:
        """The wire request; raises FleetError (its `envelope` renders it)."""
        ...

    def renderer(self, parsed: Parsed, rid: str, created: int) -> Renderer: ...

    async def completed(self, renderer: Renderer, usage: p.Usage) -> None:
        """After the worker's `done`, before the last byte goes out (a stored response is
        written here, so the client's next turn finds it)."""
        ...


class OpenAIRenderer:
    """Chat and completion streams (`render.StreamRenderer`), non-streaming bodies of all
    three (`render.Assembler`)."""

    def __init__(self, parsed: Parsed, rid: str, created: int) -> None:
        self.op = parsed.op
        prefix = "chatcmpl-" if parsed.op == "chat" else "cmpl-"
        self.rid = prefix + rid
        self.created = created
        self.model = parsed.model
        self.stream = render.StreamRenderer(
            op=parsed.op,
            rid=self.rid,
            created=created,
            model=parsed.model,
            include_usage=parsed.include_usage,
        )
        self.acc = render.Assembler(parsed.n)

    def start(self, n: int) -> bytes:
        return self.stream.start(n)

    def delta(self, msg: p.Delta) -> bytes:
        return self.stream.delta(msg)

    def finish(self, usage: p.Usage) -> bytes:
        return self.stream.finish(usage)

    def fail(self, err: FleetError) -> bytes:
        return self.stream.fail(err.body())

    def collect(self, msg: p.Delta | p.Embedding) -> None:
        if isinstance(msg, p.Delta):
            self.acc.add(msg)
        else:
            self.acc.add_embedding(msg)

    def body(self, usage: p.Usage) -> bytes:
        if self.op == "chat":
            return self.acc.chat_body(self.rid, self.created, self.model, usage)
        if self.op == "completion":
            return self.acc.completion_body(self.rid, self.created, self.model, usage)
        return self.acc.embedding_body(self.model, usage)


class OpenAIFront:
    """`/v1/chat/completions`, `/v1/completions`, `/v1/embeddings`: bodies go as they are."""

    envelope: Envelope = staticmethod(openai_envelope)
    charges = True

    def __init__(self, op: str) -> None:
        self.route = op

    async def parse(
        self, body: bytes, limits: Limits, default_model: str | None, principal: Principal
    ) -> Parsed:
        return parse(self.route, body, limits, default_model)

    def renderer(self, parsed: Parsed, rid: str, created: int) -> Renderer:
        return OpenAIRenderer(parsed, rid, created)

    async def completed(self, renderer: Renderer, usage: p.Usage) -> None:
        return None


OPENAI_FRONTS = {op: OpenAIFront(op) for op in ("chat", "completion", "embedding")}
