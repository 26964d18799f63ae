"""Build an engine from CLI arguments (the only place that knows every engine)."""

from __future__ import annotations

import argparse

from worker.engine import Engine
from worker.sim import SimEngine, SimSettings


def build_engine(args: argparse.Namespace, model_id: str) -> Engine:
    match args.engine:
        case "sim":
            return SimEngine(
                SimSettings(
                    ttft_ms=args.sim_ttft_ms, itl_ms=args.sim_itl_ms, tokens=args.sim_tokens
                )
            )
        case "openai":
            from worker.openai_engine import OpenAIEngine, OpenAISettings  # noqa: PLC0415

            return OpenAIEngine(
                OpenAISettings(
                    base_url=args.upstream,
                    api_key=args.upstream_api_key or None,
                    upstream_model=args.upstream_model or None,
                    served_model=model_id,
                    wait_ready_s=args.upstream_wait,
                )
            )
        case other:
            raise SystemExit(f"llmfleet: unknown engine {other!r}")
