"""Subject and resource names, and the reversible one-token escaping of model ids.

Model ids contain `.`, `:`, `/` (`qwen2.5:7b`, `meta-llama/Llama-3.1-8B-Instruct`), and a raw
`.` would split a NATS subject token while `*`/`>` would act as wildcards. `escape_model`
keeps `[A-Za-z0-9_-]` and writes every other UTF-8 byte as `=XX` (uppercase hex). The result
is one subject token, a valid JetStream stream/consumer name part and a valid KV key, and
`unescape_model` reverses it exactly.
"""

from __future__ import annotations

import functools
import re

MAX_MODEL_ID_BYTES = 200
"""Longest model id accepted (UTF-8 bytes). Escaped ids stay well under NATS' name limits."""

SUBJECT_ROOT = "llmfleet"
REQUEST_STREAM = "LLMFLEET_REQUESTS"
REQUEST_SUBJECT_PREFIX = f"{SUBJECT_ROOT}.req."
REQUEST_SUBJECTS = f"{REQUEST_SUBJECT_PREFIX}*.*"
"""`llmfleet.req.<escaped model>.<producer>`: the last token is the producer's name, which
NATS permissions bind to its user (docs/security.md)."""
GATEWAY_PRODUCER = "gateway"
"""The producer name every gateway publishes under (its NATS user name)."""
CANCEL_PREFIX = f"{SUBJECT_ROOT}.cancel."
"""`llmfleet.cancel.<worker>.<producer>`: a producer cancels only its own requests."""
HEARTBEAT_PREFIX = f"{SUBJECT_ROOT}.hb."
DISCOVER_SUBJECT = f"{SUBJECT_ROOT}.discover"
GATEWAY_HB_PREFIX = f"{SUBJECT_ROOT}.gwhb."
"""Gateway announcements (`GatewayAnnounce`): `llmfleet.gwhb.<gateway>`, for operators."""
CONTROL_PREFIX = f"{SUBJECT_ROOT}.ctl."
CONSUMER_PREFIX = "llmfleet-"
INBOX_ROOT = "_LLMFLEET"
REPLY_ROOT = f"{INBOX_ROOT}.r"
"""Every producer's reply space is `_LLMFLEET.r.<producer>.>`: its reply streams and inbox."""
BODY_BUCKET_PREFIX = "LLMFLEET_BODIES_"
"""A producer's large bodies go to object-store bucket `LLMFLEET_BODIES_<producer>`."""
ADMIN_INBOX_PREFIX = f"{INBOX_ROOT}.admin"
"""Inbox prefix of operator tools (`llmfleet status`, `llmfleet drain`)."""


def reply_space(producer: str) -> str:
    """`_LLMFLEET.r.<producer>`: the only place workers answer `producer`'s requests."""
    return f"{REPLY_ROOT}.{producer}"


def gateway_reply_root(gateway_id: str, producer: str = GATEWAY_PRODUCER) -> str:
    """A gateway's reply streams are `<root>.<128 random bits>` (one token past it)."""
    return f"{reply_space(producer)}.{gateway_id}"


def gateway_inbox_prefix(gateway_id: str, producer: str = GATEWAY_PRODUCER) -> str:
    """nats-py inbox prefix of a gateway (JetStream answers, PubAcks, pongs): inside its
    producer's reply space but two tokens past its reply root, so its one-token reply
    subjects never collide with it, and a role allowed `_LLMFLEET.r.gateway.>` needs no
    `_INBOX.>`."""
    return f"{gateway_reply_root(gateway_id, producer)}.i"


def worker_inbox_prefix(worker_id: str) -> str:
    """nats-py inbox prefix of a worker (JetStream answers, body reads). Its own root
    `_LLMFLEET.wi`, apart from the pull inboxes `_LLMFLEET.w.<worker>.<model>.<n>`."""
    return f"{INBOX_ROOT}.wi.{worker_id}"


_SAFE = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-")
_ESCAPED = re.compile(r"^(?:[A-Za-z0-9_-]|=[0-9A-F]{2})+$")


@functools.lru_cache(maxsize=4096)
def escape_model(model_id: str) -> str:
    """Return the one-token form of `model_id`; raises ValueError if empty or too long.

    Cached (bounded): the gateway escapes the model of every request it publishes, and a
    fleet serves few models."""
    raw = model_id.encode("utf-8")
    if not raw:
        raise ValueError("model id is empty")
    if len(raw) > MAX_MODEL_ID_BYTES:
        raise ValueError(f"model id is longer than {MAX_MODEL_ID_BYTES} bytes")
    return "".join(chr(b) if b in _SAFE else f"={b:02X}" for b in raw)


