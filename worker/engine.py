"""The small interface every inference engine implements, and the events it yields.

An engine serves one model. `chat` and `complete` are async generators of `Output`
(new text for one or more choices) ending with exactly one `Usage`; `embed` returns all
vectors at once; `count_tokens` sizes a chat prompt without generating. Engines raise
`common.errors.FleetError` subclasses for anything the client should see (bad
parameters, upstream failures); anything else becomes a 500.
Cancellation (task cancel) must stop generation promptly and release resources.

An engine with an upstream of its own (openai, anthropic) may also implement `health`
(`HealthProbe`): its model's runner then calls it every `--upstream-health-interval` and
counts a failure like a failed request's, so a dead upstream opens the circuit before a
request fails on it. Engines without it (sim, llamacpp, embeddings) have no probe.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Protocol, runtime_checkable

import msgspec

from common.openai_types import ChatRequest, CompletionRequest, EmbeddingRequest
from common.protocol import ChoiceDelta, Usage


class Output(msgspec.Struct):
    """New output: one `ChoiceDelta` per choice that advanced."""

    choices: list[ChoiceDelta]


EngineEvent = Output | Usage


class EmbedResult(msgspec.Struct):
    embeddings: list[list[float] | str]
    usage: Usage


class ModelCard(msgspec.Struct, frozen=True):
    """How the model is described in the fleet catalog and `/v1/models`."""

    engine: str
    owned_by: str = "llmfleet"
    simulated: bool = False
    description: str = ""


class Engine(Protocol):
    """What every engine implements; `health` (`HealthProbe`) is optional: an engine
    without it has no probe (`health_probe` returns None)."""

    def card(self) -> ModelCard: ...

    async def start(self) -> None:
        """Load or connect; called once before the first request."""

    async def aclose(self) -> None:
        """Release everything; called once at shutdown."""

    def chat(self, req: ChatRequest, raw: bytes) -> AsyncIterator[EngineEvent]: ...

    def complete(self, req: CompletionRequest, raw: bytes) -> AsyncIterator[EngineEvent]: ...

    async def embed(self, req: EmbeddingRequest, raw: bytes) -> EmbedResult: ...

    async def count_tokens(self, req: ChatRequest, raw: bytes) -> int:
        """The chat prompt's size in the model's tokens (the `count_tokens` op): by its
        tokenizer where the engine has one, else `estimate_tokens`."""
        ...


@runtime_checkable
class HealthProbe(Protocol):
    """The optional part of `Engine`: a check of the upstream without a request."""

    async def health(self) -> str | None:
        """None when the upstream answers; else why not, in a short text fit for an
        announcement (never a key or a URL with credentials). Bounded in time by the
        engine; called only between `start` and `aclose`, one call at a time."""
        ...


def health_probe(engine: Engine) -> Callable[[], Awaitable[str | None]] | None:
    """The engine's `health` if it has one, else None (no probe: requests alone feed the
    circuit breaker)."""
    return engine.health if isinstance(engine, HealthProbe) else None


def estimate_tokens(req: ChatRequest, raw: bytes) -> int:
    """A tokenizer-free estimate, for engines that have none: one token per 4 bytes of
    the request's messages and tools as JSON (OpenAI's rule of thumb for English; JSON
    punctuation makes it err high), at least 1."""
    size = len(msgspec.json.encode(req.messages))
    if req.tools:
        size += len(msgspec.json.encode(req.tools))
    return max(1, -(-size // 4))
