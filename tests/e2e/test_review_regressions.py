"""Regressions from the hostile review of issue 13 (virtual keys, limits, budgets, audit),
against real processes: nats-server, two `--auth keys` gateways and sim workers. Each test
fails on the behaviour the review found:

- a stream its client abandons is charged (the output seen, the prompt's byte bound);
- a producer's choice of request id cannot erase another audit event (Nats-Msg-Id);
- a huge model name is cut in its audit event and does not stall `--audit-required`;
- 401s are not stored in the audit stream;
- a `key_queue_full` refusal consumes no rpm;
- a revocation with a future `revoked_at` (an admin clock ahead) is effective at once;
- a default model the key may not run is not disclosed.

`gw-main` has `--audit-required --default-model hidden-m --max-queue 4
--key-queue-share 0.5`; `gw-plain` has no default model.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import httpx
import pytest

from common import protocol as p
from common.audit import (
    AUDIT_STREAM,
    GATEWAY_AUDIT_PREFIX,
    MAX_FIELD_CHARS,
    WORKER_AUDIT_PREFIX,
    AuditEvent,
    decode,
)
from control.keys import new_secret
from tests.keyhelp import make_key, read_usage, update_key
from tests.natshelp import connected, publish_request, reply_subject, request_headers
from tests.procs import Fleet, Gateway

FAST, HIDDEN, STREAM, ONE = "m-fast", "hidden-m", "m-stream", "m-one"
WORKER = "w-rr"
MAIN_ID = "gw-main"
KEYS: dict[str, dict[str, Any]] = {
    "k-ready": {"models": ("*",), "admin": True},
    "k-bud": {"models": (STREAM,), "budget_tokens": 5000, "budget_period": "total"},
    "k-rr": {"models": (FAST,)},
    "k-long": {"models": ("*",)},
    "k-q": {"models": (ONE,), "rpm": 4},
    "k-rev": {"models": (FAST,)},
    "k-nohidden": {"models": (FAST,)},
    "k-hidden": {"models": (HIDDEN,)},
}


@pytest.fixture(scope="module")
async def secrets(nats_url: str) -> dict[str, str]:
    return {name: await make_key(nats_url, name, **f) for name, f in KEYS.items()}


@pytest.fixture(scope="module")
def gws(fleet: Fleet, secrets: dict[str, str]) -> tuple[Gateway, Gateway]:
    fleet.worker(
        "--worker-id", WORKER, "--model", FAST, "--model", HIDDEN, "--engine", "sim",
        "--max-concurrency", "32", "--sim-ttft-ms", "1", "--sim-itl-ms", "1", "--sim-tokens", "3",
    )  # fmt: skip
    fleet.worker(
        "--model", STREAM, "--engine", "sim", "--max-concurrency", "4",
        "--sim-ttft-ms", "1", "--sim-itl-ms", "20", "--sim-tokens", "1000",
    )  # fmt: skip
    fleet.worker(
        "--model", ONE, "--engine", "sim", "--max-concurrency", "1",
        "--sim-ttft-ms", "1", "--sim-itl-ms", "20", "--sim-tokens", "1000",
    )  # fmt: skip
    models = (FAST, HIDDEN, STREAM, ONE)
    ready = secrets["k-ready"]
    main = fleet.gateway(
        "--auth", "keys", "--gateway-id", MAIN_ID, "--audit-required",
        "--default-model", HIDDEN, "--max-queue", "4", "--key-queue-share", "0.5",
        wait_models=models, key=ready,
    )  # fmt: skip
    plain = fleet.gateway(
        "--auth", "keys", "--gateway-id", "gw-plain", "--max-queue", "4",
        wait_models=models, key=ready,
    )  # fmt: skip
    return main, plain


def bearer(secret: str) -> dict[str, str]:
    return {"authorization": f"Bearer {secret}"}


def chat(model: str | None, max_tokens: int = 2, **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": max_tokens,
    }
    if model is not None:
        body["model"] = model
    return {**body, **extra}


async def stored(nats_url: str) -> list[tuple[str, AuditEvent]]:
    """Every event in the audit stream, with its subject."""
    out = []
    async with connected(nats_url) as nc:
        js = nc.jetstream()
        state = (await js.stream_info(AUDIT_STREAM)).state
        if state.messages:
            for seq in range(state.first_seq, state.last_seq + 1):
                m = await js.get_msg(AUDIT_STREAM, seq)
                out.append((m.subject or "", decode(m.data or b"")))
    return out


async def audit_count(nats_url: str) -> int:
    async with connected(nats_url) as nc:
        return int((await nc.jetstream().stream_info(AUDIT_STREAM)).state.messages)


async def events_by_id(
    nats_url: str, want: dict[str, int], timeout: float = 5.0
) -> dict[str, list[tuple[str, AuditEvent]]]:
    """Wait until each request id in `want` has at least that many events."""
    deadline = time.monotonic() + timeout
    while True:
        by_id: dict[str, list[tuple[str, AuditEvent]]] = {}
        for subject, ev in await stored(nats_url):
            by_id.setdefault(ev.request_id, []).append((subject, ev))
        if all(len(by_id.get(rid, [])) >= n for rid, n in want.items()):
            return by_id
        got = {rid: len(by_id.get(rid, [])) for rid in want}
        assert time.monotonic() < deadline, f"audit events: {got}, want {want}"
        await asyncio.sleep(0.1)


async def test_an_abandoned_stream_is_charged(
    nats_url: str, gws: tuple[Gateway, Gateway], secrets: dict[str, str]
) -> None:
    """The client reads ~20 deltas of a 1000-token stream and leaves: no `done` ever
    comes, yet the key is charged for the output it got and the prompt's bound."""
    main, _ = gws
    body = chat(STREAM, max_tokens=1000, stream=True)
    deltas = 0
    async with httpx.AsyncClient(base_url=main.base_url, timeout=20) as http:
        async with http.stream(
            "POST", "/chat/completions", json=body, headers=bearer(secrets["k-bud"])
        ) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[len("data: ") :])
                if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                    deltas += 1
                if deltas >= 20:
                    break
    assert deltas == 20
    deadline = time.monotonic() + 3.0
    while True:
        u = await read_usage(nats_url, "k-bud")
        if u is not None and u.completion_tokens >= 20 and u.prompt_tokens > 0:
            break
        assert time.monotonic() < deadline, f"the abandoned stream was not charged: {u}"
        await asyncio.sleep(0.1)
    assert u.completion_tokens < 1000, u  # it was cut short, not run to the end


