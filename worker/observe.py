"""The worker's metrics and spans.

Per request (`JobObserver`, used by `run_job`): the `process {model}` CONSUMER span (a child
of the traceparent the request carries: the gateway's `queue wait` span), the engine span
`{operation} {model}` under it, and two histogram records (engine time to first token,
duration), once per request. Everything else is read from `ModelRunner.stats()` (the one
stats snapshot that also feeds announcements and `llmfleet status`) at scrape time.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from common import names
from common.protocol import Usage
from common.telemetry import DURATION_BUCKETS, TTFT_BUCKETS, Telemetry, gen_ai_operation

MODEL = "gen_ai.request.model"
OP = "gen_ai.operation.name"
OUTCOME = "llmfleet.outcome"


class WorkerMetrics:
    """Per-request instruments of one worker (shared by its runners)."""

    def __init__(self, tel: Telemetry) -> None:
        self.tel = tel
        self._attrs: dict[tuple[str, ...], dict[str, Any]] = {}
        self.ttft = tel.histogram(
            "llmfleet.worker.time_to_first_token",
            "s",
            "Time from a worker taking a request to the engine's first output",
            TTFT_BUCKETS,
        )
        self.duration = tel.histogram(
            "llmfleet.worker.request.duration",
            "s",
            "Time from a worker taking a request to its terminal reply, by outcome",
            DURATION_BUCKETS,
        )

    def labels(self, key: tuple[str, ...]) -> dict[str, Any]:
        a = self._attrs.get(key)
        if a is None:
            a = {MODEL: key[0], OP: gen_ai_operation(key[1])}
            if len(key) > 2:
                a[OUTCOME] = key[2]
            self._attrs[key] = a
        return a

    def job(
        self, *, request_id: str, op: str, model: str, worker: str, engine: Any,
        traceparent: str | None, queued_ms: float | None,
    ) -> JobObserver:  # fmt: skip
        return JobObserver(self, request_id, op, model, worker, engine, traceparent, queued_ms)


class JobObserver:
    """One job's spans and timings; `finish` is called exactly once."""

    __slots__ = ("_engine_span", "_m", "_span", "engine", "model", "op", "start")

    def __init__(
        self, m: WorkerMetrics, request_id: str, op: str, model: str, worker: str, engine: Any,
        traceparent: str | None, queued_ms: float | None,
    ) -> None:  # fmt: skip
        self._m = m
        self.op = op
        self.model = model
        self.engine = ""  # the engine's kind, only needed for spans
        self.start = time.perf_counter()
        self._span: trace.Span | None = None
        self._engine_span: trace.Span | None = None
        tel = m.tel
        if tel.tracing:
            self.engine = engine.card().engine
            attrs: dict[str, Any] = {
                "messaging.system": "nats",
                "messaging.operation.type": "process",
                "messaging.destination.name": names.model_filter(model),
                "llmfleet.request_id": request_id,
                "llmfleet.worker": worker,
                OP: gen_ai_operation(op),
                MODEL: model,
            }
            if queued_ms is not None:
                attrs["llmfleet.queued_ms"] = queued_ms
            self._span = tel.tracer.start_span(
                f"process {model}",
                context=tel.extract(traceparent),
                kind=SpanKind.CONSUMER,
                attributes=attrs,
            )

    def engine_started(self) -> None:
        """The engine call begins (after the body was fetched and decoded)."""
        if self._span is None:
            return
        self._engine_span = self._m.tel.tracer.start_span(
            f"{gen_ai_operation(self.op)} {self.model}",
            context=trace.set_span_in_context(self._span),
            kind=SpanKind.CLIENT if self.engine in ("openai", "anthropic") else SpanKind.INTERNAL,
            attributes={
                OP: gen_ai_operation(self.op),
                MODEL: self.model,
                "llmfleet.engine": self.engine,
            },
        )

    def upstream_traceparent(self) -> str | None:
        """The engine span as a `traceparent` (None when not tracing)."""
        if self._engine_span is None:
            return None
        return self._m.tel.traceparent(self._engine_span)

    def finish(
        self, outcome: str, first_output_at: float | None, usage: Usage | None, error: str | None
    ) -> None:
        end = time.perf_counter()
        m = self._m
        key = (self.model, self.op)
        if first_output_at is not None:
            m.ttft.record(first_output_at - self.start, key, lambda: m.labels(key))
        dkey = (self.model, self.op, outcome)
        m.duration.record(end - self.start, dkey, lambda: m.labels(dkey))
        for span in (self._engine_span, self._span):
            if span is None:
                continue
            if usage is not None:
                span.set_attribute("gen_ai.usage.input_tokens", usage.prompt_tokens)
                span.set_attribute("gen_ai.usage.output_tokens", usage.completion_tokens)
            if error is not None:
                span.set_attribute("error.type", error)
                span.set_status(Status(StatusCode.ERROR, error))
            span.set_attribute(OUTCOME, outcome)
            span.end()


