"""Composition roots: build a gateway or a worker, with everything it needs, from settings.

The only place that knows every component and engine; the CLI and the dev stack call it.
"""

from __future__ import annotations

import argparse
import logging

from common.queue import QueueSettings
from common.telemetry import Telemetry, otlp_endpoint_from_env
from gateway.dispatch import DispatchSettings
from gateway.server import Gateway, GatewaySettings
from gateway.validate import Limits
from llmfleet.flags import models_of
from worker.engines import build_engine
from worker.service import ServedModel, Worker, WorkerSettings


def build_worker(args: argparse.Namespace, nats_url: str) -> Worker:
    """A worker serving `--model` (each `NAME=PATH` gets its own model file)."""
    models = models_of(args)
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


def _telemetry(args: argparse.Namespace, service: str, metrics: bool) -> Telemetry:
    """One process's metrics and tracing (OTLP only when an endpoint is configured)."""

    endpoint = otlp_endpoint_from_env(getattr(args, "otlp_endpoint", ""))
    return Telemetry(
        service_name=service, metrics=metrics or bool(endpoint), otlp_endpoint=endpoint
    )


def build_gateway(args: argparse.Namespace, nats_url: str) -> Gateway:
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
