"""`llmfleet routes check|push|show` and a gateway's `RoutesWatch`, on the deployed roles.

One hub node on the shipped accounts.conf (tests/security/stack.py): the CLI logs in as
`admin`, the watch as `gateway` (read and watch rights on LLMFLEET_KEYS, no write). A
push reaches the running watch within 2 s (the first one too, when the push makes the
bucket); a bad file is refused before it reaches the broker; an entry that does not parse
or did not come from an admin is rejected while the last good routes stay; and neither
role needs a right it lacks.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import nats.js.api as api
import pytest

from common.audit import AuditSettings, ensure_audit_stream, stream_config
from control.keyring import Keyring
from control.routes import Routes, parse_routes
from control.routes_watch import RoutesWatch
from control.store import KEYS_BUCKET, ROUTES_KEY
from tests.admincli import Ran, run, run_process
from tests.security.stack import Actor, OneNodeHub, actor, start_hub

GOOD = """\
# The fleet's routes (comments survive a push).
default_model: chat
models: [qwen2.5:7b, gemma-3-270m, tiny]
aliases:
  chat:
    description: General chat, falls back to the small model
    chain: [qwen2.5:7b, small]
    hop_timeout: 5
  small:
    chain: [gemma-3-270m, tiny]
    fallback_on: [unavailable, worker_lost]