async def test_a_producer_cannot_erase_audit_events_with_its_request_id(
    nats_url: str, gws: tuple[Gateway, Gateway], secrets: dict[str, str]
) -> None:
    main, _ = gws
    async with httpx.AsyncClient(base_url=main.base_url, timeout=20) as http:
        r = await http.post("/chat/completions", json=chat(FAST), headers=bearer(secrets["k-rr"]))
    assert r.status_code == 200, r.text
    rid = r.headers["x-request-id"]
    again = "rr-" + new_secret()[-12:]  # a producer's own id, published twice

    async with connected(nats_url) as nc:
        reply = reply_subject("review-rr")
        sub = await nc.subscribe(reply)
        await nc.flush()
        js = nc.jetstream()
        body = json.dumps(chat(FAST, max_tokens=3)).encode()
        # The gateway's request id; a new Nats-Msg-Id so the request queue takes it.
        h = request_headers(reply, op="chat", request_id=rid, **{p.H_MSG_ID: "m1-" + rid})
        await publish_request(js, FAST, body, h)
        for n in (1, 2):  # the same request id twice, as two queued requests
            h = request_headers(reply, op="chat", request_id=again, **{p.H_MSG_ID: f"{again}-{n}"})
            await publish_request(js, FAST, body, h)
        ends: list[dict[str, Any]] = []
        async with asyncio.timeout(15):
            while len(ends) < 3:
                msg = json.loads((await sub.next_msg(timeout=10)).data)
                if msg["type"] in ("done", "error"):
                    ends.append(msg)
    assert [m["type"] for m in ends] == ["done"] * 3, ends

    by_id = await events_by_id(nats_url, {rid: 2, again: 2})
    evs = sorted(by_id[rid], key=lambda se: se[0])
    assert len(evs) == 2, evs
    (gw_subject, gw_ev), (wk_subject, wk_ev) = evs
    assert gw_subject == GATEWAY_AUDIT_PREFIX + MAIN_ID and gw_ev.key == "k-rr", gw_ev
    assert wk_subject == WORKER_AUDIT_PREFIX + WORKER and wk_ev.key == "producer:test", wk_ev
    twice = by_id[again]
    assert len(twice) == 2, twice
    for subject, ev in twice:
        assert subject == WORKER_AUDIT_PREFIX + WORKER
        assert ev.key == "producer:test" and ev.status == 200, ev


