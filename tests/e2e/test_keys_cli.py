"""`llmfleet keys`, `usage` and `prices` against a real nats-server: the secret is printed
once and only its hash stored, `--json` shapes, CAS updates, rotation overlaps, revocation,
usage from seeded ledgers, prices, and one-line errors (unreachable broker, refused login,
missing permission, unknown key, taken name)."""

from __future__ import annotations

import asyncio
import re
import time
from typing import Any

import msgspec
import nats
import pytest

from control import ledger as L
from control.keys import PRICES_DECODER, RECORD_DECODER, hash_secret, period_end, period_id
from control.store import KEY_PREFIX, KEYS_BUCKET, PRICES_KEY, open_bucket, quota_config
from llmfleet.broker import EmbeddedNats, free_port
from tests.admincli import Ran, run, run_process

SECRET = re.compile(r"sk-llmf-[A-Za-z0-9_-]{20,}")
VIEW_FIELDS = {
    "name", "state", "models", "admin", "rpm", "tpm", "max_parallel", "budget_tokens",
    "budget_cost", "budget_period", "expires_at", "revoked_at", "created_at", "updated_at",
    "description", "secrets",
}  # fmt: skip


@pytest.fixture
def keys(nats_url: str, capsys: pytest.CaptureFixture[str]) -> Any:
    """`keys(*args)`: `llmfleet ARGS --nats <the module's broker>`, in this process."""

    def call(*args: str) -> Ran:
        return run(capsys, *args, "--nats", nats_url)

    return call


async def _raw(url: str, key: str) -> bytes:
    nc = await nats.connect(url)
    try:
        kv = await nc.jetstream().key_value(KEYS_BUCKET)
        value = (await kv.get(key)).value
        assert value is not None
        return value
    finally:
        await nc.close()


def raw_record(url: str, name: str) -> bytes:
    return asyncio.run(_raw(url, KEY_PREFIX + name))


def test_create_prints_the_secret_once_and_stores_only_its_hash(nats_url: str, keys: Any) -> None:
    p = run_process("keys", "create", "alpha", "--nats", nats_url)
    assert p.returncode == 0, p.stderr
    found = SECRET.findall(p.stdout)
    assert len(found) == 1, p.stdout
    secret = found[0]
    assert "runs no model until --models is set" in p.stdout  # default deny, said out loud
    raw = raw_record(nats_url, "alpha")
    assert secret.encode() not in raw
    assert hash_secret(secret).encode() in raw
    record = RECORD_DECODER.decode(raw)
    assert record.models == () and [s.sha256 for s in record.secrets] == [hash_secret(secret)]
    for args in (("show", "alpha"), ("show", "alpha", "--json"), ("list",), ("list", "--json")):
        r = keys("keys", *args)
        assert r.code == 0, r.err
        assert "alpha" in r.out
        assert secret not in r.out and hash_secret(secret) not in r.out  # never again


def test_json_shapes_of_create_show_and_list(keys: Any) -> None:
    doc = keys(
        "keys", "create", "beta", "--models", "qwen*,llama3*", "--rpm", "60", "--tpm", "5000",
        "--max-parallel", "2", "--budget-tokens", "100000", "--budget-cost", "2.5",
        "--budget-period", "day", "--expires", "30d", "--admin", "--description", "team b",
        "--json",
    ).json()  # fmt: skip
    assert set(doc) == VIEW_FIELDS | {"secret"}
    assert SECRET.fullmatch(doc["secret"])
    assert doc["models"] == ["qwen*", "llama3*"] and doc["admin"] is True
    assert (doc["rpm"], doc["tpm"], doc["max_parallel"]) == (60, 5000, 2)
    assert (doc["budget_tokens"], doc["budget_cost"], doc["budget_period"]) == (100000, 2.5, "day")
    assert abs(doc["expires_at"] - (time.time() + 30 * 86400)) < 60
    assert doc["state"] == "active" and doc["revoked_at"] is None
    assert doc["description"] == "team b"
    assert [set(s) for s in doc["secrets"]] == [{"created_at", "expires_at"}]  # no hash
    shown = keys("keys", "show", "beta", "--json").json()
    assert shown == {k: v for k, v in doc.items() if k != "secret"}
    listed = keys("keys", "list", "--json").json()
    assert set(listed) == {"keys"}
    assert [k for k in listed["keys"] if k["name"] == "beta"] == [shown]


