"""The security suite's stage: a one-node hub on the deployed NATS configs, the fleet logged
in with its roles' credentials, attackers logged in as theirs, and the checks every attack
ends with.

The hub is deploy/nats/nats-1.conf + hub.conf + settings.conf + accounts.conf, copied to a
temporary directory. As in tests/deploy/natsconf.py only the network layout is rewritten
(loopback ports, the store directory) and, to run one node, the `cluster {}` block is cut
out: settings.conf and accounts.conf (every permission under test) are the shipped files
byte for byte, unless a test passes its own accounts text (the scoped-worker example).
Passwords come from the environment, as in production.

Every check is end to end: real nats-server, real `llmfleet` processes, the official
openai SDK as the honest HTTP client. The sim engine is deterministic (words hashed from
the prompt), so `sim_answer` says exactly what an honest client must get back.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import msgspec
import nats
import nats.errors
import nats.js.api
import openai
from nats.aio.client import Client

from common import names
from common import protocol as p
from common.openai_types import CHAT_DECODER
from llmfleet.broker import free_port
from tests.deploy.natsconf import (
    NATS_DIR,
    PASSWORDS,
    UNCHANGED,
    HubNode,
    hub_layout,
    password_env,
    rewrite_file,
    start_with_retries,
)
from tests.procs import Fleet, Gateway, Proc
from worker.engines.sim_plan import plan_chat

API_KEY = "sk-security-suite"
MODEL = "sim-model"
SIM_TOKENS = 32  # the sim engine's default answer length (worker/settings.py)

_CLUSTER_BLOCK = re.compile(r"^cluster \{\n.*?^\}\n", re.S | re.M)


class OneNodeHub(HubNode):
    """deploy/nats's hub config as one node (module docstring). `accounts` replaces
    accounts.conf's text (a test's variant of it); `env` adds variables (its passwords)."""

    def __init__(
        self, workdir: Path, accounts: str | None = None, env: dict[str, str] | None = None
    ) -> None:
        workdir.mkdir(parents=True)
        for f in ("nats-1.conf", "hub.conf", *UNCHANGED):
            shutil.copyfile(NATS_DIR / f, workdir / f)
        client, http, route, leaf = (free_port() for _ in range(4))
        hub_conf = workdir / "hub.conf"
        rewrite_file(hub_conf, hub_layout(workdir, client, http, route, leaf, [route] * 3))
        text, cut = _CLUSTER_BLOCK.subn("", hub_conf.read_text())
        assert cut == 1, "hub.conf has no `cluster {}` block at the top level: update the test"
        hub_conf.write_text(text)
        if accounts is not None:
            (workdir / "accounts.conf").write_text(accounts)
        super().__init__("nats-1", workdir / "nats-1.conf", client, http, leaf)
        self.passwords = dict(PASSWORDS)
        self.env = {**password_env(), **(env or {})}

    def start(self) -> None:
        super().start()
        deadline = time.monotonic() + 15
        while True:
            try:
                if self.monitor("/jsz").get("config"):  # JetStream is up
                    return
            except (OSError, ValueError):
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("JetStream did not start:\n" + self.log()[-3000:])
            time.sleep(0.05)

    def url(self, user: str) -> str:
        return f"nats://{user}:{self.passwords[user]}@127.0.0.1:{self.port}"

    def mark(self) -> int:
        """Where the server log ends now (for `violations(since=...)`)."""
        return len(self.log())

    def violations(self, *client_names: str, since: int = 0) -> list[str]:
        """The server's permission-violation log lines of the connections with these names
        (a name ending in `-` is a prefix). The log names a client `"<version>:<lang>:<name>"`."""
        needles = [f":{n}" if n.endswith("-") else f':{n}"' for n in client_names]
        return [
            line
            for line in self.log()[since:].splitlines()
            if "Violation - " in line and any(n in line for n in needles)
        ]

    def fleet_violations(self, since: int = 0) -> list[str]:
        """Violations by the fleet's own processes: each must do its job within its rights."""
        return self.violations("llmfleet-gateway-", "llmfleet-worker-", since=since)

    def connections(self) -> dict[str, int]:
        """The fleet's connections, name -> connection id: a process whose connection the
        server closed (a protocol error) reconnects with a new id."""
        conns = self.monitor("/connz?limit=1024")["connections"]
        return {c["name"]: c["cid"] for c in conns if c.get("name", "").startswith("llmfleet-")}


def start_hub(workdir: Path, accounts: str | None = None, **env: str) -> OneNodeHub:
    n = [0]

    def make(_: int) -> OneNodeHub:
        n[0] += 1
        return OneNodeHub(workdir / f"hub-{n[0]}", accounts, env)

    hub = start_with_retries(make)
    assert isinstance(hub, OneNodeHub)
    return hub


