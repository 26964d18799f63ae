"""One request's reply stream (gateway/dispatch.py `Submission`) on the in-memory bus: the
protocol checks and races that are hard to provoke through real processes. The test plays
the worker, publishing reply messages to the request's reply subject."""

from __future__ import annotations

from collections.abc import AsyncIterator

import msgspec
import pytest

from common import names
from common import protocol as p
from common.errors import ErrorBody, FleetError, ServiceUnavailable, UpstreamError
from common.fakebus import FakeBus, FakeJetStream
from gateway.dispatch import Dispatcher, Submission
from gateway.mux import ReplyMux
from gateway.settings import DispatchSettings
from gateway.stats import GatewayCounters
from gateway.validate import Parsed

FAST = DispatchSettings(
    queue_timeout_s=0.3, probe_after_s=0.05, stall_timeout_s=0.3, redelivery_wait_s=0.3
)
PARSED = Parsed("chat", "m", True, False, 1, b'{"model":"m","messages":[]}')
ACK = "$JS.ACK.LLMFLEET_REQUESTS.llmfleet-m.1.7.7.1700000000000000000.0"


class Rig(msgspec.Struct):
    bus: FakeBus
    js: FakeJetStream
    dispatcher: Dispatcher
    counters: GatewayCounters


@pytest.fixture
async def rig() -> AsyncIterator[Rig]:
    bus, js, counters = FakeBus(), FakeJetStream(), GatewayCounters()
    d: Dispatcher | None = None

    async def on_orphan(acc: p.Accepted) -> None:
        assert d is not None
        await d.send_cancel(acc.worker, acc.request_id, acc.delivery)

    mux = ReplyMux(bus, "gw1", on_orphan, counters)
    await mux.start()
    d = Dispatcher(bus, js, mux, FAST, counters)
    yield Rig(bus, js, d, counters)
    await bus.aclose()


async def submit(rig: Rig) -> tuple[Submission, str]:
    sub = await rig.dispatcher.submit(PARSED, "rid1")
    headers = rig.js.messages[sub.stream_seq].headers
    assert headers is not None
    return sub, headers[p.H_REPLY]


async def say(rig: Rig, reply: str, *msgs: msgspec.Struct) -> None:
    for m in msgs:
        await rig.bus.publish(reply, p.encode(m))
    await rig.bus.settle()


def delivery_of(worker: str) -> str:
    """Each test worker gets its own delivery of the one request (stream seq 1)."""
    return f"1.{worker[-1]}" if worker[-1].isdigit() else "1.9"


def accepted(worker: str = "w1", seq: int = 0) -> p.Accepted:
    return p.Accepted(
        seq=seq,
        worker=worker,
        model="m",
        request_id="rid1",
        ack_subject=ACK,
        delivery=delivery_of(worker),
    )


def delta(seq: int, text: str = "hi", worker: str = "w1") -> p.Delta:
    return p.Delta(seq=seq, choices=[p.ChoiceDelta(0, text)], delivery=delivery_of(worker))


def cancels_to(rig: Rig, worker: str) -> list[p.Control]:
    return [p.decode_control(m.data) for m in rig.bus.sent_to(names.cancel_subject(worker, "*"))]


async def answer_pings(rig: Rig, worker: str) -> None:
    async def pong(msg: object) -> None:
        await msg.respond(p.PONG)  # type: ignore[attr-defined]

    await rig.bus.subscribe(names.control_subject(worker), cb=pong)


async def test_a_stream_reads_in_order_to_done(rig: Rig) -> None:
    sub, reply = await submit(rig)
    beat = p.Heartbeat(last_seq=1, delivery="1.1")
    await say(rig, reply, accepted(), delta(1), beat, delta(2))
    await say(rig, reply, p.Done(seq=3, usage=p.Usage(1, 2, 3), delivery="1.1"))
    assert (await sub.first()).worker == "w1"
    assert isinstance(await sub.next(), p.Delta) and isinstance(await sub.next(), p.Delta)
    done = await sub.next()
    assert isinstance(done, p.Done) and sub.terminal
    assert rig.counters.published == 1


async def test_a_sequence_gap_is_a_stream_gap_error(rig: Rig) -> None:
    sub, reply = await submit(rig)
    await say(rig, reply, accepted(), delta(1), delta(3))
    await sub.first()
    await sub.next()
    with pytest.raises(UpstreamError) as e:
        await sub.next()
    assert e.value.code == "stream_gap"


async def test_a_heartbeat_that_counts_more_messages_than_arrived_is_a_gap(rig: Rig) -> None:
    sub, reply = await submit(rig)
    await say(rig, reply, accepted(), delta(1), p.Heartbeat(last_seq=2, delivery="1.1"))
    await sub.first()
    await sub.next()
    with pytest.raises(UpstreamError) as e:
        await sub.next()
    assert e.value.code == "stream_gap"


async def test_an_error_reply_keeps_its_status_and_code(rig: Rig) -> None:
    sub, reply = await submit(rig)
    err = p.Error(seq=1, status=400, error=ErrorBody("bad", param="x", code="c"), delivery="1.1")
    await say(rig, reply, accepted(), err)
    await sub.first()
    with pytest.raises(FleetError) as e:
        await sub.next()
    assert (e.value.status, e.value.param, e.value.code) == (400, "x", "c")
    assert sub.terminal


