"""Virtual keys at the gateway (issue 13), against real processes: nats-server, two
`--auth keys` gateways and sim workers, keys written into LLMFLEET_KEYS as `llmfleet keys`
would.

- Default deny: keys x models x routes, every answer checked; a model a key may not run is
  answered byte for byte like one that does not exist (apart from its name); `models=[]`
  runs nothing (LiteLLM #26656, #28464, #23850); `qwen*` is not `qwenx-evil` (#33030).
- 401 `invalid_api_key` for missing, unknown, expired and revoked keys on every /v1 route;
  `x-api-key` works like Bearer; only admin keys read /stats.
- Revocation, a models change and rotation reach both gateways within 2 s.
- Fairness: one key holds at most its share of a model's queue at a gateway.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import httpx
import openai
import pytest

from common import names
from control.keys import model_matches, new_secret
from tests.keyhelp import make_key, revoke, rotate, update_key
from tests.natshelp import connected
from tests.procs import Fleet, Gateway

QWEN, EVIL, QWEN25, OTHER, SLOW = "qwen-7b", "qwenx-evil", "qwen2.5:7b", "other", "slow"
SERVED = (QWEN, EVIL, QWEN25, OTHER)
ALL_SERVED = (*SERVED, SLOW)
GHOSTS = ("qwen-9b", "nope")  # served by nobody: one `qwen*` would allow, one nothing would
KEY_MODELS: dict[str, tuple[str, ...]] = {
    "k-none": (),
    "k-qwen": ("qwen*",),
    "k-all": ("*",),
    "k-other": (OTHER,),
}
PROPAGATION_S = 2.0  # the contract: key changes reach every gateway within 2 s


def bearer(secret: str) -> dict[str, str]:
    return {"authorization": f"Bearer {secret}"}


def may(key: str, model: str) -> bool:
    return any(model_matches(p, model) for p in KEY_MODELS[key])


@pytest.fixture(scope="module")
async def secrets(nats_url: str) -> dict[str, str]:
    out = {
        name: await make_key(nats_url, name, models=models) for name, models in KEY_MODELS.items()
    }
    out["k-admin"] = await make_key(nats_url, "k-admin", models=("*",), admin=True)
    now = time.time()
    out["k-expired"] = await make_key(nats_url, "k-expired", models=("*",), expires_at=now - 5)
    out["k-revoked"] = await make_key(nats_url, "k-revoked", models=("*",), revoked_at=now - 5)
    for name in ("k-fair-a", "k-fair-b"):
        out[name] = await make_key(nats_url, name, models=(SLOW,))
    return out


@pytest.fixture(scope="module")
def gws(fleet: Fleet, secrets: dict[str, str]) -> tuple[Gateway, Gateway]:
    models = [arg for m in SERVED for arg in ("--model", m)]
    fleet.worker(
        *models, "--engine", "sim", "--max-concurrency", "32",
        "--sim-ttft-ms", "1", "--sim-itl-ms", "1", "--sim-tokens", "3",
    )  # fmt: skip
    fleet.worker(
        "--model", SLOW, "--engine", "sim", "--max-concurrency", "1",
        "--sim-ttft-ms", "1", "--sim-itl-ms", "20", "--sim-tokens", "500",
    )  # fmt: skip
    admin = secrets["k-admin"]
    g1 = fleet.gateway("--auth", "keys", wait_models=ALL_SERVED, key=admin)
    g2 = fleet.gateway("--auth", "keys", wait_models=ALL_SERVED, key=admin)
    return g1, g2


# ---- default deny ---------------------------------------------------------------------

ROUTES = ("chat", "chat-stream", "completion", "embedding", "retrieve")


async def call(http: httpx.AsyncClient, route: str, model: str, secret: str) -> httpx.Response:
    h = bearer(secret)
    if route == "retrieve":
        return await http.get(f"/models/{model}", headers=h)
    if route in ("chat", "chat-stream"):
        body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        if route == "chat-stream":
            body["stream"] = True
        return await http.post("/chat/completions", json=body, headers=h)
    if route == "completion":
        body = {"model": model, "prompt": "hi", "max_tokens": 2}
        return await http.post("/completions", json=body, headers=h)
    return await http.post("/embeddings", json={"model": model, "input": "hi"}, headers=h)


VOLATILE = ("x-request-id", "date", "content-length")


def shape(r: httpx.Response, model: str) -> tuple[int, bytes, list[tuple[str, str]], list[str]]:
    """Everything a client can see of an answer, with the model's name masked: status,
    body, headers (values too, except the per-response ones), and the header names."""
    assert r.headers.get("content-length") in (None, str(len(r.content)))
    kept = sorted((k, v) for k, v in r.headers.multi_items() if k not in VOLATILE)
    return (
        r.status_code,
        r.content.replace(model.encode(), b"<model>"),
        kept,
        sorted(k for k, _ in r.headers.multi_items()),
    )


async def test_default_deny_matrix_on_both_gateways(
    gws: tuple[Gateway, Gateway], secrets: dict[str, str]
) -> None:
    limit = asyncio.Semaphore(16)

    async def one(http: httpx.AsyncClient, key: str, model: str, route: str) -> httpx.Response:
        async with limit:
            return await call(http, route, model, secrets[key])

    for gw in gws:
        async with httpx.AsyncClient(base_url=gw.base_url, timeout=20) as http:
            cases = [(k, m, r) for k in KEY_MODELS for m in (*SERVED, *GHOSTS) for r in ROUTES]
            answers = await asyncio.gather(*(one(http, *c) for c in cases))
            got = dict(zip(cases, answers, strict=True))
        for (key, model, route), r in got.items():
            allowed = may(key, model) and model in SERVED
            if allowed:
                assert r.status_code == 200, (gw.url, key, model, route, r.text)
                if route == "chat-stream":
                    assert r.headers["content-type"].startswith("text/event-stream")
                    assert r.content.endswith(b"data: [DONE]\n\n")
                elif route != "retrieve":
                    assert r.json()["model"] == model
                continue
            assert r.status_code == 404, (gw.url, key, model, route, r.text)
            err = r.json()["error"]
            assert err["code"] == "model_not_found" and err["param"] == "model", err
            assert model in err["message"]
            # Not runnable == not there: compare with a model nobody serves.
            for ghost in GHOSTS:
                assert shape(r, model) == shape(got[(key, ghost, route)], ghost), (
                    key,
                    model,
                    ghost,
                    route,
                )


async def test_listing_shows_only_what_the_key_may_run(
    gws: tuple[Gateway, Gateway], secrets: dict[str, str]
) -> None:
    for gw in gws:
        for key in KEY_MODELS:
            with openai.OpenAI(base_url=gw.base_url, api_key=secrets[key], max_retries=0) as c:
                listed = {m.id for m in c.models.list()}
            assert listed == {m for m in ALL_SERVED if may(key, m)}, (gw.url, key)
    with openai.OpenAI(base_url=gws[0].base_url, api_key=secrets["k-none"], max_retries=0) as c:
        assert list(c.models.list()) == []  # models=[] runs nothing (LiteLLM #26656)


def test_glob_is_a_family_not_a_prefix(
    gws: tuple[Gateway, Gateway], secrets: dict[str, str]
) -> None:
    """`qwen*` runs the qwen family and never `qwenx-evil` (LiteLLM #33030)."""
    hi = [{"role": "user", "content": "hi"}]
    with openai.OpenAI(base_url=gws[1].base_url, api_key=secrets["k-qwen"], max_retries=0) as c:
        for model in (QWEN, QWEN25):
            r = c.chat.completions.create(model=model, messages=hi, max_tokens=2)  # type: ignore[arg-type]
            assert r.model == model
        with pytest.raises(openai.NotFoundError) as e:
            c.chat.completions.create(model=EVIL, messages=hi, max_tokens=2)  # type: ignore[arg-type]
        assert e.value.code == "model_not_found"
        with pytest.raises(openai.NotFoundError):
            c.models.retrieve(EVIL)
        with pytest.raises(openai.NotFoundError):
            c.embeddings.create(model=EVIL, input="hi")


# ---- who is calling -------------------------------------------------------------------


async def test_missing_unknown_expired_revoked_keys_are_401_everywhere(
    gws: tuple[Gateway, Gateway], secrets: dict[str, str]
) -> None:
    presented = {
        "missing": {},
        "empty bearer": {"authorization": "Bearer"},
        "unknown": bearer(new_secret()),
        "not bearer": {"authorization": f"Basic {secrets['k-all']}"},
        "expired": bearer(secrets["k-expired"]),
        "revoked": bearer(secrets["k-revoked"]),
    }
    chat = {"model": QWEN, "messages": [{"role": "user", "content": "hi"}]}
    routes = [
        ("POST", "/chat/completions", chat),
        ("POST", "/completions", {"model": QWEN, "prompt": "hi"}),
        ("POST", "/embeddings", {"model": QWEN, "input": "hi"}),
        ("GET", "/models", None),
        ("GET", f"/models/{QWEN}", None),
        ("GET", "/models/nope", None),
    ]
    for gw in gws:
        async with httpx.AsyncClient(base_url=gw.base_url, timeout=10) as http:
            for what, headers in presented.items():
                for method, path, body in routes:
                    r = await http.request(method, path, json=body, headers=headers)
                    assert r.status_code == 401, (what, method, path, r.text)
                    err = r.json()["error"]
                    assert err["code"] == "invalid_api_key", (what, path, err)
                    assert err["type"] == "invalid_request_error"
    with openai.OpenAI(base_url=gws[0].base_url, api_key=secrets["k-expired"], max_retries=0) as c:
        with pytest.raises(openai.AuthenticationError):
            c.models.list()


async def test_x_api_key_works_like_bearer(
    gws: tuple[Gateway, Gateway], secrets: dict[str, str]
) -> None:
    chat = {"model": OTHER, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    async with httpx.AsyncClient(base_url=gws[0].base_url, timeout=10) as http:
        h = {"x-api-key": secrets["k-other"]}
        r = await http.post("/chat/completions", json=chat, headers=h)
        assert r.status_code == 200, r.text
        assert {m["id"] for m in (await http.get("/models", headers=h)).json()["data"]} == {OTHER}
        r = await http.post("/chat/completions", json={**chat, "model": QWEN}, headers=h)
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
        for bad in (new_secret(), secrets["k-revoked"]):
            r = await http.post("/chat/completions", json=chat, headers={"x-api-key": bad})
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"


def test_only_admin_keys_read_stats(gws: tuple[Gateway, Gateway], secrets: dict[str, str]) -> None:
    for gw in gws:
        r = httpx.get(gw.url + "/stats", headers=bearer(secrets["k-admin"]))
        assert r.status_code == 200 and SLOW in r.json()["fleet"]["models"]
        r = httpx.get(gw.url + "/stats", headers=bearer(secrets["k-all"]))
        assert r.status_code == 403 and r.json()["error"]["code"] == "permission_denied"
        assert "fleet" not in r.text
        r = httpx.get(gw.url + "/stats")
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        r = httpx.get(gw.url + "/stats", headers=bearer(secrets["k-revoked"]))
        assert r.status_code == 401


# ---- changes reach every gateway within 2 s -------------------------------------------


async def until_all(
    gws: tuple[Gateway, Gateway],
    check: Callable[[httpx.AsyncClient], Awaitable[bool]],
    deadline: float,
) -> None:
    """Poll `check` on each gateway (at once) until it holds; fail past `deadline`."""

    async def on(gw: Gateway) -> None:
        async with httpx.AsyncClient(base_url=gw.base_url, timeout=5) as http:
            while not await check(http):
                assert time.monotonic() < deadline, f"{gw.url}: not in effect within the deadline"
                await asyncio.sleep(0.02)

    await asyncio.gather(*(on(gw) for gw in gws))


def chat_body(model: str) -> dict[str, object]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}


async def status_of(http: httpx.AsyncClient, secret: str, model: str) -> int:
    r = await http.post("/chat/completions", json=chat_body(model), headers=bearer(secret))
    return r.status_code


async def test_revocation_reaches_both_gateways_within_2s(
    nats_url: str, gws: tuple[Gateway, Gateway]
) -> None:
    secret = await make_key(nats_url, "k-rev", models=("*",))
    await until_all(
        gws, lambda h: _is(status_of(h, secret, OTHER), 200), time.monotonic() + PROPAGATION_S
    )
    await revoke(nats_url, "k-rev")
    deadline = time.monotonic() + PROPAGATION_S
    await until_all(gws, lambda h: _is(status_of(h, secret, OTHER), 401), deadline)
    for gw in gws:  # and it stays revoked, on every route
        r = httpx.get(gw.base_url + "/models", headers=bearer(secret))
        assert r.status_code == 401


async def test_a_models_change_reaches_both_gateways_within_2s(
    nats_url: str, gws: tuple[Gateway, Gateway]
) -> None:
    secret = await make_key(nats_url, "k-mod", models=("qwen*",))
    await until_all(
        gws, lambda h: _is(status_of(h, secret, QWEN), 200), time.monotonic() + PROPAGATION_S
    )
    await update_key(nats_url, "k-mod", models=(OTHER,))
    deadline = time.monotonic() + PROPAGATION_S

    async def swapped(http: httpx.AsyncClient) -> bool:
        got = (await status_of(http, secret, QWEN), await status_of(http, secret, OTHER))
        return got == (404, 200)

    await until_all(gws, swapped, deadline)
    await update_key(nats_url, "k-mod", models=())  # emptied: runs nothing at all
    deadline = time.monotonic() + PROPAGATION_S
    await until_all(gws, lambda h: _is(status_of(h, secret, OTHER), 404), deadline)


async def test_rotation_keeps_both_secrets_for_the_overlap_then_only_the_new(
    nats_url: str, gws: tuple[Gateway, Gateway]
) -> None:
    old = await make_key(nats_url, "k-rot", models=(OTHER,))
    await until_all(
        gws, lambda h: _is(status_of(h, old, OTHER), 200), time.monotonic() + PROPAGATION_S
    )
    overlap = 4.0  # longer than the 2 s a change may take to arrive
    new, ends = await rotate(nats_url, "k-rot", overlap_s=overlap)

    async def both_work(http: httpx.AsyncClient) -> bool:
        got = (await status_of(http, new, OTHER), await status_of(http, old, OTHER))
        return got == (200, 200)

    await until_all(gws, both_work, time.monotonic() + PROPAGATION_S)
    await asyncio.sleep(max(0.0, ends + 0.4 - time.time()))  # let the overlap pass
    for gw in gws:
        async with httpx.AsyncClient(base_url=gw.base_url, timeout=5) as http:
            assert await status_of(http, old, OTHER) == 401
            assert await status_of(http, new, OTHER) == 200


async def _is(status: Awaitable[int], want: int) -> bool:
    return await status == want


# ---- fairness: a key's share of a model's queue ---------------------------------------


@pytest.fixture(scope="module")
def fair_gw(fleet: Fleet, gws: tuple[Gateway, Gateway], secrets: dict[str, str]) -> Gateway:
    """Its own gateway: --max-queue is the request stream's per-subject limit, shared."""
    return fleet.gateway(
        "--auth", "keys", "--max-queue", "4", "--key-queue-share", "0.5",
        wait_models=(SLOW,), key=secrets["k-admin"],
    )  # fmt: skip


async def queued(nats_url: str) -> int:
    async with connected(nats_url) as nc:
        return int((await nc.jetstream().stream_info(names.REQUEST_STREAM)).state.messages)


async def test_one_key_cannot_hold_a_models_whole_queue(
    nats_url: str, fair_gw: Gateway, secrets: dict[str, str]
) -> None:
    """--max-queue 4 x --key-queue-share 0.5: key A may have 2 requests waiting for `slow`
    at this gateway; its third is refused at once, while key B's request is admitted."""
    short = {**chat_body(SLOW), "max_tokens": 1}
    async with httpx.AsyncClient(base_url=fair_gw.base_url, timeout=30) as http:
        # Occupy the only slot of `slow` with a long stream (cancelled below).
        holder_body = {**chat_body(SLOW), "max_tokens": 400, "stream": True}
        async with http.stream(
            "POST", "/chat/completions", json=holder_body, headers=bearer(secrets["k-all"])
        ) as holder:
            assert holder.status_code == 200
            chunks = holder.aiter_bytes()
            await anext(chunks)  # running on the worker
            before = await queued(nats_url)
            a = bearer(secrets["k-fair-a"])
            waiting = [
                asyncio.create_task(http.post("/chat/completions", json=short, headers=a))
                for _ in range(2)
            ]
            deadline = time.monotonic() + 10
            while await queued(nats_url) < before + 2:  # both published: both counted
                assert time.monotonic() < deadline, "key A's requests never reached the queue"
                await asyncio.sleep(0.02)
            third = await http.post("/chat/completions", json=short, headers=a)
            assert third.status_code == 429, third.text
            assert third.json()["error"]["code"] == "key_queue_full"
            assert third.headers["retry-after"]
            b = asyncio.create_task(
                http.post("/chat/completions", json=short, headers=bearer(secrets["k-fair-b"]))
            )
            deadline = time.monotonic() + 10
            while await queued(nats_url) < before + 3:  # B was admitted to the queue
                assert not b.done(), b.result().text
                assert time.monotonic() < deadline, "key B's request never reached the queue"
                await asyncio.sleep(0.02)
        # The holder is gone (cancelled on its worker): everyone queued is answered.
        for r in [*await asyncio.gather(*waiting), await b]:
            assert r.status_code == 200, r.text
