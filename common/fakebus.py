"""An in-memory `Bus` and `JetStream` (common/bus.py) for unit tests of what is built on them.

Subjects route with NATS wildcards (`*` one token, `>` the rest). Each subscription has
its own task that runs its callback one message at a time, in order, as nats-py does.
`request` answers no-responders when nothing subscribes, and times out as nats-py does.
The JetStream half stores published messages under increasing sequence numbers and can
be told to fail. Everything published is recorded in `published`. Not for integration
tests: those run a real nats-server.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools

import nats.errors

from common.bus import Callback, Msg


def matches(pattern: str, subject: str) -> bool:
    p, s = pattern.split("."), subject.split(".")
    for i, token in enumerate(p):
        if token == ">":
            return len(s) > i
        if i >= len(s) or (token != "*" and token != s[i]):
            return False
    return len(p) == len(s)


class FakeMsg:
    def __init__(
        self,
        bus: FakeBus,
        subject: str,
        data: bytes,
        reply: str = "",
        headers: dict[str, str] | None = None,
    ) -> None:
        self._bus = bus
        self.subject = subject
        self.data = data
        self.reply = reply
        self.headers = headers

    async def respond(self, data: bytes) -> None:
        await self._bus.publish(self.reply, data)


class FakeSub:
    def __init__(self, bus: FakeBus, subject: str, cb: Callback) -> None:
        self.bus = bus
        self.subject = subject
        self.queue: asyncio.Queue[Msg] = asyncio.Queue()
        self._task = asyncio.ensure_future(self._pump(cb))

    async def _pump(self, cb: Callback) -> None:
        while True:
            msg = await self.queue.get()
            try:
                await cb(msg)
            except Exception as exc:  # nats-py logs callback errors and goes on
                self.bus.errors.append(exc)

    async def unsubscribe(self, limit: int = 0) -> None:
        self.bus.subs = [s for s in self.bus.subs if s is not self]
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


class FakeBus:
    """Implements `common.bus.Bus`. Close with `aclose()` (stops the callback tasks)."""

    def __init__(self, max_payload: int = 1024 * 1024) -> None:
        self.subs: list[FakeSub] = []
        self.published: list[FakeMsg] = []
        self.errors: list[Exception] = []
        self.connected = True
        self._max_payload = max_payload
        self._inboxes = itertools.count(1)

    @property
    def is_connected(self) -> bool:
        return self.connected

    @property
    def max_payload(self) -> int:
        return self._max_payload

    async def publish(
        self,
        subject: str,
        payload: bytes = b"",
        reply: str = "",
        headers: dict[str, str] | None = None,
    ) -> None:
        await self.deliver(subject, subject, payload, reply, headers)

    async def deliver(
        self,
        to: str,
        subject: str,
        payload: bytes,
        reply: str,
        headers: dict[str, str] | None = None,
    ) -> None:
        """Route to `to` a message whose subject is `subject`: a plain publish has them
        equal; a JetStream pull delivery goes to the pull's inbox but keeps its stream
        subject, with the delivery's ack subject as `reply`."""
        msg = FakeMsg(self, subject, payload, reply, headers)
        self.published.append(msg)
        for sub in list(self.subs):
            if matches(sub.subject, to):
                sub.queue.put_nowait(msg)

    async def request(
        self,
        subject: str,
        payload: bytes = b"",
        timeout: float = 0.5,
        old_style: bool = False,
        headers: dict[str, str] | None = None,
    ) -> Msg:
        if not any(matches(s.subject, subject) for s in self.subs):
            raise nats.errors.NoRespondersError
        inbox = f"_FAKE.inbox.{next(self._inboxes)}"
        answer: asyncio.Future[Msg] = asyncio.get_running_loop().create_future()

        async def on_answer(msg: Msg) -> None:
            if not answer.done():
                answer.set_result(msg)

        sub = await self.subscribe(inbox, cb=on_answer)
        try:
            await self.publish(subject, payload, inbox, headers)
            try:
                return await asyncio.wait_for(answer, timeout)
            except TimeoutError:
                raise nats.errors.TimeoutError from None
        finally:
            await sub.unsubscribe()

    async def flush(self, timeout: int = 10) -> None:
        await self.settle()

    async def subscribe(
        self,
        subject: str,
        queue: str = "",
        cb: Callback | None = None,
        future: object = None,
        max_msgs: int = 0,
        pending_msgs_limit: int = 0,
        pending_bytes_limit: int = 0,
    ) -> FakeSub:
        assert cb is not None, "the fake supports callback subscriptions only"
        sub = FakeSub(self, subject, cb)
        self.subs.append(sub)
        return sub

    def sent_to(self, pattern: str) -> list[FakeMsg]:
        """What was published on subjects matching `pattern`, in order."""
        return [m for m in self.published if matches(pattern, m.subject)]

    async def settle(self) -> None:
        """Let every subscription's callback run on what was published so far."""
        for _ in range(20):
            if all(s.queue.empty() for s in self.subs):
                await asyncio.sleep(0)
                if all(s.queue.empty() for s in self.subs):
                    return
            await asyncio.sleep(0)

    async def aclose(self) -> None:
        for sub in list(self.subs):
            await sub.unsubscribe()


class FakeAck:
    def __init__(self, stream: str, seq: int, duplicate: bool | None = None) -> None:
        self.stream = stream
        self.seq = seq
        self.duplicate = duplicate


class Stored:
    """One message in the fake stream."""

    def __init__(self, subject: str, data: bytes, headers: dict[str, str] | None) -> None:
        self.subject, self.data, self.headers = subject, data, headers


class FakeJetStream:
    """Implements `common.bus.JetStream`: a store of published requests by sequence."""

    def __init__(self, stream: str = "LLMFLEET_REQUESTS") -> None:
        self.stream = stream
        self.messages: dict[int, Stored] = {}
        self.deleted: list[int] = []
        self.fail_next: list[Exception] = []  # raised by the next publishes, in order
        self._seq = itertools.count(1)

    async def publish(
        self,
        subject: str,
        payload: bytes = b"",
        timeout: float | None = None,
        stream: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> FakeAck:
        if self.fail_next:
            raise self.fail_next.pop(0)
        seq = next(self._seq)
        self.messages[seq] = Stored(subject, payload, headers)
        return FakeAck(self.stream, seq)

    async def delete_msg(self, stream_name: str, seq: int) -> bool:
        self.deleted.append(seq)
        return self.messages.pop(seq, None) is not None
