"""A small OpenAI-compatible server for integration tests and benchmarks (raw ASGI, uvicorn).

    python tests/upstream_server.py --port 8000 [--ttft-ms 20 --itl-ms 5 --tokens 16]
                                    [--api-key KEY] [--embedding-dim 8] [--model NAME]

Endpoints: GET /v1/models, POST /v1/chat/completions, POST /v1/completions (streaming SSE
exactly like OpenAI, including the `stream_options.include_usage` usage chunk and
`data: [DONE]`, or a plain JSON body), POST /v1/embeddings (float or base64 little-endian
float32, `dimensions` honoured), and GET /stats -> {"open_streams", "aborted", "requests"}
(`requests` counts POSTs: inference, not readiness probes).

Output is deterministic: "tok0 tok1 tok2 ..." (one word per token, and per chunk), cut at
`max_tokens` / `max_completion_tokens` (finish_reason "length") or after `--tokens` words
(finish_reason "stop"). Prompt tokens are the words of the prompt.

Test hooks, chosen by the request's `model`:
    error-400        -> 400 OpenAI error envelope, param "messages"
    error-500        -> 500 OpenAI error envelope
    error-midstream  -> streams 2 tokens, then `data: {"error": {...}}`, then ends

Runtime control (for every model): `POST /control {"fail": 500}` makes every route but
/stats and /control answer that status (an OpenAI error envelope) until `POST /control
{"fail": null}`; it answers the control state. Control calls are not counted in /stats.

A stream counts as aborted when the client disconnects before its last byte was sent;
`open_streams` goes back to 0 once every stream ended either way.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import math
import struct
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterator
from typing import Any

import msgspec
import uvicorn

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


class ServerSettings(msgspec.Struct, frozen=True):
    ttft_ms: float = 20.0
    itl_ms: float = 5.0
    tokens: int = 16
    embedding_dim: int = 8
    api_key: str | None = None
    model: str = "test-model"


class Stats(msgspec.Struct):
    open_streams: int = 0
    aborted: int = 0
    requests: int = 0
    traceparents: list[str] = msgspec.field(default_factory=list)  # last 100 received


class HttpError(Exception):
    def __init__(
        self, status: int, message: str, *, type: str, param: str | None, code: str | None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.body = {"error": {"message": message, "type": type, "param": param, "code": code}}


_json = msgspec.json.Encoder()
_decode_body = msgspec.json.Decoder(dict[str, Any])


def words_of(value: Any) -> int:
    """Prompt tokens: words of strings (recursively), or the length of token-id lists."""
    if isinstance(value, str):
        return len(value.split())
    if isinstance(value, int):
        return 1
    if isinstance(value, list):
        return sum(words_of(v) for v in value)
    if isinstance(value, dict):
        return words_of(value.get("content") or value.get("text") or "")
    return 0


def embed_vector(text: str, dim: int) -> list[float]:
    """A deterministic unit vector for `text` (float32-exact values)."""
    vec: list[float] = []
    for i in range(dim):
        h = hashlib.blake2b(f"{i}|{text}".encode(), digest_size=4).digest()
        vec.append(int.from_bytes(h, "little") / 2**32 * 2.0 - 1.0)
    norm = math.sqrt(sum(v * v for v in vec)) or 1.0
    return [struct.unpack("<f", struct.pack("<f", v / norm))[0] for v in vec]


def to_base64(vec: list[float]) -> str:
    return base64.b64encode(struct.pack(f"<{len(vec)}f", *vec)).decode("ascii")


def sse(obj: Any) -> bytes:
    return b"data: " + _json.encode(obj) + b"\n\n"


SSE_HEADERS = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]


async def stream_sse(
    stats: Any,
    events: AsyncGenerator[bytes, None],
    receive: Receive,
    send: Send,
    headers: list[tuple[bytes, bytes]] = SSE_HEADERS,
) -> None:
    """Send `events` as an SSE body while watching for the client to disconnect; counts
    `stats.open_streams` while it runs and `stats.aborted` when the client left early."""
    finished = False
    aborted = False

    async def produce() -> None:
        nonlocal finished
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        async with contextlib.aclosing(events):
            async for event in events:
                await send({"type": "http.response.body", "body": event, "more_body": True})
        # Everything is written; a disconnect from here on is not an abort.
        finished = True
        watcher.cancel()
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def watch() -> None:
        nonlocal aborted
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                if not finished:
                    aborted = True
                    producer.cancel()
                return

    stats.open_streams += 1
    try:
        async with asyncio.TaskGroup() as tg:
            producer = tg.create_task(produce())
            watcher = tg.create_task(watch())
    finally:
        stats.open_streams -= 1
    if aborted:
        stats.aborted += 1


class App:
    """The ASGI app; `stats` is live (read it directly or via GET /stats)."""

    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        self.stats = Stats()
        self.fail: int | None = None  # POST /control {"fail": status}: every route fails

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        path: str = scope["path"].rstrip("/")
        method: str = scope["method"]
        try:
            if path == "/stats":
                await self._send_json(send, 200, self.stats)
                return
            if path == "/control" and method == "POST":
                await self._control(await self._read_body(receive), send)
                return
            if method == "POST":  # inference requests only, not readiness probes
                self.stats.requests += 1
                for k, v in scope["headers"]:
                    if k == b"traceparent":
                        self.stats.traceparents = [*self.stats.traceparents[-99:], v.decode()]
            if self.fail is not None:
                await self._read_body_if_post(method, receive)
                raise HttpError(
                    self.fail,
                    "simulated upstream failure",
                    type="server_error",
                    param=None,
                    code=None,
                )
            self._check_auth(scope)
            routes: dict[str, tuple[str, Callable[[Any, Receive, Send], Awaitable[None]]]] = {
                "/v1/models": ("GET", self._models),
                "/v1/chat/completions": ("POST", self._chat),
                "/v1/completions": ("POST", self._completions),
                "/v1/embeddings": ("POST", self._embeddings),
            }
            if path not in routes:
                raise HttpError(
                    404, f"no route {path}", type="invalid_request_error", param=None, code=None
                )
            want, handler = routes[path]
            if method != want:
                raise HttpError(
                    405, "method not allowed", type="invalid_request_error", param=None, code=None
                )
            body: Any = None
            if method == "POST":
                body = await self._read_body(receive)
                self._check_hooks(body)
            await handler(body, receive, send)
        except HttpError as exc:
            await self._send_json(send, exc.status, exc.body)

    # ---- plumbing -----------------------------------------------------------------------------

    async def _control(self, body: dict[str, Any], send: Send) -> None:
        fail = body.get("fail")
        if fail is not None and not (isinstance(fail, int) and 400 <= fail <= 599):
            raise HttpError(
                400, "fail: an HTTP status 400-599 or null", type="x", param="fail", code=None
            )
        self.fail = fail
        await self._send_json(send, 200, {"fail": self.fail})

    async def _read_body_if_post(self, method: str, receive: Receive) -> None:
        if method == "POST":
            with contextlib.suppress(HttpError):  # failing anyway
                await self._read_body(receive)

    def _check_auth(self, scope: Scope) -> None:
        key = self.settings.api_key
        if key is None:
            return
        headers = dict(scope["headers"])
        if headers.get(b"authorization", b"").decode("latin-1") != f"Bearer {key}":
            raise HttpError(
                401,
                "Incorrect API key provided",
                type="invalid_request_error",
                param=None,
                code="invalid_api_key",
            )

    @staticmethod
    async def _read_body(receive: Receive) -> dict[str, Any]:
        data = bytearray()
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                raise HttpError(400, "client went away", type="x", param=None, code=None)
            data += msg.get("body", b"")
            if not msg.get("more_body", False):
                break
        try:
            return _decode_body.decode(data)
        except msgspec.MsgspecError as exc:
            raise HttpError(
                400,
                f"invalid JSON body: {exc}",
                type="invalid_request_error",
                param=None,
                code=None,
            ) from exc

    @staticmethod
    def _check_hooks(body: dict[str, Any]) -> None:
        model = body.get("model")
        if model == "error-400":
            raise HttpError(
                400,
                "simulated bad request",
                type="invalid_request_error",
                param="messages",
                code="invalid_value",
            )
        if model == "error-500":
            raise HttpError(
                500, "simulated upstream failure", type="server_error", param=None, code=None
            )

    @staticmethod
    async def _send_json(send: Send, status: int, obj: Any) -> None:
        payload = _json.encode(obj)
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(payload)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": payload})

    async def _stream(
        self, events: AsyncGenerator[bytes, None], receive: Receive, send: Send
    ) -> None:
        await stream_sse(self.stats, events, receive, send)

    # ---- generation ---------------------------------------------------------------------------

    def _plan(self, limit: int | None) -> tuple[int, str]:
        tokens = self.settings.tokens
        if limit is not None and limit <= tokens:
            return limit, "length"
        return tokens, "stop"

    async def _tick(self, t0: float, i: int) -> None:
        """Sleep until token `i` is due (ttft, then one every itl, from `t0`)."""
        loop = asyncio.get_running_loop()
        delay = t0 + (self.settings.ttft_ms + i * self.settings.itl_ms) / 1000.0 - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)

    async def _generate(
        self, body: dict[str, Any], *, chat: bool, receive: Receive, send: Send
    ) -> None:
        raw_limit = body.get("max_completion_tokens") or body.get("max_tokens")
        if chat:
            prompt_tokens = words_of(body.get("messages", []))
        else:
            raw_limit = body.get("max_tokens", 16)
            prompt_tokens = words_of(body.get("prompt", ""))
        limit = raw_limit if isinstance(raw_limit, int) else None
        n = body.get("n") or 1
        count, finish = self._plan(limit)
        model = str(body.get("model", self.settings.model))
        midstream = model == "error-midstream"
        if midstream:
            count = min(count, 2)
        rid = ("chatcmpl-" if chat else "cmpl-") + hashlib.md5(
            _json.encode(body), usedforsecurity=False
        ).hexdigest()[:16]
        created = int(time.time())
        obj = "chat.completion.chunk" if chat else "text_completion"
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": count * n,
            "total_tokens": prompt_tokens + count * n,
        }

        def word(i: int) -> str:
            return ("" if i == 0 else " ") + f"tok{i}"

        def chunk(choices: list[dict[str, Any]], with_usage: bool) -> dict[str, Any]:
            c: dict[str, Any] = {
                "id": rid,
                "object": obj,
                "created": created,
                "model": model,
                "choices": choices,
            }
            if with_usage:
                c["usage"] = None
            return c

        def choice(index: int, text: str | None, finish_reason: str | None) -> dict[str, Any]:
            if chat:
                delta: dict[str, Any] = {"role": "assistant"} if text == "" else {}
                if text is not None:
                    delta["content"] = text
                return {
                    "index": index,
                    "delta": delta,
                    "logprobs": None,
                    "finish_reason": finish_reason,
                }
            return {
                "index": index,
                "text": text or "",
                "logprobs": None,
                "finish_reason": finish_reason,
            }

        if not body.get("stream"):
            if count:
                await self._tick(asyncio.get_running_loop().time(), count - 1)
            if midstream:
                raise HttpError(
                    500, "simulated mid-stream failure", type="server_error", param=None, code=None
                )
            text = "".join(word(i) for i in range(count))
            choices = [
                {
                    "index": c,
                    "message": {"role": "assistant", "content": text},
                    "logprobs": None,
                    "finish_reason": finish,
                }
                if chat
                else {"index": c, "text": text, "logprobs": None, "finish_reason": finish}
                for c in range(n)
            ]
            await self._send_json(
                send,
                200,
                {
                    "id": rid,
                    "object": "chat.completion" if chat else "text_completion",
                    "created": created,
                    "model": model,
                    "choices": choices,
                    "usage": usage,
                },
            )
            return

        opts = body.get("stream_options")
        include_usage = isinstance(opts, dict) and bool(opts.get("include_usage"))

        async def events() -> AsyncGenerator[bytes, None]:
            t0 = asyncio.get_running_loop().time()
            if chat:
                for c in range(n):
                    yield sse(chunk([choice(c, "", None)], include_usage))
            for i in range(count):
                await self._tick(t0, i)
                for c in range(n):
                    yield sse(chunk([choice(c, word(i), None)], include_usage))
            if midstream:
                yield sse(
                    {
                        "error": {
                            "message": "simulated mid-stream failure",
                            "type": "server_error",
                            "param": None,
                            "code": None,
                        }
                    }
                )
                return
            for c in range(n):
                yield sse(chunk([choice(c, None, finish)], include_usage))
            if include_usage:
                final = chunk([], False)
                final["usage"] = usage
                yield sse(final)
            yield b"data: [DONE]\n\n"

        await self._stream(events(), receive, send)

    # ---- endpoints ----------------------------------------------------------------------------

    async def _models(self, body: Any, receive: Receive, send: Send) -> None:
        card = {"id": self.settings.model, "object": "model", "created": 0, "owned_by": "test"}
        await self._send_json(send, 200, {"object": "list", "data": [card]})

    async def _chat(self, body: dict[str, Any], receive: Receive, send: Send) -> None:
        await self._generate(body, chat=True, receive=receive, send=send)

    async def _completions(self, body: dict[str, Any], receive: Receive, send: Send) -> None:
        await self._generate(body, chat=False, receive=receive, send=send)

    async def _embeddings(self, body: dict[str, Any], receive: Receive, send: Send) -> None:
        raw = body.get("input", "")
        inputs = raw if isinstance(raw, list) and raw and not isinstance(raw[0], int) else [raw]
        dim = body.get("dimensions") or self.settings.embedding_dim
        b64 = body.get("encoding_format") == "base64"
        data = []
        for i, item in enumerate(inputs):
            text = item if isinstance(item, str) else " ".join(map(str, item))
            vec = embed_vector(text, dim)
            data.append(
                {"object": "embedding", "index": i, "embedding": to_base64(vec) if b64 else vec}
            )
        tokens = sum(max(1, words_of(item)) for item in inputs)
        await asyncio.sleep(self.settings.ttft_ms / 1000.0)
        await self._send_json(
            send,
            200,
            {
                "object": "list",
                "data": data,
                "model": body.get("model", self.settings.model),
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            },
        )


def make_app(settings: ServerSettings | None = None) -> App:
    return App(settings or ServerSettings())


class _QuietServer(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield  # leave the host process's signal handlers alone


class RunningServer:
    """Serves `make_app(settings)` with uvicorn on a free loopback port, in this event loop.

    `await start()` returns once the socket listens (`base_url` is then ".../v1");
    `await stop()` shuts the server down and waits for it. Also an async context manager.
    """

    def __init__(
        self, settings: ServerSettings | None = None, host: str = "127.0.0.1", port: int = 0
    ) -> None:
        self.app = make_app(settings)
        config = uvicorn.Config(
            self.app,
            host=host,
            port=port,
            log_config=None,
            log_level="warning",
            access_log=False,
            lifespan="off",
            ws="none",
        )
        self._server = _QuietServer(config)
        self._task: asyncio.Task[None] | None = None
        self.base_url = ""
        self.port = 0

    async def start(self) -> None:
        self._task = asyncio.create_task(self._server.serve())
        while not self._server.started:
            if self._task.done():
                await self._task
                raise RuntimeError("upstream test server failed to start")
            await asyncio.sleep(0.01)
        sock = self._server.servers[0].sockets[0]
        host, self.port = sock.getsockname()[:2]
        self.base_url = f"http://{host}:{self.port}/v1"

    async def stop(self) -> None:
        if self._task is not None:
            self._server.should_exit = True
            await self._task
            self._task = None

    async def __aenter__(self) -> RunningServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--ttft-ms", type=float, default=20.0)
    p.add_argument("--itl-ms", type=float, default=5.0)
    p.add_argument("--tokens", type=int, default=16)
    p.add_argument("--embedding-dim", type=int, default=8)
    p.add_argument("--api-key", default=None)
    p.add_argument("--model", default="test-model")
    a = p.parse_args()
    settings = ServerSettings(
        ttft_ms=a.ttft_ms,
        itl_ms=a.itl_ms,
        tokens=a.tokens,
        embedding_dim=a.embedding_dim,
        api_key=a.api_key,
        model=a.model,
    )
    uvicorn.run(
        make_app(settings),
        host=a.host,
        port=a.port,
        log_level="warning",
        access_log=False,
        lifespan="off",
        ws="none",
    )


if __name__ == "__main__":
    main()
