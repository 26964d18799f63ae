"""Payload limits (bodies over the broker's max_payload go by reference; beyond the body
limit they get 413 and the broker connection stays up) and fuzzed request bodies (never a
5xx, never a crash, bounded memory) while a healthy stream keeps running."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import nats
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common import names
from llmfleet.broker import EmbeddedNats
from tests.procs import Fleet, Gateway

MODEL = "fuzz-model"
SMALL_PAYLOAD = 64 * 1024


@pytest.fixture(scope="module")
def small_broker() -> Iterator[EmbeddedNats]:
    with EmbeddedNats(max_payload=SMALL_PAYLOAD) as server:
        yield server


@pytest.fixture(scope="module")
def gw(small_broker: EmbeddedNats, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    fleet = Fleet(small_broker.url, tmp_path_factory.mktemp("pfleet"))
    try:
        fleet.worker(
            "--model", MODEL, "--max-concurrency", "8",
            "--sim-ttft-ms", "1", "--sim-itl-ms", "1", "--sim-tokens", "4",
        )  # fmt: skip
        yield fleet.gateway("--max-body-bytes", str(1024 * 1024), wait_models=(MODEL,))
    finally:
        fleet.stop_all()


def _chat(content: str, **extra: object) -> dict[str, object]:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], **extra}


async def _bucket_objects(url: str) -> int:
    nc = await nats.connect(url)
    try:
        obs = await nc.jetstream().object_store(names.body_bucket(names.GATEWAY_PRODUCER))
        try:
            return len(await obs.list(ignore_deletes=True))
        except Exception:  # nats-py raises when the bucket is empty
            return 0
    finally:
        await nc.close()


def test_bodies_over_max_payload_go_by_reference(gw: Gateway, small_broker: EmbeddedNats) -> None:
    big = "word " * 40_000  # ~200 KB, over the broker's 64 KiB max_payload
    r = httpx.post(gw.base_url + "/chat/completions", json=_chat(big), timeout=30)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["prompt_tokens"] == 40_000  # the worker read the whole body
    deadline = time.monotonic() + 5.0  # the gateway deletes it once the request ended
    while asyncio.run(_bucket_objects(small_broker.url)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert asyncio.run(_bucket_objects(small_broker.url)) == 0


def test_body_over_the_limit_is_413_and_the_broker_connection_survives(gw: Gateway) -> None:
    huge = "x" * (2 * 1024 * 1024)
    r = httpx.post(gw.base_url + "/chat/completions", json=_chat(huge), timeout=30)
    assert r.status_code == 413
    assert r.json()["error"]["code"] == "payload_too_large"
    ok = httpx.post(gw.base_url + "/chat/completions", json=_chat("hi"), timeout=30)
    assert ok.status_code == 200
    assert httpx.get(gw.url + "/readyz").status_code == 200


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
KEYS = ["model", "messages", "max_tokens", "n", "stream", "stream_options", "temperature",
        "top_p", "stop", "seed", "tools", "tool_choice", "response_format", "logprobs",
        "prompt", "input", "encoding_format", "dimensions", "echo"]  # fmt: skip
bodies = st.one_of(
    st.binary(max_size=200),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.fixed_dictionaries(
        {"model": st.sampled_from([MODEL, "", "nope", "a.b*>"])},
        optional={k: json_values for k in KEYS[1:]},
    ).map(lambda d: json.dumps(d).encode()),
    st.fixed_dictionaries(
        {
            "model": st.just(MODEL),
            "messages": st.lists(
                st.fixed_dictionaries(
                    {"role": st.sampled_from(["user", "system", "assistant", "bogus"])},
                    optional={"content": json_values},
                ),
                max_size=3,
            ),
        },
        optional={k: json_values for k in KEYS[2:]},
    ).map(lambda d: json.dumps(d).encode()),
)


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def test_fuzzed_bodies_never_hurt_the_gateway_or_a_concurrent_stream(gw: Gateway) -> None:
    healthy: dict[str, object] = {}

    def stream_forever() -> None:  # one long healthy stream across the whole fuzz run
        body = _chat("keep going", stream=True, max_tokens=4)
        done = 0
        with httpx.Client(base_url=gw.base_url, timeout=30) as c:
            while not healthy.get("stop"):
                with c.stream("POST", "/chat/completions", json=body) as r:
                    raw = r.read()
                assert r.status_code == 200 and raw.endswith(b"data: [DONE]\n\n")
                done += 1
        healthy["done"] = done

    t = threading.Thread(target=stream_forever)
    t.start()
    rss_before = _rss_kb(gw.popen.pid)
    statuses: list[int] = []
    with httpx.Client(base_url=gw.base_url, timeout=30) as c:

        @settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
        @given(
            path=st.sampled_from(["/chat/completions", "/completions", "/embeddings"]), body=bodies
        )
        def check(path: str, body: bytes) -> None:
            r = c.post(path, content=body, headers={"content-type": "application/json"})
            statuses.append(r.status_code)
            assert r.status_code < 500, (path, body, r.status_code, r.text)
            if r.status_code >= 400:
                err = r.json()["error"]
                assert set(err) == {"message", "type", "param", "code"}
                assert "Traceback" not in err["message"]

        try:
            check()
        finally:
            healthy["stop"] = True
            t.join(30)
    assert healthy.get("done", 0) > 0  # the stream thread finished its loop without failing
    assert gw.alive()
    assert _rss_kb(gw.popen.pid) - rss_before < 64 * 1024  # bounded memory
    assert 400 in statuses  # (valid bodies are rare here; the healthy stream covers 200s)
