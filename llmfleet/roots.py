"""Composition roots: build a gateway or a worker, with everything it needs, from settings.

The only place that knows every component and engine; the CLI and the dev stack call it.
"""

from __future__ import annotations

import argparse
import logging

from common.natsconn import tls_context
from common.telemetry import Telemetry, otlp_endpoint_from_env
from gateway.server import Gateway
from gateway.settings import GatewaySettings, check_gateway
from llmfleet.flags import (
    GATEWAY_FLAGS,
    LLAMACPP_FLAGS,
    NATS_TLS_FLAGS,
    OPENAI_FLAGS,
    SIM_FLAGS,
    WORKER_FLAGS,
    WORKER_REPLICAS,
    models_of,
    settings_from,
)
from worker.engines import EngineUnavailable, build_engine
from worker.service import ServedModel, Worker
from worker.settings import WorkerSettings


def build_worker(args: argparse.Namespace, nats_url: str) -> Worker:
    """A worker serving `--model` (each `NAME=PATH` gets its own model file)."""
    models = models_of(args)
    if not models:
        raise SystemExit("llmfleet worker: give --model NAME (or LLMFLEET_MODEL)")
    flags = (*WORKER_FLAGS, WORKER_REPLICAS, *SIM_FLAGS, *OPENAI_FLAGS, *LLAMACPP_FLAGS)
    settings = settings_from(args, WorkerSettings(nats_url=nats_url), (*NATS_TLS_FLAGS, *flags))
    # A bad TLS file fails the start here (TLSFilesError, a ValueError the CLI shows).
    tls_context(settings.nats_ca, settings.nats_cert, settings.nats_key)
    # llama.cpp batches `--max-concurrency` sequences; the embedding model encodes one batch
    # at a time: be honest, and let the broker hold the rest where any worker can take it.
    slots = 1 if settings.engine.kind == "embeddings" else settings.max_concurrency
    served = []
    for spec in models:
        # `--model NAME=PATH` gives each in-process model its own file (several per worker).
        name, _, path = spec.partition("=")
        try:
            engine = build_engine(
                settings.engine, name, model_path=path or args.model_path, slots=slots
            )
        except EngineUnavailable as exc:
            raise SystemExit(f"llmfleet: {exc}") from None
        served.append(ServedModel(model_id=name, engine=engine, max_concurrency=slots))
    telemetry = _telemetry(args, "llmfleet-worker", settings.metrics_port > 0)
    return Worker(settings, served, telemetry)


def _telemetry(args: argparse.Namespace, service: str, metrics: bool) -> Telemetry:
    """One process's metrics and tracing (OTLP only when an endpoint is configured)."""
    endpoint = otlp_endpoint_from_env(getattr(args, "otlp_endpoint", ""))
    return Telemetry(
        service_name=service, metrics=metrics or bool(endpoint), otlp_endpoint=endpoint
    )


def build_gateway(args: argparse.Namespace, nats_url: str) -> Gateway:
    """A gateway from the gateway flags `args` has (`dev` has only some: the rest keep the
    defaults in gateway/settings.py)."""
    if getattr(args, "access_log", "on") == "off":
        logging.getLogger("llmfleet.access").setLevel(logging.WARNING)
    flags = (*NATS_TLS_FLAGS, *GATEWAY_FLAGS)
    settings = settings_from(args, GatewaySettings(nats_url=nats_url), flags)
    check_gateway(settings)  # ValueError: the CLI shows it
    tls_context(settings.nats_ca, settings.nats_cert, settings.nats_key)  # TLSFilesError: too
    return Gateway(settings, _telemetry(args, "llmfleet-gateway", True))
