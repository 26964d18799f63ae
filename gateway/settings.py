"""The gateway's settings, with their defaults written once (the CLI reads them).

Plain msgspec Structs, importable without the gateway's dependencies.
"""

from __future__ import annotations

import msgspec

from common.settings import QueueSettings


class Limits(msgspec.Struct, frozen=True):
    max_body_bytes: int = 32 * 1024 * 1024
    max_tokens: int = 32_768
    max_n: int = 128
    max_messages: int = 4096
    max_stop: int = 16
    max_embedding_inputs: int = 2048
    max_prompts: int = 2048
    max_choices: int = 4096  # completions: prompts x n


class DispatchSettings(msgspec.Struct, frozen=True):
    queue_timeout_s: float = 60.0
    probe_after_s: float = 1.5
    stall_timeout_s: float = 5.0
    redelivery_wait_s: float = 8.0
    request_timeout_s: float = 600.0
    retry_after_s: float = 2.0
    publish_timeout_s: float = 2.0
    publish_retry_s: float = 10.0


class GatewaySettings(msgspec.Struct, frozen=True):
    nats_url: str
    host: str = "127.0.0.1"
    port: int = 8080
    gateway_id: str = ""
    api_key: str | None = None
    default_model: str | None = None  # for requests that name no model
    limits: Limits = Limits()
    dispatch: DispatchSettings = DispatchSettings()
    queue: QueueSettings = QueueSettings()
    discover_wait_s: float = 0.5
    model_grace_s: float = 30.0
    cors_origins: tuple[str, ...] = ()
    resume_on_failure: bool = False
    shutdown_grace_s: float = 30.0
    queue_poll_s: float = 5.0  # queue-depth metric refresh (0: off)
    announce_s: float = 2.0  # GatewayAnnounce interval (for `llmfleet status`)