def unescape_model(token: str) -> str:
    """Inverse of `escape_model`; raises ValueError for text `escape_model` cannot produce."""
    if not _ESCAPED.match(token):
        raise ValueError(f"not an escaped model id: {token!r}")
    out = bytearray()
    i = 0
    while i < len(token):
        if token[i] == "=":
            out.append(int(token[i + 1 : i + 3], 16))
            i += 3
        else:
            out.append(ord(token[i]))
            i += 1
    return out.decode("utf-8")


def request_subject(model_id: str, producer: str) -> str:
    """Subject `producer` publishes a request for `model_id` to (captured by the stream)."""
    return f"{REQUEST_SUBJECT_PREFIX}{escape_model(model_id)}.{producer}"


def model_filter(model_id: str) -> str:
    """Every producer's requests for `model_id`: the filter of the model's consumer."""
    return f"{REQUEST_SUBJECT_PREFIX}{escape_model(model_id)}.*"


def parse_request_subject(subject: str) -> tuple[str, str]:
    """(model id, producer) of a request subject; ValueError if it is not one."""
    if not subject.startswith(REQUEST_SUBJECT_PREFIX):
        raise ValueError(f"not a request subject: {subject!r}")
    token, dot, producer = subject[len(REQUEST_SUBJECT_PREFIX) :].partition(".")
    if not dot:
        raise ValueError(f"request subject without a producer: {subject!r}")
    return unescape_model(token), check_producer(producer)


def cancel_subject(worker_id: str, producer: str) -> str:
    return f"{CANCEL_PREFIX}{worker_id}.{producer}"


def body_bucket(producer: str) -> str:
    return BODY_BUCKET_PREFIX + producer


def consumer_name(model_id: str) -> str:
    """Durable pull consumer shared by every worker that serves `model_id`."""
    return CONSUMER_PREFIX + escape_model(model_id)


def heartbeat_subject(worker_id: str) -> str:
    return HEARTBEAT_PREFIX + worker_id


def control_subject(worker_id: str) -> str:
    return CONTROL_PREFIX + worker_id


WORKER_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_WORKER_ID = WORKER_ID


def check_worker_id(worker_id: str, kind: str = "worker") -> str:
    """Worker (and gateway) ids become subject tokens: keep them to `[A-Za-z0-9_-]{1,64}`."""
    if not _WORKER_ID.match(worker_id):
        raise ValueError(f"{kind} id must match [A-Za-z0-9_-]{{1,64}}: {worker_id!r}")
    return worker_id


def answerable(reply: str) -> bool:
    """May a worker answer a core request (ping, micro endpoint) on `reply`? Only into an
    inbox: a producer's reply space, the operator tools', or a client library's default
    `_INBOX.` (a dev broker without authorization). A request naming any other reply (say
    `llmfleet.ctl.<worker>.drain`) would make the worker a confused deputy."""
    return reply.startswith((REPLY_ROOT + ".", ADMIN_INBOX_PREFIX + ".", "_INBOX."))


def check_producer(producer: str) -> str:
    """Producer names are NATS user names used as one subject token: `[A-Za-z0-9_-]{1,64}`
    (so also a valid object-store bucket name part)."""
    if not _WORKER_ID.match(producer):
        raise ValueError(f"producer name must match [A-Za-z0-9_-]{{1,64}}: {producer!r}")
    return producer


_SUBJECT_TOKEN = re.compile(r"^[!-~]+$")  # printable ASCII, no space
MAX_REPLY_SUBJECT = 256


def check_reply(reply: str, producer: str) -> str:
    """A reply subject a worker may publish `producer`'s answers to: inside its reply space,
    printable ASCII tokens, no wildcards, at most 256 bytes. ValueError otherwise."""
    space = reply_space(producer) + "."
    if not reply.startswith(space) or len(reply) > MAX_REPLY_SUBJECT:
        raise ValueError(f"reply subject must start with {space!r} (at most 256 bytes)")
    for token in reply[len(space) :].split("."):
        if not _SUBJECT_TOKEN.match(token) or token in ("*", ">") or "*" in token or ">" in token:
            raise ValueError("reply subject has an empty, wildcard or non-printable token")
    return reply


SERVICE_NAME = "llmfleet-worker"
"""The NATS micro service every worker registers (`nats micro ls` lists the fleet)."""


def service_subject(worker_id: str, endpoint: str) -> str:
    """A worker's own micro-service endpoint: `llmfleet.ctl.<worker>.<endpoint>`."""
    return f"{CONTROL_PREFIX}{worker_id}.{endpoint}"
