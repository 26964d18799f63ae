"""The small interface every inference engine implements, and the events it yields.

An engine serves one model. `chat` and `complete` are async generators of `Output`
(new text for one or more choices) ending with exactly one `Usage`; `embed` returns all
vectors at once; `count_tokens` sizes a chat prompt without generating. Engines raise
`common.errors.FleetError` subclasses for anything the client should see (bad
parameters, upstream failures); anything else becomes a 500.
Cancellation (task cancel) must stop generation promptly and release resources.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol

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


def estimate_tokens(req: ChatRequest, raw: bytes) -> int:
    """A tokenizer-free estimate, for engines that have none: one token per 4 bytes of
    the request's messages and tools as JSON (OpenAI's rule of thumb for English; JSON
    punctuation makes it err high), at least 1."""
    size = len(msgspec.json.encode(req.messages))
    if req.tools:
        size += len(msgspec.json.encode(req.tools))
    return max(1, -(-size // 4))
