"""The worker's settings and each engine's, with their defaults written once (the CLI
reads them). Plain msgspec Structs, importable without the engines' dependencies.
"""

from __future__ import annotations

import msgspec

from common.apis.anthropic_upstream import DEFAULT_MAX_TOKENS
from common.breaker import BreakerSettings
from common.settings import QueueSettings


class RunnerSettings(msgspec.Struct, frozen=True):
    heartbeat_s: float = 1.0
    # A pull request's lifetime at the broker. Shorter than the gateway's stall timeout
    # (5 s): when a gateway gives up on a frozen worker and hands its delivery back, the
    # frozen worker's own pulls have lapsed, so the redelivery goes to a live worker.
    pull_expires_s: float = 3.0
    # The longest a request may run here, whatever its Llmfleet-Timeout says (or when it
    # sends none): a producer cannot hold a slot for good (the gateway's --request-timeout).
    max_request_s: float = 600.0
    # Each model's circuit breaker on this worker (worker/design.md): `threshold` failures
    # of the upstream in a row open it for `base_s`, doubling up to `max_s`.
    breaker: BreakerSettings = BreakerSettings()
    # How often an engine with a health probe (openai, anthropic) checks its upstream
    # between requests (0: never); its failures count like a request's.
    health_interval_s: float = 2.0


class SimSettings(msgspec.Struct, frozen=True):
    ttft_ms: float = 20.0
    itl_ms: float = 5.0
    tokens: int = 32
    embedding_dim: int = 384


class OpenAISettings(msgspec.Struct, frozen=True):
    """Where the upstream lives and what the model is called on each side: the settings of
    every engine that proxies to an HTTP upstream (`openai`, `anthropic`; the `--upstream*`
    flags).

    `timeout_s` bounds non-streaming calls (embeddings, token counts) and request writes;
    streams have no read timeout (a long generation is legal, and deadlines are enforced
    by the worker).
    """

    base_url: str = ""  # empty: the engine's default, UPSTREAM_DEFAULTS[kind]
    served_model: str = ""  # set per model by the composition root
    api_key: str | None = None
    upstream_model: str | None = None
    timeout_s: float = 600.0
    connect_timeout_s: float = 10.0
    max_connections: int = 1024
    wait_ready_s: float = 900.0
    # The health probe's GET, below the upstream's root (the base URL without /v1), sent
    # with the engine's auth headers every `RunnerSettings.health_interval_s`.
    health_path: str = "/v1/models"


UPSTREAM_DEFAULTS = {
    "openai": "http://127.0.0.1:8000/v1",
    "anthropic": "https://api.anthropic.com",
}
"""Each upstream engine's base URL when `--upstream` is empty."""


class AnthropicSettings(msgspec.Struct, frozen=True):
    """What only the `anthropic` engine needs; the connection is `OpenAISettings`."""

    # Messages requires max_tokens: what a request that sets none gets (plus its thinking
    # budget when thinking is on).
    default_max_tokens: int = DEFAULT_MAX_TOKENS


class LlamaCppSettings(msgspec.Struct, frozen=True):
    """One GGUF model. `n_ctx` is per sequence: the KV cache holds `n_ctx * n_parallel`."""

    model_path: str = ""  # empty: the packaged Gemma 3 270M
    chat_format: str | None = None  # built-in template name or Jinja file; None: the GGUF's
    n_ctx: int = 4096
    n_parallel: int = 8  # the worker's max concurrency for the model
    n_threads: int | None = None
    n_gpu_layers: int = 0


class STSettings(msgspec.Struct, frozen=True):
    model_path: str = ""  # empty: the packaged all-MiniLM-L6-v2
    device: str = "cpu"


ENGINES = ("sim", "openai", "anthropic", "llamacpp", "embeddings")


class EngineSettings(msgspec.Struct, frozen=True):
    """Which engine serves the worker's models, and every engine's settings."""

    kind: str = "sim"
    sim: SimSettings = SimSettings()
    openai: OpenAISettings = OpenAISettings()
    anthropic: AnthropicSettings = AnthropicSettings()
    llamacpp: LlamaCppSettings = LlamaCppSettings()
    embeddings: STSettings = STSettings()


class WorkerSettings(msgspec.Struct, frozen=True):
    nats_url: str
    worker_id: str = ""
    heartbeat_s: float = 1.0
    drain_grace_s: float = 30.0
    max_concurrency: int = 8  # per model (the embeddings engine always takes 1)
    engine: EngineSettings = EngineSettings()
    queue: QueueSettings = QueueSettings()
    runner: RunnerSettings = RunnerSettings()
    metrics_host: str = "127.0.0.1"
    metrics_port: int = 0  # 0: no /metrics server
    # on: requests from batch producers (straight over NATS) leave an audit event in
    # LLMFLEET_AUDIT, under the producer their subject names (gateways audit their own)
    audit: str = "on"
    # NATS TLS (PEM files; see common.natsconn.tls_context): the CA to check servers
    # against (for NATS only: HTTPS upstreams keep the system store), and a client
    # certificate + key for servers that demand one.
    nats_ca: str | None = None
    nats_cert: str | None = None
    nats_key: str | None = None


def check_worker(settings: WorkerSettings) -> None:
    """ValueError naming the first setting a worker cannot run with (the CLI shows it)."""
    b = settings.runner.breaker
    if b.threshold < 1:
        raise ValueError(f"--breaker-failures must be at least 1, not {b.threshold}")
    if not b.base_s > 0:
        raise ValueError(f"--breaker-backoff must be positive, not {b.base_s}")
    if not b.max_s >= b.base_s:
        raise ValueError(f"--breaker-backoff-max must be at least {b.base_s}, not {b.max_s}")
    interval = settings.runner.health_interval_s
    if not interval >= 0:
        raise ValueError(f"--upstream-health-interval must be 0 (off) or more, not {interval}")
    path = settings.engine.openai.health_path
    if not path.startswith("/") or any(c.isspace() for c in path) or "://" in path:
        raise ValueError(f"--upstream-health-path must be a path starting with /, not {path!r}")
