"""One inference request, from the HTTP request to its last byte: `Call` owns its phases.

    admit     auth, bounded body, typed decode + limits, what the key may run,
              catalog lookup, the key's rate limits and budgets (gateway/govern.py)
                                                                     (401/413/400/404/429)
    publish   JetStream publish of the body (by reference when large)    (429/503)
    wait      for a worker's `accepted`, up to the queue timeout         (503/504)
    answer    SSE frames or one JSON body; errors before the first frame keep their
              HTTP status, later ones are one error event; with --resume-on-failure a
              worker lost mid-answer is replaced (gateway/resume.py)
    finish    a client that left, or any failure, cancels the worker (or withdraws the
              request from the queue); the reservation is settled to the real usage;
              metrics, the access line and the audit event are recorded once

Everything a phase needs is on the `Call` (request id, the telemetry record, the headers
owed to the client, whether the response has started), so the flow reads top to bottom
here; the app routes, `Dispatcher`/`Submission` speak the wire protocol, `render` frames.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from typing import TYPE_CHECKING

from opentelemetry import trace

from common import protocol as p
from common.audit import AuditEvent
from common.errors import FleetError, GatewayTimeout, InternalError, InvalidRequest
from common.logs import bind
from common.telemetry import gen_ai_operation
from control.quota import Ticket
from gateway.auth import Principal
from gateway.dispatch import Submission
from gateway.fronts import Front, Renderer
from gateway.govern import ms
from gateway.http import (
    SSE_HEADERS,
    ClientGone,
    Receive,
    Scope,
    Send,
    header,
    read_body,
    send_error,
    send_json,
)
from gateway.observe import CLIENT_CLOSED, MODEL, RequestRecord
from gateway.resume import ResumingReplies
from gateway.routing import NORMAL, Plan, counts_against, for_hop, reason_of
from gateway.validate import Parsed

if TYPE_CHECKING:
    from gateway.app import GatewayApp

log = logging.getLogger(__name__)

Headers = list[tuple[bytes, bytes]]


def timeout_header(scope: Scope) -> float | None:
    """`x-llmfleet-timeout: SECONDS`, the client's total budget for the request.

    SDK timeout headers (`x-stainless-*`) are not used: they bound waiting for response
    headers or between reads, not a whole stream, and must not cut a healthy stream off.
    """
    v = header(scope, b"x-llmfleet-timeout")
    if not v:
        return None
    try:
        t = float(v)
    except ValueError:
        return None
    return t if t > 0 else None


def worker_headers(sub: Submission) -> Headers:
    """Names the worker that produced the answer (after any redelivery) and the model it
    served (as the worker names it)."""
    if not sub.worker:
        return []
    out = [(b"x-llmfleet-worker", sub.worker.encode())]
    if sub.model:
        out.append((b"x-llmfleet-model", sub.model.encode("utf-8", "replace")))
    return out


async def wait_disconnect(receive: Receive) -> None:
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            return


class Call:
    """One `/v1` inference request. `serve()` runs it to the end and never raises a
    `FleetError`: every failure becomes the right response (or error event)."""

    def __init__(self, app: GatewayApp, front: Front, scope: Scope, receive: Receive, send: Send):
        self.app = app
        self.front = front
        self.op = op = front.route
        self.scope = scope
        self.receive = receive
        self.send = send
        self.rid = secrets.token_hex(12)
        self.headers: Headers = [(b"x-request-id", self.rid.encode())]
        self.traceparent = header(scope, b"traceparent")
        self.started = False  # the HTTP response has begun (status 200 sent)
        self.principal: Principal | None = None
        self.asked_model = ""  # the model the request named (audit; may not exist)
        self.ticket: Ticket | None = None  # what its key's limits reserved
        self.admitted = ""  # the model, once admitted (its usage counts for the key)
        self.prompt_bound = 0  # the prompt's size in bytes: no more tokens than that
        self.done = False  # the worker's `done` (its usage) arrived
        self.queued: Principal | None = None  # counted in its key's queue share
        self.audited = False  # --audit-required: the event is already stored
        self.unsent: list[bytes] = []  # SSE frames not yet written (sent with the next write)
        self.plan: Plan | None = None  # the models it may be served by (gateway/routing.py)
        self.hop: tuple[str, str] | None = None  # (model, kind) awaiting its verdict
        self.sub: Submission | None = None  # the hop being answered
        self.published = False  # some hop was published (it counts as active)
        self.hop_accepted = False  # a worker accepted the hop being tried
        self.hop_replies: ResumingReplies | None = None  # the reply stream of that hop
        self.hop_rid = self.rid  # the id the hop was published with
        self.queued_model = ""  # the model whose queue share it is counted in
        span = None
        if app.telemetry.tracing:
            span = app.metrics.server_span(
                op,
                scope["method"],
                scope["path"],
                self.traceparent,
                header(scope, b"tracestate"),
            )
        self.rec = RequestRecord(op, self.rid, span)

    async def serve(self) -> None:
        app = self.app
        app.stats.requests += 1
        bind(request_id=self.rid)
        try:
            try:
                parsed = await self._admit()
            except FleetError as err:
                self._failed(err.status, err.code or err.type)
                await send_error(self.send, err, self.headers, self.front.envelope)
                return
            except ClientGone:
                app.stats.disconnects += 1
                self.rec.fail(CLIENT_CLOSED, "client_disconnected")
                return
            except Exception:
                self.rec.fail(500, "internal_error")
                raise
            await self._answer_unless_gone(parsed)
        finally:
            self._leave_queue()
            self._verdict(None)  # a hop still waiting for its verdict: nobody got one
            app.governor.settle(self.principal, self.ticket, *self._charged(), self.admitted)
            app.governor.record(self._audit_event(), written=self.audited)
            app.metrics.finish(self.rec, published=self.published)

    # ---- admit and publish -------------------------------------------------------------

    async def _admit(self) -> Parsed:
        app = self.app
        gov = app.governor
        router = app.router
        self.principal = principal = gov.authenticate(self.scope)  # before the body
        gov.check_audit()
        body = await read_body(self.scope, self.receive, app.limits.max_body_bytes)
        # A default model the key may not use is no default for it (not even its name).
        default = router.default_model(app.default_model)
        if default is not None and not router.may_use(principal, default):
            default = None
        try:
            parsed = await self.front.parse(body, app.limits, default, principal)
        except RecursionError as exc:  # msgspec decoding a hostile nesting depth
            raise InvalidRequest("Request body is nested too deeply.") from exc
        self.rec.stream = parsed.stream
        self.asked_model = parsed.model
        # Which models it may be served by: those the key may run, or the same 404.
        self.plan = plan = router.plan(parsed.model, principal, app.catalog.snapshot)
        if plan.alias:
            self.headers.append((b"x-llmfleet-alias", plan.alias.encode()))
        self.rec.model = parsed.model  # a metrics label: only models and aliases the fleet has
        bind(model=parsed.model)
        self.prompt_bound = len(parsed.body)
        # Its share of the queue first: a request refused there consumes no quota. The
        # share is per model waited for (an alias is no way around it); a later hop moves
        # it (`_queue_for`).
        gov.enter_queue(principal, plan.hops[0])
        self.queued, self.queued_model = principal, plan.hops[0]
        parsed, self.ticket = await gov.admit(principal, parsed, plan.hops)
        self.admitted = plan.hops[0]
        if self.ticket is not None:
            self.headers = [*self.headers, *self.ticket.headers]
        return parsed

    async def _publish(
        self, parsed: Parsed, hop_timeout_s: float | None, tries: int = 0
    ) -> Submission:
        """Publish one hop; a later hop is a new message (its own id: the broker would
        drop a second message with the first one's id as a duplicate)."""
        ctx = None
        span = self.rec.span
        if span is not None:
            span.update_name(f"{gen_ai_operation(self.op)} {parsed.model}")
            span.set_attribute(MODEL, parsed.model)
            ctx = trace.set_span_in_context(span)
        timeout = timeout_header(self.scope)
        if tries:  # the request's deadline (the client's, else --request-timeout) is for
            # all its hops together
            total = timeout or self.app.dispatcher.settings.request_timeout_s
            timeout = total - (time.perf_counter() - self.rec.start)
            if timeout <= 0:
                raise GatewayTimeout("The request's timeout passed before its next hop.")
        self.hop_rid = rid = self.rid if not tries else f"{self.rid}-h{tries}"
        sub = await self.app.dispatcher.submit(
            parsed, rid, self.traceparent, timeout, ctx, hop_timeout_s=hop_timeout_s
        )
        if not self.published:
            self.published = True
            self.app.metrics.started(self.rec)
            self.app.stats.in_flight += 1
        return sub

    # ---- answer ------------------------------------------------------------------------

    async def _answer_unless_gone(self, parsed: Parsed) -> None:
        """Answer, racing the client's disconnect; whoever ends first cancels the other,
        and a request that did not end cleanly is cancelled on its worker."""
        try:
            async with asyncio.TaskGroup() as tg:
                answer = tg.create_task(self._answer(parsed))
                gone = tg.create_task(wait_disconnect(self.receive))
                await asyncio.wait({answer, gone}, return_when=asyncio.FIRST_COMPLETED)
                if answer.done():
                    gone.cancel()
                else:
                    answer.cancel()
                    self.app.stats.disconnects += 1
                    self.rec.fail(CLIENT_CLOSED, "client_disconnected")
                    log.debug("request %s: client disconnected", self.rid)
            if self.sub is not None and not self.sub.terminal:
                await self.app.dispatcher.cancel(self.sub)
        finally:
            if self.published:
                self.app.stats.in_flight -= 1
            if self.sub is not None:
                self.rec.accepted_at = self.sub.accepted_at
                await self.sub.close()

    async def _answer(self, parsed: Parsed) -> None:
        renderer: Renderer | None = None
        replies: ResumingReplies | None = None
        try:
            hop, replies, first = await self._first_reply(parsed)
            if self.hop is not None and self.hop[1] != NORMAL:
                # The probe answered: close its circuit now, not after a stream any
                # client could keep open for as long as it likes.
                self._verdict(True)
            renderer = self.front.renderer(hop, self.rid, int(time.time()))
            if hop.stream:
                await self._stream(hop, renderer, replies, first)
            else:
                await self._collect(renderer, replies, first)
            self._verdict(True)
        except FleetError as err:
            counted = counts_against(reason_of(err, True), True, err.code)
            self._verdict(False if counted else None, err)
            await self._fail(err, renderer, err.code or err.type)
        except Exception:
            log.exception("request %s failed in the gateway", self.rid)
            internal = InternalError("The gateway failed while handling the request.")
            await self._fail(internal, renderer, "internal_error")
        finally:
            last = replies if replies is not None else self.hop_replies
            current = last.current if last is not None else self.sub
            if current is not None:  # the worker that answered, or failed it
                self.rec.worker = current.worker or ""
                self.rec.worker_model = current.model
            if last is not None:
                await last.close()
            self.hop_replies = None

    async def _first_reply(
        self, parsed: Parsed
    ) -> tuple[Parsed, ResumingReplies, list[p.Delta | p.Embedding | p.Done]]:
        """Try the plan's hops in order until one gives its first reply (a stream's first
        content or `done`; a JSON answer's every message). Nothing has reached the client
        yet, so a hop that fails for a reason the alias falls back on is given up
        (cancelled, or withdrawn from the queue) and the next is tried; skipped and
        failed hops count as fallbacks."""
        app = self.app
        router = app.router
        plan = self.plan
        assert plan is not None
        start = tries = 0
        failed: tuple[str, str, FleetError] | None = None  # (model, reason, error)
        while True:
            try:
                i, kind = router.pick(plan, start, app.catalog.snapshot)
            except FleetError:
                if failed is not None:
                    raise failed[2] from None  # nothing left to try: the last hop's error
                raise
            model = plan.hops[i]
            self.hop = (model, kind)  # at once: a probe must always get its verdict
            if failed is not None:
                router.fallback(failed[0], model, failed[1])
                log.info("request %s: %s -> %s (%s)", self.rid, failed[0], model, failed[1])
            hop = parsed if model == parsed.model else for_hop(parsed, model)
            self.admitted = model
            self._queue_for(model)
            self.app.governor.reprice(self.ticket, model)
            tries += 1
            try:
                replies, first = await self._try_hop(hop, plan, tries - 1)
                return hop, replies, first
            except FleetError as err:
                reason = self._hop_failed(err)
                if not (i + 1 < len(plan.hops) and reason in plan.fallback_on):
                    raise
                await self._give_up_hop()
                self.rec.first_at, self.rec.tokens_out = None, 0  # nothing of it was sent
                failed, start = (model, reason or "", err), i + 1

    async def _try_hop(
        self, hop: Parsed, plan: Plan, tries: int
    ) -> tuple[ResumingReplies, list[p.Delta | p.Embedding | p.Done]]:
        """Publish one hop and read its first reply (a JSON answer: all of it)."""
        self.hop_accepted = False
        self.sub = sub = await self._publish(hop, plan.hop_timeout_s or None, tries)
        await sub.first()
        self.hop_accepted = True
        self._leave_queue()
        bind(worker=sub.worker)
        self.hop_replies = replies = self._replies(hop, sub)
        first: list[p.Delta | p.Embedding | p.Done] = [await replies.next()]
        # One JSON body reaches the client only at the end: until then a hop may still
        # be given up, so read its whole answer here.
        while not hop.stream and not isinstance(first[-1], p.Done):
            if isinstance(first[-1], p.Delta):
                if self.rec.first_at is None:
                    self.rec.first_at = time.perf_counter()
                self._seen(first[-1])
            first.append(await replies.next())
        return replies, first

    def _hop_failed(self, err: FleetError) -> str | None:
        """The verdict on a hop that failed before its first byte, and the reason."""
        from_worker = self.hop_accepted
        reason = reason_of(err, from_worker)
        # A 4xx is no verdict either way: the worker may have answered it without its
        # upstream (a count it estimated, a parameter its engine refuses).
        self._verdict(False if counts_against(reason, from_worker, err.code) else None, err)
        return reason

    def _replies(self, hop: Parsed, sub: Submission) -> ResumingReplies:
        span = self.rec.span
        return ResumingReplies(
            self.app.dispatcher,
            hop,
            sub,
            self.hop_rid,  # continuations are `<hop id>-r<n>`: unique across hops
            enabled=self.app.resume_on_failure,
            traceparent=sub.traceparent,
            timeout_s=sub.timeout_s,
            trace_context=None if span is None else trace.set_span_in_context(span),
        )

    async def _give_up_hop(self) -> None:
        """Stop the hop being left: cancel its worker or withdraw it from the queue."""
        replies, self.hop_replies = self.hop_replies, None
        if replies is not None:
            await replies.close()  # continuations it started (--resume-on-failure)
        sub, self.sub = self.sub, None
        if sub is None:
            return
        try:
            if not sub.terminal:
                await self.app.dispatcher.cancel(sub)
        finally:  # the client may leave during the cancel: the stream is closed anyway
            await sub.close()

    def _verdict(self, ok: bool | None, err: FleetError | None = None) -> None:
        """The hop's outcome for its model's circuit, once: True (it answered), False (it
        failed in a way that counts), None (no verdict: the client left, its deadline)."""
        if self.hop is None:
            return
        (model, kind), self.hop = self.hop, None
        router = self.app.router
        if self.op == "count_tokens":  # free, and answered without the upstream at times
            router.abandoned(model, kind)
            return
        if ok is True:
            router.succeeded(model, kind)
        elif ok is False:
            text = "" if err is None else f"{err.status} {err.code or err.type}: {err.message}"
            router.failed(model, kind, text[:300])
        else:
            router.abandoned(model, kind)

    async def _stream(
        self,
        parsed: Parsed,
        renderer: Renderer,
        replies: ResumingReplies,
        first: list[p.Delta | p.Embedding | p.Done],
    ) -> None:
        """SSE: the status goes out with the first content (an error before it keeps its
        own status); frames that piled up while the client was slow go in one write."""
        sub = replies.current
        (msg,) = first
        if isinstance(msg, p.Delta):
            self.rec.first_at = time.perf_counter()
        self.headers = [*self.headers, *worker_headers(sub)]
        await self.send(
            {"type": "http.response.start", "status": 200, "headers": [*SSE_HEADERS, *self.headers]}
        )
        self.started = True
        unsent = self.unsent
        unsent.append(renderer.start(parsed.n))  # goes out with the first content
        while True:
            if isinstance(msg, p.Done):
                unsent.append(renderer.finish(msg.usage))
                self.rec.tokens_in = msg.usage.prompt_tokens
                self.rec.tokens_out = msg.usage.completion_tokens
                self.done = True
                await self.front.completed(renderer, msg.usage)
                await self._audit_gate(replies.current)
                await self.send({"type": "http.response.body", "body": b"".join(unsent)})
                self.app.stats.ok += 1
                return
            if isinstance(msg, p.Delta):
                self._seen(msg)
                unsent.append(renderer.delta(msg))
            if not replies.has_pending():  # write what piled up in one go
                body = b"".join(unsent)
                unsent.clear()
                await self.send({"type": "http.response.body", "body": body, "more_body": True})
            msg = await replies.next()

    async def _collect(
        self,
        renderer: Renderer,
        replies: ResumingReplies,
        answer: list[p.Delta | p.Embedding | p.Done],
    ) -> None:
        """One JSON body: the whole answer (read by `_first_reply`), assembled."""
        usage = p.Usage()
        for msg in answer:
            if isinstance(msg, p.Delta | p.Embedding):
                renderer.collect(msg)
            else:
                usage = msg.usage
        self.rec.tokens_in, self.rec.tokens_out = usage.prompt_tokens, usage.completion_tokens
        self.done = True
        body = renderer.body(usage)
        await self.front.completed(renderer, usage)
        await self._audit_gate(replies.current)
        self.app.stats.ok += 1
        await send_json(self.send, 200, body, [*self.headers, *worker_headers(replies.current)])

    # ---- governance --------------------------------------------------------------------

    def _seen(self, msg: p.Delta) -> None:
        """Count output as it arrives: a request that never gets its `done` (the client
        left, the worker failed) is charged for what it got (`_charged`)."""
        if msg.tokens is not None:
            self.rec.tokens_out = max(self.rec.tokens_out, msg.tokens)
        else:
            self.rec.tokens_out += 1

    def _charged(self) -> tuple[int, int]:
        """(prompt, completion) tokens its key is charged: the worker's usage; without
        one, after a worker took it, the prompt's bound and the output seen. A front
        that does not charge (counting tokens) costs none."""
        if not self.front.charges:
            return 0, 0
        prompt, completion = self.rec.tokens_in, self.rec.tokens_out
        if not self.done and self.rec.accepted_at is not None:
            prompt = max(prompt, self.prompt_bound)
        return prompt, completion

    def _leave_queue(self) -> None:
        if self.queued is not None:
            self.app.governor.leave_queue(self.queued, self.queued_model)
            self.queued = None

    def _queue_for(self, model: str) -> None:
        """Count the request in its key's share of `model`'s queue (the hop about to be
        published), moving it from the model it was counted for."""
        if self.principal is None or (self.queued_model == model and self.queued is not None):
            return
        self._leave_queue()
        self.app.governor.enter_queue(self.principal, model)  # 429 key_queue_full
        self.queued, self.queued_model = self.principal, model

    async def _audit_gate(self, sub: Submission) -> None:
        """`--audit-required`: the answer completes only once its audit event is stored
        (else AuditRequired, 503 or an error event)."""
        gov = self.app.governor
        if not gov.audit_required:
            return
        self.rec.worker, self.rec.worker_model = sub.worker or "", sub.model
        await gov.write_required(self._audit_event())
        self.audited = True

    def _audit_event(self) -> AuditEvent:
        rec = self.rec
        client = self.scope.get("client")
        return self.app.governor.event(
            request_id=self.rid,
            key="" if self.principal is None else self.principal.name,
            route=self.op,
            model=self.asked_model,
            served_model=rec.worker_model,
            worker=rec.worker,
            status=rec.status,
            error=rec.error_type or "",
            prompt_tokens=rec.tokens_in,
            completion_tokens=rec.tokens_out,
            ttft_ms=None if rec.first_at is None else ms(rec.first_at - rec.start),
            duration_ms=ms(time.perf_counter() - rec.start) or 0.0,
            stream=rec.stream,
            client=f"{client[0]}:{client[1]}" if client else "",
        )

    # ---- failures ----------------------------------------------------------------------

    def _failed(self, status: int, code: str) -> None:
        self.app.stats.count_status(status)
        self.rec.fail(status, code)

    async def _fail(self, err: FleetError, renderer: Renderer | None, code: str) -> None:
        """Before the response started: the error with its status; after: one SSE error
        event and `[DONE]` (the status, 200, is already out)."""
        self.app.stats.count_status(err.status)
        self.rec.fail(200 if self.started else err.status, code)
        if not self.started or renderer is None:
            await send_error(self.send, err, self.headers, self.front.envelope)
        else:
            body = b"".join(self.unsent) + renderer.fail(err)
            await self.send({"type": "http.response.body", "body": body})
