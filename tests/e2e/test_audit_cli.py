"""`llmfleet audit tail` on a real audit stream: the last N (oldest first), filters that
must read back through many chunks, `--since`, `--json` as stored, malformed events
skipped and counted, `--follow` of an event published after the start; and the admin role
of deploy/nats/accounts.conf running every admin command within its rights."""

from __future__ import annotations

import asyncio
import json
import re
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import nats
import pytest

from common import audit, names
from common.audit import AuditEvent, AuditSettings, ensure_audit_stream
from control.store import open_bucket, quota_config
from llmfleet.broker import EmbeddedNats
from tests.admincli import Ran, env, run

N = 1500  # events seeded: several of the tail's chunks
T0 = int(time.time())
SUBJECT = "llmfleet.audit.gw.test"


def event(i: int, **kw: Any) -> AuditEvent:
    """Event i: seconds apart, ending a second before T0; team-a/team-b alternate, two
    `rare` ones near the start; gemma every 7th (served as itself), else qwen3 as
    qwen3-8b; a 429 every 10th."""
    key = "rare" if i in (5, 100) else ("team-a" if i % 2 else "team-b")
    model = "gemma" if i % 7 == 0 else "qwen3"
    fields: dict[str, Any] = {
        "ts": float(T0 - (N - i)),
        "request_id": f"req-{i}",
        "key": key,
        "route": "chat",
        "model": model,
        "served_model": model if model == "gemma" else "qwen3-8b",
        "worker": "w-1",
        "status": 429 if i % 10 == 0 else 200,
        "error": "rate_limit_exceeded" if i % 10 == 0 else "",
        "prompt_tokens": i,
        "completion_tokens": 2 * i,
        "ttft_ms": 12.0,
        "duration_ms": 100.0 + i,
        "stream": i % 2 == 0,
        "client": "10.0.0.9:5000",
    }
    fields.update(kw)
    return AuditEvent(**fields)


async def publish(url: str, events: list[AuditEvent], junk: bytes = b"") -> None:
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        await ensure_audit_stream(js, AuditSettings())
        acks = [await js.publish_async(SUBJECT, audit.encode(e)) for e in events]
        if junk:
            acks.append(await js.publish_async(SUBJECT, junk))
        await asyncio.gather(*acks)
    finally:
        await nc.close()


@pytest.fixture(scope="module")
def seeded(nats_url: str) -> str:
    """N events, then one message that is no AuditEvent (the newest)."""
    asyncio.run(publish(nats_url, [event(i) for i in range(N)], junk=b'{"ts": "not a time"}'))
    return nats_url


@pytest.fixture
def tail(seeded: str, capsys: pytest.CaptureFixture[str]) -> Any:
    def call(*args: str) -> Ran:
        return run(capsys, "audit", "tail", *args, "--nats", seeded)

    return call


def ids(r: Ran) -> list[str]:
    assert r.code == 0, r.err
    return [json.loads(line)["request_id"] for line in r.out.splitlines()]


