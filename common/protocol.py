"""The llmfleet wire protocol, version 2 (documented for any-language users in docs/protocol.md).

Request: one JetStream message on `llmfleet.req.<escaped model>.<producer>`. The last token
is the producer's name: NATS permissions let each producer publish only its own token, so
the subject (never a header) says who sent it. The payload is the OpenAI request body
exactly as it would be POSTed, and these headers describe it:

    Llmfleet-Version        "2"
    Llmfleet-Op             chat | completion | embedding | count_tokens
    Llmfleet-Request-Id     the producer's id (also sent as Nats-Msg-Id: a re-publish is
                            deduplicated); echoed back, and named by `cancel`
    Llmfleet-Reply          where the reply stream goes: inside `_LLMFLEET.r.<producer>.`
    Llmfleet-Queue-Timeout  ms after the broker stored it: a worker that gets it later
                            drops it (optional)
    Llmfleet-Timeout        ms after the broker stored it: generation is cut off (optional)
    traceparent             W3C trace context (optional)
    Llmfleet-Body-Ref       LLMFLEET_BODIES_<producer>/<name>: the body is in that object
                            store, the payload is empty (for bodies over max_payload)

Both timeouts count from the message's JetStream timestamp (the broker's clock), and the
worker measures them against its own estimate of that clock, so neither the producer's nor
the worker's clock has to agree with anyone's.

Reply stream: JSON messages on the reply subject, each tagged by `type`, numbered by `seq`
(0, 1, 2, ... per delivery) and naming their `delivery` (`<stream seq>.<delivery count>`):
one `accepted`, then `delta` or `embedding` messages, then exactly one terminal `done` or
`error`; `heartbeat` messages (not numbered) say the worker is alive while a stream is
silent. An `error` may also come first (before `accepted`) when a worker rejects a message
it cannot run, and a second `accepted` (another delivery) may follow the first before any
content when the first worker was lost and the broker redelivered the request.

Schema evolution: only by adding fields with defaults; decoders ignore unknown fields.
"""

from __future__ import annotations

import time
from typing import Any

import msgspec
from msgspec import UNSET, UnsetType

from common.errors import ErrorBody

PROTOCOL_VERSION = "2"

H_VERSION = "Llmfleet-Version"
H_OP = "Llmfleet-Op"
H_REQUEST_ID = "Llmfleet-Request-Id"
H_REPLY = "Llmfleet-Reply"
H_QUEUE_TIMEOUT = "Llmfleet-Queue-Timeout"
H_TIMEOUT = "Llmfleet-Timeout"
H_TRACEPARENT = "traceparent"
H_MSG_ID = "Nats-Msg-Id"
H_BODY_REF = "Llmfleet-Body-Ref"

OPS = ("chat", "completion", "embedding", "count_tokens")
"""`count_tokens`: the payload is a chat body; the reply is `accepted` then `done` whose
`usage.prompt_tokens` is the prompt's size in the model's tokens (no content)."""


