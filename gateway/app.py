"""The gateway's ASGI application: routes, auth, CORS, and the non-inference endpoints.

Each inference request is a `gateway.request.Call`, which owns its phases (admit, publish,
wait for a worker, answer, finish); everything else here is a small synchronous answer.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from common.apis.anthropic import error_envelope as anthropic_envelope
from common.errors import (
    FleetError,
    InternalError,
    MethodNotAllowed,
    NotFound,
    Unauthorized,
)
from common.telemetry import PROMETHEUS_CONTENT_TYPE, Telemetry
from gateway import render
from gateway.auth import Authenticator, Principal, model_not_found
from gateway.catalog import Catalog, ModelEntry
from gateway.dispatch import Dispatcher
from gateway.front_messages import CountTokensFront, MessagesFront
from gateway.front_responses import ResponsesFront, serve_stored
from gateway.fronts import OPENAI_FRONTS, Front
from gateway.govern import Governor
from gateway.http import (
    Message,
    Receive,
    Scope,
    Send,
    header,
    openai_envelope,
    send_error,
    send_json,
)
from gateway.observe import GatewayMetrics
from gateway.request import Call
from gateway.routing import Router
from gateway.settings import Limits

if TYPE_CHECKING:
    from gateway.responses_store import ResponseStore

log = logging.getLogger(__name__)

_OPS = {
    "/v1/chat/completions": "chat",
    "/v1/completions": "completion",
    "/v1/embeddings": "embedding",
}
_LISTINGS = ("/v1/models", "/v1/aliases", "/v1/health")
_MESSAGES = "/v1/messages"
_RESPONSES = "/v1/responses"


class GatewayApp:
    def __init__(
        self,
        *,
        dispatcher: Dispatcher,
        catalog: Catalog,
        limits: Limits,
        api_key: str | None,
        ready_check: Any,
        governor: Governor | None = None,
        metrics_token: str | None = None,
        default_model: str | None = None,
        cors_origins: tuple[str, ...] = (),
        resume_on_failure: bool = False,
        telemetry: Telemetry | None = None,
        responses: ResponseStore | None = None,
        router: Router | None = None,
    ) -> None:
        self.telemetry = telemetry or Telemetry.off()
        self.router = router or Router()  # aliases, fallback chains, model circuits
        self.responses = responses  # stored Responses API responses (None: not kept)
        self.metrics = GatewayMetrics(self.telemetry)
        self.cors_origins = cors_origins
        self.resume_on_failure = resume_on_failure
        self.dispatcher = dispatcher
        self.catalog = catalog
        self.limits = limits
        self.api_key = api_key
        self.governor = governor or Governor(
            Authenticator("api-key" if api_key else "none", api_key, None)
        )
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
            requested = header(scope, b"access-control-request-headers")
            send = _with_cors(send, origin, self.cors_origins, requested)
            if method == "OPTIONS" and origin is not None:
                await send({"type": "http.response.start", "status": 204, "headers": []})
                await send({"type": "http.response.body", "body": b""})
                return
        # Anthropic's routes answer every error in Anthropic's envelope.
        envelope = anthropic_envelope if path.startswith(_MESSAGES) else openai_envelope
        try:
            await self._route(path, method, scope, receive, send)
        except FleetError as err:
            self.stats.count_status(err.status)
            await send_error(send, err, envelope=envelope)
        except Exception:
            log.exception("unhandled error on %s %s", method, path)
            self.stats.server_errors += 1
            internal = InternalError("The gateway failed to handle the request.")
            await send_error(send, internal, envelope=envelope)

    async def _route(
        self, path: str, method: str, scope: Scope, receive: Receive, send: Send
    ) -> None:
        """One branch per route; errors are answered by `__call__`."""
        route = path.rstrip("/")
        front = self._front(route)
        if front is not None:
            if method != "POST":
                raise MethodNotAllowed(f"Use POST for {path}.")
            await Call(self, front, scope, receive, send).serve()
        elif route.startswith(_RESPONSES + "/"):
            await serve_stored(self, method, route[len(_RESPONSES) + 1 :], scope, send)
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
            self.governor.auth.authenticate_admin(scope)  # it shows the whole fleet
            await send_json(send, 200, render.json_bytes(self.snapshot_stats()))
        elif path == "/readyz":
            ok = await self.ready_check()
            body = b'{"status":"ready"}' if ok else b'{"status":"not ready"}'
            await send_json(send, 200 if ok else 503, body)
        elif route in _LISTINGS:
            if method not in ("GET", "HEAD"):
                raise MethodNotAllowed(f"Use GET for {path}.")
            await send_json(send, 200, self._listing(route, scope))
        elif path.startswith("/v1/models/"):
            if method not in ("GET", "HEAD"):
                raise MethodNotAllowed(f"Use GET for {path}.")
            principal = self.governor.authenticate(scope)
            await self._model(principal, path[len("/v1/models/") :].rstrip("/"), send)
        else:
            raise NotFound(f"Unknown path {path}.")

    def _listing(self, route: str, scope: Scope) -> bytes:
        """`GET /v1/models`, `/v1/aliases` (what the caller may use), `/v1/health` (the
        whole fleet's circuits: admin keys only)."""
        if route == "/v1/health":
            self.governor.auth.authenticate_admin(scope)
            return render.json_bytes(self.router.health(self.catalog.snapshot))
        principal = self.governor.authenticate(scope)
        if route == "/v1/aliases":
            return render.json_bytes(self._aliases_doc(principal))
        return self._models_body(principal)

    def _front(self, route: str) -> Front | None:
        """The API an inference route speaks (one front per request: it may keep state)."""
        op = _OPS.get(route)
        if op is not None:
            return OPENAI_FRONTS[op]
        if route == _MESSAGES:
            return MessagesFront()
        if route == _MESSAGES + "/count_tokens":
            return CountTokensFront()
        if route == _RESPONSES:
            return ResponsesFront(self.responses)
        return None

    def snapshot_stats(self) -> dict[str, Any]:
        """`GET /stats`: the counters (`gateway/stats.py`) and the fleet as the catalog sees it."""
        snap = self.catalog.snapshot
        return {
            **self.stats.snapshot(self.dispatcher.mux.open_streams).as_document(),
            "governance": self.governor.stats(),
            "routes": self.router.health(self.catalog.snapshot)["routes"],
            "responses": None
            if self.responses is None
            else {"stored": self.responses.stored, "store_failures": self.responses.failed},
            "fleet": {
                "workers": len(snap.workers),
                "models": {
                    m.id: {
                        "status": self.router.status(m),
                        "workers": len(m.workers),
                        "slots": m.slots,
                        "in_flight": m.in_flight,
                    }
                    for m in snap.models.values()
                },
            },
        }

    def auth_metrics(self, scope: Scope) -> None:
        """`/metrics` takes `--metrics-token`, the API key, or (`--auth keys`) an admin
        key; it is open only when no auth is set at all (`--metrics-listen` serves it
        without auth, on a listener of its own)."""
        auth = self.governor.auth
        keys = [k for k in (self.metrics_token, self.api_key) if k is not None]
        if any(auth.bears(scope, k) for k in keys):
            return
        if auth.mode == "keys":
            try:
                if auth.authenticate(scope).admin:
                    return
            except Unauthorized:
                pass
        elif not keys:
            return
        raise Unauthorized("Incorrect metrics token provided.")

    # ---- models ----------------------------------------------------------------------

    def _model_entry(self, m: ModelEntry) -> dict[str, Any]:
        return {
            "id": m.id,
            "object": "model",
            "created": m.created,
            "owned_by": m.owned_by,
            "simulated": m.simulated,
            "description": m.description,
            "workers": len(m.workers),
            "max_concurrency": m.slots,
            "status": self.router.status(m),
        }

    def _alias_entry(self, alias: str, hops: tuple[str, ...]) -> dict[str, Any]:
        """An alias as a model (clients pick models from /v1/models), naming only the
        targets the caller may run."""
        a = self.router.routes.aliases[alias]
        snap = self.catalog.snapshot
        return {
            "id": alias,
            "object": "model",
            "created": min((e.created for m in hops if (e := snap.lookup(m))), default=0),
            "owned_by": "llmfleet",
            "description": a.description,
            "alias_for": list(hops),
            "status": self.router.alias_status(hops, snap),
        }

    def _usable_aliases(
        self, principal: Principal, served: bool = False
    ) -> list[tuple[str, tuple[str, ...]]]:
        """The aliases the caller may use, with the targets it may run (`served`: only
        the targets the fleet has, as a request would be planned: /v1/models)."""
        snap = self.catalog.snapshot
        out = []
        for alias in self.router.routes.aliases:
            hops = self.router.usable_chain(principal, alias)
            if served:
                hops = tuple(m for m in hops if snap.lookup(m) is not None)
            if hops:
                out.append((alias, hops))
        return out

    def _models_body(self, principal: Principal) -> bytes:
        """The models and aliases the caller may use (all of them, without virtual keys).
        An alias hides a model of the same name."""
        snap = self.catalog.snapshot
        aliases = self._usable_aliases(principal, served=True)
        named = set(self.router.routes.aliases)
        entries = [
            self._model_entry(m)
            for m in snap.models.values()
            if principal.may_run(m.id) and m.id not in named
        ]
        entries += [self._alias_entry(a, hops) for a, hops in aliases]
        return render.models_body(entries)

    async def _model(self, principal: Principal, model_id: str, send: Send) -> None:
        if model_id in self.router.routes.aliases:
            snap = self.catalog.snapshot
            hops = tuple(m for m in self.router.usable_chain(principal, model_id) if snap.lookup(m))
            if not hops:  # what a request for it would get
                raise model_not_found(model_id)
            await send_json(send, 200, render.json_bytes(self._alias_entry(model_id, hops)))
            return
        entry = self.catalog.snapshot.lookup(model_id)
        if entry is None or not principal.may_run(model_id):
            raise model_not_found(model_id)
        await send_json(send, 200, render.json_bytes(self._model_entry(entry)))

    def _aliases_doc(self, principal: Principal) -> dict[str, Any]:
        """`GET /v1/aliases`: the aliases the caller may use, each with only the targets
        it may run (an alias with none is not shown)."""
        snap = self.catalog.snapshot
        data = []
        for alias, hops in self._usable_aliases(principal):
            a = self.router.routes.aliases[alias]
            data.append(
                {
                    "id": alias,
                    "object": "alias",
                    "description": a.description,
                    "chain": list(hops),
                    "fallback_on": list(a.fallback_on),
                    "hop_timeout": a.hop_timeout,
                    "status": self.router.alias_status(hops, snap),
                }
            )
        default = self.router.default_model(self.default_model)
        if default is not None and not self.router.may_use(principal, default):
            default = None
        return {"object": "list", "data": data, "default_model": default}


def _with_cors(
    send: Send, origin: str | None, allowed: tuple[str, ...], requested: str | None = None
) -> Send:
    """Add CORS headers for an allowed browser origin (`*` allows any). A preflight's
    requested headers are allowed too: the SDKs send their own (`x-stainless-*`)."""
    if origin is None or ("*" not in allowed and origin not in allowed):
        return send
    allow_headers = (
        b"authorization, content-type, x-api-key, x-llmfleet-timeout, anthropic-version, "
        b"anthropic-beta, anthropic-dangerous-direct-browser-access"
    )
    if requested:
        allow_headers += b", " + requested.encode("latin-1")
    extra = [
        (b"access-control-allow-origin", origin.encode("latin-1")),
        (b"access-control-allow-methods", b"GET, POST, DELETE, OPTIONS"),
        (b"access-control-allow-headers", allow_headers),
        (
            b"access-control-expose-headers",
            b"x-request-id, x-llmfleet-worker, x-llmfleet-model, x-llmfleet-alias, retry-after, "
            b"x-ratelimit-limit-requests, x-ratelimit-remaining-requests, "
            b"x-ratelimit-reset-requests, x-ratelimit-limit-tokens, "
            b"x-ratelimit-remaining-tokens, x-ratelimit-reset-tokens",
        ),
        (b"access-control-max-age", b"600"),
        (b"vary", b"origin"),
    ]

    async def cors_send(message: Message) -> None:
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", []), *extra]}
        await send(message)

    return cors_send