async def test_a_huge_model_name_neither_stalls_nor_bloats_the_audit(
    nats_url: str, gws: tuple[Gateway, Gateway], secrets: dict[str, str]
) -> None:
    """70 000 characters of model name, from a valid key: 404, and its audit event (cut
    to MAX_FIELD_CHARS) does not wedge the writer of an `--audit-required` gateway."""
    main, _ = gws
    name = "x" * 70_000
    async with httpx.AsyncClient(
        base_url=main.base_url, timeout=20, headers=bearer(secrets["k-long"])
    ) as http:
        r = await http.post("/chat/completions", json=chat(name))
        assert r.status_code == 404, r.text[:300]
        assert r.json()["error"]["code"] == "model_not_found"
        long_rid = r.headers["x-request-id"]
        statuses = []
        for _ in range(20):  # spread over ~1 s, the writer's retry window
            ok = await http.post("/chat/completions", json=chat(FAST))
            statuses.append((ok.status_code, ok.text[:200]))
            await asyncio.sleep(0.05)
    assert all(s == 200 for s, _ in statuses), statuses
    by_id = await events_by_id(nats_url, {long_rid: 1})
    ((_, ev),) = by_id[long_rid]
    assert ev.status == 404 and ev.error == "model_not_found", ev
    assert ev.model == name[:MAX_FIELD_CHARS], len(ev.model)
    # The writer never failed an event, nor dropped one, nor has any left waiting.
    stats = httpx.get(main.url + "/stats", headers=bearer(secrets["k-ready"])).json()
    audit = stats["governance"]["audit"]
    assert (audit["failed"], audit["dropped"], audit["queued"]) == (0, 0, 0), audit


async def test_unauthenticated_requests_are_not_stored(
    nats_url: str, gws: tuple[Gateway, Gateway], secrets: dict[str, str]
) -> None:
    main, _ = gws
    before = await audit_count(nats_url)
    bad = [{}, bearer(new_secret()), {"x-api-key": new_secret()}, bearer("sk-llmf-nope")]
    async with httpx.AsyncClient(base_url=main.base_url, timeout=20) as http:
        answers = await asyncio.gather(
            *(
                http.post("/chat/completions", json=chat(FAST), headers=bad[i % len(bad)])
                for i in range(50)
            )
        )
    assert all(r.status_code == 401 for r in answers), {r.status_code for r in answers}
    assert all(r.json()["error"]["code"] == "invalid_api_key" for r in answers)
    await asyncio.sleep(1.0)  # the writer publishes within milliseconds
    # Events of earlier tests may still land meanwhile: count those of no key (a 401's).
    assert await audit_count(nats_url) < before + 50
    assert not [ev for _, ev in await stored(nats_url) if not ev.key]
    assert main.alive() and httpx.get(main.url + "/healthz").status_code == 200
    r = httpx.post(
        main.base_url + "/chat/completions", json=chat(FAST), headers=bearer(secrets["k-rr"])
    )
    assert r.status_code == 200, r.text


async def _in_flight(gw: Gateway, admin: str, n: int, timeout: float = 10.0) -> None:
    """Wait until the gateway has `n` requests published and not yet answered."""
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(base_url=gw.url, headers=bearer(admin)) as http:
        while True:
            doc = (await http.get("/stats")).json()
            if doc["http"]["in_flight"] >= n:
                return
            assert time.monotonic() < deadline, doc
            await asyncio.sleep(0.02)