"""
SECOND = GOOD.replace("hop_timeout: 5", "hop_timeout: 7")
CYCLE = "aliases:\n  chat: {chain: [small]}\n  small: {chain: [m, chat]}\n"
UNKNOWN = "models: [qwen2.5:7b, gemma-3-270m]\naliases:\n  chat: {chain: [qwen2.5:7b, gema-3]}\n"
PROMISE_S = 2.0


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OneNodeHub]:
    h = start_hub(tmp_path_factory.mktemp("routeshub"))
    try:
        yield h
    finally:
        h.stop()


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("routes")
    out = {}
    for name, text in {"good": GOOD, "second": SECOND, "cycle": CYCLE, "unknown": UNKNOWN}.items():
        (d / f"{name}.yaml").write_text(text)
        out[name] = str(d / f"{name}.yaml")
    return out


class Gateway:
    """What a gateway with `--routes kv` does with the watch's callbacks: keep the last
    good routes; here also every call, with the time it came."""

    def __init__(self) -> None:
        self.routes = Routes()
        self.version = ""
        self.applied: list[tuple[float, Routes, str]] = []
        self.rejected: list[tuple[float, str]] = []
        self.changed = asyncio.Event()

    def apply(self, routes: Routes, version: str) -> None:
        self.routes, self.version = routes, version
        self.applied.append((time.monotonic(), routes, version))
        self.changed.set()

    def reject(self, error: str) -> None:
        self.rejected.append((time.monotonic(), error))
        self.changed.set()

    async def wait_for(self, pred: Callable[[], bool], timeout: float = 5.0) -> None:
        async with asyncio.timeout(timeout):
            while not pred():
                self.changed.clear()
                await self.changed.wait()


@pytest.fixture(scope="module")
async def gw(hub: OneNodeHub) -> AsyncIterator[tuple[Gateway, RoutesWatch, Actor]]:
    """A RoutesWatch running as the gateway role, from before the bucket exists."""
    g = Gateway()
    watch = RoutesWatch(g.apply, g.reject)
    async with actor(hub, "gateway", "routes") as a:
        task = asyncio.create_task(watch.run(a.js))
        try:
            async with asyncio.timeout(5):
                await watch.ready.wait()
            yield g, watch, a
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def cli(capsys: pytest.CaptureFixture[str], hub: OneNodeHub, *args: str) -> Ran:
    """`llmfleet ARGS --nats <admin>` in a thread (it runs its own event loop), while the
    watch goes on in this one."""
    return await asyncio.to_thread(run, capsys, *args, "--nats", hub.url("admin"))


@contextlib.asynccontextmanager
async def admin_kv(hub: OneNodeHub) -> AsyncIterator[Any]:
    """LLMFLEET_KEYS as the admin role, written raw (not through the CLI)."""
    async with actor(hub, "admin", "raw") as a:
        yield await a.js.key_value(KEYS_BUCKET)


async def revision(hub: OneNodeHub) -> int:
    async with admin_kv(hub) as kv:
        return int((await kv.get(ROUTES_KEY)).revision)


# ---- check (offline) ------------------------------------------------------------------------


def test_check_prints_the_flattened_chains(
    files: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    r = run(capsys, "routes", "check", files["good"])
    assert r.code == 0, r.err
    assert "ok" in r.out
    assert "qwen2.5:7b -> gemma-3-270m -> tiny" in r.out  # chat, with small expanded
    assert "unavailable, worker_lost" in r.out and "5 s" in r.out
    assert "General chat, falls back to the small model" in r.out
    assert "default model: chat (an alias)" in r.out


def test_check_refuses_bad_files_with_one_line(
    files: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    r = run(capsys, "routes", "check", files["cycle"])
    assert r.code == 1 and r.out == ""
    assert r.err == (
        f"llmfleet routes check: {files['cycle']}: alias 'chat': cycle chat -> small -> chat"
    )
    p = run_process("routes", "check", files["unknown"])  # the real exit status and stderr
    assert p.returncode == 1 and p.stdout == ""
    assert p.stderr.strip() == (
        f"llmfleet routes check: {files['unknown']}: alias 'chat': unknown target 'gema-3' "
        "(not an alias, not in models)"
    )
    r = run(capsys, "routes", "check", files["good"] + ".missing")
    assert r.code == 1 and "No such file" in r.err


# ---- push, the watch, show ------------------------------------------------------------------


async def test_nothing_stored_yet(
    hub: OneNodeHub, gw: tuple[Gateway, RoutesWatch, Actor], capsys: pytest.CaptureFixture[str]
) -> None:
    g, watch, _ = gw
    assert watch.ready.is_set() and g.applied == [] and g.rejected == []  # no bucket yet
    r = await cli(capsys, hub, "routes", "show")
    assert r.code == 0, r.err
    assert "no routes stored" in r.out


async def test_a_push_reaches_the_watch_within_2_s(
    hub: OneNodeHub,
    gw: tuple[Gateway, RoutesWatch, Actor],
    files: dict[str, str],
    capsys: pytest.CaptureFixture[str],
) -> None:
    g, watch, a = gw
    for path, timeout in ((files["good"], 5), (files["second"], 2)):
        before = len(g.applied)
        started = time.monotonic()
        r = await cli(capsys, hub, "routes", "push", path)
        assert r.code == 0, r.err
        assert "revision" in r.out and "2 aliases" in r.out
        await g.wait_for(lambda n=before: len(g.applied) > n, timeout=timeout)
        at, routes, version = g.applied[-1]
        assert at - started < PROMISE_S, at - started
        assert routes == parse_routes(Path(path).read_text())
        assert version == f"kv rev {await revision(hub)}"
    assert g.routes.aliases["chat"].hop_timeout == 7
    assert g.routes.chain("chat") == ("qwen2.5:7b", "gemma-3-270m", "tiny")
    assert g.rejected == []
    # A fresh read (after a reconnect) hands nothing over again.
    n = len(g.applied)
    watch.restart()
    await asyncio.sleep(0.5)
    assert len(g.applied) == n
    # The keyring, watching the same bucket, ignores the entry.
    ring = Keyring()
    task = asyncio.create_task(ring.run(a.js))
    try:
        async with asyncio.timeout(5):
            await ring.ready.wait()
        assert ring.names == [] and ring.prices_ok and ring.forged == 0
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_show_prints_the_text_as_pushed(
    hub: OneNodeHub, capsys: pytest.CaptureFixture[str]
) -> None:
    r = await cli(capsys, hub, "routes", "show")
    assert r.code == 0, r.err
    assert r.out.startswith(SECOND)  # comments and all
    assert f"revision {await revision(hub)}" in r.err
    assert "invalid" not in r.err


async def test_a_bad_file_is_refused_and_kv_is_unchanged(
    hub: OneNodeHub,
    gw: tuple[Gateway, RoutesWatch, Actor],
    files: dict[str, str],
    capsys: pytest.CaptureFixture[str],
) -> None:
    g, _, _ = gw
    rev = await revision(hub)
    n = (len(g.applied), len(g.rejected))
    for name, what in (("cycle", "cycle chat -> small -> chat"), ("unknown", "'gema-3'")):
        r = await cli(capsys, hub, "routes", "push", files[name])
        assert r.code == 1 and what in r.err, r.err
        assert r.err.startswith(f"llmfleet routes push: {files[name]}: alias 'chat': ")
    await asyncio.sleep(0.5)
    assert await revision(hub) == rev
    assert (len(g.applied), len(g.rejected)) == n


async def test_a_raw_write_that_does_not_parse_is_rejected_and_the_last_good_stays(
    hub: OneNodeHub, gw: tuple[Gateway, RoutesWatch, Actor], capsys: pytest.CaptureFixture[str]
) -> None:
    g, _, _ = gw
    good, n = g.routes, len(g.applied)
    for garbage, what in (
        (b"aliases: [unclosed", ": line "),
        (b"\x00\xff\xfe garbage", ": not UTF-8 text"),
        (CYCLE.encode(), ": alias 'chat': cycle chat -> small -> chat"),
    ):
        async with admin_kv(hub) as kv:
            rev = await kv.put(ROUTES_KEY, garbage)
        await g.wait_for(lambda r=rev: any(f"rev {r}:" in e for _, e in g.rejected), timeout=2)
        line = g.rejected[-1][1]
        assert line.startswith(f"{KEYS_BUCKET}.{ROUTES_KEY} rev {rev}{what}"), line
        assert "\n" not in line
    assert g.routes == good and len(g.applied) == n  # the last good routes are in force
    r = await cli(capsys, hub, "routes", "show")
    assert r.code == 0 and r.out.startswith("aliases:\n  chat: {chain: [small]}")
    assert "invalid, gateways keep their last good routes" in r.err
    assert "cycle chat -> small -> chat" in r.err


async def test_a_republished_entry_is_refused(
    hub: OneNodeHub, gw: tuple[Gateway, RoutesWatch, Actor]
) -> None:
    """A role that may configure a stream (gateways: LLMFLEET_AUDIT) can aim a republish
    at the key, and the server stores it; the watch sees `Nats-Stream` and rejects it."""
    g, watch, a = gw
    good, forged_before = g.routes, watch.forged
    await ensure_audit_stream(a.js, AuditSettings())
    config = stream_config(AuditSettings())
    config.republish = api.RePublish(src="llmfleet.audit.gw.*", dest=f"$KV.{KEYS_BUCKET}.routes")
    try:
        await a.js.update_stream(config)
        await a.js.publish("llmfleet.audit.gw.x", b"default_model: evil\n")
    finally:
        await a.js.update_stream(stream_config(AuditSettings()))
    await g.wait_for(lambda: watch.forged > forged_before, timeout=2)
    line = g.rejected[-1][1]
    assert "republished from stream 'LLMFLEET_AUDIT', not written by an admin" in line
    assert g.routes == good


async def test_push_again_then_delete(
    hub: OneNodeHub,
    gw: tuple[Gateway, RoutesWatch, Actor],
    files: dict[str, str],
    capsys: pytest.CaptureFixture[str],
) -> None:
    g, _, a = gw
    r = await cli(capsys, hub, "routes", "push", files["good"])
    assert r.code == 0, r.err
    rev = await revision(hub)
    await g.wait_for(lambda: g.version == f"kv rev {rev}", timeout=2)
    assert g.routes == parse_routes(GOOD)
    async with admin_kv(hub) as kv:
        await kv.delete(ROUTES_KEY)
    await g.wait_for(lambda: g.version.endswith("(deleted)"), timeout=2)
    assert g.routes == Routes()
    r = await cli(capsys, hub, "routes", "show")
    assert r.code == 0 and "no routes stored (deleted at revision" in r.out
    # Every role stayed within its rights.
    assert a.errors == []
    assert hub.violations(a.name, "llmfleet-admin") == []
