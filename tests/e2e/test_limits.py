"""A bounded per-model queue (429 + Retry-After, nothing lost) and API-key auth.

Own module and broker: the worker creates the request stream with default limits, and the
gateway (which owns queue policy) tightens them to its --max-queue."""

from __future__ import annotations

import asyncio
import time

import httpx
import openai
import pytest

from tests.procs import Fleet, Gateway

MODEL = "bounded-model"
KEY = "sk-test-key"


@pytest.fixture(scope="module")
def gw(fleet: Fleet) -> Gateway:
    fleet.worker(
        "--model", MODEL, "--max-concurrency", "1",
        "--sim-ttft-ms", "300", "--sim-itl-ms", "1", "--sim-tokens", "2",
    )  # fmt: skip
    time.sleep(1.0)  # let the worker create the stream first
    return fleet.gateway(
        "--max-queue", "2", "--api-key", KEY, "--queue-timeout", "30", wait_models=(MODEL,)
    )


async def test_full_queue_is_429_and_nothing_is_lost(gw: Gateway) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "x"}]}
    headers = {"authorization": f"Bearer {KEY}"}
    async with httpx.AsyncClient(base_url=gw.base_url, timeout=60, headers=headers) as http:
        results = await asyncio.gather(
            *(http.post("/chat/completions", json=body) for _ in range(8))
        )
    codes = sorted(r.status_code for r in results)
    assert set(codes) == {200, 429}, codes
    assert codes.count(429) >= 4  # 1 slot + 2 queued (+1 the worker holds before its ack)
    for r in results:
        if r.status_code == 429:
            assert r.headers["retry-after"] == "2"
            assert r.json()["error"]["type"] == "rate_limit_error"
        else:
            assert r.json()["usage"]["completion_tokens"] == 2


def test_api_key_is_required_when_set(gw: Gateway) -> None:
    with openai.OpenAI(base_url=gw.base_url, api_key="wrong", max_retries=0) as c:
        with pytest.raises(openai.AuthenticationError):
            c.models.list()
    with openai.OpenAI(base_url=gw.base_url, api_key=KEY, max_retries=0) as c:
        assert MODEL in {m.id for m in c.models.list()}
        r = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}])
        assert r.choices[0].message.content
    assert httpx.get(gw.url + "/healthz").status_code == 200  # probes need no key
