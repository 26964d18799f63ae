"""Fleet behaviour over the real broker: capacity-aware dispatch, FIFO, queue timeouts,
client disconnects, and the wire protocol as a batch producer uses it (no HTTP)."""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest

from common import protocol as p
from tests.natshelp import (
    connected,
    publish_request,
    reply_subject,
    request_headers,
    watch_announcements,
)
from tests.procs import Fleet, Gateway

SLOW = "slow-model"  # max-concurrency 2, ~150 ms per request
BUSY = "busy-model"  # max-concurrency 1, long first token
LONG = "long-model"  # long streams, to disconnect from
QUICK = "quick-model"
LATE = "late-model"  # its worker starts during a test

BODY = json.dumps({"model": SLOW, "messages": [{"role": "user", "content": "hi"}]}).encode()


@pytest.fixture(scope="module")
def gw(fleet: Fleet) -> Gateway:
    fleet.worker(
        "--model", SLOW, "--max-concurrency", "2",
        "--sim-ttft-ms", "50", "--sim-itl-ms", "20", "--sim-tokens", "5",
    )  # fmt: skip
    fleet.worker(
        "--model", BUSY, "--max-concurrency", "1",
        "--sim-ttft-ms", "1500", "--sim-itl-ms", "1", "--sim-tokens", "1",
    )  # fmt: skip
    fleet.worker(
        "--model", LONG, "--model", QUICK, "--max-concurrency", "4",
        "--sim-ttft-ms", "1", "--sim-itl-ms", "10", "--sim-tokens", "1000",
    )  # fmt: skip
    return fleet.gateway("--queue-timeout", "0.5", wait_models=(SLOW, BUSY, LONG, QUICK))


async def test_saturated_worker_never_runs_a_third_request_and_serves_fifo(
    gw: Gateway, fleet: Fleet
) -> None:
    """20 requests to a worker with 2 slots: all complete, at most 2 at once, in order."""
    events: list[tuple[int, str]] = []
    done = asyncio.Event()

    async with connected(fleet.nats_url) as nc, watch_announcements(nc) as ann:

        async def on_reply(msg: object) -> None:
            i = int(msg.subject.rsplit(".", 1)[1])  # type: ignore[attr-defined]
            r = p.decode_reply(msg.data)  # type: ignore[attr-defined]
            events.append((i, r.__struct_config__.tag))  # type: ignore[arg-type]
            if sum(1 for _, t in events if t in ("done", "error")) == 20:
                done.set()

        await nc.subscribe(reply_subject("fifo.*"), cb=on_reply)
        js = nc.jetstream()
        for i in range(20):  # sequential publishes: stream order = i
            await publish_request(js, SLOW, BODY, request_headers(reply_subject(f"fifo.{i}")))
        async with asyncio.timeout(30):
            await done.wait()
        await ann.wait_for(lambda a: any(m.in_flight == 0 for _, m in a.model(SLOW)))
        ((announce, _),) = ann.model(SLOW)

    assert [t for _, t in events].count("done") == 20
    assert [i for i, t in events if t == "accepted"] == list(range(20))  # FIFO
    running, peak = set(), 0
    for i, t in events:
        if t == "accepted":
            running.add(i)
        elif t in ("done", "error"):
            running.discard(i)
        peak = max(peak, len(running))
    assert peak == 2  # used both slots, never a third
    assert announce.peak_in_flight == 2