async def test_queue_timeout_withdraws_the_request_and_is_a_503(rig: Rig) -> None:
    sub, _ = await submit(rig)
    with pytest.raises(ServiceUnavailable) as e:
        await sub.first()
    assert e.value.code == "queue_timeout" and e.value.retry_after
    assert rig.js.deleted == [sub.stream_seq]  # taken back out of the queue
    assert rig.counters.queue_timeouts == 1


async def test_an_accepted_that_races_the_withdraw_is_served(rig: Rig) -> None:
    sub, reply = await submit(rig)
    real_delete = rig.js.delete_msg

    async def delete_while_a_worker_takes_it(stream: str, seq: int) -> bool:
        await say(rig, reply, accepted())  # the worker took it just before the delete
        return await real_delete(stream, seq)

    rig.js.delete_msg = delete_while_a_worker_takes_it  # type: ignore[method-assign]
    assert (await sub.first()).worker == "w1"  # served after all, no 503
    assert rig.counters.queue_timeouts == 0


async def test_a_late_accepted_after_the_timeout_is_cancelled(rig: Rig) -> None:
    sub, reply = await submit(rig)
    with pytest.raises(ServiceUnavailable):
        await sub.first()
    await say(rig, reply, accepted("late"))  # nobody reads this stream any more
    assert cancels_to(rig, "late") == [p.Cancel(request_id="rid1", delivery="1.9")]
    assert rig.counters.orphans == 1


async def test_a_worker_lost_before_output_is_nakked_and_another_takes_over(rig: Rig) -> None:
    sub, reply = await submit(rig)
    await say(rig, reply, accepted("w1"))
    await sub.first()
    # w1 does not answer pings (no responders): it is gone; its delivery is handed back
    await answer_pings(rig, "w2")

    async def redeliver() -> None:
        # w1 comes back from its blip and goes on: its messages must not mix in
        await say(rig, reply, delta(1, "from w1"), accepted("w2", seq=0))
        await say(rig, reply, delta(1, "from w2", "w2"), delta(2, "w1 again"))
        await say(rig, reply, p.Done(seq=2, usage=p.Usage(), delivery="1.2"))

    await rig.bus.subscribe(ACK, cb=lambda _m: redeliver())
    msg = await sub.next()
    assert isinstance(msg, p.Delta) and msg.choices[0].content == "from w2"
    assert isinstance(await sub.next(), p.Done) and sub.terminal  # no stream_gap, no mix
    assert [m.data for m in rig.bus.sent_to(ACK)] == [b"-NAK"]
    assert sub.worker == "w2"
    assert (rig.counters.workers_lost, rig.counters.redelivered) == (1, 1)
    # the lost worker is fenced: told to stop that delivery, its messages ignored
    assert cancels_to(rig, "w1") == [p.Cancel(request_id="rid1", delivery="1.1")]
    assert rig.counters.fenced == 2


async def test_a_second_delivery_after_output_is_cancelled_not_mixed(rig: Rig) -> None:
    sub, reply = await submit(rig)
    await say(rig, reply, accepted("w1"), delta(1, "a"), accepted("w2"), delta(1, "x", "w2"))
    await say(rig, reply, delta(2, "b"))
    await sub.first()
    assert (await sub.next()).choices[0].content == "a"  # type: ignore[union-attr]
    assert (await sub.next()).choices[0].content == "b"  # type: ignore[union-attr]
    assert cancels_to(rig, "w2") == [p.Cancel(request_id="rid1", delivery="1.2")]


async def test_a_worker_lost_after_output_is_a_502(rig: Rig) -> None:
    sub, reply = await submit(rig)
    await say(rig, reply, accepted("w1"), delta(1))
    await sub.first()
    await sub.next()
    with pytest.raises(UpstreamError) as e:
        await sub.next()  # silence, and pings get no responders
    assert e.value.code == "worker_lost"
    assert rig.bus.sent_to(ACK) == []  # output was sent: never handed to another worker


async def test_a_silent_worker_that_answers_pings_is_given_up_after_the_stall_timeout(
    rig: Rig,
) -> None:
    sub, reply = await submit(rig)
    await answer_pings(rig, "w1")
    await say(rig, reply, accepted("w1"), delta(1))
    await sub.first()
    await sub.next()
    with pytest.raises(UpstreamError) as e:
        await sub.next()
    assert e.value.code == "worker_lost"
    assert len(rig.bus.sent_to(names.control_subject("w1"))) >= 2  # it was pinged first


async def test_a_client_that_leaves_before_a_worker_withdraws_and_after_cancels(
    rig: Rig,
) -> None:
    queued, _ = await submit(rig)
    await rig.dispatcher.cancel(queued)
    assert rig.js.deleted == [queued.stream_seq] and rig.counters.withdrawn == 1
    running, reply = await submit(rig)
    await say(rig, reply, accepted("w1"))
    await running.first()
    await rig.dispatcher.cancel(running)
    assert cancels_to(rig, "w1") == [p.Cancel(request_id="rid1", delivery="1.1")]
    assert rig.counters.cancels_sent == 1