_OUTCOME_FIELDS = (("completed", {OUTCOME: "completed"}), ("failed", {OUTCOME: "failed"}))
_CANCEL = "llmfleet.cancel.reason"

Fields = tuple[tuple[str, dict[str, str]], ...]  # (RunnerStats field, extra labels), ...

# (kind, name, unit, description, fields), read per model at each scrape
_WORKER_INSTRUMENTS: tuple[tuple[str, str, str, str, Fields], ...] = (
    ("counter", "llmfleet.worker.requests", "{request}",
     "Requests run to their terminal reply, by outcome (completed: done; failed: error)",
     _OUTCOME_FIELDS),
    ("counter", "llmfleet.worker.tokens", "{token}",
     "Tokens of completed requests, by gen_ai.token.type",
     (("tokens_in", {"gen_ai.token.type": "input"}),
      ("tokens_out", {"gen_ai.token.type": "output"}))),
    ("counter", "llmfleet.worker.cancellations", "{request}",
     "Running requests cancelled: by a cancel message, because nobody reads the reply "
     "stream any more, or when the drain grace ran out",
     (("cancelled", {_CANCEL: "cancel"}), ("listener_gone", {_CANCEL: "listener_gone"}),
      ("drain_cancelled", {_CANCEL: "drain"}))),
    ("counter", "llmfleet.worker.deliveries.refused", "{request}",
     "Delivered requests not run: handed back (nak: draining or no slot; circuit_open: "
     "the model's circuit is open here) or expired",
     (("naks", {"llmfleet.refusal": "nak"}), ("expired", {"llmfleet.refusal": "expired"}),
      ("circuit_naks", {"llmfleet.refusal": "circuit_open"}))),
    ("counter", "llmfleet.worker.deliveries.terminated", "{message}",
     "Deliveries dropped for good (+TERM): unreadable, or with a reply subject outside the "
     "producer's reply space (never answered), or delivered too often (poison)",
     (("terminated", {}),)),
    ("counter", "llmfleet.worker.job_errors", "{request}",
     "Jobs that raised past their own error handling (a bug; the worker went on)",
     (("job_errors", {}),)),
    ("counter", "llmfleet.worker.events.refused", "{event}",
     "Cancels and notices refused because a flood filled the runner's inbox",
     (("refused_events", {}),)),
    ("updown", "llmfleet.worker.requests.active", "{request}", "Requests running now",
     (("in_flight", {}),)),
    ("updown", "llmfleet.worker.slots", "{request}", "Slots (max concurrency)",
     (("max_concurrency", {}),)),
    ("updown", "llmfleet.worker.pulls", "{request}",
     "Open pull requests (free slots asking the broker for work)", (("credits", {}),)),
    ("gauge", "llmfleet.worker.circuit.state", "1",
     "The model's circuit breaker on this worker: 0 closed, 1 half_open, 2 open",
     (("circuit_state", {}),)),
    ("counter", "llmfleet.worker.circuit.opened", "{open}",
     "Times the model's circuit opened on this worker (or re-opened after a failed probe)",
     (("circuit_opened", {}),)),
)  # fmt: skip


def observe_worker(tel: Telemetry, runners: Callable[[], list[Any]], nc: Callable[[], Any]) -> None:
    """Counters and gauges read at scrape time from the runners' stats snapshots."""

    def per_model(fields: Fields) -> Callable[[], Iterator[tuple[float, Mapping[str, Any]]]]:
        def read() -> Iterator[tuple[float, Mapping[str, Any]]]:
            for r in runners():
                st = r.stats()
                for field, extra in fields:
                    yield getattr(st, field), {MODEL: st.model, **extra}

        return read

    for kind, name, unit, description, fields in _WORKER_INSTRUMENTS:
        tel.observe(kind, name, unit, description, per_model(fields))
    tel.observe(
        "counter",
        "llmfleet.nats.reconnects",
        "{reconnect}",
        "Reconnections of this process's NATS connection",
        lambda: [(int(c.stats.get("reconnects", 0)), {})] if (c := nc()) is not None else [],
    )