async def test_saturation_through_the_gateway(gw: Gateway, fleet: Fleet) -> None:
    async with connected(fleet.nats_url) as nc, watch_announcements(nc) as ann:
        async with openai.AsyncOpenAI(
            base_url=gw.base_url, api_key="x", max_retries=0, timeout=60
        ) as c:
            results = await asyncio.gather(
                *(
                    c.chat.completions.create(
                        model=SLOW,
                        messages=[{"role": "user", "content": f"q{i}"}],
                        extra_headers={"x-llmfleet-timeout": "60"},
                    )
                    for i in range(20)
                ),
                return_exceptions=True,
            )
        await ann.wait_for(lambda a: bool(a.model(SLOW)))
        ((announce, _),) = ann.model(SLOW)
    # queue timeout is 0.5 s: with 2 slots and ~150 ms jobs, later ones may time out
    ok = [r for r in results if not isinstance(r, BaseException)]
    rejected = [r for r in results if isinstance(r, openai.APIStatusError)]
    assert len(ok) + len(rejected) == 20
    assert all(r.status_code == 503 for r in rejected)
    assert all(len(r.choices[0].message.content.split()) == 5 for r in ok)  # type: ignore[union-attr]
    assert len(ok) >= 4
    assert announce.peak_in_flight <= 2


async def test_queue_timeout_is_503_with_retry_after_and_never_runs(
    gw: Gateway, fleet: Fleet
) -> None:
    body = {"model": BUSY, "messages": [{"role": "user", "content": "x"}]}
    async with connected(fleet.nats_url) as nc, watch_announcements(nc) as ann:
        await ann.wait_for(lambda a: bool(a.model(BUSY)))
        ((before, _),) = ann.model(BUSY)
        async with httpx.AsyncClient(base_url=gw.base_url, timeout=30) as http:
            first = asyncio.create_task(http.post("/chat/completions", json=body))
            await asyncio.sleep(0.2)  # the first now holds the only slot
            second = await http.post("/chat/completions", json=body)
            assert second.status_code == 503
            assert second.headers["retry-after"] == "2"
            assert second.json()["error"]["code"] == "queue_timeout"
            assert (await first).status_code == 200
        await asyncio.sleep(1.0)  # a withdrawn request must not run later
        await ann.wait_for(
            lambda a: (
                a.model(BUSY)[0][0].completed == before.completed + 1
                and a.model(BUSY)[0][1].in_flight == 0
            )
        )
        await asyncio.sleep(2.0)
        ((after, _),) = ann.model(BUSY)
    assert after.completed == before.completed + 1
    assert after.failed == before.failed


async def test_client_timeout_shorter_than_queue_timeout_is_504(gw: Gateway) -> None:
    body = {"model": BUSY, "messages": [{"role": "user", "content": "x"}]}
    async with httpx.AsyncClient(base_url=gw.base_url, timeout=30) as http:
        first = asyncio.create_task(http.post("/chat/completions", json=body))
        await asyncio.sleep(0.2)  # the first holds the only slot for 1.5 s
        r = await http.post("/chat/completions", json=body, headers={"x-llmfleet-timeout": "0.2"})
        assert r.status_code == 504
        assert r.json()["error"]["code"] == "deadline_exceeded"
        assert (await first).status_code == 200


async def test_client_disconnect_cancels_on_the_worker(gw: Gateway, fleet: Fleet) -> None:
    body = {"model": LONG, "messages": [{"role": "user", "content": "x"}], "stream": True}
    async with connected(fleet.nats_url) as nc, watch_announcements(nc) as ann:
        async with httpx.AsyncClient(base_url=gw.base_url, timeout=30) as http:
            async with http.stream("POST", "/chat/completions", json=body) as r:
                assert r.status_code == 200
                chunks = r.aiter_bytes()  # keep a reference: a dropped iterator closes
                for _ in range(3):
                    await chunks.__anext__()
                await ann.wait_for(lambda a: a.model(LONG)[0][1].in_flight == 1, timeout=5)
        # 1000 tokens at 10 ms would take 10 s; the slot must come back long before
        await ann.wait_for(lambda a: a.model(LONG)[0][1].in_flight == 0, timeout=4)
        ((announce, _),) = ann.model(LONG)
    assert announce.failed >= 1  # cancelled, not completed


# ---- the wire protocol, as a batch producer sees it ------------------------------------


