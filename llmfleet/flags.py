"""The `llmfleet` command line: every command's flags, each with an environment variable.

Every flag can also come from an environment variable `LLMFLEET_<FLAG>` (dashes become
underscores, e.g. `LLMFLEET_NATS_URL`); a flag given on the command line wins. The global
flags (`--log-level`, `--log-format`) may stand before or after the command.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from typing import Any, NamedTuple, TypeVar

import msgspec

from common import __version__
from gateway.settings import GatewaySettings
from worker.settings import ENGINES, WorkerSettings

S = TypeVar("S", bound=msgspec.Struct)

DEFAULT_NATS_URL = "nats://127.0.0.1:4222"


def env_name(flag: str) -> str:
    return "LLMFLEET_" + flag.lstrip("-").replace("-", "_").upper()


def env_default(
    flag: str, default: Any, conv: Callable[[str], Any] = str, env: str | None = None
) -> Any:
    name = env or env_name(flag)
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return conv(raw)
    except ValueError:
        raise SystemExit(f"llmfleet: invalid value for {name}: {raw!r}") from None


def add(
    p: Any,
    flag: str,
    default: Any,
    help: str,
    conv: Callable[[str], Any] = str,
    env: str | None = None,
    **kw: Any,
) -> None:
    env = env or env_name(flag)
    p.add_argument(
        flag,
        default=env_default(flag, default, conv, env),
        type=conv,
        help=f"{help} [env {env}; default {default!r}]",
        **kw,
    )


def _truthy(raw: str) -> bool:
    if raw.lower() in ("1", "true", "yes", "on"):
        return True
    if raw.lower() in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(raw)


def _nats_args(p: argparse.ArgumentParser) -> None:
    add(p, "--port", 4222, "client port", int, env="LLMFLEET_NATS_PORT")
    add(p, "--host", "127.0.0.1", "listen address", env="LLMFLEET_NATS_HOST")
    add(p, "--store", "", "JetStream store directory (default: a temporary one)")
    add(p, "--http-port", 0, "monitoring port (0: off)", int)


class Flag(NamedTuple):
    """A flag that sets one settings field; its default is the field's (written once, in
    gateway/settings.py or worker/settings.py). An empty value means None for a field whose
    default is None; `none_if` names another value that does (`--n-threads 0`)."""

    name: str
    path: str  # dotted field path in the settings root, e.g. "dispatch.queue_timeout_s"
    help: str
    choices: tuple[str, ...] | None = None
    none_if: object = ""
    metavar: str | None = None  # the value's name in --help (argparse's default: DEST)

    @property
    def dest(self) -> str:
        return self.name.lstrip("-").replace("-", "_")


GATEWAY_FLAGS = (
    Flag("--host", "host", "HTTP listen address"),
    Flag("--port", "port", "HTTP port"),
    Flag("--api-key", "api_key", "require this bearer token from clients (empty: no auth)"),
    Flag(
        "--auth",
        "auth",
        "none | api-key | keys (virtual keys from `llmfleet keys`; see docs/governance.md); "
        "empty: api-key when --api-key is set, else none",
        choices=("", "none", "api-key", "keys"),
    ),
    Flag(
        "--audit",
        "audit",
        "on: one audit event per request in the LLMFLEET_AUDIT stream",
        choices=("on", "off"),
    ),
    Flag(
        "--audit-required",
        "audit_required",
        "fail a request whose audit event cannot be stored (default: complete it, count it)",
    ),
    Flag("--audit-retention", "audit_retention_days", "days the audit stream keeps events"),
    Flag(
        "--audit-max-bytes",
        "audit_max_bytes",
        "size cap of the audit stream, oldest events dropped first (-1: none)",
    ),
    Flag(
        "--responses-store",
        "responses",
        "on: keep /v1/responses answers (store: true, the default) in the LLMFLEET_RESPONSES "
        "KV bucket, for previous_response_id and GET /v1/responses/{id}",
        choices=("on", "off"),
    ),
    Flag("--responses-ttl", "responses_ttl_s", "seconds a stored response is kept"),
    Flag(
        "--responses-max-bytes",
        "responses_max_bytes",
        "size cap of the stored responses, oldest dropped first (-1: none)",
    ),
    Flag(
        "--reserve-tokens",
        "reserve_tokens",
        "completion tokens reserved (and set as max_tokens) for a request with no max tokens "
        "under a key with a token limit or budget",
    ),
    Flag(
        "--key-queue-share",
        "key_queue_share",
        "most of one model's --max-queue one virtual key may hold waiting at this gateway "
        "(0: no cap)",
    ),
    Flag("--default-model", "default_model", "model for requests that name none (empty: 400)"),
    Flag(
        "--routes",
        "routes",
        "aliases and fallback chains: a YAML file (reloaded on SIGHUP), or `kv` for the "
        "entry `llmfleet routes push` stores (docs/routing.md)",
        metavar="FILE|kv",
    ),
    Flag(
        "--breaker-failures", "breaker.threshold", "failures in a row that open a model's circuit"
    ),
    Flag(
        "--breaker-backoff", "breaker.base_s", "seconds a circuit first stays open (then doubles)"
    ),
    Flag("--breaker-backoff-max", "breaker.max_s", "longest a circuit stays open, in seconds"),
    Flag("--gateway-id", "gateway_id", "gateway id in announcements and subjects (empty: random)"),
    Flag(
        "--cors-origins",
        "cors_origins",
        "browser origins allowed to call the API, comma separated or *",
    ),
    Flag(
        "--producer-buckets",
        "producer_buckets",
        "batch producers (NATS users) whose body buckets LLMFLEET_BODIES_<name> this gateway "
        "creates, comma separated (producers may not create streams)",
    ),
    Flag(
        "--model-grace", "model_grace_s", "seconds a model stays listed after its last worker left"
    ),
    Flag(
        "--resume-on-failure",
        "resume_on_failure",
        "continue a stream on another worker if its worker dies mid-answer "
        "(see docs/reliability.md for the limits)",
    ),
    Flag(
        "--queue-timeout",
        "dispatch.queue_timeout_s",
        "seconds a request may wait for a free worker",
    ),
    Flag(
        "--stall-timeout",
        "dispatch.stall_timeout_s",
        "seconds a silent worker gets before a stream fails",
    ),
    Flag(
        "--request-timeout",
        "dispatch.request_timeout_s",
        "default and maximum total seconds per request",
    ),
    Flag("--max-body-bytes", "limits.max_body_bytes", "largest accepted request body"),
    Flag("--max-tokens-limit", "limits.max_tokens", "largest max_tokens accepted"),
    Flag("--max-n", "limits.max_n", "largest n (and best_of) accepted"),
    Flag("--max-queue", "queue.max_per_model", "requests that may wait per model (more: 429)"),
    Flag("--stream-replicas", "queue.replicas", "replicas of the request stream (3 on a cluster)"),
    Flag("--queue-poll", "queue_poll_s", "seconds between queue-depth polls for /metrics (0: off)"),
    Flag(
        "--max-header-bytes",
        "edge.max_header_bytes",
        "largest request line + headers (more: 431, connection closed)",
    ),
    Flag(
        "--header-timeout",
        "edge.header_timeout_s",
        "seconds a connection gets to send a whole request head (else: closed)",
    ),
    Flag(
        "--max-connections",
        "edge.max_connections",
        "open connections or running requests at most (more: 503)",
    ),
    Flag(
        "--metrics-token",
        "metrics_token",
        "bearer token for GET /metrics (the API key works too; with --api-key and no "
        "token, /metrics needs the API key)",
    ),
    Flag(
        "--metrics-listen",
        "metrics_listen",
        "HOST:PORT of an extra listener serving only GET /metrics, without auth "
        "(for a private network; empty: none)",
    ),
)

NATS_TLS_FLAGS = (
    Flag(
        "--nats-ca",
        "nats_ca",
        "CA file (PEM) to check NATS server certificates against, for NATS only (empty: the "
        "system store, or SSL_CERT_FILE). Any --nats-ca/--nats-cert/--nats-key makes TLS "
        "required, for nats:// URLs too (tls:// always requires it)",
        metavar="FILE",
    ),
    Flag(
        "--nats-cert",
        "nats_cert",
        "client certificate (PEM) for a NATS server that verifies clients (with --nats-key)",
        metavar="FILE",
    ),
    Flag("--nats-key", "nats_key", "unencrypted private key (PEM) of --nats-cert", metavar="FILE"),
)
"""TLS to the broker: wherever `--nats` is (gateway, worker, status, drain); the same
fields in the gateway's and the worker's settings."""

WORKER_FLAGS = (
    Flag("--engine", "engine.kind", "inference engine", choices=ENGINES),
    Flag("--max-concurrency", "max_concurrency", "requests run at once per model"),
    Flag("--worker-id", "worker_id", "worker id (empty: host-pid-random)"),
    Flag("--heartbeat", "heartbeat_s", "seconds between catalog announcements"),
    Flag("--drain-grace", "drain_grace_s", "seconds in-flight requests get on SIGTERM"),
    Flag(
        "--max-request-time",
        "runner.max_request_s",
        "longest a request may run, whatever timeout its producer sent (or none)",
    ),
    Flag("--metrics-port", "metrics_port", "port for Prometheus GET /metrics (0: off)"),
    Flag("--metrics-host", "metrics_host", "listen address of --metrics-port"),
    Flag(
        "--audit",
        "audit",
        "on: requests from batch producers (straight over NATS) leave an audit event",
        choices=("on", "off"),
    ),
    Flag(
        "--breaker-failures",
        "runner.breaker.threshold",
        "upstream failures in a row (5xx, 429, no connection, a broken stream, a failed "
        "health probe) that open a model's circuit on this worker: it pulls nothing then",
    ),
    Flag(
        "--breaker-backoff",
        "runner.breaker.base_s",
        "seconds an opened circuit stays open before one request probes the upstream",
    ),
    Flag(
        "--breaker-backoff-max",
        "runner.breaker.max_s",
        "the most seconds a circuit stays open (the backoff doubles per failed probe)",
    ),
)
WORKER_REPLICAS = Flag(
    "--stream-replicas",
    "queue.replicas",
    "replicas of the request stream, if this worker creates it",
)
SIM_FLAGS = (
    Flag("--sim-ttft-ms", "engine.sim.ttft_ms", "simulated time to first token"),
    Flag("--sim-itl-ms", "engine.sim.itl_ms", "simulated inter-token latency"),
    Flag("--sim-tokens", "engine.sim.tokens", "output tokens when the request sets no limit"),
)
OPENAI_FLAGS = (
    Flag(
        "--upstream",
        "engine.openai.base_url",
        "upstream base URL (empty: http://127.0.0.1:8000/v1 for --engine openai, "
        "https://api.anthropic.com for --engine anthropic)",
    ),
    Flag(
        "--upstream-api-key",
        "engine.openai.api_key",
        "API key for the upstream (stays on the worker; the anthropic engine sends it "
        "as x-api-key)",
    ),
    Flag(
        "--upstream-model",
        "engine.openai.upstream_model",
        "model name upstream (empty: the served name)",
    ),
    Flag(
        "--upstream-wait",
        "engine.openai.wait_ready_s",
        "seconds to wait for the upstream to be ready",
    ),
    Flag(
        "--upstream-health-interval",
        "runner.health_interval_s",
        "seconds between health probes of the upstream (its failures count toward "
        "--breaker-failures; 0: no probe)",
    ),
    Flag(
        "--upstream-health-path",
        "engine.openai.health_path",
        "the health probe's GET path below the upstream's root",
    ),
    Flag(
        "--anthropic-max-tokens",
        "engine.anthropic.default_max_tokens",
        "max_tokens the anthropic engine sends for a request that sets none (Messages "
        "requires one; the thinking budget is added when thinking is on)",
    ),
)
LLAMACPP_FLAGS = (
    Flag(
        "--chat-format",
        "engine.llamacpp.chat_format",
        "llama.cpp built-in template name or Jinja file (empty: the GGUF's own template)",
    ),
    Flag("--n-ctx", "engine.llamacpp.n_ctx", "llama.cpp context size in tokens, per sequence"),
    Flag(
        "--n-threads",
        "engine.llamacpp.n_threads",
        "llama.cpp CPU threads (0: its default)",
        none_if=0,
    ),
    Flag(
        "--n-gpu-layers", "engine.llamacpp.n_gpu_layers", "layers to offload to the GPU (-1: all)"
    ),
)


def _at(root: Any, path: str) -> Any:
    for part in path.split("."):
        root = getattr(root, part)
    return root


def _typed(flag: Flag, default: Any) -> tuple[Callable[[str], Any], Any]:
    """How the flag reads a value, and its default as the CLI shows it."""
    if default is None:
        conv: Callable[[str], Any] = int if isinstance(flag.none_if, int) else str
        return conv, flag.none_if
    if isinstance(default, tuple):
        return str, ",".join(default)
    return type(default), default


def add_settings_flags(p: Any, root: Any, flags: tuple[Flag, ...]) -> None:
    """Add `flags` to a parser (or argument group), with defaults read from `root`."""
    for f in flags:
        default = _at(root, f.path)
        if isinstance(default, bool):
            p.add_argument(
                f.name,
                action="store_true",
                default=env_default(f.name, default, _truthy),
                help=f"{f.help} [env {env_name(f.name)}]",
            )
            continue
        conv, shown = _typed(f, default)
        add(p, f.name, shown, f.help, conv, choices=f.choices, metavar=f.metavar)


def settings_from(args: argparse.Namespace, root: S, flags: tuple[Flag, ...]) -> S:
    """`root` with the value of every flag in `flags` that `args` carries (a command that
    lacks a flag, like `dev` for most gateway flags, keeps the settings' default)."""
    for f in flags:
        if not hasattr(args, f.dest):
            continue
        value = getattr(args, f.dest)
        default = _at(root, f.path)
        if default is None:
            value = None if value == f.none_if else value
        elif isinstance(default, tuple):
            value = tuple(v.strip() for v in value.split(",") if v.strip())
        root = _replace_at(root, f.path.split("."), value)
    return root


def _replace_at(root: S, parts: list[str], value: Any) -> S:
    head = parts[0]
    if len(parts) > 1:
        value = _replace_at(getattr(root, head), parts[1:], value)
    return msgspec.structs.replace(root, **{head: value})


GATEWAY = GatewaySettings(nats_url=DEFAULT_NATS_URL)
WORKER = WorkerSettings(nats_url=DEFAULT_NATS_URL)


def gateway_args(p: argparse.ArgumentParser, with_nats: bool = True) -> None:
    if with_nats:
        _nats_url_arg(p)
    add_settings_flags(p, GATEWAY, GATEWAY_FLAGS)
    add(
        p,
        "--access-log",
        "on",
        "one INFO line per finished request (logger llmfleet.access)",
        choices=["on", "off"],
    )
    _otlp_arg(p)


def _otlp_arg(p: argparse.ArgumentParser) -> None:
    add(
        p,
        "--otlp-endpoint",
        "",
        "OTLP/HTTP collector URL for traces and metrics, e.g. http://127.0.0.1:4318 "
        "(empty: OTEL_EXPORTER_OTLP_ENDPOINT, else tracing off)",
    )


def worker_args(p: argparse.ArgumentParser, with_nats: bool = True) -> None:
    if with_nats:
        _nats_url_arg(p)
    p.add_argument(
        "--model",
        action="append",
        default=None,
        help="model name to serve (repeat for several; NAME=PATH gives an in-process engine "
        "its own model file) [env LLMFLEET_MODEL, comma separated]",
    )
    add_settings_flags(p, WORKER, WORKER_FLAGS)
    _otlp_arg(p)
    if with_nats:
        add_settings_flags(p, WORKER, (WORKER_REPLICAS,))
    add_settings_flags(p.add_argument_group("sim engine"), WORKER, SIM_FLAGS)
    o = p.add_argument_group(
        "openai engine (vLLM, llama.cpp server, SGLang, Ollama, TGI) and anthropic engine "
        "(the Anthropic Messages API or any Messages-compatible server)"
    )
    add_settings_flags(o, WORKER, OPENAI_FLAGS)
    lc = p.add_argument_group("llamacpp and embeddings engines (in-process models)")
    add(lc, "--model-path", "", "GGUF file (llamacpp) or sentence-transformers dir (embeddings)")
    add_settings_flags(lc, WORKER, LLAMACPP_FLAGS)


def _global_flags(suppress: bool) -> argparse.ArgumentParser:
    """The flags every command takes. The top parser holds their defaults; each command's
    parser takes them too, with no default of its own, so `llmfleet gateway --log-level
    warning` and `llmfleet --log-level warning gateway` mean the same."""
    g = argparse.ArgumentParser(add_help=False)
    if suppress:
        g.add_argument("--log-level", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        g.add_argument(
            "--log-format", default=argparse.SUPPRESS, choices=["text", "json"],
            help=argparse.SUPPRESS,
        )  # fmt: skip
    else:
        add(g, "--log-level", "info", "debug | info | warning | error")
        add(g, "--log-format", "text", "text | json (JSON lines)", choices=["text", "json"])
    return g


def build_parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="llmfleet",
        description="A NATS-driven LLM worker fleet behind an OpenAI-compatible gateway.",
        parents=[_global_flags(suppress=False)],
    )
    top.add_argument("--version", action="version", version=f"llmfleet {__version__}")
    sub = top.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common = [_global_flags(suppress=True)]

    def command(name: str, help: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, parents=common)

    _nats_args(command("nats", "run the embedded nats-server with JetStream"))
    gateway_args(command("gateway", "run the OpenAI-compatible HTTP gateway"))
    worker_args(command("worker", "run a worker serving one or more models"))
    dev = command("dev", "nats-server + gateway + workers, in the foreground")
    worker_args(dev, with_nats=False)
    add(dev, "--host", "127.0.0.1", "HTTP listen address")
    add(dev, "--port", 8080, "HTTP port", int)
    add(dev, "--nats-port", 4222, "NATS port (a free one if taken)", int)
    _status_args(command("status", "show the fleet: models, queues, workers"))
    _drain_args(command("drain", "ask one worker to drain and exit"))
    from llmfleet.adminflags import admin_args  # noqa: PLC0415 - it builds on this module

    admin_args(sub, common)
    _routes_args(command("routes", "aliases and fallback chains gateways route by (admin)"), common)
    return top


def _nats_url_arg(p: argparse.ArgumentParser) -> None:
    """`--nats` and the TLS flags that go with it (`NATS_TLS_FLAGS`)."""
    add(
        p,
        "--nats",
        DEFAULT_NATS_URL,
        "NATS server URL(s), comma separated (tls://: TLS required)",
        env="LLMFLEET_NATS_URL",
        dest="nats_url",
    )
    add_settings_flags(p, GATEWAY, NATS_TLS_FLAGS)  # the worker's defaults are the same


def _status_args(p: argparse.ArgumentParser) -> None:
    _nats_url_arg(p)
    p.add_argument("--watch", "-w", action="store_true", help="refresh until Ctrl-C")
    p.add_argument("--json", action="store_true", help="print JSON (one document per refresh)")
    p.add_argument("--interval", type=float, default=2.0, help="seconds between refreshes")
    p.add_argument(
        "--wait", type=float, default=0.5, help="seconds to collect worker announcements"
    )


def _drain_args(p: argparse.ArgumentParser) -> None:
    _nats_url_arg(p)
    p.add_argument("worker", help="worker id, or a unique prefix of one (see `llmfleet status`)")
    p.add_argument("--wait", action="store_true", help="follow the worker until it has left")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds --wait waits at most")


def _routes_args(p: argparse.ArgumentParser, parents: list[argparse.ArgumentParser]) -> None:
    """`routes check FILE` (offline), `routes push FILE`, `routes show` (llmfleet/routescli.py)."""
    from llmfleet.adminflags import _admin_conn, _positive  # noqa: PLC0415 - builds on this

    actions = p.add_subparsers(dest="routes_command", required=True, metavar="ACTION")
    check = actions.add_parser(
        "check", help="validate a routes file (offline) and show its chains", parents=parents
    )
    push = actions.add_parser(
        "push", help="validate a routes file, then store it for every gateway", parents=parents
    )
    for q in (check, push):
        q.add_argument("file", metavar="FILE", help="the routes file (YAML)")
    _admin_conn(push)
    push.add_argument(
        "--replicas",
        type=_positive(int),
        default=env_default("--keys-replicas", 1, int),
        help="replicas of the LLMFLEET_KEYS bucket, if this makes it (3 on a cluster) "
        "[env LLMFLEET_KEYS_REPLICAS]",
    )
    show = actions.add_parser(
        "show", help="print the stored routes file and its revision", parents=parents
    )
    _admin_conn(show)


def models_of(args: argparse.Namespace) -> list[str]:
    if args.model:
        return list(args.model)
    from_env = env_default("--model", "")
    if from_env:
        return [m.strip() for m in from_env.split(",") if m.strip()]
    return {
        "sim": ["sim-model"],
        "llamacpp": ["gemma-3-270m"],
        "embeddings": ["all-minilm-l6-v2"],
    }.get(args.engine, [])