# ---- the fleet ------------------------------------------------------------------------


class ScriptProc(Proc):
    """A `Proc` that runs one of this suite's launcher scripts instead of `-m llmfleet`."""

    def __init__(self, script: Path, args: list[str], log_path: Path) -> None:
        self.args = args
        self.log_path = log_path
        env = {k: v for k, v in os.environ.items() if not k.startswith("LLMFLEET_")}
        self._log = log_path.open("wb")
        self.popen = subprocess.Popen(
            [sys.executable, str(script), *args],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**env, "PYTHONUNBUFFERED": "1"},
        )


class Stack:
    """A gateway (with `API_KEY`) and sim workers, each logged in as its role. Workers are
    named (`--worker-id`), so their announcements and control subjects are known."""

    def __init__(self, hub: OneNodeHub, workdir: Path) -> None:
        self.hub = hub
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.worker_fleet = Fleet(hub.url("worker"), workdir)
        self.gateway_fleet = Fleet(hub.url("gateway"), workdir)
        self.workers: dict[str, Proc] = {}
        self.gw: Gateway | None = None
        self._gateway_id = ""

    def worker(self, worker_id: str, *flags: str, model: str = MODEL) -> Proc:
        proc = self.worker_fleet.worker("--worker-id", worker_id, "--model", model, *flags)
        self.workers[worker_id] = proc
        return proc

    def fast_clock_worker(self, worker_id: str, skew_s: float, *flags: str, model: str) -> Proc:
        """A worker whose wall clock runs `skew_s` seconds ahead (tests/security/fastclock.py)."""
        args = ["--log-level", "info", "worker", "--nats", self.hub.url("worker")]
        args += ["--worker-id", worker_id, "--model", model, *flags]
        log_path = self.workdir / f"{worker_id}.log"
        proc = ScriptProc(Path(__file__).with_name("fastclock.py"), [str(skew_s), *args], log_path)
        self.worker_fleet.procs.append(proc)
        self.workers[worker_id] = proc
        return proc

    def gateway(self, *flags: str, wait_models: tuple[str, ...] = (MODEL,)) -> Gateway:
        self.gw = self.gateway_fleet.gateway("--api-key", API_KEY, *flags, wait_models=wait_models)
        self._gateway_id = self._find_gateway_id()
        return self.gw

    def _find_gateway_id(self) -> str:
        for name in self.hub.connections():
            if name.startswith("llmfleet-gateway-"):
                return name[len("llmfleet-gateway-") :]
        raise AssertionError("no gateway connection in /connz")

    @property
    def gateway_id(self) -> str:
        """The gateway's id, as anyone who can read the monitoring port's `/connz` (or the
        gateway's announcements) learns it."""
        return self._gateway_id

    def client(self) -> openai.AsyncOpenAI:
        assert self.gw is not None
        return openai.AsyncOpenAI(base_url=self.gw.base_url, api_key=API_KEY, max_retries=0)

    def retire(self, worker_id: str) -> Proc:
        """Stop counting a worker as part of the fleet (a test stopped it on purpose)."""
        return self.workers.pop(worker_id)

    def conn_names(self) -> set[str]:
        """Connection names of the processes that are part of the fleet now."""
        gateways = {f"llmfleet-gateway-{self._gateway_id}"} if self._gateway_id else set()
        return {f"llmfleet-worker-{w}" for w in self.workers} | gateways

    def stop(self) -> None:
        self.gateway_fleet.stop_all()
        self.worker_fleet.stop_all()


# ---- what an honest client must get ----------------------------------------------------


def sim_answer(prompt: str, max_tokens: int | None = None, tokens: int = SIM_TOKENS) -> str:
    """The sim engine's exact answer to one user message (worker/engines/sim_plan.py)."""
    body: dict[str, Any] = {"messages": [{"role": "user", "content": prompt}]}
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    plans, _ = plan_chat(CHAT_DECODER.decode(json.dumps(body)), tokens)
    return "".join(plans[0].pieces)


class Answer(msgspec.Struct):
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str | None
    request_id: str = ""
    worker: str = ""


