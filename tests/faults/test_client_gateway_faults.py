"""Clients that leave, a gateway that dies, deadlines, and 4x overload: slots come back,
nothing runs unseen or twice, and every request gets exactly one clear answer."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Iterator

import httpx
import openai
import pytest

from tests.natshelp import connected, watch_announcements
from tests.procs import Fleet, Gateway, upstream_process
from tests.sse import sse_events, sse_text

PROXIED = "proxied-model"
STREAMY = "streamy-model"
OVER = "overload-model"


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    workdir = tmp_path_factory.mktemp("upstream")
    flags = ("--ttft-ms", "2", "--itl-ms", "20", "--tokens", "100")
    with upstream_process(workdir, *flags) as url:
        yield url


@pytest.fixture(scope="module")
def gw(fleet: Fleet, upstream: str) -> Gateway:
    fleet.worker(
        "--engine", "openai", "--model", PROXIED, "--upstream", upstream + "/v1",
        "--max-concurrency", "8",
    )  # fmt: skip
    fleet.worker(
        "--model", STREAMY, "--max-concurrency", "4",
        "--sim-ttft-ms", "5", "--sim-itl-ms", "50", "--sim-tokens", "2000",
    )  # fmt: skip
    fleet.worker(
        "--model", OVER, "--max-concurrency", "2",
        "--sim-ttft-ms", "50", "--sim-itl-ms", "10", "--sim-tokens", "5",
    )  # fmt: skip
    return fleet.gateway(wait_models=(PROXIED, STREAMY, OVER))


async def test_abandoned_requests_free_their_slots_and_upstream_streams(
    gw: Gateway, fleet: Fleet, upstream: str
) -> None:
    msgs = [{"role": "user", "content": "x"}]
    async with openai.AsyncOpenAI(base_url=gw.base_url, api_key="x", max_retries=0) as c:

        async def abandon(i: int) -> str:
            try:  # a client timeout of 0.5 s: the connection is closed, streaming or not
                async with asyncio.timeout(0.5):
                    if i % 2:
                        stream = await c.chat.completions.create(
                            model=PROXIED,
                            messages=msgs,  # type: ignore[arg-type]
                            stream=True,
                        )
                        async for _ in stream:
                            pass
                    else:
                        await c.chat.completions.create(model=PROXIED, messages=msgs)  # type: ignore[arg-type]
            except (TimeoutError, openai.APITimeoutError):
                return "timeout"
            return "finished"

        outcomes = await asyncio.gather(*(abandon(i) for i in range(200)))
    assert outcomes.count("timeout") == 200  # each would take ~2 s upstream

    async with connected(fleet.nats_url) as nc, watch_announcements(nc) as ann:
        await ann.wait_for(
            lambda a: bool(a.model(PROXIED)) and a.model(PROXIED)[0][1].in_flight == 0, 10
        )
        async with openai.AsyncOpenAI(base_url=gw.base_url, api_key="x", max_retries=0) as c:
            r = await asyncio.wait_for(
                c.chat.completions.create(model=PROXIED, messages=msgs, max_tokens=3),  # type: ignore[arg-type]
                10,
            )
        assert r.choices[0].message.content == "tok0 tok1 tok2"
    async with httpx.AsyncClient() as http:
        for _ in range(50):
            stats = (await http.get(upstream + "/stats")).json()
            if stats["open_streams"] == 0:
                break
            await asyncio.sleep(0.1)
    assert stats["open_streams"] == 0
    assert stats["aborted"] >= 8  # the upstream saw its streams closed, not run to the end


async def test_gateway_death_stops_generation(gw: Gateway, fleet: Fleet) -> None:
    doomed = fleet.gateway(wait_models=(STREAMY,))
    body = {"model": STREAMY, "messages": [{"role": "user", "content": "x"}], "stream": True}
    async with connected(fleet.nats_url) as nc, watch_announcements(nc) as ann:
        async with httpx.AsyncClient(base_url=doomed.base_url, timeout=60) as http:
            async with http.stream("POST", "/chat/completions", json=body) as r:
                chunks = r.aiter_bytes()
                await chunks.__anext__()
                await ann.wait_for(lambda a: any(m.in_flight == 1 for _, m in a.model(STREAMY)))
                doomed.stop(signal.SIGKILL)
                # 2000 tokens at 50 ms is 100 s of work; nobody reads it any more
                await ann.wait_for(lambda a: any(m.in_flight == 0 for _, m in a.model(STREAMY)), 5)
    ((announce, _),) = ann.model(STREAMY)
    assert announce.failed >= 1


async def test_deadline_from_client_header(gw: Gateway) -> None:
    body = {"model": STREAMY, "messages": [{"role": "user", "content": "x"}]}
    async with httpx.AsyncClient(base_url=gw.base_url, timeout=30) as http:
        r = await http.post("/chat/completions", json=body, headers={"x-llmfleet-timeout": "1"})
        assert r.status_code == 504
        assert r.json()["error"]["code"] == "deadline_exceeded"
        async with http.stream(
            "POST",
            "/chat/completions",
            json={**body, "stream": True},
            headers={"x-llmfleet-timeout": "1"},
        ) as s:
            raw = await s.aread()
    events = sse_events(raw)
    assert events[-1] == "[DONE]"
    assert events[-2]["error"]["code"] == "deadline_exceeded"  # type: ignore[index]


async def test_overload_4x_rejects_cleanly_and_never_runs_twice(gw: Gateway, fleet: Fleet) -> None:
    gw = fleet.gateway("--queue-timeout", "0.15", wait_models=(OVER,))
    body = {"model": OVER, "messages": [{"role": "user", "content": "x"}]}
    codes: list[int] = []
    async with connected(fleet.nats_url) as nc, watch_announcements(nc) as ann:
        await ann.wait_for(lambda a: bool(a.model(OVER)))
        ((before, _),) = ann.model(OVER)
        async with httpx.AsyncClient(base_url=gw.base_url, timeout=30) as http:

            async def loop() -> None:  # closed loop: 8 clients for 2 slots = 4x load
                end = asyncio.get_running_loop().time() + 3.0
                while asyncio.get_running_loop().time() < end:
                    r = await http.post("/chat/completions", json=body)
                    codes.append(r.status_code)
                    if r.status_code == 503:
                        assert r.headers["retry-after"]
                        assert r.json()["error"]["code"] == "queue_timeout"
                    else:
                        assert len(r.json()["choices"][0]["message"]["content"].split()) == 5

            await asyncio.gather(*(loop() for _ in range(8)))
        ok = codes.count(200)
        await asyncio.sleep(1.5)  # let late cancellations settle, then read the counters
        await ann.wait_for(
            lambda a: (
                a.model(OVER)[0][1].in_flight == 0
                and a.model(OVER)[0][0].completed >= before.completed + ok
            )
        )
        ((after, _),) = ann.model(OVER)
    assert set(codes) <= {200, 503}
    assert codes.count(503) > 0 and ok > 0
    assert after.completed - before.completed == ok  # nothing ran unseen or twice


async def test_gateway_sigterm_finishes_streams_then_exits(fleet: Fleet) -> None:
    fleet.worker(
        "--model", "drainable", "--max-concurrency", "4",
        "--sim-ttft-ms", "5", "--sim-itl-ms", "20", "--sim-tokens", "60",
    )  # fmt: skip
    gw = fleet.gateway(wait_models=("drainable",))
    body = {"model": "drainable", "messages": [{"role": "user", "content": "x"}], "stream": True}
    async with httpx.AsyncClient(base_url=gw.base_url, timeout=60) as http:
        async with http.stream("POST", "/chat/completions", json=body) as r:
            chunks = r.aiter_bytes()
            raw = await chunks.__anext__()
            gw.popen.send_signal(signal.SIGTERM)  # ~1.2 s of stream still to come
            await asyncio.sleep(0.3)
            with pytest.raises(httpx.ConnectError):  # no new connections meanwhile
                await httpx.AsyncClient().get(gw.url + "/healthz")
            async for more in chunks:
                raw += more
    assert raw.endswith(b"data: [DONE]\n\n")
    text = sse_text(sse_events(raw))
    assert len(text.split()) == 60  # the whole answer, after SIGTERM
    assert await asyncio.to_thread(gw.popen.wait, 20) == 0


def test_stats_count_waits_rejections_and_failures(gw: Gateway) -> None:
    before = httpx.get(gw.url + "/stats").json()
    body = {"model": PROXIED, "messages": [{"role": "user", "content": "x"}], "max_tokens": 1}
    assert httpx.post(gw.base_url + "/chat/completions", json=body, timeout=30).status_code == 200
    bad = {"model": "no-such-model", "messages": [{"role": "user", "content": "x"}]}
    assert httpx.post(gw.base_url + "/chat/completions", json=bad).status_code == 404
    after = httpx.get(gw.url + "/stats").json()
    assert after["queue"]["published"] - before["queue"]["published"] == 1
    assert after["http"]["ok"] - before["http"]["ok"] == 1
    assert after["http"]["client_errors"] - before["http"]["client_errors"] == 1
    assert set(after["failures"]) == {"workers_lost", "redelivered", "resumed"}
    assert after["fleet"]["models"][PROXIED]["status"] == "ready"