def test_default_is_the_last_100_oldest_first_as_a_table(tail: Any) -> None:
    r = tail()
    assert r.code == 0, r.err
    rows = re.findall(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\dZ .*$", r.out, re.M)
    assert len(rows) == 100
    tokens = [int(m) for row in rows for m in re.findall(r" (\d+)/\d+ ", row)]
    assert tokens == list(range(N - 100, N))  # the newest last
    header = r.out.splitlines()[0].split()
    assert header[:7] == ["time", "key", "route", "model", "served", "worker", "status"]
    assert re.search(
        r"team-a .* chat .* qwen3 .* qwen3-8b .* w-1 .* 200 .* 10\.0\.0\.9:5000", r.out
    )
    assert "429 rate_limit_exceeded" in r.out
    assert "skipped 1 malformed event" in r.err  # the junk one, newest of all


def test_json_lines_are_the_events_as_stored(tail: Any) -> None:
    r = tail("-n", "3", "--json")
    assert ids(r) == [f"req-{i}" for i in (N - 3, N - 2, N - 1)]
    assert r.out.splitlines()[0].encode() == audit.encode(event(N - 3))


def test_key_filter_reads_back_to_the_start_of_the_stream(tail: Any) -> None:
    assert ids(tail("--key", "rare", "--json")) == ["req-5", "req-100"]  # fewer than -n
    want = [f"req-{i}" for i in range(N - 8, N, 2)]  # team-b: the even ones
    assert ids(tail("--key", "team-b", "-n", "4", "--json")) == want
    assert ids(tail("--key", "team-*", "-n", "1", "--json")) == [f"req-{N - 1}"]
    r = tail("--key", "nobody")
    assert r.code == 0 and "no audit events match" in r.out


def test_model_filter_matches_the_model_asked_or_served(tail: Any) -> None:
    gemma = [i for i in range(N) if i % 7 == 0]
    assert ids(tail("--model", "gemma", "-n", "3", "--json")) == [f"req-{i}" for i in gemma[-3:]]
    served = ids(tail("--model", "qwen3-8b", "-n", "2", "--json"))  # only ever served
    assert served == [f"req-{i}" for i in range(N) if i % 7][-2:]
    assert ids(tail("--model", "gemma", "--key", "rare", "--json")) == []
    both = ids(tail("--model", "qwen3", "--key", "rare", "--json"))
    assert both == ["req-5", "req-100"]


def test_since_a_time_or_a_duration(tail: Any) -> None:
    k = N - 40
    iso = datetime.fromtimestamp(T0 - (N - k), UTC).strftime("%Y-%m-%dT%H:%M:%S")
    assert ids(tail("--since", iso, "-n", "1000", "--json")) == [f"req-{i}" for i in range(k, N)]
    assert ids(tail("--since", iso + "+00:00", "-n", "2", "--json")) == [
        f"req-{N - 2}",
        f"req-{N - 1}",
    ]
    assert len(ids(tail("--since", "2h", "-n", "2000", "--json"))) == N
    assert ids(tail("--since", "0s", "--json")) == []  # every event is older than now
    r = tail("--since", "yesterday")
    assert r.code == 1 and "--since" in r.err


def test_a_missing_stream_is_an_error_and_odd_events_are_shown_safely(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with EmbeddedNats() as server:
        r = run(capsys, "audit", "tail", "--nats", server.url)
        assert r.code == 1 and "LLMFLEET_AUDIT does not exist" in r.err
        evil = event(1, model="m\x1b[2J\x1b]0;owned\x07", client="\x9b31m")
        asyncio.run(publish(server.url, [evil, event(2, ts=1e300)]))  # no calendar has it
        r = run(capsys, "audit", "tail", "--nats", server.url)
    assert r.code == 0, r.err
    assert "\x1b" not in r.out and "\x07" not in r.out and "\x9b" not in r.out
    assert "m\\x1b[2J" in r.out and "\\x9b31m" in r.out
    assert "1e+300" in r.out


def _readline(proc: subprocess.Popen[str], timeout: float = 10.0) -> str:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    assert ready, "no line in time"
    return proc.stdout.readline()


def test_follow_prints_events_published_after_it_started(seeded: str) -> None:
    asyncio.run(publish(seeded, [event(N, key="follower", request_id="before")]))
    with subprocess.Popen(
        [sys.executable, "-m", "llmfleet", "audit", "tail", "--follow", "--json", "--key",
         "follower", "--nats", seeded],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**env(), "PYTHONUNBUFFERED": "1"},
    ) as proc:  # fmt: skip
        try:
            assert json.loads(_readline(proc))["request_id"] == "before"  # the tail, read
            asyncio.run(publish(seeded, [event(N + 1, key="follower", request_id="after")]))
            assert json.loads(_readline(proc))["request_id"] == "after"  # followed
            proc.send_signal(signal.SIGINT)
            _, err = proc.communicate(timeout=10)
            assert proc.returncode == 0, err
            assert "Traceback" not in err
        finally:
            if proc.poll() is None:
                proc.kill()


# ---- the deployed admin role --------------------------------------------------------------


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from tests.security.stack import start_hub  # noqa: PLC0415

    h = start_hub(tmp_path_factory.mktemp("adminhub"))
    try:
        yield h
    finally:
        h.stop()


async def _as_gateway(hub: Any) -> None:
    """What a gateway with --auth keys and --audit on makes: the quota bucket, the audit
    stream and an event."""
    nc = await nats.connect(hub.url("gateway"), inbox_prefix=names.gateway_inbox_prefix("t"))
    try:
        js = nc.jetstream(timeout=3)
        await open_bucket(js, quota_config(), create=True)
        await ensure_audit_stream(js, AuditSettings())
        await js.publish("llmfleet.audit.gw.t", audit.encode(event(1, key="ops")))
    finally:
        await nc.close()


def test_the_deployed_admin_role_runs_every_admin_command(
    hub: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    asyncio.run(_as_gateway(hub))
    mark = hub.mark()
    url = hub.url("admin")

    def admin(*args: str) -> Ran:
        r = run(capsys, *args, "--nats", url)
        assert r.code == 0, (args, r.err)
        return r

    admin("keys", "create", "ops", "--models", "*", "--budget-tokens", "100")
    admin("keys", "update", "ops", "--rpm", "10")
    admin("keys", "rotate", "ops", "--overlap", "0s")
    assert [k["name"] for k in admin("keys", "list", "--json").json()["keys"]] == ["ops"]
    assert admin("usage", "--json").json()["keys"][0]["budgets"][0]["used"] == 0
    admin("prices", "set", "m", "--input", "1", "--output", "2")
    assert admin("prices", "list", "--json").json()["models"] == {"m": {"input": 1, "output": 2}}
    assert ids(admin("audit", "tail", "--json")) == ["req-1"]
    admin("keys", "revoke", "ops")
    time.sleep(0.2)  # a violation is logged asynchronously
    assert hub.violations("llmfleet-admin", since=mark) == []
    r = run(capsys, "keys", "list", "--nats", hub.url("worker"))  # not an admin
    assert r.code == 1 and "permission denied" in r.err
