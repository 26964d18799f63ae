"""Fleet-wide limits and budgets of virtual keys (issue 13), driven through two gateways at
once: real nats-server, two `--auth keys` gateways, one sim worker.

The bounds proved here are control/quota.py's: rpm over a sliding window admits at most
limit + G x (lease - 1) per 60 s (a lease is 1 unit below 20 rpm, so: exactly the limit);
max-parallel and token budgets are never exceeded; a request refused by one limit takes
nothing from the others (LiteLLM #39309); usage is the worker's real usage, streams
included, kept in LLMFLEET_QUOTA so that it outlives a gateway.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import msgspec
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from control import ledger
from tests.keyhelp import make_key, read_ledger, read_usage
from tests.procs import Fleet, Gateway

MODEL = "m-lim"
BUDGET = 500
KEYS: dict[str, dict[str, Any]] = {
    "k-ready": {},
    "k-rpm": {"rpm": 6},
    "k-par": {"max_parallel": 2},
    "k-bud": {"budget_tokens": BUDGET, "budget_period": "total"},
    "k-bud-steady": {"budget_tokens": BUDGET, "budget_period": "total"},
    "k-bud-restart": {"budget_tokens": 250, "budget_period": "total"},
    "k-tpm": {"rpm": 3, "tpm": 1000},
    "k-use": {"budget_tokens": 1_000_000, "budget_period": "total"},
}
RATE_HEADERS = ("x-ratelimit-limit-requests", "x-ratelimit-remaining-requests")
GW_FLAGS = ("--auth", "keys", "--reserve-tokens", "64")


@pytest.fixture(scope="module")
async def secrets(nats_url: str) -> dict[str, str]:
    models = ("*",)
    return {name: await make_key(nats_url, name, models=models, **f) for name, f in KEYS.items()}


@pytest.fixture(scope="module")
def gws(fleet: Fleet, secrets: dict[str, str]) -> tuple[Gateway, Gateway]:
    fleet.worker(
        "--model", MODEL, "--engine", "sim", "--max-concurrency", "64",
        "--sim-ttft-ms", "1", "--sim-itl-ms", "5", "--sim-tokens", "200",
    )  # fmt: skip
    ready = secrets["k-ready"]
    return (
        fleet.gateway(*GW_FLAGS, wait_models=(MODEL,), key=ready),
        fleet.gateway(*GW_FLAGS, wait_models=(MODEL,), key=ready),
    )


def chat(max_tokens: int, content: str = "hi", **extra: Any) -> dict[str, Any]:
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        **extra,
    }


# What a request of chat(100) reserves: its body, in bytes, and its max_tokens.
RESERVATION = len(httpx.Request("POST", "http://x", json=chat(100)).content) + 100


def bearer(secret: str) -> dict[str, str]:
    return {"authorization": f"Bearer {secret}"}


async def post_on_both(
    gws: tuple[Gateway, Gateway], secret: str, bodies: list[dict[str, Any]]
) -> list[httpx.Response]:
    """POST every body at once, alternating between the two gateways."""
    async with (
        httpx.AsyncClient(base_url=gws[0].base_url, timeout=30, headers=bearer(secret)) as a,
        httpx.AsyncClient(base_url=gws[1].base_url, timeout=30, headers=bearer(secret)) as b,
    ):
        clients = (a, b)
        return await asyncio.gather(
            *(clients[i % 2].post("/chat/completions", json=body) for i, body in enumerate(bodies))
        )


def refused(r: httpx.Response, code: str) -> dict[str, Any]:
    assert r.status_code == 429, r.text
    err: dict[str, Any] = r.json()["error"]
    assert err["code"] == code, err
    if code == "rate_limit_exceeded":  # a `total` budget never resets: no time to give
        assert int(r.headers["retry-after"]) >= 1
    return err


async def test_rpm_is_exact_across_two_gateways(
    gws: tuple[Gateway, Gateway], secrets: dict[str, str]
) -> None:
    answers = await post_on_both(gws, secrets["k-rpm"], [chat(1) for _ in range(20)])
    ok = [r for r in answers if r.status_code == 200]
    assert len(ok) == 6, sorted(r.status_code for r in answers)
    for r in answers:
        if r.status_code != 200:
            err = refused(r, "rate_limit_exceeded")
            assert err["type"] == "requests"
            assert "requests per min" in err["message"]
        # OpenAI's headers on successes and refusals alike.
        for h in RATE_HEADERS:
            assert h in r.headers, (r.status_code, dict(r.headers))
        assert r.headers["x-ratelimit-limit-requests"] == "6"
        assert 0 <= int(r.headers["x-ratelimit-remaining-requests"]) <= 6
        assert r.headers["x-ratelimit-reset-requests"].endswith("s")
    assert {r.headers["x-llmfleet-worker"] for r in ok}  # they ran on the worker


async def test_max_parallel_holds_fleet_wide(
    gws: tuple[Gateway, Gateway], secrets: dict[str, str]
) -> None:
    """Six clients (three per gateway) keep streaming ~0.2 s answers for 2.5 s: the key
    never has more than 2 open at once, counting from the client's side (a stream is open
    from its first byte to its last, inside the time its slot is held)."""
    open_now = most = ok = refusals = 0
    stop_at = time.monotonic() + 2.5

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal open_now, most, ok, refusals
        while time.monotonic() < stop_at:
            async with http.stream("POST", "/chat/completions", json=chat(40, stream=True)) as r:
                if r.status_code != 200:
                    await r.aread()
                    refused(r, "rate_limit_exceeded")
                    refusals += 1
                    await asyncio.sleep(0.02)
                    continue
                chunks = r.aiter_bytes()
                await anext(chunks)
                open_now += 1
                most = max(most, open_now)
                async for _ in chunks:
                    pass
                open_now -= 1
                ok += 1

    headers = bearer(secrets["k-par"])
    async with (
        httpx.AsyncClient(base_url=gws[0].base_url, timeout=30, headers=headers) as a,
        httpx.AsyncClient(base_url=gws[1].base_url, timeout=30, headers=headers) as b,
    ):
        await asyncio.gather(*(client(http) for http in (a, a, a, b, b, b)))
    assert most <= 2, most
    assert ok >= 2 and refusals >= 1, (ok, refusals)


async def test_a_budget_is_never_exceeded_by_concurrent_requests(
    nats_url: str, gws: tuple[Gateway, Gateway], secrets: dict[str, str]
) -> None:
    """Each request reserves its body's bytes + max_tokens (~174) and really uses 101
    tokens: ten at once would use twice the budget if reservations raced."""
    secret = secrets["k-bud"]
    answers = await post_on_both(gws, secret, [chat(100) for _ in range(10)])
    used = 0
    for r in answers:
        if r.status_code == 200:
            used += r.json()["usage"]["total_tokens"]
        else:
            refused(r, "insufficient_quota")
    assert used <= BUDGET, used
    assert any(r.status_code == 200 for r in answers)
    # Spend the rest one by one, until less than a reservation is left. A gateway may
    # refuse earlier while the other holds part of the budget in an idle lease (given
    # back after a second idle): wait that out, then try again.
    deadline, i = time.monotonic() + 10, 0
    while BUDGET - used >= RESERVATION:
        assert time.monotonic() < deadline, f"the budget never ran out: used {used}"
        (r,) = await post_on_both((gws[i % 2], gws[i % 2]), secret, [chat(100)])
        i += 1
        if r.status_code == 200:
            used += r.json()["usage"]["total_tokens"]
        else:
            refused(r, "insufficient_quota")
            await asyncio.sleep(1.3)
    assert used <= BUDGET, used
    for gw in gws:  # spent: refused everywhere
        (r,) = await post_on_both((gw, gw), secret, [chat(100)])
        refused(r, "insufficient_quota")
    raw = await read_ledger(nats_url, ledger.budget_key("k-bud", "btok", "total"))
    assert raw is not None and ledger.BUDGET_DECODER.decode(raw).granted <= BUDGET


async def test_a_budget_with_room_left_is_not_refused(
    gws: tuple[Gateway, Gateway], secrets: dict[str, str]
) -> None:
    """One client, one gateway, a request every 0.2 s: `insufficient_quota` comes only
    once less than one reservation is left of the budget, not while a part of it sits in
    this gateway's own lease."""
    secret = secrets["k-bud-steady"]
    used, answers = 0, 0
    while True:
        (r,) = await post_on_both((gws[0], gws[0]), secret, [chat(100)])
        answers += 1
        assert answers <= 10, "never refused"
        if r.status_code != 200:
            break
        used += r.json()["usage"]["total_tokens"]
        await asyncio.sleep(0.2)
    refused(r, "insufficient_quota")
    assert BUDGET - used < RESERVATION, (
        f"refused with {BUDGET - used} of {BUDGET} tokens left, for a request that "
        f"reserves {RESERVATION}: {r.json()['error']['message']}"
    )


