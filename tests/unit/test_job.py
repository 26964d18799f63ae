"""`run_job` with a fake engine and a recording publisher: every outcome is exactly one
terminal message, and internal failures never leak internals."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

from common import protocol as p
from common.errors import InvalidRequest
from common.openai_types import ChatRequest, CompletionRequest, EmbeddingRequest
from worker.engine import EmbedResult, EngineEvent, ModelCard, Output
from worker.job import JobHandle, JobSpec, run_job


class Recorder:
    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes]] = []

    async def publish(
        self, subject: str, payload: bytes = b"", reply: str = "", headers: object = None
    ) -> None:
        self.sent.append((subject, payload))

    def replies(self) -> list[p.Reply]:
        return [p.decode_reply(d) for s, d in self.sent if s == "reply"]

    def acks(self) -> list[bytes]:
        return [d for s, d in self.sent if s == "ack"]


class Broken:
    def __init__(self, exc: Exception, after: int = 0) -> None:
        self.exc, self.after = exc, after

    def card(self) -> ModelCard:
        return ModelCard(engine="broken")

    async def start(self) -> None: ...

    async def aclose(self) -> None: ...

    async def _gen(self) -> AsyncIterator[EngineEvent]:
        for i in range(self.after):
            yield Output(choices=[p.ChoiceDelta(index=0, content=f"t{i} ")])
        raise self.exc

    def chat(self, req: ChatRequest, raw: bytes) -> AsyncIterator[EngineEvent]:
        return self._gen()

    def complete(self, req: CompletionRequest, raw: bytes) -> AsyncIterator[EngineEvent]:
        return self._gen()

    async def embed(self, req: EmbeddingRequest, raw: bytes) -> EmbedResult:
        raise self.exc


BODY = json.dumps({"model": "m", "messages": [{"role": "user", "content": "x"}]}).encode()


async def _run(engine: Broken, body: bytes = BODY) -> Recorder:
    rec = Recorder()
    spec = JobSpec(request_id="r", op="chat", reply="reply", body=body)
    handle = JobHandle(rec, spec, "ack", "watch")
    result = await run_job(handle, engine=engine, worker="w", model="m")
    assert result.key == ""
    return rec


async def test_internal_failure_is_a_generic_500() -> None:
    rec = await _run(Broken(RuntimeError("secret path /etc/passwd"), after=2))
    replies = rec.replies()
    assert isinstance(replies[0], p.Accepted)
    assert [type(r) for r in replies[1:]] in ([p.Delta, p.Error], [p.Delta, p.Delta, p.Error])
    err = replies[-1]
    assert isinstance(err, p.Error) and err.status == 500
    assert "secret" not in err.error.message and err.error.code == "internal_error"
    assert [r.seq for r in replies] == list(range(len(replies)))
    assert rec.acks() == [b"+ACK"]  # acked exactly once, at the first output


async def test_engine_client_error_keeps_its_status() -> None:
    rec = await _run(Broken(InvalidRequest("bad temperature", param="temperature")))
    (acc, err) = rec.replies()
    assert isinstance(acc, p.Accepted)
    assert isinstance(err, p.Error) and err.status == 400 and err.error.param == "temperature"
    assert rec.acks() == [b"+ACK"]


async def test_unreadable_body_is_400_naming_the_field() -> None:
    rec = await _run(Broken(RuntimeError("unused")), body=b'{"model": "m"}')
    err = rec.replies()[-1]
    assert isinstance(err, p.Error) and err.status == 400 and err.error.param == "messages"


class Slow:
    """An engine that takes `wait` seconds before answering (embeddings), or between its
    first and second token (chat)."""

    def __init__(self, wait: float, exc: Exception | None = None) -> None:
        self.wait, self.exc = wait, exc

    def card(self) -> ModelCard:
        return ModelCard(engine="slow")

    async def start(self) -> None: ...

    async def aclose(self) -> None: ...

    async def _gen(self) -> AsyncIterator[EngineEvent]:
        yield Output(choices=[p.ChoiceDelta(index=0, content="a")])
        await asyncio.sleep(self.wait)
        yield Output(choices=[p.ChoiceDelta(index=0, content="b", finish_reason="stop")])
        yield p.Usage(1, 2, 3)

    def chat(self, req: ChatRequest, raw: bytes) -> AsyncIterator[EngineEvent]:
        return self._gen()

    def complete(self, req: CompletionRequest, raw: bytes) -> AsyncIterator[EngineEvent]:
        return self._gen()

    async def embed(self, req: EmbeddingRequest, raw: bytes) -> EmbedResult:
        await asyncio.sleep(self.wait)
        if self.exc is not None:
            raise self.exc
        return EmbedResult(embeddings=[[1.0]], usage=p.Usage(1, 0, 1))


async def test_a_job_waiting_for_its_engine_keeps_its_delivery_alive_itself() -> None:
    rec = Recorder()
    body = json.dumps({"model": "m", "input": "x"}).encode()
    spec = JobSpec(request_id="r", op="embedding", reply="reply", body=body)
    await run_job(JobHandle(rec, spec, "ack", "watch"), engine=Slow(1.3), worker="w", model="m")
    acks = rec.acks()
    assert acks[:2] == [b"+WPI", b"+WPI"] and acks[-1] == b"+ACK"  # no runner tick needed
    assert acks.count(b"+ACK") == 1


async def test_a_silent_stream_gets_heartbeats_from_its_job() -> None:
    rec = Recorder()
    spec = JobSpec(request_id="r", op="chat", reply="reply", body=BODY)
    handle = JobHandle(rec, spec, "ack", "watch", heartbeat_s=0.4)
    await run_job(handle, engine=Slow(1.3), worker="w", model="m")
    kinds = [type(r).__name__ for r in rec.replies()]
    assert kinds[:2] == ["Accepted", "Delta"] and kinds[-1] == "Done"
    beats = [r for r in rec.replies() if isinstance(r, p.Heartbeat)]
    assert len(beats) >= 2 and all(b.last_seq == 1 for b in beats)  # after the first delta
    assert rec.acks() == [b"+ACK"]  # acked at the first output: no +WPI after it


async def test_an_engine_error_after_a_long_wait_keeps_its_status() -> None:
    rec = Recorder()
    body = json.dumps({"model": "m", "input": "x"}).encode()
    spec = JobSpec(request_id="r", op="embedding", reply="reply", body=body)
    bad = InvalidRequest("too many dimensions", param="dimensions")
    await run_job(
        JobHandle(rec, spec, "ack", "watch"), engine=Slow(0.7, bad), worker="w", model="m"
    )
    err = rec.replies()[-1]
    assert isinstance(err, p.Error) and err.status == 400 and err.error.param == "dimensions"
    assert rec.acks()[0] == b"+WPI"  # it did wait past a keep-alive first