async def test_a_key_queue_full_refusal_consumes_no_rpm(
    gws: tuple[Gateway, Gateway], secrets: dict[str, str]
) -> None:
    """rpm 4, a key's share of the queue 2 (`--max-queue 4 --key-queue-share 0.5`), one
    worker running one request at a time: one running and two queued fill the share; the
    next two are `key_queue_full`. They took no rpm: one more request is admitted later
    (4 in all), and only the one after it meets the rpm."""
    main, _ = gws
    async with httpx.AsyncClient(
        base_url=main.base_url, timeout=30, headers=bearer(secrets["k-q"])
    ) as http:
        async with http.stream(
            "POST", "/chat/completions", json=chat(ONE, max_tokens=40, stream=True)
        ) as running:
            assert running.status_code == 200
            chunks = running.aiter_bytes()
            await anext(chunks)  # running on the worker: out of the queue
            queued = [
                asyncio.create_task(http.post("/chat/completions", json=chat(ONE, max_tokens=2)))
                for _ in range(2)
            ]
            try:
                await _in_flight(main, secrets["k-ready"], 3)  # 1 running, 2 waiting
                refusals = [
                    await http.post("/chat/completions", json=chat(ONE, max_tokens=2))
                    for _ in range(2)
                ]
                still_queued = not any(t.done() for t in queued)
                async for _ in chunks:
                    pass
            finally:
                answers = await asyncio.gather(*queued, return_exceptions=True)
        for r in refusals:
            assert r.status_code == 429, r.text
            assert r.json()["error"]["code"] == "key_queue_full", r.text
        assert still_queued
        for a in answers:
            assert isinstance(a, httpx.Response) and a.status_code == 200, a
        r = await http.post("/chat/completions", json=chat(ONE, max_tokens=2))
        assert r.status_code == 200, r.text  # the 4th admitted: the refusals took none
        r = await http.post("/chat/completions", json=chat(ONE, max_tokens=2))
        assert r.status_code == 429, r.text
        err = r.json()["error"]
        assert err["code"] == "rate_limit_exceeded" and err["type"] == "requests", err


async def test_a_revocation_dated_in_the_future_is_effective_at_once(
    nats_url: str, gws: tuple[Gateway, Gateway], secrets: dict[str, str]
) -> None:
    """An admin whose clock is 30 s ahead revokes a key: it stops working within 2 s."""
    main, _ = gws
    h = bearer(secrets["k-rev"])
    async with httpx.AsyncClient(base_url=main.base_url, timeout=10, headers=h) as http:
        assert (await http.post("/chat/completions", json=chat(FAST))).status_code == 200
        await update_key(nats_url, "k-rev", revoked_at=time.time() + 30)
        t0 = time.monotonic()
        while True:
            r = await http.post("/chat/completions", json=chat(FAST))
            if r.status_code == 401:
                break
            assert r.status_code == 200, r.text
            assert time.monotonic() - t0 < 2.0, "the revoked key still works after 2 s"
            await asyncio.sleep(0.05)
        assert r.json()["error"]["code"] == "invalid_api_key"
        assert (await http.get("/models")).status_code == 401


async def test_a_default_model_the_key_may_not_run_is_not_disclosed(
    gws: tuple[Gateway, Gateway], secrets: dict[str, str]
) -> None:
    main, plain = gws
    answers = []
    for gw in (main, plain):
        async with httpx.AsyncClient(base_url=gw.base_url, timeout=10) as http:
            r = await http.post(
                "/chat/completions", json=chat(None), headers=bearer(secrets["k-nohidden"])
            )
        assert r.status_code == 400, (gw.url, r.text)
        err = r.json()["error"]
        assert err["type"] == "invalid_request_error" and err["param"] == "model", err
        assert HIDDEN not in r.text and HIDDEN not in str(r.headers), (gw.url, r.text)
        answers.append(r.content)
    assert answers[0] == answers[1]  # just like a gateway with no default model
    async with httpx.AsyncClient(base_url=main.base_url, timeout=10) as http:
        r = await http.post(
            "/chat/completions", json=chat(None), headers=bearer(secrets["k-hidden"])
        )
    assert r.status_code == 200, r.text
    assert r.json()["model"] == HIDDEN