async def test_a_request_refused_by_tpm_consumes_no_rpm(
    gws: tuple[Gateway, Gateway], secrets: dict[str, str]
) -> None:
    """rpm 3, tpm 1000 (LiteLLM #39309): after one small request, a request that needs the
    whole tpm is refused; the refusal took nothing, so 2 more small requests pass, and
    only the 4th small one meets the rpm."""
    secret = secrets["k-tpm"]
    (first,) = await post_on_both((gws[0], gws[0]), secret, [chat(2)])
    assert first.status_code == 200, first.text
    (big,) = await post_on_both((gws[1], gws[1]), secret, [chat(2, "x" * 1200)])
    err = refused(big, "rate_limit_exceeded")
    assert err["type"] == "tokens", err
    assert big.headers["x-ratelimit-limit-tokens"] == "1000"
    for _ in range(2):
        (r,) = await post_on_both((gws[1], gws[1]), secret, [chat(2)])
        assert r.status_code == 200, r.text
    (r,) = await post_on_both((gws[1], gws[1]), secret, [chat(2)])
    assert refused(r, "rate_limit_exceeded")["type"] == "requests"


def usage_of(u: Any) -> tuple[int, int]:
    return (u.prompt_tokens, u.completion_tokens)


async def wait_usage(nats_url: str, key: str, want: ledger.Usage, timeout: float = 4.0) -> None:
    """The ledger reaches `want` in every period (flushed each second), within `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        got = {p: await read_usage(nats_url, key, p) for p in ("day", "month", "total")}
        if all(u is not None and (u.requests, *usage_of(u)) == (want.requests, *usage_of(want))
               for u in got.values()):  # fmt: skip
            return
        assert time.monotonic() < deadline, f"usage of {key}: {got}, want {want}"
        await asyncio.sleep(0.1)


SPENT: dict[str, ledger.Usage] = {}  # k-use's usage, as the clients saw it


async def test_usage_is_the_workers_real_usage_streaming_included(
    nats_url: str, gws: tuple[Gateway, Gateway], secrets: dict[str, str]
) -> None:
    secret = secrets["k-use"]
    c1 = openai.OpenAI(base_url=gws[0].base_url, api_key=secret, max_retries=0)
    c2 = openai.OpenAI(base_url=gws[1].base_url, api_key=secret, max_retries=0)
    words: list[ChatCompletionMessageParam] = [
        {"role": "user", "content": "count these four words"}
    ]
    seen: list[tuple[int, int]] = []
    with c1, c2:
        r = c1.chat.completions.create(model=MODEL, messages=words, max_tokens=7)
        assert r.usage is not None
        plain = (r.usage.prompt_tokens, r.usage.completion_tokens)
        seen.append(plain)
        for chunk in c2.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "a streamed one"}],
            max_tokens=9,
            stream=True,
            stream_options={"include_usage": True},
        ):
            if chunk.usage is not None:
                seen.append((chunk.usage.prompt_tokens, chunk.usage.completion_tokens))
        cr = c2.completions.create(model=MODEL, prompt="one two", max_tokens=5)
        assert cr.usage is not None
        seen.append((cr.usage.prompt_tokens, cr.usage.completion_tokens))
        for cc in c1.completions.create(
            model=MODEL,
            prompt="three four five",
            max_tokens=4,
            stream=True,
            stream_options={"include_usage": True},
        ):
            if cc.usage is not None:
                seen.append((cc.usage.prompt_tokens, cc.usage.completion_tokens))
        e = c1.embeddings.create(model=MODEL, input=["a b c", "d e"])
        seen.append((e.usage.prompt_tokens, 0))
        # A stream whose client asks for no usage is counted all the same: the same
        # request as the first, so the same (deterministic) usage.
        with c2.chat.completions.create(
            model=MODEL, messages=words, max_tokens=7, stream=True
        ) as stream:
            assert all(chunk.usage is None for chunk in stream)
        seen.append(plain)
    assert len(seen) == 6 and all(c >= 0 and p > 0 for p, c in seen), seen
    want = ledger.Usage(
        requests=6,
        prompt_tokens=sum(p for p, _ in seen),
        completion_tokens=sum(c for _, c in seen),
    )
    await wait_usage(nats_url, "k-use", want)
    SPENT["k-use"] = want


async def test_usage_and_budgets_survive_a_gateway_restart(
    nats_url: str, fleet: Fleet, gws: tuple[Gateway, Gateway], secrets: dict[str, str]
) -> None:
    """Runs last: it stops the first gateway. A new gateway process sees the same ledger."""
    before = SPENT.get("k-use")
    assert before is not None, "runs after the usage test"
    (r,) = await post_on_both((gws[0], gws[0]), secrets["k-bud-restart"], [chat(100)])
    assert r.status_code == 200, r.text  # 101 used; less than a reservation is left
    assert gws[0].stop() == 0
    fresh = fleet.gateway(*GW_FLAGS, wait_models=(MODEL,), key=secrets["k-ready"])
    got = await read_usage(nats_url, "k-use")
    assert got is not None and usage_of(got) == usage_of(before), got
    pair = (fresh, gws[1])
    for gw in pair:
        (r,) = await post_on_both((gw, gw), secrets["k-bud-restart"], [chat(100)])
        refused(r, "insufficient_quota")  # the spent budget is still spent
        (r,) = await post_on_both((gw, gw), secrets["k-rpm"], [chat(1)])
        refused(r, "rate_limit_exceeded")  # and the rpm window still full
    (r,) = await post_on_both((fresh, fresh), secrets["k-use"], [chat(3, "after restart")])
    assert r.status_code == 200, r.text
    u = r.json()["usage"]
    want = msgspec.structs.replace(
        before,
        requests=before.requests + 1,
        prompt_tokens=before.prompt_tokens + u["prompt_tokens"],
        completion_tokens=before.completion_tokens + u["completion_tokens"],
    )
    await wait_usage(nats_url, "k-use", want)
