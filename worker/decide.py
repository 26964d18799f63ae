"""Pure decisions of the worker: how much to pull, whether to run a delivered request,
what a finished job tells the circuit breaker, how to coalesce output. No I/O, no
logging; tested without an event loop."""

from __future__ import annotations

import enum

import msgspec

from common.breaker import CLOSED, HALF_OPEN, OPEN
from common.protocol import ChoiceDelta


class RunnerState(enum.Enum):
    """The lifecycle of a worker and of each of its model runners (announced as `.value`)."""

    STARTING = "starting"
    READY = "ready"
    DRAINING = "draining"
    STOPPED = "stopped"


_NEXT = {
    RunnerState.STARTING: {RunnerState.READY, RunnerState.DRAINING},
    RunnerState.READY: {RunnerState.DRAINING},
    RunnerState.DRAINING: {RunnerState.STOPPED},
    RunnerState.STOPPED: set(),
}


def transition(current: RunnerState, wanted: RunnerState) -> RunnerState:
    """The state after asking for `wanted`: lifecycles only move forward (a drain asked
    for while starting skips `ready`; asking again for a state already left is a no-op)."""
    return wanted if wanted in _NEXT[current] else current


MAX_OPEN_PULLS = 64
"""Open pull requests per runner at most: enough to take a burst at once (each delivery
opens the next), few enough that a large `max_concurrency` does not flood the broker's
waiting-request list (a consumer keeps at most `max_waiting` of them)."""


def pull_batch(
    max_concurrency: int,
    running: int,
    credits: int,
    state: RunnerState,
    max_open: int = MAX_OPEN_PULLS,
    circuit: str = CLOSED,
) -> int:
    """How many more messages to ask the broker for now (0: none).

    `credits` are messages already asked for and not yet delivered or expired. Running
    jobs plus credits never exceed `max_concurrency`: the broker, not this worker, holds
    every request beyond what it can run at once. `circuit` is the model's circuit on this
    worker (`common.breaker.state_at`, now): open, nothing is pulled; half-open, running
    jobs plus credits never exceed 1 (the one request that probes the upstream).
    """
    if state is not RunnerState.READY or circuit == OPEN:
        return 0
    if circuit == HALF_OPEN:
        return max(0, 1 - running - credits)
    return max(0, min(max_concurrency - running, max_open) - credits)


class Admission(enum.Enum):
    RUN = "run"
    NAK = "nak"  # give it back at once: another worker (or this one later) takes it
    CIRCUIT_OPEN = "circuit_open"  # the model's circuit is open here: give it back, delayed
    EXPIRED = "expired"  # its queue timeout passed while it waited: drop without running
    POISON = "poison"  # delivered too often (it kills workers?): drop with an error


MAX_DELIVERIES = 10
"""A request delivered this often (each worker that took it died or gave it back) is
dropped with an error instead of being handed to yet another worker."""


def admit(
    *,
    state: RunnerState,
    running: int,
    max_concurrency: int,
    queue_timeout_ms: int | None,
    queued_ms: float,
    delivered: int = 1,
    circuit_allows: bool = True,
) -> Admission:
    """What to do with a delivered request (an unreadable one never gets here: the runner
    terminates it when it cannot read it). `queued_ms` is the worker's estimate of how long
    the broker held it (`ClockOffset.queued_ms`), which never overstates the wait.
    `circuit_allows`: the model's circuit would let a request through now (closed, or
    half-open with no probe out: `common.breaker.available`); an expired request is still
    answered (504) while it is open, since that never reaches the upstream."""
    if delivered > MAX_DELIVERIES:
        return Admission.POISON
    if state is not RunnerState.READY or running >= max_concurrency:
        return Admission.NAK
    if queue_timeout_ms is not None and queued_ms > queue_timeout_ms:
        return Admission.EXPIRED
    if not circuit_allows:
        return Admission.CIRCUIT_OPEN
    return Admission.RUN


CIRCUIT_NAK_DELAY_S = 1.0
"""A delivery refused because the model's circuit is open here goes back to the broker with
this delay (`-NAK {"delay": ...}`): long enough that it does not bounce through this
worker's remaining open pulls, short enough that another worker takes it soon."""


class Verdict(enum.Enum):
    """What one finished job tells the model's circuit breaker on this worker."""

    SUCCESS = "success"  # the upstream answered (done, or its own 4xx)
    FAILURE = "failure"  # the upstream failed (5xx, 429, no connection, a broken stream)
    NONE = "none"  # no word about the upstream (cancelled, the request's own deadline...)


def breaker_verdict(
    *, ok: bool, status: int, code: str, engine_ran: bool, upstream_answered: bool
) -> Verdict:
    """The breaker's reading of a job's end. `engine_ran`: the engine was called (so
    failures before it, a body that could not be fetched or decoded, say nothing of the
    upstream); `upstream_answered`: the error is the upstream's own answer (an
    `EngineError`, its 4xx passed through). Cancellations (`cancelled`) and the request's
    own deadline (`deadline_exceeded`) are no verdict: the client left or asked too much."""
    if ok:
        return Verdict.SUCCESS
    if code in ("cancelled", "deadline_exceeded") or not engine_ran:
        return Verdict.NONE
    if status == 429 or status >= 500:
        return Verdict.FAILURE
    return Verdict.SUCCESS if upstream_answered else Verdict.NONE


