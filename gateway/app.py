"""The gateway's ASGI application: routes, auth, CORS, and the non-inference endpoints.

Each inference request is a `gateway.request.Call`, which owns its phases (admit, publish,
wait for a worker, answer, finish); everything else here is a small synchronous answer.
"""

from __future__ import annotations

import hmac
import logging
from typing import Any

from common.errors import (
    FleetError,
    InternalError,
    MethodNotAllowed,
    ModelNotFound,
    NotFound,
    Unauthorized,
)
from common.telemetry import PROMETHEUS_CONTENT_TYPE, Telemetry
from gateway import render
from gateway.catalog import Catalog, ModelEntry
from gateway.dispatch import Dispatcher
from gateway.http import (
    Message,
    Receive,
    Scope,
    Send,
    header,
    send_error,
    send_json,
)
from gateway.observe import GatewayMetrics
from gateway.request import Call
from gateway.settings import Limits

log = logging.getLogger(__name__)

_OPS = {
    "/v1/chat/completions": "chat",
    "/v1/completions": "completion",
    "/v1/embeddings": "embedding",
}


class GatewayApp:
    def __init__(
        self,
        *,
        dispatcher: Dispatcher,
        catalog: Catalog,
        limits: Limits,
        api_key: str | None,
        ready_check: Any,
        metrics_token: str | None = None,
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
        self.metrics_token = metrics_token
        self.default_model = default_model
        self.ready_check = ready_check
        self.stats = dispatcher.counters  # one set of counters, shared with the dispatcher

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
            await self._route(path, method, scope, receive, send)
        except FleetError as err:
            self.stats.count_status(err.status)
            await send_error(send, err)
        except Exception:
            log.exception("unhandled error on %s %s", method, path)
            self.stats.server_errors += 1
            await send_error(send, InternalError("The gateway failed to handle the request."))

    async def _route(
        self, path: str, method: str, scope: Scope, receive: Receive, send: Send
    ) -> None:
        """One branch per route; errors are answered by `__call__`."""
        op = _OPS.get(path.rstrip("/"))
        if op is not None:
            if method != "POST":
                raise MethodNotAllowed(f"Use POST for {path}.")
            await Call(self, op, scope, receive, send).serve()
        elif path in ("/healthz", "/health"):  # /health: what llama.cpp and vLLM probe
            await send_json(send, 200, b'{"status":"ok"}')
        elif path == "/metrics":  # it names every model: a token when auth is on
            self.auth_metrics(scope)
            body = self.telemetry.render_metrics()
            headers = [
                (b"content-type", PROMETHEUS_CONTENT_TYPE),
                (b"content-length", str(len(body)).encode()),
            ]
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            await send({"type": "http.response.body", "body": body})
        elif path == "/stats":
            self.auth(scope)  # it shows the fleet: same key as /v1
            await send_json(send, 200, render.json_bytes(self.snapshot_stats()))
        elif path == "/readyz":
            ok = await self.ready_check()
            body = b'{"status":"ready"}' if ok else b'{"status":"not ready"}'
            await send_json(send, 200 if ok else 503, body)
        elif path.rstrip("/") == "/v1/models":
            if method not in ("GET", "HEAD"):
                raise MethodNotAllowed(f"Use GET for {path}.")
            self.auth(scope)
            await send_json(send, 200, self._models_body())
        elif path.startswith("/v1/models/"):
            if method not in ("GET", "HEAD"):
                raise MethodNotAllowed(f"Use GET for {path}.")
            self.auth(scope)
            await self._model(path[len("/v1/models/") :].rstrip("/"), send)
        else:
            raise NotFound(f"Unknown path {path}.")

    def snapshot_stats(self) -> dict[str, Any]:
        """`GET /stats`: the counters (`gateway/stats.py`) and the fleet as the catalog sees it."""
        snap = self.catalog.snapshot
        return {
            **self.stats.snapshot(self.dispatcher.mux.open_streams).as_document(),
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

    def auth(self, scope: Scope) -> None:
        """Unauthorized unless the request bears the API key (or no key is set). Runs on
        the headers alone: before any body is read."""
        if self.api_key is not None and not _bears(scope, self.api_key):
            raise Unauthorized("Incorrect API key provided.")

    def auth_metrics(self, scope: Scope) -> None:
        """`/metrics` takes `--metrics-token` or the API key; it is open only when neither
        is set (`--metrics-listen` serves it without auth, on a listener of its own)."""
        keys = [k for k in (self.metrics_token, self.api_key) if k is not None]
        if keys and not any(_bears(scope, k) for k in keys):
            raise Unauthorized("Incorrect metrics token provided.")

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


def _bears(scope: Scope, key: str) -> bool:
    """The request's `Authorization: Bearer` token is `key` (compared in constant time)."""
    given = header(scope, b"authorization") or ""
    token = given[7:] if given[:7].lower() == "bearer " else ""
    return hmac.compare_digest(token.encode(), key.encode())


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