def test_update_changes_only_what_is_asked(keys: Any) -> None:
    before = keys("keys", "create", "delta", "--models", "qwen*,llama3*", "--rpm", "60",
                  "--max-parallel", "2", "--budget-cost", "1", "--expires", "1d", "--admin",
                  "--json").json()  # fmt: skip
    time.sleep(0.01)
    doc = keys(
        "keys", "update", "delta", "--add-models", "gemma*", "--remove-models", "llama3*",
        "--clear", "rpm", "--clear", "budget-cost", "--tpm", "9000", "--no-expires",
        "--no-admin", "--json",
    ).json()  # fmt: skip
    assert doc["models"] == ["qwen*", "gemma*"]
    assert doc["rpm"] is None and doc["budget_cost"] is None and doc["tpm"] == 9000
    assert doc["max_parallel"] == 2  # untouched
    assert doc["expires_at"] is None and doc["admin"] is False
    assert doc["updated_at"] > before["updated_at"] and doc["created_at"] == before["created_at"]
    assert doc["secrets"] == before["secrets"]
    assert keys("keys", "update", "delta", "--models", "", "--json").json()["models"] == []
    r = keys("keys", "update", "delta", "--models", "*")
    assert r.code == 0 and "every model" in r.out
    r = keys("keys", "update", "delta", "--rpm", "5", "--clear", "rpm")
    assert r.code == 1 and "contradict" in r.err
    r = keys("keys", "update", "delta", "--expires", "1d", "--no-expires")
    assert r.code == 1 and "contradict" in r.err
    assert keys("keys", "show", "delta", "--json").json()["rpm"] is None  # nothing written


def test_rotate_keeps_old_secrets_for_the_overlap_only(nats_url: str, keys: Any) -> None:
    first = keys("keys", "create", "gamma", "--models", "*", "--json").json()["secret"]
    doc = keys("keys", "rotate", "gamma", "--json").json()  # default overlap: 1 h
    second = doc["secret"]
    assert second != first
    old, new = doc["secrets"]
    assert abs(old["expires_at"] - (time.time() + 3600)) < 30 and new["expires_at"] is None
    raw = raw_record(nats_url, "gamma")
    assert hash_secret(first).encode() in raw and hash_secret(second).encode() in raw
    assert first.encode() not in raw and second.encode() not in raw

    doc = keys("keys", "rotate", "gamma", "--overlap", "10m", "--json").json()
    soon = time.time() + 600
    assert [s["expires_at"] is not None for s in doc["secrets"]] == [True, True, False]
    assert all(abs(s["expires_at"] - soon) < 30 for s in doc["secrets"][:2])
    doc = keys("keys", "rotate", "gamma", "--overlap", "1h", "--json").json()
    exp = [s["expires_at"] for s in doc["secrets"]]
    assert all(abs(e - soon) < 30 for e in exp[:2])  # an earlier expiry is never extended
    assert abs(exp[2] - (time.time() + 3600)) < 30 and exp[3] is None

    r = keys("keys", "rotate", "gamma", "--overlap", "0s")
    assert r.code == 0 and "stop working now" in r.out
    (last,) = SECRET.findall(r.out)
    record = RECORD_DECODER.decode(raw_record(nats_url, "gamma"))
    assert [s.sha256 for s in record.secrets] == [hash_secret(last)]  # the old ones are gone


