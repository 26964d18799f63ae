"""The OpenAI Responses API: `POST /v1/responses` as a `Front` over the chat path, and the
stored-response routes (`GET`/`DELETE /v1/responses/{id}`, `GET .../{id}/input_items`).

    parse       Responses request -> (the stored history it continues) -> chat body,
                checked by gateway.validate like any chat request      (400, 404 model)
    renderer    chat deltas -> Responses SSE events, or the `response` object
    completed   after the worker's `done`, before the last byte: the response is stored
                (with `store`, the default), so the client's next turn finds it

A store that fails after the answer is built (broker down, bucket refusing) does not fail
the answer: it is logged and counted (`ResponseStore.failed`).

The translation is `common.apis.responses*` (pure); the store is
`gateway.responses_store` (KV bucket LLMFLEET_RESPONSES). One front per request: it keeps
the request, its input items and the principal between `parse` and `completed`.

Without a store (`--responses-store off`), `store: true` requests are answered as usual
but not stored (their `store` field says false), `previous_response_id` is 400
`previous_response_not_found`, and every stored-response route is 404.
"""

from __future__ import annotations

import logging
import secrets
import time
import urllib.parse
from typing import Any, Protocol

import msgspec

from common import protocol as p
from common.apis.responses import ResponsesRequest, decode_request, normalize_input
from common.apis.responses_chat import responses_to_chat
from common.apis.responses_stream import ResponseStream, response_shell
from common.errors import FleetError, InvalidRequest, MethodNotAllowed, NotFound
from gateway.auth import Principal
from gateway.fronts import Renderer
from gateway.govern import Governor
from gateway.http import Envelope, Scope, Send, openai_envelope, send_json
from gateway.responses_store import ResponseMissing, ResponseStore, StoredResponse
from gateway.settings import Limits
from gateway.validate import Parsed, parse

log = logging.getLogger(__name__)

_encode = msgspec.json.Encoder().encode
MAX_LIST = 100  # input_items: most items per page
DEFAULT_LIST = 20


def not_found(response_id: str) -> NotFound:
    return NotFound(f"Response with id '{response_id}' not found.")


def previous_not_found(response_id: str) -> InvalidRequest:
    return InvalidRequest(
        f"Previous response with id '{response_id}' not found.",
        param="previous_response_id",
        code="previous_response_not_found",
    )


# The chat checks name chat parameters; a Responses client sent these instead.
_PARAMS = {"messages": "input", "max_completion_tokens": "max_output_tokens"}


def _in_responses_terms(err: InvalidRequest) -> InvalidRequest:
    param = err.param or ""
    head = param.split("[", 1)[0].split(".", 1)[0]
    if head not in _PARAMS:
        return err
    message = err.message
    for chat, ours in _PARAMS.items():
        message = message.replace(f"'{chat}", f"'{ours}")
    return InvalidRequest(message, param=_PARAMS[head], code=err.code)


class ResponsesRenderer:
    """One response: SSE events (streaming) or the `response` object (not)."""

    def __init__(self, stream: ResponseStream) -> None:
        self.stream = stream

    def start(self, n: int) -> bytes:
        return self.stream.start()

    def delta(self, msg: p.Delta) -> bytes:
        return self.stream.delta(msg)

    def finish(self, usage: p.Usage) -> bytes:
        return self.stream.close(usage, int(time.time()))

    def fail(self, err: FleetError) -> bytes:
        return self.stream.fail(err)

    def collect(self, msg: p.Delta | p.Embedding) -> None:
        if isinstance(msg, p.Delta):
            self.stream.delta(msg)

    def body(self, usage: p.Usage) -> bytes:
        self.stream.close(usage, int(time.time()))
        return _encode(self.stream.response())


