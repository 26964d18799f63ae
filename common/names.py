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
REQUEST_SUBJECTS = f"{REQUEST_SUBJECT_PREFIX}*"
HEARTBEAT_PREFIX = f"{SUBJECT_ROOT}.hb."
DISCOVER_SUBJECT = f"{SUBJECT_ROOT}.discover"
GATEWAY_HB_PREFIX = f"{SUBJECT_ROOT}.gwhb."
"""Gateway announcements (`GatewayAnnounce`): `llmfleet.gwhb.<gateway>`, for operators."""
CONTROL_PREFIX = f"{SUBJECT_ROOT}.ctl."
CONSUMER_PREFIX = "llmfleet-"
INBOX_ROOT = "_LLMFLEET"
ADMIN_INBOX_PREFIX = f"{INBOX_ROOT}.admin"
"""Inbox prefix of operator tools (`llmfleet status`, `llmfleet drain`)."""


def gateway_inbox_prefix(gateway_id: str) -> str:
    """nats-py inbox prefix of a gateway (JetStream answers, PubAcks, pongs): under its reply
    root `_LLMFLEET.gw.<id>` but two tokens deep, so its one-token reply subjects never
    collide with it, and a role allowed `_LLMFLEET.gw.>` needs no `_INBOX.>`."""
    return f"{INBOX_ROOT}.gw.{gateway_id}.i"


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


def request_subject(model_id: str) -> str:
    """Subject a request for `model_id` is published to (captured by the request stream)."""
    return REQUEST_SUBJECT_PREFIX + escape_model(model_id)


def consumer_name(model_id: str) -> str:
    """Durable pull consumer shared by every worker that serves `model_id`."""
    return CONSUMER_PREFIX + escape_model(model_id)


def heartbeat_subject(worker_id: str) -> str:
    return HEARTBEAT_PREFIX + worker_id


def control_subject(worker_id: str) -> str:
    return CONTROL_PREFIX + worker_id


_WORKER_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def check_worker_id(worker_id: str, kind: str = "worker") -> str:
    """Worker (and gateway) ids become subject tokens: keep them to `[A-Za-z0-9_-]{1,64}`."""
    if not _WORKER_ID.match(worker_id):
        raise ValueError(f"{kind} id must match [A-Za-z0-9_-]{{1,64}}: {worker_id!r}")
    return worker_id


SERVICE_NAME = "llmfleet-worker"
"""The NATS micro service every worker registers (`nats micro ls` lists the fleet)."""


def service_subject(worker_id: str, endpoint: str) -> str:
    """A worker's own micro-service endpoint: `llmfleet.ctl.<worker>.<endpoint>`."""
    return f"{CONTROL_PREFIX}{worker_id}.{endpoint}"
