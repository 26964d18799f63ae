"""The audit trail (issue 13), against real processes: one event per request in the
durable stream LLMFLEET_AUDIT, written by the gateway that answered it (or, for a request
straight over NATS, by the worker, under the producer its subject names); never a secret;
and `--audit-required`, which fails requests while the stream cannot be written.

Two `--auth keys` gateways (`gw-a` plain, `gw-b` with --audit-required), one sim worker.
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
    WORKER_AUDIT_PREFIX,
    AuditEvent,
    AuditSettings,
    decode,
    ensure_audit_stream,
)
from control.keys import new_secret
from tests.keyhelp import make_key
from tests.natshelp import connected, publish_request, reply_subject, request_headers
from tests.procs import Fleet, Gateway
from tests.sse import sse_events

MODEL, SECRET_MODEL, WORKER = "m-aud", "m-secret", "w-aud"
BAD = new_secret()  # presented, never valid


@pytest.fixture(scope="module")
async def secrets(nats_url: str) -> dict[str, str]:
    return {
        "k-ready": await make_key(nats_url, "k-ready", models=("*",)),
        "k-aud": await make_key(nats_url, "k-aud", models=(MODEL,)),
        "k-rl": await make_key(nats_url, "k-rl", models=(MODEL,), rpm=1),
    }


@pytest.fixture(scope="module")
def gws(fleet: Fleet, secrets: dict[str, str]) -> tuple[Gateway, Gateway]:
    fleet.worker(
        "--worker-id", WORKER, "--model", MODEL, "--model", SECRET_MODEL, "--engine", "sim",
        "--sim-ttft-ms", "1", "--sim-itl-ms", "1", "--sim-tokens", "8",
    )  # fmt: skip
    both = (MODEL, SECRET_MODEL)
    ready = secrets["k-ready"]
    a = fleet.gateway("--auth", "keys", "--gateway-id", "gw-a", wait_models=both, key=ready)
    b = fleet.gateway(
        "--auth", "keys", "--gateway-id", "gw-b", "--audit-required", wait_models=both, key=ready
    )
    return a, b


async def stored(nats_url: str) -> list[tuple[str, bytes, dict[str, str]]]:
    """Every message in the audit stream: (subject, raw data, headers)."""
    out = []
    async with connected(nats_url) as nc:
        js = nc.jetstream()
        state = (await js.stream_info(AUDIT_STREAM)).state
        for seq in range(state.first_seq, state.last_seq + 1):
            if state.messages == 0:
                break
            m = await js.get_msg(AUDIT_STREAM, seq)
            out.append((m.subject or "", m.data or b"", dict(m.headers or {})))
    return out


async def events_for(
    nats_url: str, rids: set[str], timeout: float = 5.0
) -> tuple[dict[str, list[tuple[str, AuditEvent]]], list[tuple[str, bytes, dict[str, str]]]]:
    """Wait until every request id has an event; returns them by id (with their subject),
    and every stored message."""
    deadline = time.monotonic() + timeout
    while True:
        raw = await stored(nats_url)
        by_id: dict[str, list[tuple[str, AuditEvent]]] = {}
        for subject, data, _ in raw:
            ev = decode(data)
            by_id.setdefault(ev.request_id, []).append((subject, ev))
        if rids <= set(by_id):
            return by_id, raw
        assert time.monotonic() < deadline, f"no audit event for {sorted(rids - set(by_id))}"
        await asyncio.sleep(0.1)


class Seen:
    """What each request's client saw, to hold its audit event against."""

    def __init__(self) -> None:
        self.want: dict[str, dict[str, Any]] = {}

    async def post(
        self,
        gw: Gateway,
        secret: str,
        path: str,
        body: dict[str, Any],
        key: str,
        status: int,
        error: str = "",
    ) -> httpx.Response:
        async with httpx.AsyncClient(base_url=gw.base_url, timeout=20) as http:
            r = await http.post(path, json=body, headers={"authorization": f"Bearer {secret}"})
        assert r.status_code == status, r.text
        rid = r.headers["x-request-id"]
        prompt = completion = 0
        if status == 200:
            if body.get("stream"):
                usage = [e["usage"] for e in sse_events(r.content) if isinstance(e, dict)]
                prompt, completion = usage[-1]["prompt_tokens"], usage[-1]["completion_tokens"]
            else:
                u = r.json()["usage"]
                prompt, completion = u["prompt_tokens"], u.get("completion_tokens", 0)
        else:
            assert r.json()["error"]["code"] == error
        self.want[rid] = {
            "key": key,
            "route": {"/chat/completions": "chat", "/completions": "completion"}.get(
                path, "embedding"
            ),
            "model": "" if status == 401 else body["model"],  # 401: the body is never read
            "served_model": r.headers.get("x-llmfleet-model", ""),
            "worker": r.headers.get("x-llmfleet-worker", ""),
            "gateway": gw.args[gw.args.index("--gateway-id") + 1],
            "status": status,
            "error": error,
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "stream": bool(body.get("stream")),
        }
        return r