async def honest_chat(
    client: openai.AsyncOpenAI,
    prompt: str,
    max_tokens: int | None = None,
    *,
    stream: bool = True,
    model: str = MODEL,
    on_start: Callable[[str], Any] | None = None,
    extra_headers: dict[str, str] | None = None,
) -> Answer:
    """One chat through the gateway; a stream is read to its end. `on_start` gets the
    request id once the response has begun (a stream's headers)."""
    messages: Any = [{"role": "user", "content": prompt}]
    extra: dict[str, Any] = {"extra_headers": extra_headers or {}}
    if max_tokens is not None:
        extra["max_tokens"] = max_tokens
    if not stream:
        raw = await client.chat.completions.with_raw_response.create(
            model=model, messages=messages, **extra
        )
        r = raw.parse()
        assert r.usage is not None
        return Answer(
            r.choices[0].message.content or "",
            r.usage.prompt_tokens,
            r.usage.completion_tokens,
            r.choices[0].finish_reason,
            raw.headers.get("x-request-id", ""),
            raw.headers.get("x-llmfleet-worker", ""),
        )
    parts: list[str] = []
    finish: str | None = None
    usage = None
    async with client.chat.completions.with_streaming_response.create(
        model=model,
        messages=messages,
        stream=True,
        stream_options={"include_usage": True},
        **extra,
    ) as resp:
        rid = resp.headers.get("x-request-id", "")
        if on_start is not None:
            on_start(rid)
        async for chunk in await resp.parse():
            if chunk.usage is not None:
                usage = chunk.usage
            for ch in chunk.choices:
                parts.append(ch.delta.content or "")
                finish = ch.finish_reason or finish
        worker = resp.headers.get("x-llmfleet-worker", "")
    assert usage is not None, "a stream with include_usage ends with a usage chunk"
    return Answer("".join(parts), usage.prompt_tokens, usage.completion_tokens, finish, rid, worker)


def check_answer(got: Answer, prompt: str, max_tokens: int | None = None) -> None:
    """`got` is exactly the sim engine's answer to `prompt`: its own, whole, once."""
    want = sim_answer(prompt, max_tokens)
    assert got.text == want, (prompt, got.text, want)
    assert got.prompt_tokens == len(prompt.split()), (prompt, got)
    assert got.completion_tokens == len(want.split()), (prompt, got)


# ---- attackers --------------------------------------------------------------------------


def inbox_prefix(role: str, tag: str) -> str:
    """The inbox prefix a role's permissions allow (its JetStream answers, pongs)."""
    if role in ("worker", "worker-sim"):
        return names.worker_inbox_prefix(tag)
    if role == "gateway":
        return names.gateway_inbox_prefix(tag)
    if role == "admin":
        return names.ADMIN_INBOX_PREFIX
    return names.reply_space(role)


class Actor:
    """A plain nats-py connection logged in as `role`. `errors` collects what the server
    reported to it (permission violations arrive as `-ERR`, asynchronously)."""

    def __init__(self, hub: OneNodeHub, role: str, name: str) -> None:
        self.hub = hub
        self.role = role
        self.name = name
        self.errors: list[Exception] = []
        self.nc: Client = Client()

    async def connect(self) -> Actor:
        async def on_error(exc: Exception) -> None:
            self.errors.append(exc)

        self.nc = await nats.connect(
            self.hub.url(self.role),
            name=self.name,
            inbox_prefix=inbox_prefix(self.role, self.name),
            error_cb=on_error,
            max_reconnect_attempts=0,
            allow_reconnect=False,
        )
        return self

    @property
    def js(self) -> Any:
        return self.nc.jetstream(timeout=2.0)

    def reply(self, tag: str = "") -> str:
        """A reply subject in this producer's own reply space."""
        return f"{names.reply_space(self.role)}.{tag or secrets.token_hex(8)}"

    async def expect_denied(self, *subjects: str, timeout: float = 5.0) -> None:
        """Each subject was refused by NATS: the server told this connection (a permissions
        error naming it) and logged a violation for it."""
        deadline = time.monotonic() + timeout
        while True:
            told = " ".join(str(e) for e in self.errors).lower()
            logged = "\n".join(self.hub.violations(self.name))
            missing = [
                s for s in subjects if f'"{s.lower()}"' not in told or f'"{s}"' not in logged
            ]
            if not missing:
                return
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{self.name}: no permission violation for {missing}\n"
                    f"told: {told[-2000:]}\nlogged: {logged[-2000:]}"
                )
            await asyncio.sleep(0.05)

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.nc.close()


@contextlib.asynccontextmanager
async def actor(hub: OneNodeHub, role: str, tag: str = "") -> AsyncIterator[Actor]:
    a = await Actor(hub, role, f"attack-{role}-{tag or secrets.token_hex(3)}").connect()
    try:
        yield a
    finally:
        await a.close()


def chat_body(prompt: str = "hi", max_tokens: int = 4, model: str = MODEL) -> bytes:
    return json.dumps(
        {
            "model": model,
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": max_tokens,
        }
    ).encode()


async def read_stream(sub: Any, timeout: float = 10.0) -> list[dict[str, Any]]:
    """A reply stream's messages up to its terminal one (`done` or `error`)."""
    out: list[dict[str, Any]] = []
    while not out or out[-1]["type"] not in ("done", "error"):
        out.append(json.loads((await sub.next_msg(timeout=timeout)).data))
    return out


# ---- the checks every attack ends with --------------------------------------------------


