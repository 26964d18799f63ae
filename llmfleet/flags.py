"""The `llmfleet` command line: every command's flags, each with an environment variable.

Every flag can also come from an environment variable `LLMFLEET_<FLAG>` (dashes become
underscores, e.g. `LLMFLEET_NATS_URL`); a flag given on the command line wins. The global
flags (`--log-level`, `--log-format`) may stand before or after the command.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from typing import Any

from common import __version__

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


def gateway_args(p: argparse.ArgumentParser, with_nats: bool = True) -> None:
    if with_nats:
        _nats_url_arg(p)
    add(p, "--host", "127.0.0.1", "HTTP listen address")
    add(p, "--port", 8080, "HTTP port", int)
    add(p, "--api-key", "", "require this bearer token from clients (empty: no auth)")
    add(p, "--default-model", "", "model for requests that name none (empty: they get a 400)")
    add(p, "--gateway-id", "", "gateway id in announcements and subjects (default: random)")
    add(p, "--cors-origins", "", "browser origins allowed to call the API, comma separated or *")
    add(p, "--model-grace", 30.0, "seconds a model stays listed after its last worker left", float)
    p.add_argument(
        "--resume-on-failure",
        action="store_true",
        default=env_default("--resume-on-failure", False, _truthy),
        help="continue a stream on another worker if its worker dies mid-answer "
        "(see docs/reliability.md for the limits) [env LLMFLEET_RESUME_ON_FAILURE]",
    )
    add(p, "--queue-timeout", 60.0, "seconds a request may wait for a free worker", float)
    add(p, "--stall-timeout", 5.0, "seconds a silent worker gets before a stream fails", float)
    add(p, "--request-timeout", 600.0, "default and maximum total seconds per request", float)
    add(p, "--max-body-bytes", 32 * 1024 * 1024, "largest accepted request body", int)
    add(p, "--max-tokens-limit", 32768, "largest max_tokens accepted", int)
    add(p, "--max-n", 128, "largest n accepted", int)
    add(p, "--max-queue", 10000, "requests that may wait per model (more: 429)", int)
    add(p, "--stream-replicas", 1, "replicas of the request stream (3 on a cluster)", int)
    add(p, "--queue-poll", 5.0, "seconds between queue-depth polls for /metrics (0: off)", float)
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
    add(
        p,
        "--engine",
        "sim",
        "inference engine: sim | openai | llamacpp | embeddings",
        choices=["sim", "openai", "llamacpp", "embeddings"],
    )
    p.add_argument(
        "--model",
        action="append",
        default=None,
        help="model name to serve (repeat for several; NAME=PATH gives an in-process engine "
        "its own model file) [env LLMFLEET_MODEL, comma separated]",
    )
    add(p, "--max-concurrency", 8, "requests run at once per model", int)
    add(p, "--worker-id", "", "worker id (default: host-pid-random)")
    add(p, "--heartbeat", 1.0, "seconds between catalog announcements", float)
    add(p, "--drain-grace", 30.0, "seconds in-flight requests get on SIGTERM", float)
    add(p, "--metrics-port", 0, "port for Prometheus GET /metrics (0: off)", int)
    add(p, "--metrics-host", "127.0.0.1", "listen address of --metrics-port")
    _otlp_arg(p)
    if with_nats:
        add(
            p,
            "--stream-replicas",
            1,
            "replicas of the request stream, if this worker creates it",
            int,
        )
    g = p.add_argument_group("sim engine")
    add(g, "--sim-ttft-ms", 20.0, "simulated time to first token", float)
    add(g, "--sim-itl-ms", 5.0, "simulated inter-token latency", float)
    add(g, "--sim-tokens", 32, "output tokens when the request sets no limit", int)
    o = p.add_argument_group("openai engine (vLLM, llama.cpp server, SGLang, Ollama, TGI)")
    add(o, "--upstream", "http://127.0.0.1:8000/v1", "upstream base URL")
    add(o, "--upstream-api-key", "", "API key for the upstream (stays on the worker)")
    add(o, "--upstream-model", "", "model name upstream (default: the served name)")
    add(o, "--upstream-wait", 900.0, "seconds to wait for the upstream to be ready", float)
    lc = p.add_argument_group("llamacpp and embeddings engines (in-process models)")
    add(lc, "--model-path", "", "GGUF file (llamacpp) or sentence-transformers dir (embeddings)")
    add(lc, "--chat-format", "", "llama.cpp chat format (default: the GGUF's own template)")
    add(lc, "--n-ctx", 4096, "llama.cpp context size in tokens", int)
    add(lc, "--n-threads", 0, "llama.cpp CPU threads (0: its default)", int)
    add(lc, "--n-gpu-layers", 0, "layers to offload to the GPU (-1: all)", int)


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
    return top


def _nats_url_arg(p: argparse.ArgumentParser) -> None:
    add(
        p,
        "--nats",
        DEFAULT_NATS_URL,
        "NATS server URL(s), comma separated",
        env="LLMFLEET_NATS_URL",
        dest="nats_url",
    )


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