def chat(model: str = MODEL, **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "audit me"}], **extra}


async def test_every_request_leaves_one_event_and_none_holds_a_secret(
    nats_url: str, gws: tuple[Gateway, Gateway], secrets: dict[str, str]
) -> None:
    a, b = gws
    aud, rl = secrets["k-aud"], secrets["k-rl"]
    chat_, nf = "/chat/completions", "model_not_found"
    streamed = chat(max_tokens=4, stream=True, stream_options={"include_usage": True})
    completion = {"model": MODEL, "prompt": "a b", "max_tokens": 2}
    run = [  # gateway, secret, route, body, key audited, status, error code
        (a, aud, chat_, chat(max_tokens=3), "k-aud", 200, ""),
        (a, aud, chat_, streamed, "k-aud", 200, ""),
        (b, aud, "/completions", completion, "k-aud", 200, ""),
        (a, aud, "/embeddings", {"model": MODEL, "input": ["x y z", "w"]}, "k-aud", 200, ""),
        (a, aud, chat_, chat(SECRET_MODEL), "k-aud", 404, nf),  # exists, not for this key
        (b, aud, chat_, chat(SECRET_MODEL, stream=True), "k-aud", 404, nf),
        (a, aud, chat_, chat("m-ghost"), "k-aud", 404, nf),
        (a, BAD, chat_, chat(), "", 401, "invalid_api_key"),
        (b, rl, chat_, chat(max_tokens=1), "k-rl", 200, ""),
        (b, rl, chat_, chat(max_tokens=1), "k-rl", 429, "rate_limit_exceeded"),
    ]  # fmt: skip
    seen = Seen()
    for gw, secret, path, body, key, status, error in run:
        await seen.post(gw, secret, path, body, key, status, error)

    # A request with no valid key is counted, never stored: anyone could fill the disk.
    unauthenticated = {rid for rid, want in seen.want.items() if want["status"] == 401}
    assert len(unauthenticated) == 1
    stored_ids = set(seen.want) - unauthenticated
    by_id, raw = await events_for(nats_url, stored_ids)
    assert not unauthenticated & set(by_id)
    for rid, want in seen.want.items():
        if rid in unauthenticated:
            continue
        assert len(by_id[rid]) == 1, (rid, by_id[rid])  # one event per request
        subject, ev = by_id[rid][0]
        assert subject == GATEWAY_AUDIT_PREFIX + want["gateway"]
        got = {f: getattr(ev, f) for f in want}
        assert got == want, rid
        assert ev.client.startswith("127.0.0.1:"), ev
        assert ev.duration_ms > 0
        if want["status"] == 200:
            assert want["worker"] == WORKER and want["served_model"] == MODEL
            if want["route"] != "embedding":
                assert ev.ttft_ms is not None and 0 < ev.ttft_ms <= ev.duration_ms
    # No stored message (body or headers) holds any secret that was ever presented.
    for subject, data, headers in raw:
        blob = data + json.dumps(headers).encode()
        for secret in (*secrets.values(), BAD):
            assert secret.encode() not in blob, subject