async def consumer_settled(
    hub: OneNodeHub, model: str = MODEL, timeout: float = 10.0
) -> nats.js.api.ConsumerInfo:
    """The model's consumer holds nothing: no request waits, none is delivered and un-acked
    (a refused request was terminated, not left to be redelivered forever)."""
    async with actor(hub, "admin", "settle") as admin:
        deadline = time.monotonic() + timeout
        while True:
            info: nats.js.api.ConsumerInfo = await admin.js.consumer_info(
                names.REQUEST_STREAM, names.consumer_name(model)
            )
            if info.num_pending == 0 and info.num_ack_pending == 0:
                return info
            if time.monotonic() > deadline:
                raise AssertionError(f"consumer of {model} never settled: {info}")
            await asyncio.sleep(0.05)


async def announcements(hub: OneNodeHub, wait: float = 1.5) -> dict[str, p.WorkerAnnounce]:
    """Every worker's latest announcement (asked for with `discover`), read as the
    operator (batch producers may read the catalog but not ask for it)."""
    latest: dict[str, p.WorkerAnnounce] = {}
    async with actor(hub, "admin", "catalog") as a:

        async def on_msg(msg: Any) -> None:
            ann = p.decode_announce(msg.data)
            latest[ann.worker] = ann

        await a.nc.subscribe(names.HEARTBEAT_PREFIX + "*", cb=on_msg)
        await a.nc.flush()
        await a.nc.publish(names.DISCOVER_SUBJECT, b"")
        await asyncio.sleep(wait)
    return latest


def model_stats(ann: p.WorkerAnnounce, model: str = MODEL) -> p.ModelStatus:
    return next(m for m in ann.models if m.id == model)


class Before(msgspec.Struct, frozen=True):
    """What the fleet looked like before an attack: where the server log ended, and the
    id of each of the fleet's connections."""

    log_mark: int
    conns: dict[str, int]


def before(stack: Stack) -> Before:
    return Before(stack.hub.mark(), stack.hub.connections())


async def assert_unharmed(stack: Stack, was: Before, *prompts: str) -> None:
    """After an attack: no connection of the fleet was closed or re-made, every worker
    process runs and answers a ping, the gateway serves an honest client its exact answer,
    and the fleet's own roles broke no permission since `was`."""
    now = stack.hub.connections()
    fleet = stack.conn_names()
    lost = {n: cid for n, cid in was.conns.items() if n in fleet and now.get(n) != cid}
    assert not lost, f"connections closed or re-made: {lost} (now {now})"
    for wid, proc in stack.workers.items():
        assert proc.alive(), f"worker {wid} died:\n{proc.log()[-3000:]}"
    assert stack.gw is not None and stack.gw.alive(), "the gateway died"
    async with actor(stack.hub, "gateway", "ping") as a:  # batch producers may not ping
        for wid in stack.workers:
            pong = await a.nc.request(names.control_subject(wid), p.encode(p.Ping()), timeout=3)
            assert pong.data == p.PONG, wid
    async with stack.client() as c:
        for prompt in prompts or ("are you still there",):
            check_answer(await honest_chat(c, prompt, 5), prompt, 5)
    assert stack.hub.fleet_violations(was.log_mark) == []


async def raw_publish(
    hub: OneNodeHub, user: str, subject: str, header_block: bytes, payload: bytes
) -> int:
    """Publish one message speaking the NATS protocol itself (no client library that would
    check or clean the header block), logged in as `user`, and return the stream sequence
    JetStream stored it under (its PubAck, received on the user's own inbox)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", hub.port)
    try:
        await reader.readline()  # INFO
        connect = {
            "verbose": False,
            "pedantic": False,
            "headers": True,
            "user": user,
            "pass": hub.passwords[user],
            "name": f"attack-raw-{user}",
        }
        inbox = f"{inbox_prefix(user, 'raw')}.{secrets.token_hex(8)}"
        writer.write(b"CONNECT " + json.dumps(connect).encode() + b"\r\n")
        writer.write(f"SUB {inbox} 1\r\n".encode())
        size = len(header_block)
        writer.write(f"HPUB {subject} {inbox} {size} {size + len(payload)}\r\n".encode())
        writer.write(header_block + payload + b"\r\n")
        await writer.drain()
        async with asyncio.timeout(5):
            while True:
                line = await reader.readline()
                if line.startswith(b"-ERR"):
                    raise AssertionError(f"the server refused the raw publish: {line!r}")
                if line.startswith(b"PING"):
                    writer.write(b"PONG\r\n")
                if line.startswith(b"MSG "):
                    ack = json.loads(await reader.readline())
                    assert "seq" in ack, ack
                    return int(ack["seq"])
    finally:
        writer.close()
        await writer.wait_closed()