def test_revoke_is_kept_and_idempotent(keys: Any) -> None:
    keys("keys", "create", "epsilon", "--models", "*")
    r = keys("keys", "revoke", "epsilon")
    assert r.code == 0 and "Revoked key epsilon" in r.out
    doc = keys("keys", "show", "epsilon", "--json").json()
    assert doc["state"] == "revoked" and doc["revoked_at"] is not None
    again = keys("keys", "revoke", "epsilon")
    assert again.code == 0 and "already revoked" in again.out
    assert keys("keys", "show", "epsilon", "--json").json()["revoked_at"] == doc["revoked_at"]
    r = keys("keys", "rotate", "epsilon")
    assert r.code == 1 and "revoked" in r.err and not SECRET.search(r.out)
    listed = keys("keys", "list").out
    assert re.search(r"epsilon .* revoked", listed)


def test_taken_names_unknown_keys_and_bad_values(nats_url: str, keys: Any) -> None:
    keys("keys", "create", "zeta", "--models", "a")
    before = raw_record(nats_url, "zeta")
    r = keys("keys", "create", "zeta", "--models", "*")
    assert r.code == 1 and "'zeta' exists" in r.err and not SECRET.search(r.out)
    assert raw_record(nats_url, "zeta") == before
    for action in ("show", "update", "revoke", "rotate"):
        r = keys("keys", action, "no-such-key")
        assert r.code == 1 and "no key named 'no-such-key'" in r.err, (action, r)
    assert keys("usage", "no-such-key").code == 1
    for bad in (("bad name!",), ("ok", "--rpm", "0"), ("ok", "--expires", "soon")):
        r = keys("keys", "create", *bad)
        assert r.code == 2, bad  # a usage error, before any connection


def test_unreachable_broker_is_one_line_without_the_password(tmp_path: Any) -> None:
    where = f"127.0.0.1:{free_port()}"
    p = run_process("keys", "list", "--nats", f"nats://admin:s3cret-pw@{where}")
    assert p.returncode == 1
    assert p.stderr.strip().splitlines() == [
        f"llmfleet keys list: cannot reach the NATS server at nats://{where}"
    ]
    assert "s3cret" not in p.stdout + p.stderr
    p = run_process("usage", "--nats", f"nats://{where}", "--creds", str(tmp_path / "none.creds"))
    assert p.returncode == 1 and "no such file" in p.stderr and "Traceback" not in p.stderr


AUTH = """
authorization {
  users: [
    { user: admin, password: right }
    { user: viewer, password: pw, permissions: {
        publish: { allow: ["llmfleet.discover"] }, subscribe: { allow: ["_LLMFLEET.admin.>"] } } }
  ]
}
"""


