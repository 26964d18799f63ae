"""Attacks 9 and 12: the catalog (`/v1/models`) and what it tells clients.

9. Catalog spoofing. `batch-etl` may read announcements but not publish them (a permission
   violation). The worker role may publish on any `llmfleet.hb.<worker>` (workers are
   trusted), yet the catalog still does not trust a payload: an announcement on
   `llmfleet.hb.a` that names worker `b` (a bogus model; or a real worker "stopped") is
   dropped, and a TTL is clamped to 60 s (checked on `accepted_announce`: waiting out
   a minute is too slow here).
12. Leaks: with `--api-key`, `/v1/models` describes models without any URL, credential or
   address, even for a worker whose engine is configured with them (an OpenAI-compatible
   upstream with a user:password URL and an API key).
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import time

import httpx

from common import names
from common import protocol as p
from gateway.catalog import MAX_TTL_S, accepted_announce
from llmfleet.broker import free_port
from tests.security.stack import (
    API_KEY,
    MODEL,
    OneNodeHub,
    Stack,
    actor,
    assert_unharmed,
    before,
)


def _announce(
    worker: str, model: str, state: str = "ready", ttl_s: float = 30.0
) -> p.WorkerAnnounce:
    return p.WorkerAnnounce(
        worker=worker,
        host="spoof",
        version="0",
        state=state,
        ttl_s=ttl_s,
        started_at=time.time(),
        models=[p.ModelStatus(id=model, engine="sim", max_concurrency=64)],
    )


def _models(stack: Stack) -> dict[str, dict[str, object]]:
    assert stack.gw is not None
    r = httpx.get(
        stack.gw.base_url + "/models", headers={"authorization": f"Bearer {API_KEY}"}, timeout=5
    )
    assert r.status_code == 200, r.text
    return {m["id"]: m for m in r.json()["data"]}


async def _until_listed(
    stack: Stack, model: str, timeout: float = 5.0
) -> dict[str, dict[str, object]]:
    deadline = time.monotonic() + timeout
    while model not in (listing := _models(stack)):
        assert time.monotonic() < deadline, f"{model} never listed: {sorted(listing)}"
        await asyncio.sleep(0.05)
    return listing


async def test_batch_producer_cannot_announce(stack: Stack, hub: OneNodeHub) -> None:
    was = before(stack)
    async with actor(hub, "batch-etl", "announce") as a:
        for subject in ("llmfleet.hb.sim-a", "llmfleet.hb.fake", "llmfleet.gwhb.fake"):
            await a.nc.publish(subject, p.encode(_announce("fake", "batch-model")))
        await a.nc.flush()
        await a.expect_denied("llmfleet.hb.sim-a", "llmfleet.hb.fake", "llmfleet.gwhb.fake")
    await asyncio.sleep(0.3)
    assert "batch-model" not in _models(stack)
    await assert_unharmed(stack, was)


async def test_an_announcement_for_another_workers_subject_is_dropped(
    stack: Stack, hub: OneNodeHub
) -> None:
    was = before(stack)
    async with actor(hub, "worker", "spoof") as w:
        # Worker "b" on worker "a"'s subject, with a model nobody serves; and worker sim-a
        # "stopped" (which would drop it from the catalog at once) on another subject.
        await w.nc.publish("llmfleet.hb.a", p.encode(_announce("b", "spoofed-model")))
        await w.nc.publish("llmfleet.hb.evil", p.encode(_announce("sim-a", MODEL, "stopped")))
        await w.nc.publish("llmfleet.hb.evil", p.encode(_announce("sim-a", "spoofed-model")))
        # Control, on the same connection (so it arrives after them): an honest one.
        await w.nc.publish("llmfleet.hb.c", p.encode(_announce("c", "control-model", ttl_s=1.0)))
        await w.nc.flush()
        assert w.errors == []
    listing = await _until_listed(stack, "control-model")
    assert "spoofed-model" not in listing
    assert listing[MODEL]["workers"] == 2  # sim-a and sim-b, both still there
    await assert_unharmed(stack, was)


def test_announcement_ttls_are_clamped() -> None:
    subject = names.heartbeat_subject("w")
    for claimed, kept in (
        (1e9, MAX_TTL_S),
        (math.inf, MAX_TTL_S),
        (60.0, 60.0),
        (3.5, 3.5),
        (0.0, 0.0),
        (-5.0, 0.0),
    ):
        assert accepted_announce(subject, _announce("w", "m", ttl_s=claimed)).ttl_s == kept
    assert accepted_announce(subject, _announce("w", "m", ttl_s=math.nan)).ttl_s == 0.0
    assert MAX_TTL_S == 60.0
    try:
        accepted_announce(subject, _announce("other", "m"))
    except ValueError:
        pass
    else:
        raise AssertionError("an announcement naming another worker was accepted")


async def test_model_descriptions_leak_no_url_or_secret(stack: Stack, hub: OneNodeHub) -> None:
    dead = free_port()  # nothing listens: the worker stays "loading", announced all along
    upstream = f"http://admin:hunter2-upstream@127.0.0.1:{dead}/v1"
    stack.worker(
        "leaky-w", "--engine", "openai", "--upstream", upstream,
        "--upstream-api-key", "sk-upstream-secret", model="leak-model",
    )  # fmt: skip
    await _until_listed(stack, "leak-model", timeout=15)
    assert stack.gw is not None
    r = httpx.get(
        stack.gw.base_url + "/models", headers={"authorization": f"Bearer {API_KEY}"}, timeout=5
    )
    body = r.text
    for m in r.json()["data"]:
        assert not re.search(r"[a-z][a-z0-9+.-]*://", str(m["description"])), m
        assert "127.0.0.1" not in str(m["description"]), m
    for secret in ("hunter2", "sk-upstream-secret", str(dead), API_KEY, "worker-test-pw"):
        assert secret not in body, secret
    one = httpx.get(
        stack.gw.base_url + "/models/leak-model",
        headers={"authorization": f"Bearer {API_KEY}"},
        timeout=5,
    )
    assert one.status_code == 200
    assert "hunter2" not in one.text and "://" not in json.dumps(one.json()["description"])
    stack.retire("leaky-w").stop()
