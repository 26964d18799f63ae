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
from tests.natshelp import reply_subject, request_headers
from worker.engines.sim import SimEngine
from worker.runner import Drain, ModelRunner, Tick
from worker.settings import SimSettings

SLOTS = 2
NEXT = f"$JS.API.CONSUMER.MSG.NEXT.{names.REQUEST_STREAM}.{names.consumer_name('m')}"
SUBJECT = names.request_subject("m", "test")
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
    reply = reply_subject(rid)
    await rig.bus.deliver(pull.reply, SUBJECT, BODY, ack, request_headers(reply, request_id=rid))
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
    headers = request_headers(reply_subject("r3"), request_id="r3")
    await rig.bus.deliver("_LLMFLEET.w.w.m.999", SUBJECT, BODY, ack, headers)
    await rig.bus.settle()
    assert [m.data for m in rig.bus.sent_to(ack)] == [b"-NAK"]
    assert rig.runner.stats().in_flight == SLOTS and rig.runner.stats().naks == 1


async def deliver_raw(rig: Rig, headers: dict[str, str], subject: str = SUBJECT) -> str:
    """Deliver a message with exactly these headers into the oldest open pull; returns its
    ack subject."""
    rig.n += 1
    pull = open_pulls(rig)[0]
    ack = f"$JS.ACK.{names.REQUEST_STREAM}.llmfleet-m.1.{rig.n}.{rig.n}.{p.now_ms() * 10**6}.0"
    await rig.bus.deliver(pull.reply, subject, BODY, ack, headers)
    await rig.bus.settle()
    return ack


@pytest.mark.parametrize(
    "reply",
    ["x y", "$JS.API.STREAM.NAMES", "_LLMFLEET.r.gateway.gw1.1", "_LLMFLEET.r.test.a b", ""],
)
async def test_an_unanswerable_reply_subject_is_terminated_and_never_published(
    rig: Rig, reply: str
) -> None:
    before = len(rig.bus.published)
    ack = await deliver_raw(rig, request_headers(reply, request_id="bad"))
    sent = [m for m in rig.bus.published[before:] if not m.subject.startswith("$JS.API.")]
    assert [(m.subject, m.data) for m in sent if m.subject != SUBJECT] == [(ack, b"+TERM")]
    assert rig.runner.stats().terminated == 1
    # the runner is alive and serves the next request normally
    good = await deliver(rig, "r1")
    await until(lambda: any(b'"done"' in m.data for m in rig.bus.sent_to(good)))


async def test_a_reused_request_id_never_exceeds_the_slots(rig: Rig) -> None:
    for _ in range(SLOTS):
        await deliver(rig, "same")
    s = rig.runner.stats()
    assert (s.in_flight, s.credits) == (SLOTS, 0)  # two jobs, one id: both counted
    await until(lambda: rig.runner.stats().completed == SLOTS)
    accepted = [json.loads(m.data) for m in rig.bus.sent_to(reply_subject("same"))]
    deliveries = {m["delivery"] for m in accepted if m["type"] == "accepted"}
    assert len(deliveries) == SLOTS  # each reply names its own delivery


async def test_a_cancel_only_reaches_the_producers_own_job(rig: Rig) -> None:
    reply = await deliver(rig, "r1")  # produced by "test"
    rig.runner.cancel("other", "r1")  # another producer naming the same id: nothing
    await rig.bus.settle()
    assert rig.runner.stats().cancelled == 0
    rig.runner.cancel("test", "r1", delivery="9.9")  # not this delivery: nothing
    await rig.bus.settle()
    assert rig.runner.stats().cancelled == 0
    rig.runner.cancel("test", "r1")
    await until(lambda: rig.runner.stats().cancelled == 1)
    await until(lambda: any(b'"cancelled"' in m.data for m in rig.bus.sent_to(reply)))


async def test_a_cancel_flood_never_drops_a_job_finished(rig: Rig) -> None:
    await deliver(rig, "r1")
    for _ in range(20_000):  # far more than the inbox takes
        rig.runner.cancel("test", "r1", delivery="0.0")  # no such delivery: never queued
        rig.runner.cancel("other", "r1")  # another producer's: never queued
        rig.runner.post(Tick())  # droppable events do fill the inbox
    await until(lambda: rig.runner.stats().in_flight == 0)
    await until(lambda: rig.runner.stats().credits == SLOTS)  # the slot came back
    s = rig.runner.stats()
    assert s.refused_events > 0 and s.cancelled == 0  # the flood was refused, counted


async def test_repeated_cancels_of_one_job_queue_once(rig: Rig) -> None:
    await deliver(rig, "r1")
    for _ in range(10_000):
        rig.runner.cancel("test", "r1")
    await until(lambda: rig.runner.stats().cancelled == 1)
    assert rig.runner.stats().refused_events == 0  # coalesced, not refused


async def test_a_job_that_raises_past_its_handling_ends_only_itself(rig: Rig) -> None:
    real_publish = rig.bus.publish

    async def publish(subject: str, payload: bytes = b"", reply: str = "", headers=None):  # type: ignore[no-untyped-def]
        if subject == reply_subject("boom"):
            raise RuntimeError("the bus refused this subject")
        await real_publish(subject, payload, reply, headers)

    rig.bus.publish = publish  # type: ignore[method-assign]
    await deliver(rig, "boom")
    await until(lambda: rig.runner.stats().job_errors == 1)
    rig.bus.publish = real_publish  # type: ignore[method-assign]
    await until(lambda: rig.runner.stats().credits == SLOTS)
    good = await deliver(rig, "r2")
    await until(lambda: any(b'"done"' in m.data for m in rig.bus.sent_to(good)))
