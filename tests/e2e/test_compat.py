"""The OpenAI-compatibility points the official SDK's own `*_with_all_params` tests need, and
what single-model clients and evaluation harnesses send, through the `openai` client:
`max_tokens: 0`, `echo` + `logprobs` prompt scoring, `best_of`, a request without `model`
(`--default-model`), and `GET /health`."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import openai
import pytest
from openai.types import Completion
from openai.types.chat import ChatCompletion

from tests.natshelp import connected, publish_request, reply_subject, request_headers
from tests.procs import Fleet, Gateway

SIM = "sim-model"
HELLO = [{"role": "user", "content": "Hello there, fleet"}]


@pytest.fixture(scope="module")
def gw(fleet: Fleet) -> Gateway:
    fleet.worker("--engine", "sim", "--model", SIM, "--sim-ttft-ms", "2", "--sim-itl-ms", "1")
    return fleet.gateway("--default-model", SIM, "--max-n", "8", wait_models=(SIM,))


@pytest.fixture(scope="module")
def plain_gw(fleet: Fleet, gw: Gateway) -> Gateway:
    """A gateway without a default model (the default)."""
    return fleet.gateway(wait_models=(SIM,))


@pytest.fixture(scope="module")
def client(gw: Gateway) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=gw.base_url, api_key="unused", max_retries=0) as c:
        yield c


def test_chat_max_tokens_0_returns_no_completion(client: openai.OpenAI) -> None:
    for kw in ({"max_tokens": 0}, {"max_completion_tokens": 0}):
        r = client.chat.completions.create(model=SIM, messages=HELLO, **kw)  # type: ignore[arg-type, call-overload]
        assert r.usage is not None
        assert r.usage.completion_tokens == 0 and r.usage.prompt_tokens > 0
        assert r.choices[0].message.content in ("", None)
        assert r.choices[0].finish_reason == "length"


def test_echo_with_max_tokens_0_scores_the_prompt(client: openai.OpenAI) -> None:
    """What lm-eval-harness sends to score a prompt: the prompt back with its logprobs."""
    prompt = "The quick brown fox"
    r = client.completions.create(model=SIM, prompt=prompt, max_tokens=0, echo=True, logprobs=1)
    choice = r.choices[0]
    assert choice.text == prompt
    assert r.usage is not None and r.usage.completion_tokens == 0
    assert r.usage.prompt_tokens == 4
    lp = choice.logprobs
    assert lp is not None and lp.tokens is not None and lp.token_logprobs is not None
    assert "".join(lp.tokens) == prompt and len(lp.tokens) == 4
    assert lp.token_logprobs[0] is None  # the first token has no context to be scored in
    assert all(isinstance(x, float) for x in lp.token_logprobs[1:])
    assert lp.text_offset == [0, 3, 9, 15]


def test_completions_max_tokens_0_without_echo(client: openai.OpenAI) -> None:
    r = client.completions.create(model=SIM, prompt="say nothing", max_tokens=0)
    assert r.choices[0].text == "" and r.usage is not None and r.usage.completion_tokens == 0


def test_best_of_0_is_the_default_and_20_is_the_ceiling(client: openai.OpenAI) -> None:
    r = client.completions.create(model=SIM, prompt="hi", max_tokens=2, best_of=0)
    assert len(r.choices) == 1
    r = client.completions.create(model=SIM, prompt="hi", max_tokens=2, best_of=3, n=2)
    assert len(r.choices) == 2
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=SIM, prompt="hi", max_tokens=2, best_of=21)
    assert e.value.param == "best_of"  # type: ignore[attr-defined]


def test_best_of_counts_against_the_n_limits(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as e:  # --max-n 8
        client.completions.create(model=SIM, prompt="hi", max_tokens=2, best_of=9)
    assert e.value.param == "best_of" and "at most 8" in e.value.message  # type: ignore[attr-defined]
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=SIM, prompt="hi", max_tokens=2, best_of=2, n=3)
    assert e.value.param == "best_of"  # type: ignore[attr-defined]


def test_a_request_without_model_goes_to_the_default_model(client: openai.OpenAI) -> None:
    r = client.post(
        "/chat/completions",
        body={"messages": HELLO, "max_tokens": 3},
        cast_to=ChatCompletion,
    )
    assert r.model == SIM and r.usage is not None and r.usage.completion_tokens == 3
    c = client.post("/completions", body={"prompt": "hi", "max_tokens": 2}, cast_to=Completion)
    assert c.model == SIM and len(c.choices) == 1
    e = client.post(
        "/embeddings", body={"input": "hi"}, cast_to=openai.types.CreateEmbeddingResponse
    )
    assert e.model == SIM and len(e.data) == 1


def test_without_a_default_model_a_missing_model_is_a_clear_400(plain_gw: Gateway) -> None:
    with openai.OpenAI(base_url=plain_gw.base_url, api_key="x", max_retries=0) as c:
        with pytest.raises(openai.BadRequestError) as e:
            c.post("/chat/completions", body={"messages": HELLO}, cast_to=ChatCompletion)
    assert e.value.param == "model"  # type: ignore[attr-defined]
    assert "must provide a model" in e.value.message


def test_get_health_answers_like_healthz(gw: Gateway) -> None:
    for path in ("/health", "/healthz"):
        r = httpx.get(gw.url + path)
        assert r.status_code == 200 and r.json() == {"status": "ok"}


async def test_a_nats_producer_may_omit_the_model_and_score_a_prompt(
    fleet: Fleet, gw: Gateway
) -> None:
    """Producers publish straight to a model's subject: the subject names the model, so a
    body without one is served; `echo` + `max_tokens: 0` scores the prompt there too."""
    async with connected(fleet.nats_url) as nc:
        reply = reply_subject("compat-producer")
        sub = await nc.subscribe(reply)
        await nc.flush()
        body = {"prompt": "one two three", "max_tokens": 0, "echo": True, "logprobs": 0}
        headers = request_headers(reply, op="completion")
        await publish_request(nc.jetstream(), SIM, json.dumps(body).encode(), headers)
        msgs = []
        while not msgs or msgs[-1]["type"] not in ("done", "error"):
            msgs.append(json.loads((await sub.next_msg(timeout=10)).data))
    assert msgs[0]["type"] == "accepted" and msgs[-1]["type"] == "done"
    text = "".join(
        c.get("content") or "" for m in msgs if m["type"] == "delta" for c in m["choices"]
    )
    assert text == "one two three"
    assert msgs[-1]["usage"]["completion_tokens"] == 0
    assert msgs[-1]["usage"]["prompt_tokens"] == 3