def test_refused_login_and_missing_permission_end_at_once(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with EmbeddedNats(extra=AUTH) as server:
        port = server.port
        wrong = f"nats://admin:wrong@127.0.0.1:{port}"
        t0 = time.monotonic()
        r = run(capsys, "keys", "list", "--nats", wrong)
        assert r.code == 1 and "refused the credentials" in r.err and "wrong" not in r.err
        assert time.monotonic() - t0 < 2.5  # not the connect timeout
        t0 = time.monotonic()
        r = run(capsys, "keys", "list", "--nats", f"nats://viewer:pw@127.0.0.1:{port}")
        assert r.code == 1 and "permission denied" in r.err, r
        assert "$js.api" in r.err.lower()  # says which right is missing
        assert time.monotonic() - t0 < 2.5  # not the JetStream API timeout
        r = run(capsys, "keys", "list", "--json", "--nats", f"nats://admin:right@127.0.0.1:{port}")
        assert r.json() == {"keys": []}


async def _seed_ledgers(url: str, entries: dict[str, msgspec.Struct]) -> None:
    nc = await nats.connect(url)
    try:
        kv = await open_bucket(nc.jetstream(), quota_config(), create=True)
        for key, value in entries.items():
            await kv.put(key, L.ENCODER.encode(value))
    finally:
        await nc.close()


def test_usage_reads_the_seeded_ledgers(nats_url: str, keys: Any) -> None:
    keys("keys", "create", "spender", "--models", "*", "--budget-tokens", "1000",
         "--budget-cost", "2", "--budget-period", "day")  # fmt: skip
    keys("keys", "create", "idle", "--models", "*")
    doc = keys("usage", "spender", "--json").json()  # no quota bucket yet: zeros
    assert [u["requests"] for u in doc["keys"][0]["usage"]] == [0, 0, 0]
    now = time.time()
    day, month = period_id("day", now), period_id("month", now)
    seed = {
        L.usage_key("spender", day): L.Usage(3, 30, 60, 1_500_000, 1),
        L.usage_key("spender", month): L.Usage(10, 100, 200, 4_000_000),
        L.usage_key("spender", "total"): L.Usage(20, 200, 400, 9_000_000),
        L.budget_key("spender", "btok", day): L.Budget(400),
        L.budget_key("spender", "bcost", day): L.Budget(500_000),
        L.budget_key("spender", "btok", month): L.Budget(999),  # not its budget period
    }
    asyncio.run(_seed_ledgers(nats_url, seed))

    doc = keys("usage", "spender", "--json").json()
    assert set(doc) == {"at", "keys"}
    (k,) = doc["keys"]
    assert k["name"] == "spender" and k["state"] == "active"
    assert k["usage"] == [
        {"period": "day", "period_id": day, "requests": 3, "prompt_tokens": 30,
         "completion_tokens": 60, "cost": 1.5, "refused": 1},
        {"period": "month", "period_id": month, "requests": 10, "prompt_tokens": 100,
         "completion_tokens": 200, "cost": 4.0, "refused": 0},
        {"period": "total", "period_id": "total", "requests": 20, "prompt_tokens": 200,
         "completion_tokens": 400, "cost": 9.0, "refused": 0},
    ]  # fmt: skip
    ends = period_end("day", now)
    assert k["budgets"] == [
        {"kind": "tokens", "period": "day", "period_id": day, "limit": 1000, "used": 400.0,
         "remaining": 600.0, "ends_at": ends},
        {"kind": "cost", "period": "day", "period_id": day, "limit": 2.0, "used": 0.5,
         "remaining": 1.5, "ends_at": ends},
    ]  # fmt: skip

    every = keys("usage", "--json").json()["keys"]
    idle = next(x for x in every if x["name"] == "idle")
    assert [u["requests"] for u in idle["usage"]] == [0, 0, 0] and idle["budgets"] == []
    table = keys("usage").out
    assert re.search(r"spender .* day \(" + day + r"\) .* 3 .* 30 .* 60 .* 1\.5000 .* 1", table)
    assert re.search(r"spender .* tokens .* day .* 400 .* 1,000 .* 600", table)


def test_prices_set_list_delete(nats_url: str, keys: Any) -> None:
    assert keys("prices", "set", "qwen*", "--input", "0.5", "--output", "1.5").code == 0
    r = keys("prices", "set", "gemma-3", "--input", "0", "--output", "0.1", "--json")
    assert r.json() == {
        "models": {"qwen*": {"input": 0.5, "output": 1.5}, "gemma-3": {"input": 0.0, "output": 0.1}}
    }
    assert re.search(r"qwen\* .* 0\.5 .* 1\.5", keys("prices", "list").out)
    assert keys("prices", "delete", "qwen*").code == 0
    assert keys("prices", "list", "--json").json() == {
        "models": {"gemma-3": {"input": 0.0, "output": 0.1}}
    }
    stored = PRICES_DECODER.decode(asyncio.run(_raw(nats_url, PRICES_KEY)))
    assert set(stored.models) == {"gemma-3"}
    r = keys("prices", "delete", "qwen*")
    assert r.code == 1 and "no price" in r.err
    assert keys("prices", "set", "m", "--input", "-1", "--output", "1").code == 2