class Usage(msgspec.Struct):
    """Token counts; the details objects (cached, reasoning tokens) only when known."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: dict[str, Any] | UnsetType = UNSET
    completion_tokens_details: dict[str, Any] | UnsetType = UNSET


class ChoiceDelta(msgspec.Struct, omit_defaults=True):
    """New output for one choice. `content` is the text (chat content or completion text)."""

    index: int
    content: str | None = None
    reasoning_content: str | None = None
    refusal: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    logprobs: dict[str, Any] | None = None
    finish_reason: str | None = None
    # The stop sequence that ended the choice (with finish_reason "stop"), when known.
    stop_sequence: str | None = None
    # Ends the current reasoning block with its signature (Anthropic's extended thinking:
    # a client must send it back with the block); `redacted_reasoning` is a whole
    # redacted block (opaque data). Engines without them never set these.
    reasoning_signature: str | None = None
    redacted_reasoning: str | None = None


class Accepted(msgspec.Struct, tag="accepted", tag_field="type", omit_defaults=True, kw_only=True):
    seq: int
    worker: str
    model: str
    request_id: str = ""
    queued_ms: float | None = None
    ack_subject: str = ""  # lets a trusted requester hand the request back (-NAK) at once
    delivery: str = ""


class Delta(msgspec.Struct, tag="delta", tag_field="type", omit_defaults=True):
    seq: int
    choices: list[ChoiceDelta]
    tokens: int | None = None  # engine outputs sent so far, this one included (~tokens)
    delivery: str = ""


class Embedding(msgspec.Struct, tag="embedding", tag_field="type", omit_defaults=True):
    seq: int
    index: int
    embedding: list[float] | str
    delivery: str = ""


class Heartbeat(msgspec.Struct, tag="heartbeat", tag_field="type", omit_defaults=True):
    """Sent when a stream has been silent for a heartbeat interval (the worker is alive).

    Not numbered itself: `last_seq` is the seq of the last numbered message sent, so a
    receiver also notices a lost message while the stream is silent.
    """

    last_seq: int
    delivery: str = ""


class Done(msgspec.Struct, tag="done", tag_field="type", omit_defaults=True):
    seq: int
    usage: Usage
    delivery: str = ""


class Error(msgspec.Struct, tag="error", tag_field="type", omit_defaults=True):
    seq: int
    status: int
    error: ErrorBody
    retry_after: float | None = None  # seconds, passed on as the HTTP Retry-After header
    delivery: str = ""


Reply = Accepted | Delta | Embedding | Heartbeat | Done | Error
TERMINAL = (Done, Error)

_reply_decoder: msgspec.json.Decoder[Reply] = msgspec.json.Decoder(Reply)
_encoder = msgspec.json.Encoder()


def encode(msg: msgspec.Struct) -> bytes:
    return _encoder.encode(msg)


def decode_reply(data: bytes) -> Reply:
    """Decode one reply-stream message; raises msgspec.DecodeError/ValidationError."""
    return _reply_decoder.decode(data)


class _AnyTagged(msgspec.Struct):
    type: str


_KNOWN_TYPES = frozenset({"accepted", "delta", "embedding", "heartbeat", "done", "error"})
_any_tagged = msgspec.json.Decoder(_AnyTagged)


def is_unknown_type(data: bytes) -> bool:
    """A well-formed message of a type this version does not know (receivers skip those)."""
    try:
        return _any_tagged.decode(data).type not in _KNOWN_TYPES
    except msgspec.DecodeError:
        return False


# ---- control and catalog messages ----------------------------------------------------------


class Cancel(msgspec.Struct, tag="cancel", tag_field="type", omit_defaults=True):
    """Sent to `llmfleet.cancel.<worker>.<producer>`: stop generating the producer's
    `request_id` (only its `delivery`, when given) and free its slot. The producer comes
    from the subject, so a producer can cancel only its own requests."""

    request_id: str
    delivery: str = ""


class Ping(msgspec.Struct, tag="ping", tag_field="type"):
    """A request to `llmfleet.ctl.<worker>`; a live worker answers `{"type":"pong"}`.

    A dead worker's subject has no subscriber, so the requester gets no-responders at once.
    """


PONG = b'{"type":"pong"}'

Control = Cancel | Ping
"""Cancel is accepted only on the cancel subject, ping only on `llmfleet.ctl.<worker>`."""
"""Drain is not a control message: it is a request to `llmfleet.ctl.<worker>.drain` (the
worker's micro-service endpoint), a subject of its own so that permissions can let
producers cancel and ping without letting them drain workers."""
_control_decoder: msgspec.json.Decoder[Control] = msgspec.json.Decoder(Control)


def decode_control(data: bytes) -> Control:
    return _control_decoder.decode(data)


def status_of(*, ready: bool, loading: bool, has_workers: bool) -> str:
    """The model status vocabulary, one rule for the gateway's catalog (`/v1/models`) and
    `llmfleet status`: a ready worker wins, then a loading one, then a draining one."""
    if ready:
        return "ready"
    if loading:
        return "loading"
    return "draining" if has_workers else "unavailable"


class ModelStatus(msgspec.Struct, omit_defaults=True):
    """One model on one worker. `loaded` is false while the worker is still loading it.

    Counters are totals since the worker started; the rates are over its last ~10 s.
    """

    id: str
    engine: str
    max_concurrency: int
    in_flight: int = 0
    owned_by: str = "llmfleet"
    created: int = 0
    simulated: bool = False
    description: str = ""
    loaded: bool = True
    completed: int = 0
    failed: int = 0
    cancelled: int = 0
    tokens_out: int = 0
    req_per_s: float = 0.0
    tokens_per_s: float = 0.0
    # This worker's circuit breaker for the model (common/breaker.py): fed by its
    # upstream's failures (5xx, 429, connection errors, broken streams) and, for engines
    # with a health probe, by the probe. While "open" the worker takes no new requests for
    # the model; "half_open": it takes one, the probe.
    circuit: str = "closed"
    circuit_failures: int = 0
    circuit_error: str = ""
    circuit_reopen_in_s: float = 0.0


class WorkerAnnounce(msgspec.Struct, omit_defaults=True):
    """Published on `llmfleet.hb.<worker>` every heartbeat interval and on `discover`, and
    returned by the worker's `status` service endpoint and `$SRV.STATS` (one stats shape
    serves the gateway catalog, `llmfleet status` and the NATS micro API).

    `ttl_s` says how long the announcement stays valid; `state` "stopped" removes the worker
    at once. Counters are totals since the worker started.
    """

    worker: str
    host: str
    version: str
    state: str
    ttl_s: float
    started_at: float
    models: list[ModelStatus]
    completed: int = 0
    failed: int = 0
    tokens_out: int = 0
    peak_in_flight: int = 0
    engine: str = ""  # the engine kind(s) of this worker, comma separated
    uptime_s: float = 0.0  # measured by the worker (immune to clock skew between hosts)
    slots_used: int = 0
    slots_total: int = 0
    req_per_s: float = 0.0
    tokens_per_s: float = 0.0


class GatewayAnnounce(msgspec.Struct, omit_defaults=True):
    """Published by every gateway on `llmfleet.gwhb.<gateway>` every few seconds and on
    `discover`, for operators (`llmfleet status`); nothing routes by it. `state` "stopped"
    (sent when it stops) removes it at once; else it is valid for `ttl_s`. Counters are
    totals since the gateway started."""

    gateway: str
    host: str
    version: str
    state: str  # ready | draining (stopped accepting, open streams finish) | stopped
    ttl_s: float
    uptime_s: float = 0.0
    listen: str = ""  # host:port of its HTTP server
    requests: int = 0
    in_flight: int = 0
    ok: int = 0
    client_errors: int = 0
    server_errors: int = 0
    workers: int = 0  # live workers in its catalog
    unhealthy: list[str] = []  # models whose circuit is open at this gateway


_gateway_announce_decoder = msgspec.json.Decoder(GatewayAnnounce)


def decode_gateway_announce(data: bytes) -> GatewayAnnounce:
    return _gateway_announce_decoder.decode(data)


_announce_decoder = msgspec.json.Decoder(WorkerAnnounce)


def decode_announce(data: bytes) -> WorkerAnnounce:
    return _announce_decoder.decode(data)


def now_ms() -> int:
    return int(time.time() * 1000)
