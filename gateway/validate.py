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
from gateway.settings import Limits

_CONTENT_REQUIRED = frozenset({"system", "user", "developer", "tool"})


class Parsed(msgspec.Struct, frozen=True):
    op: str  # chat | completion | embedding
    model: str
    stream: bool
    include_usage: bool
    n: int
    body: bytes
    # Most completion tokens the request can produce in all (None: the client set no
    # limit); quota reservations start from it (gateway/govern.py).
    max_completion: int | None = 0


def _decode_failure(exc: msgspec.DecodeError) -> InvalidRequest:
    message, param = decode_error_message(exc)
    return InvalidRequest(message, param=param)


def _check_common(n: int, stop: str | list[str] | None, limits: Limits, n_param: str = "n") -> None:
    if n > limits.max_n:
        raise InvalidRequest(f"'{n_param}' must be at most {limits.max_n}.", param=n_param)
    if isinstance(stop, list) and len(stop) > limits.max_stop:
        raise InvalidRequest(f"'stop' allows at most {limits.max_stop} sequences.", param="stop")


def _check_stream_options(stream: bool | None, has_options: bool) -> None:
    if has_options and not stream:
        raise InvalidRequest(
            "The 'stream_options' parameter is only allowed when 'stream' is enabled.",
            param="stream_options",
        )


def _check_tokens(value: int | None, param: str, limits: Limits) -> None:
    if value is not None and value > limits.max_tokens:
        raise InvalidRequest(f"'{param}' must be at most {limits.max_tokens}.", param=param)


_body_decoder = msgspec.json.Decoder(dict[str, object])
_encoder = msgspec.json.Encoder()


def _model(model: str | None, body: bytes, default: str | None) -> tuple[str, bytes]:
    """The model to route to, and the body that names it (the default filled in)."""
    if model:
        return model, body
    if not default:
        raise InvalidRequest(
            "You must provide a model parameter (this gateway has no default model).",
            param="model",
        )
    doc = _body_decoder.decode(body)
    doc["model"] = default
    return default, _encoder.encode(doc)


def parse(op: str, body: bytes, limits: Limits, default_model: str | None = None) -> Parsed:
    """Validate `body` for `op`; raises InvalidRequest (400) with the offending param.

    A body without `model` goes to `default_model` (rewritten to name it), else is a 400.
    """
    check = {"chat": _parse_chat, "completion": _parse_completion}.get(op, _parse_embedding)
    try:
        return check(body, limits, default_model)
    except msgspec.DecodeError as exc:
        raise _decode_failure(exc) from exc
    except UnicodeDecodeError as exc:
        raise InvalidRequest("Request body is not valid UTF-8.") from exc


def _parse_chat(body: bytes, limits: Limits, default_model: str | None) -> Parsed:
    chat = CHAT_DECODER.decode(body)
    model, body = _model(chat.model, body, default_model)
    _check_common(chat.choices(), chat.stop, limits)
    _check_stream_options(chat.stream, chat.stream_options is not None)
    if not chat.messages:
        raise InvalidRequest("'messages' must not be empty.", param="messages")
    if len(chat.messages) > limits.max_messages:
        raise InvalidRequest(
            f"'messages' allows at most {limits.max_messages} items.", param="messages"
        )
    for i, m in enumerate(chat.messages):
        if m.content is None and m.role in _CONTENT_REQUIRED:
            raise InvalidRequest(
                f"'messages[{i}].content' is required for role '{m.role}'.",
                param=f"messages[{i}].content",
            )
    _check_tokens(chat.max_tokens, "max_tokens", limits)
    _check_tokens(chat.max_completion_tokens, "max_completion_tokens", limits)
    usage = chat.streaming() and chat.wants_usage()
    limit = chat.token_limit()
    most = None if limit is None else limit * chat.choices()
    return Parsed("chat", model, chat.streaming(), usage, chat.choices(), body, most)


def _parse_completion(body: bytes, limits: Limits, default_model: str | None) -> Parsed:
    comp = COMPLETION_DECODER.decode(body)
    model, body = _model(comp.model, body, default_model)
    if comp.best_of and comp.best_of < comp.choices():
        raise InvalidRequest("'best_of' must be greater than or equal to 'n'.", param="best_of")
    n_param = "best_of" if (comp.best_of or 0) > comp.choices() else "n"
    _check_common(comp.candidates(), comp.stop, limits, n_param)
    _check_stream_options(comp.stream, comp.stream_options is not None)
    _check_tokens(comp.max_tokens, "max_tokens", limits)
    prompts = _batch(comp.prompt, "prompt", limits.max_prompts, "prompts")
    if len(prompts) * comp.candidates() > limits.max_choices:
        raise InvalidRequest(
            f"At most {limits.max_choices} choices (prompts x max(n, best_of)) per request.",
            param=n_param,
        )
    total = len(prompts) * comp.choices()
    usage = comp.streaming() and comp.wants_usage()
    most = len(prompts) * comp.candidates() * comp.token_limit()
    return Parsed("completion", model, comp.streaming(), usage, total, body, most)


def _parse_embedding(body: bytes, limits: Limits, default_model: str | None) -> Parsed:
    emb = EMBEDDING_DECODER.decode(body)
    model, body = _model(emb.model, body, default_model)
    _check_common(1, None, limits)
    inputs = _batch(emb.input, "input", limits.max_embedding_inputs, "items")
    if any(isinstance(t, str) and not t for t in inputs):
        raise InvalidRequest("'input' must not contain empty strings.", param="input")
    return Parsed("embedding", model, False, False, 1, body)


def _batch(
    value: str | list[str | int | list[int]], param: str, most: int, what: str
) -> list[str] | list[list[int]]:
    """A prompt or embedding input as a batch, at most `most` long."""
    try:
        items = prompt_texts(value)
    except ValueError as exc:
        raise InvalidRequest(f"'{param}' {exc}.", param=param) from exc
    if len(items) > most:
        raise InvalidRequest(f"'{param}' allows at most {most} {what}.", param=param)
    return items
