"""The gateway's ASGI application: routes, the request flow, and response framing.

Request flow (one task per HTTP request, plus one watcher for client disconnect):
  auth -> bounded body -> typed decode + limits (400/413) -> catalog (404) -> JetStream
  publish (429/503) -> wait for `accepted` (503 after the queue timeout) -> first content
  (errors before it still get a proper HTTP status) -> SSE frames or one JSON body.
A client that disconnects cancels the request on its worker (or withdraws it from the
queue) at once.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import secrets
import time
from typing import Any

import msgspec
from opentelemetry import trace

from common import protocol as p
from common.errors import (
    FleetError,
    InternalError,
    MethodNotAllowed,
    ModelNotFound,
    NotFound,
    Unauthorized,
)
from common.logs import bind
from common.telemetry import PROMETHEUS_CONTENT_TYPE, Telemetry, gen_ai_operation
from gateway import render
from gateway.catalog import Catalog, ModelEntry
from gateway.dispatch import Dispatcher, Submission
from gateway.http import (
    SSE_HEADERS,
    ClientGone,
    Message,
    Receive,
    Scope,
    Send,
    header,
    read_body,
    send_error,
    send_json,
)
from gateway.observe import CLIENT_CLOSED, MODEL, GatewayMetrics, RequestRecord
from gateway.resume import ResumingReplies
from gateway.validate import Limits, Parsed, parse

log = logging.getLogger(__name__)

_OPS = {
    "/v1/chat/completions": "chat",
    "/v1/completions": "completion",
    "/v1/embeddings": "embedding",
}


class GatewayStats(msgspec.Struct):
    requests: int = 0
    in_flight: int = 0
    ok: int = 0
    client_errors: int = 0
    server_errors: int = 0
    disconnects: int = 0


def _timeout_header(scope: Scope) -> float | None:
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


class GatewayApp:
    def __init__(
        self,
        *,
        dispatcher: Dispatcher,
        catalog: Catalog,
        limits: Limits,
        api_key: str | None,
        ready_check: Any,
        default_model: str | None = None,
        cors_origins: tuple[str, ...] = (),
        resume_on_failure: bool = False,
        telemetry: Telemetry | None = None,
    ) -> None:
        self.telemetry = telemetry or Telemetry.off()
        self.metrics = GatewayMetrics(self.telemetry)
        self.cors_origins = cors_origins
        self.resume_on_failure = resume_on_failure
        self.dispatcher = dispatcher
        self.catalog = catalog
        self.limits = limits
        self.api_key = api_key
        self.default_model = default_model
        self.ready_check = ready_check
        self.stats = GatewayStats()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        path: str = scope["path"]
        method: str = scope["method"]
        if self.cors_origins:
            origin = header(scope, b"origin")
            send = _with_cors(send, origin, self.cors_origins)
            if method == "OPTIONS" and origin is not None:
                await send({"type": "http.response.start", "status": 204, "headers": []})
                await send({"type": "http.response.body", "body": b""})
                return
        try:
            op = _OPS.get(path.rstrip("/"))
            if op is not None:
                if method != "POST":
                    raise MethodNotAllowed(f"Use POST for {path}.")
                await self._infer(op, scope, receive, send)
            elif path in ("/healthz", "/health"):  # /health: what llama.cpp and vLLM probe
                await send_json(send, 200, b'{"status":"ok"}')
            elif path == "/metrics":  # like /healthz: no API key (counts and names only)
                body = self.telemetry.render_metrics()
                headers = [
                    (b"content-type", PROMETHEUS_CONTENT_TYPE),
                    (b"content-length", str(len(body)).encode()),
                ]
                await send({"type": "http.response.start", "status": 200, "headers": headers})
                await send({"type": "http.response.body", "body": body})
            elif path == "/stats":
                self._auth(scope)  # it shows the fleet: same key as /v1
                await send_json(send, 200, render.json_bytes(self.snapshot_stats()))
            elif path == "/readyz":
                ok = await self.ready_check()
                body = b'{"status":"ready"}' if ok else b'{"status":"not ready"}'
                await send_json(send, 200 if ok else 503, body)
            elif path.rstrip("/") == "/v1/models":
                if method not in ("GET", "HEAD"):
                    raise MethodNotAllowed(f"Use GET for {path}.")
                self._auth(scope)
                await send_json(send, 200, self._models_body())
            elif path.startswith("/v1/models/"):
                if method not in ("GET", "HEAD"):
                    raise MethodNotAllowed(f"Use GET for {path}.")
                self._auth(scope)
                await self._model(path[len("/v1/models/") :].rstrip("/"), send)
            else:
                raise NotFound(f"Unknown path {path}.")
        except FleetError as err:
            self._count(err.status)
            await send_error(send, err)
        except Exception:
            log.exception("unhandled error on %s %s", method, path)
            self.stats.server_errors += 1
            await send_error(send, InternalError("The gateway failed to handle the request."))

    def snapshot_stats(self) -> dict[str, Any]:
        """Counters for operators (issue 6 exports them as Prometheus metrics)."""
        d = self.dispatcher
        snap = self.catalog.snapshot
        return {
            "http": msgspec.structs.asdict(self.stats),
            "queue": {
                "published": d.published,
                "rejected_queue_full": d.rejected_full,
                "queue_timeouts": d.queue_timeouts,
                "publish_retries": d.publish_retries,
                "bodies_by_reference": d.by_reference,
            },
            "failures": {
                "workers_lost": d.workers_lost,
                "redelivered": d.redelivered,
                "resumed": d.resumed,
            },
            "streams": {
                "open": d.mux.open_streams,
                "orphans": d.mux.orphans,
                "overflows": d.mux.overflows,
            },
            "fleet": {
                "workers": len(snap.workers),
                "models": {
                    m.id: {
                        "status": m.status,
                        "workers": len(m.workers),
                        "slots": m.slots,
                        "in_flight": m.in_flight,
                    }
                    for m in snap.models.values()
                },
            },
        }

    def _count(self, status: int) -> None:
        if status >= 500:
            self.stats.server_errors += 1
        elif status >= 400:
            self.stats.client_errors += 1
        else:
            self.stats.ok += 1

    def _auth(self, scope: Scope) -> None:
        if self.api_key is None:
            return
        given = header(scope, b"authorization") or ""
        token = given[7:] if given[:7].lower() == "bearer " else ""
        if not hmac.compare_digest(token.encode(), self.api_key.encode()):
            raise Unauthorized("Incorrect API key provided.")

    # ---- models ----------------------------------------------------------------------

    @staticmethod
    def _model_entry(m: ModelEntry) -> dict[str, Any]:
        return {
            "id": m.id,
            "object": "model",
            "created": m.created,
            "owned_by": m.owned_by,
            "simulated": m.simulated,
            "description": m.description,
            "workers": len(m.workers),
            "max_concurrency": m.slots,
            "status": m.status,
        }

    def _models_body(self) -> bytes:
        snap = self.catalog.snapshot
        return render.models_body([self._model_entry(m) for m in snap.models.values()])

    async def _model(self, model_id: str, send: Send) -> None:
        entry = self.catalog.snapshot.lookup(model_id)
        if entry is None:
            raise ModelNotFound(
                f"The model '{model_id}' does not exist or no worker serves it.", param="model"
            )
        await send_json(send, 200, render.json_bytes(self._model_entry(entry)))

    # ---- inference -------------------------------------------------------------------

    async def _infer(self, op: str, scope: Scope, receive: Receive, send: Send) -> None:
        self.stats.requests += 1
        rid = secrets.token_hex(12)
        bind(request_id=rid)
        traceparent = header(scope, b"traceparent")
        span = None
        if self.telemetry.tracing:
            span = self.metrics.server_span(
                op, scope["method"], scope["path"], traceparent, header(scope, b"tracestate")
            )
        rec = RequestRecord(op, rid, span)
        extra = [(b"x-request-id", rid.encode())]
        published = False
        try:
            try:
                self._auth(scope)
                body = await read_body(scope, receive, self.limits.max_body_bytes)
                parsed = parse(op, body, self.limits, self.default_model)
                rec.stream = parsed.stream
                if self.catalog.snapshot.lookup(parsed.model) is None:
                    raise ModelNotFound(
                        f"The model '{parsed.model}' does not exist or no worker serves it.",
                        param="model",
                    )
                rec.model = parsed.model
                bind(model=parsed.model)
                ctx = None
                if span is not None:
                    span.update_name(f"{gen_ai_operation(op)} {parsed.model}")
                    span.set_attribute(MODEL, parsed.model)
                    ctx = trace.set_span_in_context(span)
                sub = await self.dispatcher.submit(
                    parsed, rid, traceparent, _timeout_header(scope), ctx
                )
            except FleetError as err:
                self._count(err.status)
                rec.fail(err.status, err.code or err.type)
                await send_error(send, err, extra)
                return
            except ClientGone:
                self.stats.disconnects += 1
                rec.fail(CLIENT_CLOSED, "client_disconnected")
                return
            except Exception:
                rec.fail(500, "internal_error")
                raise
            published = True
            self.metrics.started(rec)
            self.stats.in_flight += 1
            try:
                await self._run(parsed, sub, receive, send, rid, extra, rec)
            finally:
                self.stats.in_flight -= 1
                rec.accepted_at = sub.accepted_at
                await sub.close()
        finally:
            self.metrics.finish(rec, published=published)

    async def _run(
        self,
        parsed: Parsed,
        sub: Submission,
        receive: Receive,
        send: Send,
        rid: str,
        extra: list[tuple[bytes, bytes]],
        rec: RequestRecord,
    ) -> None:
        async with asyncio.TaskGroup() as tg:
            respond = tg.create_task(self._respond(parsed, sub, send, rid, extra, rec))
            watch = tg.create_task(_wait_disconnect(receive))
            await asyncio.wait({respond, watch}, return_when=asyncio.FIRST_COMPLETED)
            if respond.done():
                watch.cancel()
            else:
                respond.cancel()
                self.stats.disconnects += 1
                rec.fail(CLIENT_CLOSED, "client_disconnected")
                log.debug("request %s: client disconnected", rid)
        if not sub.terminal:
            await self.dispatcher.cancel(sub)

    async def _respond(
        self,
        parsed: Parsed,
        sub: Submission,
        send: Send,
        rid: str,
        extra: list[tuple[bytes, bytes]],
        rec: RequestRecord,
    ) -> None:
        headers_sent = False
        renderer: render.StreamRenderer | None = None
        unsent: list[bytes] = []
        replies = ResumingReplies(
            self.dispatcher,
            parsed,
            sub,
            rid,
            enabled=self.resume_on_failure,
            traceparent=sub.traceparent,
            timeout_s=sub.timeout_s,
            trace_context=None if rec.span is None else trace.set_span_in_context(rec.span),
        )
        try:
            await sub.first()
            bind(worker=sub.worker)
            created = int(time.time())
            if not parsed.stream:
                await self._collect(parsed, replies, send, rid, created, extra, rec)
                return
            prefix = "chatcmpl-" if parsed.op == "chat" else "cmpl-"
            renderer = render.StreamRenderer(
                op=parsed.op,
                rid=prefix + rid,
                created=created,
                model=parsed.model,
                include_usage=parsed.include_usage,
            )
            msg = await replies.next()  # errors before the first output keep their status
            if isinstance(msg, p.Delta):
                rec.first_at = time.perf_counter()
            extra = [*extra, *_worker_header(sub)]
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [*SSE_HEADERS, *extra],
                }
            )
            headers_sent = True
            unsent.append(renderer.start(parsed.n))  # goes out with the first content
            while True:
                if isinstance(msg, p.Done):
                    unsent.append(renderer.finish(msg.usage))
                    rec.tokens_in = msg.usage.prompt_tokens
                    rec.tokens_out = msg.usage.completion_tokens
                    await send({"type": "http.response.body", "body": b"".join(unsent)})
                    self.stats.ok += 1
                    return
                if isinstance(msg, p.Delta):
                    unsent.append(renderer.delta(msg))
                if not replies.has_pending():  # write what piled up in one go
                    body = b"".join(unsent)
                    unsent.clear()
                    await send({"type": "http.response.body", "body": body, "more_body": True})
                msg = await replies.next()
        except FleetError as err:
            self._count(err.status)
            rec.fail(200 if headers_sent else err.status, err.code or err.type)
            if not headers_sent:
                await send_error(send, err, extra)
            elif renderer is not None:
                body = b"".join(unsent) + renderer.fail(err.body())
                await send({"type": "http.response.body", "body": body})
        except Exception:
            log.exception("request %s failed in the gateway", rid)
            self.stats.server_errors += 1
            rec.fail(200 if headers_sent else 500, "internal_error")
            internal = InternalError("The gateway failed while handling the request.")
            if not headers_sent:
                await send_error(send, internal, extra)
            elif renderer is not None:
                await send({"type": "http.response.body", "body": renderer.fail(internal.body())})
        finally:
            rec.worker = replies.current.worker or ""
            rec.worker_model = replies.current.model
            await replies.close()

    async def _collect(
        self,
        parsed: Parsed,
        replies: ResumingReplies,
        send: Send,
        rid: str,
        created: int,
        extra: list[tuple[bytes, bytes]],
        rec: RequestRecord,
    ) -> None:
        acc = render.Assembler(parsed.n)
        while True:
            msg = await replies.next()
            if isinstance(msg, p.Delta):
                if rec.first_at is None:
                    rec.first_at = time.perf_counter()
                acc.add(msg)
            elif isinstance(msg, p.Embedding):
                acc.add_embedding(msg)
            else:
                break
        usage = msg.usage
        rec.tokens_in, rec.tokens_out = usage.prompt_tokens, usage.completion_tokens
        if parsed.op == "chat":
            body = acc.chat_body("chatcmpl-" + rid, created, parsed.model, usage)
        elif parsed.op == "completion":
            body = acc.completion_body("cmpl-" + rid, created, parsed.model, usage)
        else:
            body = acc.embedding_body(parsed.model, usage)
        self.stats.ok += 1
        await send_json(send, 200, body, [*extra, *_worker_header(replies.current)])


def _with_cors(send: Send, origin: str | None, allowed: tuple[str, ...]) -> Send:
    """Add CORS headers for an allowed browser origin (`*` allows any)."""
    if origin is None or ("*" not in allowed and origin not in allowed):
        return send
    extra = [
        (b"access-control-allow-origin", origin.encode("latin-1")),
        (b"access-control-allow-methods", b"GET, POST, OPTIONS"),
        (b"access-control-allow-headers", b"authorization, content-type, x-llmfleet-timeout"),
        (
            b"access-control-expose-headers",
            b"x-request-id, x-llmfleet-worker, x-llmfleet-model, retry-after",
        ),
        (b"access-control-max-age", b"600"),
        (b"vary", b"origin"),
    ]

    async def cors_send(message: Message) -> None:
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", []), *extra]}
        await send(message)

    return cors_send


def _worker_header(sub: Submission) -> list[tuple[bytes, bytes]]:
    """Names the worker that produced the answer (after any redelivery) and the model it
    served (as the worker names it)."""
    if not sub.worker:
        return []
    out = [(b"x-llmfleet-worker", sub.worker.encode())]
    if sub.model:
        out.append((b"x-llmfleet-model", sub.model.encode("utf-8", "replace")))
    return out


async def _wait_disconnect(receive: Receive) -> None:
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            return
