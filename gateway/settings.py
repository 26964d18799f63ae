"""The gateway's settings, with their defaults written once (the CLI reads them).

Plain msgspec Structs, importable without the gateway's dependencies.
"""

from __future__ import annotations

import math

import msgspec

from common.breaker import BreakerSettings
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


class EdgeSettings(msgspec.Struct, frozen=True):
    """The HTTP edge: what a connection may cost before a request reaches the app
    (enforced by `gateway.edge.EdgeProtocol`)."""

    max_header_bytes: int = 64 * 1024  # request line + headers (more: 431, closed)
    header_timeout_s: float = 10.0  # to send a whole request head (else: 408, closed)
    max_connections: int = 4096  # open connections or running requests (more: 503)


class GatewaySettings(msgspec.Struct, frozen=True):
    nats_url: str
    host: str = "127.0.0.1"
    port: int = 8080
    gateway_id: str = ""
    api_key: str | None = None
    # none | api-key | keys ("": api-key when --api-key is set, else none); see
    # gateway/auth.py and docs/governance.md
    auth: str = ""
    audit: str = "on"  # on | off: one event per request in LLMFLEET_AUDIT
    audit_required: bool = False  # a request whose audit event cannot be stored fails
    audit_retention_days: float = 30.0
    audit_max_bytes: int = -1  # the audit stream's size cap (oldest events go first); -1: none
    # Stored responses (/v1/responses with `store`) in KV bucket LLMFLEET_RESPONSES
    # (gateway/responses_store.py): on | off; kept this many seconds; the bucket's size cap
    # (the oldest responses go first); -1: none.
    responses: str = "on"
    responses_ttl_s: float = 30 * 86400.0
    responses_max_bytes: int = -1
    # Reserved completion tokens for a request that sets no max tokens, under a key that
    # counts tokens (tpm, budgets); it then runs with this max_tokens.
    reserve_tokens: int = 4096
    # A key's share of one model's queue at this gateway (requests not yet taken by a
    # worker), as a fraction of --max-queue; 0: no per-key cap.
    key_queue_share: float = 0.5
    default_model: str | None = None  # for requests that name no model
    # Aliases and fallback chains (control/routes.py): a YAML file (reloaded on SIGHUP),
    # "kv" (the entry `llmfleet routes push` stores, watched), or None: no aliases.
    routes: str | None = None
    breaker: BreakerSettings = BreakerSettings()  # the circuit per model at this gateway
    limits: Limits = Limits()
    dispatch: DispatchSettings = DispatchSettings()
    edge: EdgeSettings = EdgeSettings()
    queue: QueueSettings = QueueSettings()
    discover_wait_s: float = 0.5
    model_grace_s: float = 30.0
    cors_origins: tuple[str, ...] = ()
    producer_buckets: tuple[str, ...] = ()  # batch producers whose body buckets it creates
    resume_on_failure: bool = False
    shutdown_grace_s: float = 30.0
    queue_poll_s: float = 5.0  # queue-depth metric refresh (0: off)
    announce_s: float = 2.0  # GatewayAnnounce interval (for `llmfleet status`)
    # With an api key, /metrics needs a bearer token: this one or the api key itself.
    metrics_token: str | None = None
    metrics_listen: str | None = None  # HOST:PORT of an extra /metrics-only listener (no auth)
    # NATS TLS (PEM files; see common.natsconn.tls_context): the CA to check servers
    # against, and a client certificate + key for servers that demand one.
    nats_ca: str | None = None
    nats_cert: str | None = None
    nats_key: str | None = None


def check_gateway(settings: GatewaySettings) -> None:
    """ValueError naming the first setting a gateway cannot run with (the CLI shows it)."""
    e = settings.edge
    if e.max_header_bytes < 1024:
        raise ValueError(f"--max-header-bytes must be at least 1024, not {e.max_header_bytes}")
    if not e.header_timeout_s > 0:
        raise ValueError(f"--header-timeout must be positive, not {e.header_timeout_s}")
    if e.max_connections < 1:
        raise ValueError(f"--max-connections must be at least 1, not {e.max_connections}")
    if settings.metrics_listen:
        parse_listen(settings.metrics_listen)
    if auth_mode(settings) == "api-key" and not settings.api_key:
        raise ValueError("--auth api-key needs --api-key")
    if settings.auth == "keys" and settings.api_key:
        raise ValueError("--auth keys replaces --api-key: give one of them")
    if not 0 <= settings.key_queue_share <= 1:
        raise ValueError(f"--key-queue-share must be within 0..1, not {settings.key_queue_share}")
    check_breaker(settings.breaker)
    if settings.reserve_tokens < 1:
        raise ValueError(f"--reserve-tokens must be at least 1, not {settings.reserve_tokens}")
    if not settings.audit_retention_days > 0:
        raise ValueError("--audit-retention must be positive")
    if not settings.responses_ttl_s > 0:
        raise ValueError(f"--responses-ttl must be positive, not {settings.responses_ttl_s}")
    if settings.responses_max_bytes < -1 or settings.responses_max_bytes == 0:
        raise ValueError(
            f"--responses-max-bytes must be positive or -1, not {settings.responses_max_bytes}"
        )


def check_breaker(b: BreakerSettings) -> None:
    """ValueError for circuit-breaker settings that cannot work (gateways and workers)."""
    if b.threshold < 1:
        raise ValueError(f"--breaker-failures must be at least 1, not {b.threshold}")
    if not 0 < b.base_s <= b.max_s or not math.isfinite(b.max_s):
        raise ValueError(
            f"--breaker-backoff ({b.base_s}) must be positive and at most --breaker-backoff-max "
            f"({b.max_s})"
        )


def auth_mode(settings: GatewaySettings) -> str:
    """The auth mode in force: `--auth`, else api-key if `--api-key` is set, else none."""
    return settings.auth or ("api-key" if settings.api_key else "none")


def parse_listen(value: str) -> tuple[str, int]:
    """`HOST:PORT` (`[::1]:9100` for IPv6) as (host, port); ValueError when malformed."""
    host, sep, port = value.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"--metrics-listen: expected HOST:PORT, got {value!r}")
    return host, int(port)
