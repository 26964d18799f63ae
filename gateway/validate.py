"""Turn an HTTP request body into a `Parsed` request, or raise the right client error.

Pure: no I/O. The body is decoded once with a typed msgspec decoder; deployment limits
(`Limits`) bound everything that could make one request exhaust memory or a worker.
"""

from __future__ import annotations

import msgspec

from common.errors import InvalidRequest
from common.openai_types import (
    CHAT_DECODER,
    COMPLETION_DECODER,
    EMBEDDING_DECODER,
    decode_error_message,
    prompt_texts,
)


class Limits(msgspec.Struct, frozen=True):
    max_body_bytes: int = 4 * 1024 * 1024
    max_tokens: int = 32_768
    max_n: int = 16
    max_messages: int = 4096
    max_stop: int = 16
    max_embedding_inputs: int = 2048


class Parsed(msgspec.Struct, frozen=True):
    op: str  # chat | completion | embedding
    model: str
    stream: bool
    include_usage: bool
    n: int
    body: bytes


def _decode_failure(exc: msgspec.DecodeError) -> InvalidRequest:
    message, param = decode_error_message(exc)
    return InvalidRequest(message, param=param)


def _check_common(model: str, n: int, stop: str | list[str] | None, limits: Limits) -> None:
    if not model:
        raise InvalidRequest("'model' must not be empty.", param="model")
    if n > limits.max_n:
        raise InvalidRequest(f"'n' must be at most {limits.max_n}.", param="n")
    if isinstance(stop, list) and len(stop) > limits.max_stop:
        raise InvalidRequest(f"'stop' allows at most {limits.max_stop} sequences.", param="stop")


def _check_tokens(value: int | None, param: str, limits: Limits) -> None:
    if value is not None and value > limits.max_tokens:
        raise InvalidRequest(f"'{param}' must be at most {limits.max_tokens}.", param=param)


def parse(op: str, body: bytes, limits: Limits) -> Parsed:
    """Validate `body` for `op`; raises InvalidRequest (400) with the offending param."""
    try:
        match op:
            case "chat":
                chat = CHAT_DECODER.decode(body)
                _check_common(chat.model, chat.n, chat.stop, limits)
                if not chat.messages:
                    raise InvalidRequest("'messages' must not be empty.", param="messages")
                if len(chat.messages) > limits.max_messages:
                    raise InvalidRequest(
                        f"'messages' allows at most {limits.max_messages} items.",
                        param="messages",
                    )
                _check_tokens(chat.max_tokens, "max_tokens", limits)
                _check_tokens(chat.max_completion_tokens, "max_completion_tokens", limits)
                usage = bool(
                    chat.stream and chat.stream_options and chat.stream_options.include_usage
                )
                return Parsed("chat", chat.model, chat.stream, usage, chat.n, body)
            case "completion":
                comp = COMPLETION_DECODER.decode(body)
                _check_common(comp.model, comp.n, comp.stop, limits)
                _check_tokens(comp.max_tokens, "max_tokens", limits)
                try:
                    prompts = prompt_texts(comp.prompt)
                except ValueError as exc:
                    raise InvalidRequest(f"'prompt' {exc}.", param="prompt") from exc
                if len(prompts) * comp.n > limits.max_n:
                    raise InvalidRequest(
                        f"At most {limits.max_n} prompts x n per request.", param="prompt"
                    )
                usage = bool(
                    comp.stream and comp.stream_options and comp.stream_options.include_usage
                )
                return Parsed("completion", comp.model, comp.stream, usage, comp.n, body)
            case _:
                emb = EMBEDDING_DECODER.decode(body)
                _check_common(emb.model, 1, None, limits)
                try:
                    inputs = prompt_texts(emb.input)
                except ValueError as exc:
                    raise InvalidRequest(f"'input' {exc}.", param="input") from exc
                if len(inputs) > limits.max_embedding_inputs:
                    raise InvalidRequest(
                        f"'input' allows at most {limits.max_embedding_inputs} items.",
                        param="input",
                    )
                if any(isinstance(t, str) and not t for t in inputs):
                    raise InvalidRequest("'input' must not contain empty strings.", param="input")
                return Parsed("embedding", emb.model, False, False, 1, body)
    except msgspec.DecodeError as exc:
        raise _decode_failure(exc) from exc
