"""A model runner's pull and credit accounting (worker/runner.py) on the in-memory bus. The
test plays JetStream: it answers the runner's pull requests with deliveries and statuses."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import msgspec
import pytest

from common import names
from common import protocol as p
from common.fakebus import FakeBus, FakeMsg
from tests.natshelp import request_headers
from worker.engines.sim import SimEngine
from worker.runner import Drain, ModelRunner
from worker.settings import SimSettings

SLOTS = 2
NEXT = f"$JS.API.CONSUMER.MSG.NEXT.{names.REQUEST_STREAM}.{names.consumer_name('m')}"
BODY = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]}).encode()


class Rig(msgspec.Struct):
    bus: FakeBus
    runner: ModelRunner
    pulls: list[FakeMsg]  # every pull request the runner sent, in order
    n: int = 0  # deliveries made


@pytest.fixture
async def rig() -> AsyncIterator[Rig]:
    bus = FakeBus()
    pulls: list[FakeMsg] = []

    async def on_pull(msg: FakeMsg) -> None:  # type: ignore[misc]
        pulls.append(msg)

    await bus.subscribe(NEXT, cb=on_pull)  # type: ignore[arg-type]
    engine = SimEngine(SimSettings(ttft_ms=30, itl_ms=5, tokens=4))
    runner = ModelRunner(model_id="m", engine=engine, max_concurrency=SLOTS, nc=bus, worker_id="w")
    ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    async with asyncio.TaskGroup() as tg:
        task = tg.create_task(runner.run(ready))
        await ready
        await bus.settle()
        yield Rig(bus, runner, pulls)
        runner.post(Drain(grace_s=1.0))
        await asyncio.wait_for(task, 5)
    await bus.aclose()


def open_pulls(rig: Rig) -> list[FakeMsg]:
    """Pulls not yet answered (a delivery or a status closes the oldest / its own)."""
    answered = {m.subject for m in rig.bus.published if m.subject.startswith("_LLMFLEET.w.")}
    return [m for m in rig.pulls if m.reply not in answered]


async def deliver(rig: Rig, rid: str) -> str:
    """Deliver one request into the oldest open pull; returns its reply subject."""
    rig.n += 1
    pull = open_pulls(rig)[0]
    ack = f"$JS.ACK.{names.REQUEST_STREAM}.llmfleet-m.1.{rig.n}.{rig.n}.{p.now_ms() * 10**6}.0"
    reply = f"_LLMFLEET.gw.g.{rid}"
    await rig.bus.publish(pull.reply, BODY, ack, request_headers(reply, request_id=rid))
    await rig.bus.settle()
    return reply


async def until(cond: object, timeout: float = 3.0) -> None:
    async with asyncio.timeout(timeout):
        while not cond():  # type: ignore[operator]
            await asyncio.sleep(0.01)


def budget_holds(rig: Rig) -> bool:
    s = rig.runner.stats()
    return s.in_flight + s.credits <= SLOTS


async def test_a_ready_runner_asks_for_exactly_its_free_slots(rig: Rig) -> None:
    assert len(rig.pulls) == SLOTS and rig.runner.stats().credits == SLOTS
    assert all(json.loads(m.data)["batch"] == 1 for m in rig.pulls)  # one message per pull


async def test_running_jobs_plus_credits_never_exceed_the_slots(rig: Rig) -> None:
    await deliver(rig, "r1")
    assert budget_holds(rig) and rig.runner.stats().in_flight == 1
    await deliver(rig, "r2")
    s = rig.runner.stats()
    assert (s.in_flight, s.credits) == (2, 0)  # full: nothing more is asked for
    assert len(rig.pulls) == SLOTS
    await until(lambda: rig.runner.stats().in_flight == 0)  # both finish...
    await until(lambda: rig.runner.stats().credits == SLOTS)  # ...and their slots are asked for
    assert len(rig.pulls) == 2 * SLOTS and budget_holds(rig)


async def test_an_expired_pull_gives_its_credit_back_and_is_renewed(rig: Rig) -> None:
    first = rig.pulls[0]
    await rig.bus.publish(first.reply, b"", headers={"Status": "408"})
    await rig.bus.settle()
    assert rig.runner.stats().credits == SLOTS  # closed one, opened one
    assert len(rig.pulls) == SLOTS + 1


async def test_a_refused_pull_backs_off_instead_of_spinning(rig: Rig) -> None:
    await rig.bus.publish(rig.pulls[0].reply, b"", headers={"Status": "409"})
    await rig.bus.settle()
    assert rig.runner.stats().credits == SLOTS - 1 and len(rig.pulls) == SLOTS
    await until(lambda: len(rig.pulls) == SLOTS + 1, timeout=3.0)  # after ~1 s


async def test_a_job_replies_in_order_and_acks_its_delivery(rig: Rig) -> None:
    reply = await deliver(rig, "r1")
    await until(lambda: any(b'"done"' in m.data for m in rig.bus.sent_to(reply)))
    types = [json.loads(m.data)["type"] for m in rig.bus.sent_to(reply)]
    assert types[0] == "accepted" and types[-1] == "done" and "delta" in types
    acks = [m.data for m in rig.bus.sent_to("$JS.ACK.>")]
    assert acks[-1] == b"+ACK"
    assert rig.runner.stats().completed == 1


async def test_a_full_runner_gives_a_surplus_delivery_straight_back(rig: Rig) -> None:
    await deliver(rig, "r1")
    await deliver(rig, "r2")
    # a third delivery (a late answer to a pull the runner forgot) finds no free slot
    ack = f"$JS.ACK.{names.REQUEST_STREAM}.llmfleet-m.1.9.9.{p.now_ms() * 10**6}.0"
    await rig.bus.publish("_LLMFLEET.w.w.m.999", BODY, ack, request_headers("_x", request_id="r3"))
    await rig.bus.settle()
    assert [m.data for m in rig.bus.sent_to(ack)] == [b"-NAK"]
    assert rig.runner.stats().in_flight == SLOTS and rig.runner.stats().naks == 1
