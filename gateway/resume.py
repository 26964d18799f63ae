"""`--resume-on-failure`: continue a stream on another worker when its worker dies.

Pure: builds the continuation request. The new request asks the next worker to go on from
the text already sent: for chat, the partial answer becomes a final assistant message with
`continue_final_message: true` and `add_generation_prompt: false` (vLLM's and SGLang's
parameters for exactly this); for completions, the prompt gets the partial text appended.
`max_tokens` shrinks by the tokens already sent.

Limits (documented in docs/reliability.md): only n = 1 text answers (no tool calls, no
prompt batches, no embeddings); sampling is not reproducible, so the continuation is a
plausible rather than the identical answer; usage is approximate (the continuation's
prompt contains the partial answer).
"""

from __future__ import annotations

from typing import Any

import msgspec
from opentelemetry.context import Context

from common import protocol as p
from common.errors import FleetError
from common.protocol import Usage
from gateway.dispatch import Dispatcher, Submission
from gateway.validate import Parsed

RESUMABLE_CODES = frozenset({"worker_lost", "stream_gap"})
_decode = msgspec.json.Decoder(dict[str, Any])
_encode = msgspec.json.Encoder()


def can_resume(parsed: Parsed, code: str | None, started: bool, has_tool_calls: bool) -> bool:
    return (
        started
        and code in RESUMABLE_CODES
        and parsed.op in ("chat", "completion")
        and parsed.n == 1
        and not has_tool_calls
    )


def continuation(parsed: Parsed, text_so_far: str, tokens_so_far: int) -> Parsed | None:
    """The request that continues after `text_so_far`, or None when nothing is left to do."""
    body = _decode.decode(parsed.body)
    if parsed.op == "chat":
        limit_key = "max_completion_tokens" if body.get("max_completion_tokens") else "max_tokens"
        body["messages"] = [
            *body["messages"],
            {"role": "assistant", "content": text_so_far},
        ]
        body["continue_final_message"] = True
        body["add_generation_prompt"] = False
    else:
        limit_key = "max_tokens"
        prompt = body.get("prompt")
        if not isinstance(prompt, str):
            return None
        body["prompt"] = prompt + text_so_far
        body.pop("echo", None)
    limit = body.get(limit_key)
    if limit is None and parsed.op == "completion":
        limit = 16
    if isinstance(limit, int):
        remaining = limit - tokens_so_far
        if remaining <= 0:
            return None
        body[limit_key] = remaining
    return msgspec.structs.replace(parsed, body=_encode.encode(body))


class ResumingReplies:
    """A request's reply stream that, when enabled, survives the loss of its worker.

    Wraps the first `Submission`; on a resumable failure after content was sent it submits
    the continuation and goes on reading from the new worker. `close()` cancels and closes
    the continuations (the first submission is closed by its owner).
    """

    def __init__(
        self,
        dispatcher: Dispatcher,
        parsed: Parsed,
        sub: Submission,
        request_id: str,
        *,
        enabled: bool,
        traceparent: str | None = None,
        timeout_s: float | None = None,
        max_resumes: int = 2,
        trace_context: Context | None = None,
    ) -> None:
        self._timeout_s = timeout_s
        self._trace = trace_context
        self._d = dispatcher
        self._parsed = parsed
        self.current = sub
        self._rid = request_id
        self._enabled = enabled
        self._traceparent = traceparent
        self._max = max_resumes
        self._text: list[str] = []
        self._tools = False
        self._base = 0  # tokens streamed before the current submission
        self._in_current = 0
        self._extra: list[Submission] = []
        self.resumed = 0

    def has_pending(self) -> bool:
        return bool(self.current.has_pending())

    async def next(self) -> p.Delta | p.Embedding | p.Done:
        if not self._enabled:  # the common case: no bookkeeping on the hot path
            return await self.current.next()
        while True:
            try:
                msg = await self.current.next()
            except FleetError as err:
                if self.resumed >= self._max:
                    raise
                started = bool(self._text) or self._in_current > 0
                if not can_resume(self._parsed, err.code, started, self._tools):
                    raise
                await self._resume(err)
                continue
            if isinstance(msg, p.Delta):
                for d in msg.choices:
                    if d.index == 0 and d.content:
                        self._text.append(d.content)
                    if d.tool_calls:
                        self._tools = True
                self._in_current = msg.tokens if msg.tokens is not None else self._in_current + 1
            elif isinstance(msg, p.Done) and self.resumed:
                msg = p.Done(seq=msg.seq, usage=merged_usage(msg.usage, self._base))
            return msg

    async def _resume(self, err: Exception) -> None:
        tokens = self._base + self._in_current
        cont = continuation(self._parsed, "".join(self._text), tokens)
        if cont is None:
            raise err
        self.resumed += 1
        rid = f"{self._rid}-r{self.resumed}"
        sub = await self._d.submit(cont, rid, self._traceparent, self._timeout_s, self._trace)
        self._extra.append(sub)
        await sub.first()
        self._base, self._in_current = tokens, 0
        self.current = sub
        self._d.counters.resumed += 1

    async def close(self) -> None:
        for sub in self._extra:
            await self._d.cancel(sub)
            await sub.close()


def merged_usage(continued: Usage, tokens_so_far: int) -> Usage:
    """Usage of the whole answer, from the continuation's usage (approximate)."""
    prompt = max(0, continued.prompt_tokens - tokens_so_far)
    completion = continued.completion_tokens + tokens_so_far
    return Usage(
        prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion
    )
