"""One inference request, from the HTTP request to its last byte: `Call` owns its phases.

    admit     auth, bounded body, typed decode + limits, catalog lookup  (401/413/400/404)
    publish   JetStream publish of the body (by reference when large)    (429/503)
    wait      for a worker's `accepted`, up to the queue timeout         (503/504)
    answer    SSE frames or one JSON body; errors before the first frame keep their
              HTTP status, later ones are one error event; with --resume-on-failure a
              worker lost mid-answer is replaced (gateway/resume.py)
    finish    a client that left, or any failure, cancels the worker (or withdraws the
              request from the queue); metrics and the access line are recorded once

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
from common.errors import FleetError, InternalError, ModelNotFound
from common.logs import bind
from common.telemetry import gen_ai_operation
from gateway import render
from gateway.dispatch import Submission
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
from gateway.validate import Parsed, parse

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

    def __init__(self, app: GatewayApp, op: str, scope: Scope, receive: Receive, send: Send):
        self.app = app
        self.op = op
        self.scope = scope
        self.receive = receive
        self.send = send
        self.rid = secrets.token_hex(12)
        self.headers: Headers = [(b"x-request-id", self.rid.encode())]
        self.traceparent = header(scope, b"traceparent")
        self.started = False  # the HTTP response has begun (status 200 sent)
        self.unsent: list[bytes] = []  # SSE frames not yet written (sent with the next write)
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
        published = False
        try:
            try:
                parsed = await self._admit()
                sub = await self._publish(parsed)
            except FleetError as err:
                self._failed(err.status, err.code or err.type)
                await send_error(self.send, err, self.headers)
                return
            except ClientGone:
                app.stats.disconnects += 1
                self.rec.fail(CLIENT_CLOSED, "client_disconnected")
                return
            except Exception:
                self.rec.fail(500, "internal_error")
                raise
            published = True
            app.metrics.started(self.rec)
            app.stats.in_flight += 1
            try:
                await self._answer_unless_gone(parsed, sub)
            finally:
                app.stats.in_flight -= 1
                self.rec.accepted_at = sub.accepted_at
                await sub.close()
        finally:
            app.metrics.finish(self.rec, published=published)

    # ---- admit and publish -------------------------------------------------------------

    async def _admit(self) -> Parsed:
        app = self.app
        app.auth(self.scope)
        body = await read_body(self.scope, self.receive, app.limits.max_body_bytes)
        parsed = parse(self.op, body, app.limits, app.default_model)
        self.rec.stream = parsed.stream
        if app.catalog.snapshot.lookup(parsed.model) is None:
            raise ModelNotFound(
                f"The model '{parsed.model}' does not exist or no worker serves it.",
                param="model",
            )
        self.rec.model = parsed.model
        bind(model=parsed.model)
        return parsed

    async def _publish(self, parsed: Parsed) -> Submission:
        ctx = None
        span = self.rec.span
        if span is not None:
            span.update_name(f"{gen_ai_operation(self.op)} {parsed.model}")
            span.set_attribute(MODEL, parsed.model)
            ctx = trace.set_span_in_context(span)
        return await self.app.dispatcher.submit(
            parsed, self.rid, self.traceparent, timeout_header(self.scope), ctx
        )

    # ---- answer ------------------------------------------------------------------------

    async def _answer_unless_gone(self, parsed: Parsed, sub: Submission) -> None:
        """Answer, racing the client's disconnect; whoever ends first cancels the other,
        and a request that did not end cleanly is cancelled on its worker."""
        async with asyncio.TaskGroup() as tg:
            answer = tg.create_task(self._answer(parsed, sub))
            gone = tg.create_task(wait_disconnect(self.receive))
            await asyncio.wait({answer, gone}, return_when=asyncio.FIRST_COMPLETED)
            if answer.done():
                gone.cancel()
            else:
                answer.cancel()
                self.app.stats.disconnects += 1
                self.rec.fail(CLIENT_CLOSED, "client_disconnected")
                log.debug("request %s: client disconnected", self.rid)
        if not sub.terminal:
            await self.app.dispatcher.cancel(sub)

    async def _answer(self, parsed: Parsed, sub: Submission) -> None:
        app = self.app
        span = self.rec.span
        replies = ResumingReplies(
            app.dispatcher,
            parsed,
            sub,
            self.rid,
            enabled=app.resume_on_failure,
            traceparent=sub.traceparent,
            timeout_s=sub.timeout_s,
            trace_context=None if span is None else trace.set_span_in_context(span),
        )
        renderer: render.StreamRenderer | None = None
        try:
            await sub.first()
            bind(worker=sub.worker)
            if parsed.stream:
                renderer = self._renderer(parsed)
                await self._stream(parsed, renderer, replies, sub)
            else:
                await self._collect(parsed, replies)
        except FleetError as err:
            await self._fail(err, renderer, err.code or err.type)
        except Exception:
            log.exception("request %s failed in the gateway", self.rid)
            internal = InternalError("The gateway failed while handling the request.")
            await self._fail(internal, renderer, "internal_error")
        finally:
            self.rec.worker = replies.current.worker or ""
            self.rec.worker_model = replies.current.model
            await replies.close()

    def _renderer(self, parsed: Parsed) -> render.StreamRenderer:
        prefix = "chatcmpl-" if parsed.op == "chat" else "cmpl-"
        return render.StreamRenderer(
            op=parsed.op,
            rid=prefix + self.rid,
            created=int(time.time()),
            model=parsed.model,
            include_usage=parsed.include_usage,
        )

    async def _stream(
        self,
        parsed: Parsed,
        renderer: render.StreamRenderer,
        replies: ResumingReplies,
        sub: Submission,
    ) -> None:
        """SSE: the status goes out with the first content (an error before it keeps its
        own status); frames that piled up while the client was slow go in one write."""
        msg = await replies.next()
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
                await self.send({"type": "http.response.body", "body": b"".join(unsent)})
                self.app.stats.ok += 1
                return
            if isinstance(msg, p.Delta):
                unsent.append(renderer.delta(msg))
            if not replies.has_pending():  # write what piled up in one go
                body = b"".join(unsent)
                unsent.clear()
                await self.send({"type": "http.response.body", "body": body, "more_body": True})
            msg = await replies.next()

    async def _collect(self, parsed: Parsed, replies: ResumingReplies) -> None:
        """One JSON body: the whole answer, assembled."""
        acc = render.Assembler(parsed.n)
        while True:
            msg = await replies.next()
            if isinstance(msg, p.Delta):
                if self.rec.first_at is None:
                    self.rec.first_at = time.perf_counter()
                acc.add(msg)
            elif isinstance(msg, p.Embedding):
                acc.add_embedding(msg)
            else:
                break
        usage = msg.usage
        self.rec.tokens_in, self.rec.tokens_out = usage.prompt_tokens, usage.completion_tokens
        created = int(time.time())
        if parsed.op == "chat":
            body = acc.chat_body("chatcmpl-" + self.rid, created, parsed.model, usage)
        elif parsed.op == "completion":
            body = acc.completion_body("cmpl-" + self.rid, created, parsed.model, usage)
        else:
            body = acc.embedding_body(parsed.model, usage)
        self.app.stats.ok += 1
        await send_json(self.send, 200, body, [*self.headers, *worker_headers(replies.current)])

    # ---- failures ----------------------------------------------------------------------

    def _failed(self, status: int, code: str) -> None:
        self.app.stats.count_status(status)
        self.rec.fail(status, code)

    async def _fail(
        self, err: FleetError, renderer: render.StreamRenderer | None, code: str
    ) -> None:
        """Before the response started: the error with its status; after: one SSE error
        event and `[DONE]` (the status, 200, is already out)."""
        self.app.stats.count_status(err.status)
        self.rec.fail(200 if self.started else err.status, code)
        if not self.started:
            await send_error(self.send, err, self.headers)
        elif renderer is not None:
            body = b"".join(self.unsent) + renderer.fail(err.body())
            await self.send({"type": "http.response.body", "body": body})