async def _collect(nc: object, subject: str, timeout: float = 10.0) -> list[p.Reply]:
    out: list[p.Reply] = []
    finished = asyncio.Event()

    async def cb(msg: object) -> None:
        r = p.decode_reply(msg.data)  # type: ignore[attr-defined]
        out.append(r)
        if isinstance(r, (p.Done, p.Error)):
            finished.set()

    sub = await nc.subscribe(subject, cb=cb)  # type: ignore[attr-defined]
    try:
        async with asyncio.timeout(timeout):
            await finished.wait()
    finally:
        await sub.unsubscribe()
    return out


async def test_producer_gets_accepted_deltas_done(gw: Gateway, fleet: Fleet) -> None:
    body = json.dumps(
        {"model": QUICK, "messages": [{"role": "user", "content": "a b"}], "max_tokens": 3}
    ).encode()
    async with connected(fleet.nats_url) as nc:
        js = nc.jetstream()
        waiting = asyncio.create_task(_collect(nc, reply_subject("prod.1")))
        await asyncio.sleep(0.05)
        await publish_request(
            js, QUICK, body, request_headers(reply_subject("prod.1"), request_id="r-1")
        )
        replies = await waiting
    assert isinstance(replies[0], p.Accepted)
    assert replies[0].request_id == "r-1" and replies[0].model == QUICK
    assert [r.seq for r in replies] == list(range(len(replies)))
    assert isinstance(replies[-1], p.Done)
    assert replies[-1].usage.completion_tokens == 3 and replies[-1].usage.prompt_tokens == 2
    text = "".join(c.content or "" for r in replies if isinstance(r, p.Delta) for c in r.choices)
    assert len(text.split()) == 3


async def test_producer_expired_and_malformed_requests(gw: Gateway, fleet: Fleet) -> None:
    good = json.dumps(
        {"model": QUICK, "messages": [{"role": "user", "content": "x"}], "max_tokens": 2}
    ).encode()
    async with connected(fleet.nats_url) as nc:
        js = nc.jetstream()
        # waited in the queue past its queue timeout (no worker for it yet; the worker that
        # starts later measures the wait on the broker's clock): a lone 504, never run
        waiting = asyncio.create_task(_collect(nc, reply_subject("prod.expired")))
        await asyncio.sleep(0.05)
        h = request_headers(reply_subject("prod.expired"), **{p.H_QUEUE_TIMEOUT: "300"})
        await publish_request(js, LATE, good, h)
        await asyncio.sleep(0.8)
        fleet.worker("--model", LATE, "--sim-ttft-ms", "1", "--sim-itl-ms", "1")
        (only,) = await waiting
        assert isinstance(only, p.Error) and only.seq == 0 and only.status == 504

        # an unknown operation: a lone 400 error
        waiting = asyncio.create_task(_collect(nc, reply_subject("prod.badop")))
        await asyncio.sleep(0.05)
        await publish_request(
            js, QUICK, good, request_headers(reply_subject("prod.badop"), op="dance")
        )
        (only,) = await waiting
        assert isinstance(only, p.Error) and only.status == 400

        # a body that is not a chat request: accepted, then a 400 naming the field
        waiting = asyncio.create_task(_collect(nc, reply_subject("prod.badbody")))
        await asyncio.sleep(0.05)
        await publish_request(
            js, QUICK, b'{"model": "x"}', request_headers(reply_subject("prod.badbody"))
        )
        replies = await waiting
        assert isinstance(replies[-1], p.Error)
        assert replies[-1].status == 400 and replies[-1].error.param == "messages"

        # no reply subject at all: dropped; the worker keeps serving
        await publish_request(js, QUICK, good, {p.H_OP: "chat"})
        waiting = asyncio.create_task(_collect(nc, reply_subject("prod.after")))
        await asyncio.sleep(0.05)
        await publish_request(js, QUICK, good, request_headers(reply_subject("prod.after")))
        assert isinstance((await waiting)[-1], p.Done)