class ResponsesFront:
    """`POST /v1/responses`; one instance per request (see the module docstring)."""

    route = "responses"
    envelope: Envelope = staticmethod(openai_envelope)
    charges = True

    def __init__(self, store: ResponseStore | None) -> None:
        self.store = store
        self.request: ResponsesRequest | None = None
        self.items: list[dict[str, Any]] = []
        self.principal: Principal | None = None

    async def parse(
        self, body: bytes, limits: Limits, default_model: str | None, principal: Principal
    ) -> Parsed:
        req = decode_request(body)
        if req.max_output_tokens is not None and req.max_output_tokens > limits.max_tokens:
            raise InvalidRequest(
                f"'max_output_tokens' must be at most {limits.max_tokens}.",
                param="max_output_tokens",
            )
        items = normalize_input(req.input, secrets.token_hex(12))
        history = await self._history(req, principal, limits.max_body_bytes)
        chat = _encode(responses_to_chat(req, items, history))
        try:
            parsed = parse("chat", chat, limits, default_model)
        except InvalidRequest as err:
            raise _in_responses_terms(err) from err
        self.request, self.items, self.principal = req, items, principal
        return parsed

    async def _history(
        self, req: ResponsesRequest, principal: Principal, max_bytes: int
    ) -> list[dict[str, Any]]:
        """The items of the stored responses `req` continues, oldest first."""
        prev = req.previous_response_id
        if prev is None:
            return []
        if self.store is None:
            raise previous_not_found(prev)
        try:
            chain = await self.store.chain(principal.name, prev, max_bytes=max_bytes)
        except ResponseMissing:
            raise previous_not_found(prev) from None
        return [item for entry in chain for item in (*entry.input, *entry.output)]

    def _stores(self) -> bool:
        return self.store is not None and self.request is not None and self.request.stores()

    def renderer(self, parsed: Parsed, rid: str, created: int) -> ResponsesRenderer:
        req = self.request or ResponsesRequest()
        shell = response_shell(req, parsed.model, self._stores())
        stream = ResponseStream(
            shell, rid, created, encrypted=req.wants_encrypted(), emit=parsed.stream
        )
        return ResponsesRenderer(stream)

    async def completed(self, renderer: Renderer, usage: p.Usage) -> None:
        """Store the response (with `store`). The answer is already built (its last
        event or its body) and stands when the store fails: that is logged and counted,
        and the client's next turn gets 400 previous_response_not_found."""
        if not self._stores() or not isinstance(renderer, ResponsesRenderer):
            return
        assert self.store is not None and self.request is not None
        stream = renderer.stream
        stream.close(usage, int(time.time()))  # idempotent: `finish`/`body` may come later
        entry = StoredResponse(
            id=stream.id,
            owner=self.principal.name if self.principal is not None else "",
            created_at=stream.created,
            input=self.items,
            output=stream.output(stored=True),
            response=stream.response(),
            previous_response_id=self.request.previous_response_id,
        )
        try:
            await self.store.put(entry)
        except FleetError as err:
            log.warning("response %s was answered but not stored: %s", stream.id, err.message)


# ---- stored responses ---------------------------------------------------------------------


class StoredApp(Protocol):
    """What the stored-response routes need of the app (gateway.app.GatewayApp)."""

    governor: Governor
    responses: ResponseStore | None


async def serve_stored(app: StoredApp, method: str, rest: str, scope: Scope, send: Send) -> None:
    """`/v1/responses/{rest}`: GET or DELETE `{id}`, GET `{id}/input_items`, POST
    `{id}/cancel`. Another principal's response is 404, like a missing one."""
    principal = app.governor.authenticate(scope)
    response_id, _, sub = rest.strip("/").partition("/")
    if sub == "":
        if method == "GET":
            entry = await _entry(app.responses, principal, response_id)
            await send_json(send, 200, _encode(entry.response))
        elif method == "DELETE":
            store = app.responses
            if store is None or not await store.delete(principal.name, response_id):
                raise not_found(response_id)
            body = {"id": response_id, "object": "response", "deleted": True}
            await send_json(send, 200, _encode(body))
        else:
            raise MethodNotAllowed(f"Use GET or DELETE for /v1/responses/{response_id}.")
    elif sub == "input_items":
        if method != "GET":
            raise MethodNotAllowed(f"Use GET for /v1/responses/{response_id}/input_items.")
        entry = await _entry(app.responses, principal, response_id)
        query = urllib.parse.parse_qs(bytes(scope.get("query_string", b"")).decode("latin-1"))
        await send_json(send, 200, _encode(list_page(entry.input, query)))
    elif sub == "cancel":
        if method != "POST":
            raise MethodNotAllowed(f"Use POST for /v1/responses/{response_id}/cancel.")
        await _entry(app.responses, principal, response_id)
        raise InvalidRequest("Only responses created with background: true can be cancelled.")
    else:
        raise NotFound(f"Unknown path /v1/responses/{rest}.")


async def _entry(
    store: ResponseStore | None, principal: Principal, response_id: str
) -> StoredResponse:
    entry = None if store is None else await store.get(principal.name, response_id)
    if entry is None:
        raise not_found(response_id)
    return entry


def _one(query: dict[str, list[str]], name: str) -> str | None:
    values = query.get(name)
    return values[-1] if values else None


def list_page(items: list[dict[str, Any]], query: dict[str, list[str]]) -> dict[str, Any]:
    """One page of `items` (OpenAI's list object): `order` asc | desc (default desc),
    `limit` 1..100 (default 20), `after` an item id (the page starts past it)."""
    order = _one(query, "order") or "desc"
    if order not in ("asc", "desc"):
        raise InvalidRequest("'order' must be 'asc' or 'desc'.", param="order")
    raw_limit = _one(query, "limit")
    try:
        limit = DEFAULT_LIST if raw_limit is None else int(raw_limit)
    except ValueError:
        limit = 0
    if not 1 <= limit <= MAX_LIST:
        raise InvalidRequest(f"'limit' must be an integer from 1 to {MAX_LIST}.", param="limit")
    seq = items if order == "asc" else items[::-1]
    after = _one(query, "after")
    if after:
        at = next((i for i, item in enumerate(seq) if item.get("id") == after), None)
        if at is None:
            raise InvalidRequest(
                f"No input item with id '{after}' in this response.", param="after"
            )
        seq = seq[at + 1 :]
    data = seq[:limit]
    return {
        "object": "list",
        "data": data,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
        "has_more": len(seq) > limit,
    }