async def test_a_request_straight_over_nats_is_audited_under_its_producer(
    nats_url: str, gws: tuple[Gateway, Gateway]
) -> None:
    async with connected(nats_url) as nc:
        reply = reply_subject("audit-producer")
        sub = await nc.subscribe(reply)
        await nc.flush()
        headers = request_headers(reply, op="chat")
        rid = headers[p.H_REQUEST_ID]
        body = json.dumps(chat(max_tokens=5)).encode()
        await publish_request(nc.jetstream(), MODEL, body, headers)
        msgs: list[dict[str, Any]] = []
        while not msgs or msgs[-1]["type"] not in ("done", "error"):
            msgs.append(json.loads((await sub.next_msg(timeout=10)).data))
    assert msgs[0]["type"] == "accepted" and msgs[-1]["type"] == "done", msgs
    usage = msgs[-1]["usage"]
    by_id, _ = await events_for(nats_url, {rid})
    ((subject, ev),) = by_id[rid]
    assert subject == WORKER_AUDIT_PREFIX + WORKER
    assert ev.key == "producer:test" and ev.client == "test"
    assert (ev.worker, ev.model, ev.served_model, ev.gateway) == (WORKER, MODEL, MODEL, "")
    assert (ev.status, ev.error, ev.stream) == (200, "", True)
    assert (ev.prompt_tokens, ev.completion_tokens) == (
        usage["prompt_tokens"],
        usage["completion_tokens"],
    )


async def test_audit_required_fails_requests_while_the_stream_is_gone(
    nats_url: str, gws: tuple[Gateway, Gateway], secrets: dict[str, str]
) -> None:
    """With the audit stream deleted (every publish gets no responder): gw-b, which
    requires the audit, answers 503 `audit_unavailable`; gw-a answers as usual. Both stay
    up, and gw-b serves again once the stream is back."""
    a, b = gws
    auth = {"authorization": f"Bearer {secrets['k-aud']}"}
    refusals = []
    async with connected(nats_url) as nc:
        await nc.jetstream().delete_stream(AUDIT_STREAM)
    try:
        async with (
            httpx.AsyncClient(base_url=a.base_url, timeout=20, headers=auth) as ha,
            httpx.AsyncClient(base_url=b.base_url, timeout=20, headers=auth) as hb,
        ):
            for body in (chat(max_tokens=2), chat(max_tokens=2, stream=True)):
                r = await hb.post("/chat/completions", json=body)
                assert r.status_code == 503, r.text
                assert r.json()["error"]["code"] == "audit_unavailable"
                refusals.append(r)
                r = await ha.post("/chat/completions", json=body)
                assert r.status_code == 200, r.text
            for gw in gws:
                assert gw.alive()
                assert httpx.get(gw.url + "/healthz").status_code == 200
    finally:
        async with connected(nats_url) as nc:
            await ensure_audit_stream(nc.jetstream(), AuditSettings())
    async with httpx.AsyncClient(base_url=b.base_url, timeout=20, headers=auth) as hb:
        deadline = time.monotonic() + 10
        while (r := await hb.post("/chat/completions", json=chat(max_tokens=1))).status_code != 200:
            assert r.json()["error"]["code"] == "audit_unavailable", r.text
            assert time.monotonic() < deadline, "gw-b never served again"
            await asyncio.sleep(0.2)
    rid = r.headers["x-request-id"]
    by_id, _ = await events_for(nats_url, {rid})  # stored before the answer was sent
    assert by_id[rid][0][1].status == 200
    assert "audit event not written" in b.log()  # the failure is logged
    # A stream whose status is already out when its event cannot be stored ends with an
    # error event instead of its last frames.
    async with connected(nats_url) as nc:
        await nc.jetstream().delete_stream(AUDIT_STREAM)
    try:
        async with httpx.AsyncClient(base_url=b.base_url, timeout=20, headers=auth) as hb:
            r = await hb.post("/chat/completions", json=chat(max_tokens=2, stream=True))
        events = sse_events(r.content)
        assert r.status_code == 200 and events[-1] == "[DONE]", r.text
        last = events[-2]
        assert isinstance(last, dict) and last["error"]["code"] == "audit_unavailable", r.text
        assert not any(isinstance(e, dict) and e.get("usage") for e in events)
    finally:
        async with connected(nats_url) as nc:
            await ensure_audit_stream(nc.jetstream(), AuditSettings())
    for r in refusals:  # a 503 says when to come back
        assert "retry-after" in r.headers, (r.json(), dict(r.headers))


def test_a_worker_that_audits_stops_on_sigterm(fleet: Fleet) -> None:
    """SIGTERM drains a worker: idle, it exits at once with status 0 (its audit writer
    must not keep it running)."""
    w = fleet.worker("--model", "m-stop", "--engine", "sim", "--audit", "on")
    deadline = time.monotonic() + 20
    while " ready: " not in w.log():
        assert w.alive() and time.monotonic() < deadline, w.log()
        time.sleep(0.05)
    assert w.stop(timeout=8) == 0, w.log()