class ClockOffset:
    """How far this worker's clock is from the broker's.

    Each sample is a broker timestamp and the local time something carrying it arrived:
    a delivery (stamped when the broker stored it), or the answer to a consumer-info request
    (stamped with the broker's time when it answered; the runner asks every
    `CLOCK_PROBE_S`). `local arrival - broker timestamp` is the clock offset plus a wait and
    a transit (both >= 0), so its minimum over recent samples is an upper bound on the
    offset, within a round trip of it thanks to the probes: subtracting it gives a queue
    wait that is never overstated, whatever either clock says. So a worker whose clock runs
    minutes ahead does not take fresh requests for expired ones (it would otherwise answer
    them 504 and pull the whole queue). Minima are kept per `bucket_s` over `buckets`
    buckets, so a clock that is stepped later is followed within that window. Pure: the
    caller passes its clocks in.
    """

    def __init__(self, bucket_s: float = 60.0, buckets: int = 10) -> None:
        self._bucket_s = bucket_s
        self._max = buckets
        self._mins: list[tuple[int, int]] = []  # (bucket number, min offset ns)

    def observe(self, mono_s: float, local_ns: int, broker_ns: int) -> None:
        offset = local_ns - broker_ns
        bucket = int(mono_s // self._bucket_s)
        if self._mins and self._mins[-1][0] == bucket:
            if offset < self._mins[-1][1]:
                self._mins[-1] = (bucket, offset)
        else:
            self._mins.append((bucket, offset))
        self._mins = [(b, o) for b, o in self._mins if b > bucket - self._max]

    def queued_ms(self, local_ns: int, broker_ns: int) -> float:
        """The message's wait in the broker, never overstated (0 before any observation)."""
        if not self._mins:
            return 0.0
        offset = min(o for _, o in self._mins)
        return max(0.0, (local_ns - broker_ns - offset) / 1e6)


CLOCK_PROBE_S = 30.0


class AckInfo(msgspec.Struct, frozen=True):
    stream: str
    consumer: str
    delivered: int
    stream_seq: int
    timestamp_ns: int
    pending: int


def parse_ack_subject(subject: str) -> AckInfo | None:
    """Read JetStream delivery metadata from a message's `$JS.ACK...` reply subject.

    v1: $JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>
    v2: $JS.ACK.<domain>.<account hash>.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>
        .<pending>[.<token>]
    """
    parts = subject.split(".")
    if len(parts) < 9 or parts[0] != "$JS" or parts[1] != "ACK":
        return None
    body = parts[2:] if len(parts) == 9 else parts[4:]
    if len(body) < 7:
        return None
    try:
        return AckInfo(
            stream=body[0],
            consumer=body[1],
            delivered=int(body[2]),
            stream_seq=int(body[3]),
            timestamp_ns=int(body[5]),
            pending=int(body[6]),
        )
    except ValueError:
        return None


_MAX_MERGED_CHARS = 64 * 1024


def _mergeable(d: ChoiceDelta) -> bool:
    return _text_only(d) and d.finish_reason is None


def coalesce(batches: list[list[ChoiceDelta]]) -> list[list[ChoiceDelta]]:
    """Merge consecutive outputs into as few messages as possible, preserving meaning.

    Text of the same choice is concatenated; a delta carrying tool calls, logprobs, a
    thinking signature or redacted block, or a finish reason is never merged into (the
    finish reason, with its stop sequence, may close a text run, though),
    and a message's text stays under 64 KiB.
    """
    out: list[list[ChoiceDelta]] = []
    current: dict[int, ChoiceDelta] = {}
    size = 0

    def flush() -> None:
        nonlocal current, size
        if current:
            out.append(list(current.values()))
        current = {}
        size = 0

    for batch in batches:
        for d in batch:
            added = len(d.content or "") + len(d.reasoning_content or "")
            prev = current.get(d.index)
            if prev is None and size + added <= _MAX_MERGED_CHARS:
                current[d.index] = d
                size += added
                continue
            if (
                prev is not None
                and _mergeable(prev)
                and _text_only(d)
                and size + added <= _MAX_MERGED_CHARS
            ):
                current[d.index] = ChoiceDelta(
                    index=d.index,
                    content=_cat(prev.content, d.content),
                    reasoning_content=_cat(prev.reasoning_content, d.reasoning_content),
                    finish_reason=d.finish_reason,
                    stop_sequence=d.stop_sequence,
                )
                size += added
                continue
            flush()
            current[d.index] = d
            size = added
    flush()
    return out


def _text_only(d: ChoiceDelta) -> bool:
    """Only text (and perhaps the end of the choice): a thinking block's signature or a
    redacted block keeps its own delta, so it stays where it falls in the text."""
    return (
        d.tool_calls is None
        and d.logprobs is None
        and d.refusal is None
        and d.reasoning_signature is None
        and d.redacted_reasoning is None
    )


def _cat(a: str | None, b: str | None) -> str | None:
    if a is None:
        return b
    if b is None:
        return a
    return a + b
