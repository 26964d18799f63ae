"""Typed OpenAI request bodies, decoded once at each process boundary.

Unknown fields are ignored (forward compatible, as vLLM and most peers do); known fields
are type-checked and range-checked here. Every optional parameter also accepts an explicit
`null`, meaning its default, as api.openai.com does. Limits that are deployment policy (max tokens,
max batch size) are checked by `gateway.validate`, not here.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

Role = Literal["system", "user", "assistant", "tool", "developer", "function"]
Temperature = Annotated[float, Meta(ge=0.0, le=2.0)]
TopP = Annotated[float, Meta(ge=0.0, le=1.0)]
Penalty = Annotated[float, Meta(ge=-2.0, le=2.0)]
PositiveInt = Annotated[int, Meta(ge=1)]
TokenCount = Annotated[int, Meta(ge=0)]  # 0 is valid: score the prompt, generate nothing
BestOf = Annotated[int, Meta(ge=0, le=20)]  # OpenAI's bounds; 0 means the default
ChoiceCount = Annotated[int, Meta(ge=1, le=128)]


class StreamOptions(msgspec.Struct, omit_defaults=True):
    include_usage: bool | None = None


class ChatMessage(msgspec.Struct, omit_defaults=True):
    role: Role
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None

    def text(self) -> str:
        """The message's text: a string, or the text parts of a content list."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(
            p.get("text", "") for p in self.content if isinstance(p.get("text", ""), str)
        )


class _Generating:
    """Defaults shared by chat and completion requests (`null` means the default)."""

    __slots__ = ()
    n: int | None
    stream: bool | None
    stream_options: StreamOptions | None

    def choices(self) -> int:
        return self.n or 1

    def streaming(self) -> bool:
        return bool(self.stream)

    def wants_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatRequest(msgspec.Struct, _Generating, omit_defaults=True):
    messages: list[ChatMessage]
    model: str | None = None  # absent, null or empty: the gateway's --default-model
    max_tokens: TokenCount | None = None
    max_completion_tokens: TokenCount | None = None
    n: ChoiceCount | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Meta(ge=0, le=20)] | None = None
    user: str | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None
    continue_final_message: bool | None = None  # vLLM/SGLang: extend the last assistant turn

    def token_limit(self) -> int | None:
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens
        return self.max_tokens


class CompletionRequest(msgspec.Struct, _Generating, omit_defaults=True):
    prompt: str | list[str | int | list[int]]
    model: str | None = None
    max_tokens: TokenCount | None = 16
    n: ChoiceCount | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    echo: bool | None = None
    suffix: str | None = None
    logprobs: Annotated[int, Meta(ge=0, le=5)] | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    best_of: BestOf | None = None
    user: str | None = None

    def token_limit(self) -> int:
        return 16 if self.max_tokens is None else self.max_tokens

    def candidates(self) -> int:
        """Sequences generated per prompt: `best_of` (0 or null: `n`), never fewer than `n`."""
        return max(self.best_of or 0, self.choices())


class EmbeddingRequest(msgspec.Struct, omit_defaults=True):
    input: str | list[str | int | list[int]]
    model: str | None = None
    encoding_format: Literal["float", "base64"] | None = None
    dimensions: PositiveInt | None = None
    user: str | None = None


class ModelOnly(msgspec.Struct):
    """Just enough of any body to route it (used by workers for unknown ops)."""

    model: str


def prompt_texts(prompt: str | list[str | int | list[int]]) -> list[str] | list[list[int]]:
    """Normalise a completion prompt / embedding input to a batch of strings or token lists.

    Raises ValueError when the list mixes kinds (OpenAI accepts a string, a list of strings,
    a list of token ids, or a list of token-id lists).
    """
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise ValueError("must not be empty")
    if all(isinstance(p, str) for p in prompt):
        return [p for p in prompt if isinstance(p, str)]
    if all(isinstance(p, int) for p in prompt):
        return [[p for p in prompt if isinstance(p, int)]]
    if all(isinstance(p, list) for p in prompt):
        return [p for p in prompt if isinstance(p, list)]
    raise ValueError("must be a string, a list of strings, or token ids, not a mix")


_MISSING = re.compile(r"missing required field `([^`]+)`")


def validation_param(exc: msgspec.ValidationError) -> str | None:
    """The parameter a msgspec validation error points at (`... - at `$.max_tokens``)."""
    text = str(exc)
    marker = "at `$."
    i = text.rfind(marker)
    path = text[i + len(marker) :].rstrip("`") if i >= 0 else ""
    missing = _MISSING.search(text)
    if missing:
        path = f"{path}.{missing.group(1)}" if path else missing.group(1)
    return path or None


def decode_error_message(exc: msgspec.DecodeError) -> tuple[str, str | None]:
    """A client-facing message and the offending parameter, from a msgspec error."""
    if isinstance(exc, msgspec.ValidationError):
        param = validation_param(exc)
        msg = str(exc).split(" - at `")[0]
        return (f"Invalid value for '{param}': {msg}" if param else msg), param
    return f"Request body is not valid JSON: {exc}", None


CHAT_DECODER = msgspec.json.Decoder(ChatRequest)
COMPLETION_DECODER = msgspec.json.Decoder(CompletionRequest)
EMBEDDING_DECODER = msgspec.json.Decoder(EmbeddingRequest)
