from __future__ import annotations

from common.protocol import ChoiceDelta
from worker.decide import (
    Admission,
    ClockOffset,
    RunnerState,
    admit,
    coalesce,
    parse_ack_subject,
    pull_batch,
)

READY = RunnerState.READY


def test_pull_batch_never_overcommits() -> None:
    assert pull_batch(4, 0, 0, READY) == 4
    assert pull_batch(4, 3, 1, READY) == 0
    assert pull_batch(4, 1, 1, READY) == 2
    assert pull_batch(2, 5, 0, READY) == 0
    assert pull_batch(4, 0, 0, RunnerState.DRAINING) == 0
    assert pull_batch(4, 0, 0, RunnerState.STARTING) == 0
    assert pull_batch(5000, 10, 0, READY) == 64  # never floods the broker with pulls
    assert pull_batch(5000, 10, 60, READY) == 4


def test_admit() -> None:
    kw = {"running": 0, "max_concurrency": 2, "queue_timeout_ms": None, "queued_ms": 5.0}
    assert admit(state=READY, **kw) is Admission.RUN  # type: ignore[arg-type]
    assert (
        admit(state=RunnerState.DRAINING, **kw)  # type: ignore[arg-type]
        is Admission.NAK
    )
    full = {**kw, "running": 2}
    assert admit(state=READY, **full) is Admission.NAK  # type: ignore[arg-type]
    late = {**kw, "queue_timeout_ms": 4}
    assert admit(state=READY, **late) is Admission.EXPIRED  # type: ignore[arg-type]
    poison = {**kw, "delivered": 11}
    assert admit(state=READY, **poison) is Admission.POISON  # type: ignore[arg-type]
    on_time = {**kw, "queue_timeout_ms": 5}
    assert admit(state=READY, **on_time) is Admission.RUN  # type: ignore[arg-type]


def test_clock_offset_never_overstates_the_wait() -> None:
    """A worker whose clock runs 2 minutes ahead of the broker's: the first delivery (taken
    at once by a waiting pull) teaches it the offset, and later waits are measured right."""
    ahead = 120 * 10**9
    clock = ClockOffset()
    assert clock.queued_ms(10**18 + ahead, 10**18) == 0.0  # nothing learned yet: no guess
    clock.observe(0.0, 10**18 + ahead + 10**6, 10**18)  # delivered 1 ms after it was stored
    assert clock.queued_ms(10**18 + ahead + 10**6, 10**18) == 0.0
    # stored at t=5 s, delivered at t=8 s: waited 3 s (2 minutes of skew do not count)
    stored, got = 10**18 + 5 * 10**9, 10**18 + 8 * 10**9 + ahead + 10**6
    clock.observe(1.0, got, stored)
    assert abs(clock.queued_ms(got, stored) - 3000.0) < 1e-6
    # a clock behind the broker's (negative offset) works the same way
    behind = ClockOffset()
    behind.observe(0.0, 10**18 - ahead, 10**18)
    assert behind.queued_ms(10**18 - ahead + 2 * 10**9, 10**18) == 2000.0


def test_clock_offset_follows_a_stepped_clock() -> None:
    clock = ClockOffset(bucket_s=60.0, buckets=2)
    clock.observe(0.0, 1000 * 10**6, 0)  # offset 1 s
    clock.observe(200.0, 5000 * 10**6, 0)  # stepped: offset 5 s, the old minimum aged out
    assert clock.queued_ms(5500 * 10**6, 0) == 500.0


def test_parse_ack_subject_v1_and_v2() -> None:
    v1 = parse_ack_subject("$JS.ACK.S.C.2.17.5.1700000000000000000.9")
    assert v1 is not None
    assert (v1.stream, v1.consumer, v1.delivered, v1.stream_seq, v1.pending) == ("S", "C", 2, 17, 9)
    assert v1.timestamp_ns == 1700000000000000000
    v2 = parse_ack_subject("$JS.ACK.dom.HASH.S.C.1.3.3.1700000000000000001.0.tok")
    assert v2 is not None and v2.stream == "S" and v2.stream_seq == 3
    assert parse_ack_subject("_INBOX.x") is None
    assert parse_ack_subject("$JS.ACK.S.C.x.1.1.1.1") is None


def _d(i: int, text: str | None = None, **kw: object) -> ChoiceDelta:
    return ChoiceDelta(index=i, content=text, **kw)  # type: ignore[arg-type]


def test_coalesce_merges_text_of_each_choice() -> None:
    out = coalesce([[_d(0, "a")], [_d(0, "b")], [_d(1, "x")], [_d(0, "c", finish_reason="stop")]])
    assert out == [[_d(0, "abc", finish_reason="stop"), _d(1, "x")]]


def test_coalesce_keeps_tool_calls_and_finished_choices_apart() -> None:
    tc = [{"index": 0, "function": {"arguments": "{"}}]
    out = coalesce([[_d(0, "a", finish_reason="stop")], [_d(0, "b")], [_d(0, tool_calls=tc)]])
    assert out == [[_d(0, "a", finish_reason="stop")], [_d(0, "b")], [_d(0, tool_calls=tc)]]


def test_coalesce_preserves_all_text() -> None:
    batches = [[_d(i % 3, str(i))] for i in range(50)]
    out = coalesce(batches)
    for c in range(3):
        merged = "".join(d.content or "" for msg in out for d in msg if d.index == c)
        assert merged == "".join(str(i) for i in range(50) if i % 3 == c)


def test_coalesce_caps_message_size() -> None:
    big = "x" * 40_000
    out = coalesce([[_d(0, big)], [_d(0, big)]])
    assert len(out) == 2


def test_lifecycle_only_moves_forward() -> None:
    from worker.decide import transition  # noqa: PLC0415

    s = RunnerState
    assert transition(s.STARTING, s.READY) is s.READY
    assert transition(s.STARTING, s.DRAINING) is s.DRAINING  # a drain while loading
    assert transition(s.DRAINING, s.READY) is s.DRAINING  # loaded after the drain began
    assert transition(s.READY, s.STARTING) is s.READY
    assert transition(s.DRAINING, s.STOPPED) is s.STOPPED
    assert transition(s.STOPPED, s.DRAINING) is s.STOPPED  # a second SIGTERM


def test_coalesce_keeps_signatures_and_stop_sequences() -> None:
    D = ChoiceDelta
    signed = coalesce([[D(0, reasoning_content="t")], [D(0, reasoning_signature="SIG")]])
    assert [d.reasoning_signature for batch in signed for d in batch] == [None, "SIG"]
    redacted = coalesce([[D(0, redacted_reasoning="R")], [D(0, content="x")]])
    assert [(d.redacted_reasoning, d.content) for b in redacted for d in b] == [
        ("R", None),
        (None, "x"),
    ]
    stopped = coalesce([[D(0, content="x")], [D(0, finish_reason="stop", stop_sequence="s")]])
    assert stopped == [[D(0, content="x", finish_reason="stop", stop_sequence="s")]]
