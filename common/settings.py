"""Settings of the broker layout both sides create (the request stream, the body store).

Plain msgspec Structs with their defaults, written once: the CLI takes its flag defaults
from them (llmfleet/flags.py). No imports beyond msgspec, so reading them is cheap.
"""

from __future__ import annotations

import msgspec


class QueueSettings(msgspec.Struct, frozen=True):
    max_per_model: int = 10_000  # per model and producer (one request subject)
    max_bytes: int = -1  # all queued requests together; -1: as much as the broker has
    max_msg_bytes: int = 1024 * 1024  # one request message; larger bodies go by reference
    max_age_s: float = 3600.0
    duplicate_window_s: float = 120.0
    ack_wait_s: float = 5.0
    max_deliver: int = -1  # workers give up on a poison request (worker/decide.py)
    storage: str = "memory"
    replicas: int = 1


class BodySettings(msgspec.Struct, frozen=True):
    ttl_s: float = 900.0
    max_bytes: int = 256 * 1024 * 1024
    replicas: int = 1
