"""Who may touch the control layer's broker state, with the shipped accounts.conf.

The state (control/store.py, common/audit.py, gateway/responses_store.py): KV bucket
`LLMFLEET_KEYS` (virtual keys and prices), KV bucket `LLMFLEET_QUOTA` (fleet-wide ledgers
and usage), stream `LLMFLEET_AUDIT` (`llmfleet.audit.gw.<gateway>`,
`llmfleet.audit.wk.<worker>`) and KV bucket `LLMFLEET_RESPONSES` (stored /v1/responses:
prompts and answers, the gateways' alone).

One hub node on the deployed configs (tests/security/stack.py: settings.conf and
accounts.conf byte for byte) and a GPU host's leaf server (leaf.conf). Each role connects
with plain nats-py, with its own inbox prefix, and does what the llmfleet code does
(kv.create/update/put/get/keys/history/watch, JetStream publish with its PubAck): what the
role needs works without a single permission violation, and what it must not do is
refused by the server (a violation naming the subject) and leaves nothing behind (read back
as admin). A static matrix over accounts.conf's allow lists backs the live checks: no
broad pattern (`>`, `$JS.API.>`, `_INBOX.>`) hands these subjects to another role.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import nats
import nats.errors
import nats.js.api as api
import nats.js.errors
import pytest

from common import names
from common.audit import AUDIT_STREAM, AuditSettings, ensure_audit_stream, stream_config
from control.keyring import Keyring
from control.keys import ENCODER, KeyRecord, Secret, hash_secret, new_secret
from control.store import (
    KEYS_BUCKET,
    QUOTA_BUCKET,
    StoreUnavailable,
    keys_config,
    open_bucket,
    quota_config,
)
from gateway.responses_store import (
    RESPONSES_BUCKET,
    RESPONSES_STREAM,
    ResponseStore,
    StoredResponse,
)
from tests.deploy.natsconf import NATS_DIR, Leaf, start_with_retries
from tests.security.stack import Actor, OneNodeHub, actor, start_hub

KEYS_STREAM = f"KV_{KEYS_BUCKET}"
QUOTA_STREAM = f"KV_{QUOTA_BUCKET}"
PRODUCERS = ("batch-etl", "batch-evals")
SHORT = 0.5  # JetStream timeout of calls that must be refused (no answer ever comes)


# ---- fixtures ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OneNodeHub]:
    h = start_hub(tmp_path_factory.mktemp("ctlhub"))
    try:
        yield h
    finally:
        h.stop()


@pytest.fixture(scope="module")
def leaf(hub: OneNodeHub, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Leaf]:
    lf = start_with_retries(lambda _: Leaf(tmp_path_factory.mktemp("ctlleaf"), [hub.leaf_port]))
    assert isinstance(lf, Leaf)
    try:
        deadline = time.monotonic() + 15
        while hub.monitor("/leafz").get("leafnodes", 0) < 1:
            assert time.monotonic() < deadline, "the leaf never connected:\n" + lf.log()
            time.sleep(0.05)
        yield lf
    finally:
        lf.stop()


@pytest.fixture(scope="module")
async def state(hub: OneNodeHub) -> AsyncIterator[None]:
    """The four resources, made the way the code makes them: the keys bucket by admin
    (`llmfleet keys create`), the quota bucket, the audit stream and the responses bucket
    (with one stored response of alice's) by a gateway."""
    async with actor(hub, "admin", "setup") as a, actor(hub, "gateway", "setup") as g:
        await a.js.create_key_value(keys_config())
        await open_bucket(g.js, quota_config(), create=True)
        await ensure_audit_stream(g.js, AuditSettings())
        store = await ResponseStore.open(g.js, ttl_s=3600, max_payload=g.nc.max_payload)
        await store.put(_stored("resp_seed", "alice"))
        assert hub.violations(a.name, g.name) == []
    yield


# ---- helpers ----------------------------------------------------------------------------


def _stored(rid: str, owner: str, text: str = "hi", previous: str | None = None) -> StoredResponse:
    return StoredResponse(
        id=rid,
        owner=owner,
        created_at=int(time.time()),
        input=[
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}
        ],
        output=[],
        response={"id": rid, "object": "response"},
        previous_response_id=previous,
    )


async def _admin_kv(hub: OneNodeHub, bucket: str) -> tuple[Actor, Any]:
    a = await Actor(hub, "admin", f"check-admin-{bucket}").connect()
    return a, await a.js.key_value(bucket)


async def _absent(hub: OneNodeHub, bucket: str, *keys: str) -> None:
    """As admin: none of `keys` has an entry in `bucket`."""
    a, kv = await _admin_kv(hub, bucket)
    try:
        for key in keys:
            with pytest.raises(nats.js.errors.KeyNotFoundError):
                await kv.get(key)
    finally:
        await a.close()


async def _audit_subjects(hub: OneNodeHub) -> dict[str, int]:
    """As admin: the audit stream's message count per subject."""
    async with actor(hub, "admin", "audit-count") as a:
        info = await a.js.stream_info(AUDIT_STREAM, subjects_filter=">")
        assert a.errors == []
        return dict(info.state.subjects or {})


async def _refused(coro: Any) -> None:
    """A JetStream call the server refuses: a client's denied publish is dropped (no answer
    comes); behind the leaf server, the hub never offers the interest (no responders)."""
    refusals = (nats.errors.TimeoutError, nats.errors.NoRespondersError, TimeoutError)
    no_stream = (nats.js.errors.NoStreamResponseError, nats.js.errors.ServiceUnavailableError)
    with pytest.raises((*refusals, *no_stream)):
        await coro


async def _all_refused(*coros: Any) -> None:
    await asyncio.gather(*(_refused(c) for c in coros))


def _leaf_violations(hub: OneNodeHub) -> list[str]:
    """The hub's violations on leaf connections (the leaf's user, not a client's name)."""
    return [line for line in hub.log().splitlines() if "Violation - " in line and "lid:" in line]


# ---- admin ------------------------------------------------------------------------------


async def test_gateway_may_not_create_the_keys_bucket(hub: OneNodeHub) -> None:
    """Only admin creates LLMFLEET_KEYS: a stream config of the gateway's choosing (a
    subject transform, sources) would let it write keys. The gateway's read path with
    create=False just finds no bucket, without a violation."""
    async with actor(hub, "gateway", "mkkeys") as g:
        js = g.nc.jetstream(timeout=SHORT)
        with pytest.raises(StoreUnavailable):
            await open_bucket(js, keys_config(), create=False)
        assert hub.violations(g.name) == []
        await _refused(js.create_key_value(keys_config()))
        await g.expect_denied(f"$JS.API.STREAM.CREATE.{KEYS_STREAM}")
    async with actor(hub, "admin", "nokeys") as a:
        with pytest.raises(nats.js.errors.NotFoundError):
            await a.js.stream_info(KEYS_STREAM)


async def test_admin_creates_writes_and_lists_keys(hub: OneNodeHub, state: None) -> None:
    async with actor(hub, "admin", "keys") as a:
        kv = await a.js.key_value(KEYS_BUCKET)
        rev = await kv.create("k.alice", b'{"v":1}')
        with pytest.raises(nats.js.errors.KeyWrongLastSequenceError):
            await kv.create("k.alice", b'{"v":"again"}')  # compare-and-set holds
        rev = await kv.update("k.alice", b'{"v":2}', last=rev)
        with pytest.raises(nats.js.errors.KeyWrongLastSequenceError):
            await kv.update("k.alice", b'{"v":"stale"}', last=rev - 1)
        await kv.put("cfg.prices", b"{}")
        await kv.put("k.bob", b'{"v":1}')
        await kv.delete("k.bob")
        await kv.put("k.carol", b'{"v":1}')
        await kv.purge("k.carol")
        await kv.create("k.bob", b'{"v":"reborn"}')  # create over a delete marker
        assert (await kv.get("k.alice")).value == b'{"v":2}'
        assert sorted(await kv.keys()) == ["cfg.prices", "k.alice", "k.bob"]
        assert [e.value for e in await kv.history("k.alice")] == [b'{"v":1}', b'{"v":2}']
        w = await kv.watchall()
        seen = {}
        while (e := await w.updates(timeout=2)) is not None:
            seen[e.key] = e.value
        await w.stop()
        assert seen["k.bob"] == b'{"v":"reborn"}'
        assert a.errors == []
        assert hub.violations(a.name) == []


async def test_admin_reads_quota_but_cannot_write_it(hub: OneNodeHub, state: None) -> None:
    async with actor(hub, "gateway", "q-seed") as g:
        gkv = await g.js.key_value(QUOTA_BUCKET)
        await gkv.put("alice.rpm", b"7")
    async with actor(hub, "admin", "quota") as a:
        kv = await a.js.key_value(QUOTA_BUCKET)
        assert (await kv.get("alice.rpm")).value == b"7"
        assert "alice.rpm" in await kv.keys()
        w = await kv.watch("alice.*")
        first = await w.updates(timeout=2)
        await w.stop()
        assert first is not None and first.value == b"7"
        assert hub.violations(a.name) == []
        weak = await a.nc.jetstream(timeout=SHORT).key_value(QUOTA_BUCKET)
        await _all_refused(
            weak.put("alice.rpm", b"0"),
            weak.create("mallory.rpm", b"0"),
        )
        await a.expect_denied("$KV.LLMFLEET_QUOTA.alice.rpm", "$KV.LLMFLEET_QUOTA.mallory.rpm")
        assert (await kv.get("alice.rpm")).value == b"7"
    await _absent(hub, QUOTA_BUCKET, "mallory.rpm")


async def test_admin_reads_the_audit_stream(hub: OneNodeHub, state: None) -> None:
    async with actor(hub, "gateway", "aud-seed") as g:
        for i in range(3):
            ack = await g.js.publish(f"{names.SUBJECT_ROOT}.audit.gw.seed", f"e{i}".encode())
            assert ack.stream == AUDIT_STREAM
    async with actor(hub, "admin", "audit") as a:
        info = await a.js.stream_info(AUDIT_STREAM)
        last = info.state.last_seq
        assert (await a.js.get_msg(AUDIT_STREAM, seq=last)).data == b"e2"
        got = await a.js.get_last_msg(AUDIT_STREAM, "llmfleet.audit.gw.seed")
        assert got.data == b"e2"
        # --follow: an ordered push consumer into its inbox, from the last 3 events
        sub = await a.js.subscribe(
            "llmfleet.audit.>",
            stream=AUDIT_STREAM,
            ordered_consumer=True,
            deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE,
            config=api.ConsumerConfig(opt_start_seq=last - 2),
        )
        assert [(await sub.next_msg(timeout=2)).data for _ in range(3)] == [b"e0", b"e1", b"e2"]
        await sub.unsubscribe()
        # or an ephemeral pull consumer, acked, then deleted
        pull = await a.js.pull_subscribe("llmfleet.audit.gw.>", stream=AUDIT_STREAM)
        msgs = await pull.fetch(3, timeout=2)
        assert [m.data for m in msgs] == [b"e0", b"e1", b"e2"]
        for m in msgs:
            await m.ack()
        consumer = (await pull.consumer_info()).name
        assert await a.js.delete_consumer(AUDIT_STREAM, consumer)
        assert a.errors == []
        assert hub.violations(a.name) == []
        # It reads; it never writes, purges or deletes.
        before = await _audit_subjects(hub)
        await a.nc.publish("llmfleet.audit.gw.forged", b"x")
        await a.nc.publish(f"$JS.API.STREAM.PURGE.{AUDIT_STREAM}", b"")
        await a.nc.publish(f"$JS.API.STREAM.MSG.DELETE.{AUDIT_STREAM}", b'{"seq":1}')
        await a.nc.flush()
        await a.expect_denied(
            "llmfleet.audit.gw.forged",
            f"$JS.API.STREAM.PURGE.{AUDIT_STREAM}",
            f"$JS.API.STREAM.MSG.DELETE.{AUDIT_STREAM}",
        )
    assert await _audit_subjects(hub) == before


# ---- gateway ----------------------------------------------------------------------------


async def test_gateway_reads_and_watches_keys_but_cannot_write_them(
    hub: OneNodeHub, state: None
) -> None:
    a, admin_kv = await _admin_kv(hub, KEYS_BUCKET)
    try:
        await admin_kv.put("k.dave", b'{"v":1}')
        async with actor(hub, "gateway", "keys") as g:
            kv = await g.js.key_value(KEYS_BUCKET)
            assert (await kv.get("k.dave")).value == b'{"v":1}'
            w = await kv.watchall()
            initial = {}
            while (e := await w.updates(timeout=2)) is not None:
                initial[e.key] = e.value
            assert initial["k.dave"] == b'{"v":1}'
            # A revocation made by admin reaches the running watch (the 2 s promise).
            await admin_kv.delete("k.dave")
            e = await w.updates(timeout=2)
            assert e is not None and e.key == "k.dave" and e.operation == "DEL"
            await w.stop()
            assert g.errors == []
            assert hub.violations(g.name) == []

            # Writes of any kind are refused and leave nothing behind.
            weak = await g.nc.jetstream(timeout=SHORT).key_value(KEYS_BUCKET)
            await _all_refused(
                weak.put("k.mallory", b'{"admin":true}'),
                weak.create("k.eve", b'{"admin":true}'),
                weak.put("k.dave", b'{"revived":true}'),
                weak.purge("k.alice"),
                weak.put("cfg.prices", b'{"free":true}'),
            )
            for verb in ("UPDATE", "PURGE", "DELETE"):
                await g.nc.publish(f"$JS.API.STREAM.{verb}.{KEYS_STREAM}", b"{}")
            await g.nc.publish(f"$JS.API.STREAM.MSG.DELETE.{KEYS_STREAM}", b'{"seq":1}')
            await g.nc.flush()
            await g.expect_denied(
                "$KV.LLMFLEET_KEYS.k.mallory",
                "$KV.LLMFLEET_KEYS.k.eve",
                "$KV.LLMFLEET_KEYS.k.dave",
                "$KV.LLMFLEET_KEYS.k.alice",
                "$KV.LLMFLEET_KEYS.cfg.prices",
                f"$JS.API.STREAM.UPDATE.{KEYS_STREAM}",
                f"$JS.API.STREAM.PURGE.{KEYS_STREAM}",
                f"$JS.API.STREAM.DELETE.{KEYS_STREAM}",
                f"$JS.API.STREAM.MSG.DELETE.{KEYS_STREAM}",
            )
        await _absent(hub, KEYS_BUCKET, "k.mallory", "k.eve", "k.dave")
        assert (await admin_kv.get("k.alice")).value == b'{"v":2}'
        assert (await admin_kv.get("cfg.prices")).value == b"{}"
    finally:
        await a.close()


async def test_gateway_reads_keys_by_direct_get_too(hub: OneNodeHub, state: None) -> None:
    """A bucket made with allow_direct (the nats CLI's `kv add`, other clients) is read with
    $JS.API.DIRECT.GET.KV_LLMFLEET_KEYS.$KV.LLMFLEET_KEYS.<key>: both roles may."""
    async with actor(hub, "admin", "direct") as a, actor(hub, "gateway", "direct") as g:
        info = await a.js.stream_info(KEYS_STREAM)
        info.config.allow_direct = True
        await a.js.update_stream(info.config)
        try:
            for who in (a, g):
                kv = await who.js.key_value(KEYS_BUCKET)
                assert kv._direct  # the path under test
                assert (await kv.get("k.alice")).value == b'{"v":2}'
                rev = (await kv.get("k.alice")).revision
                assert (await kv.get("k.alice", revision=rev)).value == b'{"v":2}'
        finally:
            info.config.allow_direct = False
            await a.js.update_stream(info.config)
        assert hub.violations(a.name, g.name) == []


async def test_gateway_keys_watch_survives_flow_control(hub: OneNodeHub, state: None) -> None:
    """A watch that is sent more than the consumer's window gets flow-control requests
    ($JS.FC.KV_LLMFLEET_KEYS.<consumer>.<id>); without the right to answer them it stalls."""
    a, admin_kv = await _admin_kv(hub, KEYS_BUCKET)
    big = b"x" * 60_000
    try:
        await asyncio.gather(*(admin_kv.put(f"k.fc{i}", big) for i in range(80)))
        async with actor(hub, "gateway", "fc") as g:
            w = await (await g.js.key_value(KEYS_BUCKET)).watchall()
            seen = 0
            while (e := await w.updates(timeout=3)) is not None:
                seen += e.key.startswith("k.fc")
                await asyncio.sleep(0.001)  # a reader slower than the server
            await w.stop()
            assert seen == 80
            assert g.errors == []
            assert hub.violations(g.name) == []
    finally:
        await asyncio.gather(*(admin_kv.purge(f"k.fc{i}") for i in range(80)))
        await a.close()


async def test_gateway_reads_and_writes_quota_with_compare_and_set(
    hub: OneNodeHub, state: None
) -> None:
    async with actor(hub, "gateway", "quota") as g:
        kv = await open_bucket(g.js, quota_config(), create=True)  # exists: opened
        rev = await kv.create("erin.tpm.w", b"1")
        with pytest.raises(nats.js.errors.KeyWrongLastSequenceError):
            await kv.create("erin.tpm.w", b"1")
        rev = await kv.update("erin.tpm.w", b"2", last=rev)
        with pytest.raises(nats.js.errors.KeyWrongLastSequenceError):
            await kv.update("erin.tpm.w", b"lost", last=rev - 1)
        assert (await kv.get("erin.tpm.w")).value == b"2"
        await kv.delete("erin.tpm.w")
        await kv.create("erin.tpm.w", b"0")
        assert (await kv.get("erin.tpm.w")).value == b"0"
        assert g.errors == []
        assert hub.violations(g.name) == []


async def test_gateway_keeps_stored_responses(hub: OneNodeHub, state: None) -> None:
    """Everything gateway/responses_store.py does, with the gateway's rights alone: open
    the existing bucket (and bring its TTL and size cap up to date), put an entry that fits
    one value and one split into parts (over max_payload), read them back (a fresh store:
    no cache), walk a chain, delete."""
    async with actor(hub, "gateway", "responses") as g:
        store = await ResponseStore.open(
            g.js, ttl_s=7200, max_bytes=256 * 1024 * 1024, max_payload=g.nc.max_payload
        )
        info = await g.js.stream_info(RESPONSES_STREAM)
        assert (info.config.max_age, info.config.max_bytes) == (7200, 256 * 1024 * 1024)
        big = "x" * (g.nc.max_payload * 2 + 10)
        await store.put(_stored("resp_a1", "alice"))
        await store.put(_stored("resp_a2", "alice", big, previous="resp_a1"))
        fresh = ResponseStore(store.kv, part_bytes=store.part_bytes, ttl_s=7200)
        got = await fresh.get("alice", "resp_a2")
        assert got is not None and got.input[0]["content"][0]["text"] == big
        assert await fresh.get("bob", "resp_a2") is None
        assert [e.id for e in await fresh.chain("alice", "resp_a2")] == ["resp_a1", "resp_a2"]
        assert await fresh.delete("alice", "resp_a2")
        assert await fresh.get("alice", "resp_a2") is None
        assert g.errors == []
        assert hub.violations(g.name) == []


@pytest.mark.parametrize("role", ("admin", "worker", *PRODUCERS))
async def test_only_gateways_touch_stored_responses(
    hub: OneNodeHub, state: None, role: str
) -> None:
    """Stored responses hold prompts and answers: no other role reads, writes, consumes,
    purges or reconfigures them (admin sees the stream's info, as of every stream)."""
    r = RESPONSES_STREAM
    async with actor(hub, role, "responses") as a:
        js = a.nc.jetstream(timeout=SHORT)
        await _refused(js.publish(f"$KV.{RESPONSES_BUCKET}.resp_seed", b"{}"))
        api_subjects = [
            f"$JS.API.STREAM.MSG.GET.{r}",
            f"$JS.API.DIRECT.GET.{r}",
            f"$JS.API.CONSUMER.CREATE.{r}",
            f"$JS.API.STREAM.CREATE.{r}",
            f"$JS.API.STREAM.UPDATE.{r}",
            f"$JS.API.STREAM.PURGE.{r}",
            f"$JS.API.STREAM.DELETE.{r}",
        ]
        for subject in api_subjects:
            await a.nc.publish(subject, b"{}", reply=a.nc.new_inbox())
        await a.nc.subscribe(f"$KV.{RESPONSES_BUCKET}.>")
        await a.nc.flush()
        await a.expect_denied(
            f"$KV.{RESPONSES_BUCKET}.resp_seed", *api_subjects, f"$KV.{RESPONSES_BUCKET}.>"
        )
    async with actor(hub, "gateway", "responses-check") as g:
        store = await ResponseStore.open(g.js, ttl_s=3600, create=False)
        seed = await store.get("alice", "resp_seed")
        assert seed is not None and seed.input[0]["content"][0]["text"] == "hi"


async def test_gateway_publishes_only_gateway_audit_events(hub: OneNodeHub, state: None) -> None:
    async with actor(hub, "gateway", "audit") as g:
        # Create, or bring the retention up to date (--audit-retention): its own rights.
        await ensure_audit_stream(g.js, AuditSettings(retention_days=7))
        await ensure_audit_stream(g.js, AuditSettings())
        ack = await g.js.publish(
            "llmfleet.audit.gw.gw1", b"ev1", headers={"Nats-Msg-Id": "req-ev1"}
        )
        assert ack.stream == AUDIT_STREAM and not ack.duplicate
        future = await g.js.publish_async("llmfleet.audit.gw.gw1", b"ev2")
        assert (await asyncio.wait_for(future, 2)).stream == AUDIT_STREAM
        assert g.errors == []
        assert hub.violations(g.name) == []
        before = await _audit_subjects(hub)
        assert before["llmfleet.audit.gw.gw1"] == 2
        # Not a worker's events; and it may not read, purge or consume the trail.
        await _refused(g.nc.jetstream(timeout=SHORT).publish("llmfleet.audit.wk.w1", b"forged"))
        for subject in (
            f"$JS.API.STREAM.PURGE.{AUDIT_STREAM}",
            f"$JS.API.STREAM.MSG.GET.{AUDIT_STREAM}",
            f"$JS.API.CONSUMER.CREATE.{AUDIT_STREAM}",
        ):
            await g.nc.publish(subject, b"{}")
        await g.nc.subscribe("llmfleet.audit.>")
        await g.nc.flush()
        await g.expect_denied(
            "llmfleet.audit.wk.w1",
            f"$JS.API.STREAM.PURGE.{AUDIT_STREAM}",
            f"$JS.API.STREAM.MSG.GET.{AUDIT_STREAM}",
            f"$JS.API.CONSUMER.CREATE.{AUDIT_STREAM}",
            "llmfleet.audit.>",
        )
    assert await _audit_subjects(hub) == before


# ---- workers ----------------------------------------------------------------------------


async def test_worker_publishes_only_worker_audit_events(hub: OneNodeHub, state: None) -> None:
    async with actor(hub, "worker", "w1") as w:
        ack = await w.js.publish("llmfleet.audit.wk.w1", b"nats-direct")
        assert ack.stream == AUDIT_STREAM
        assert hub.violations(w.name) == []
        before = await _audit_subjects(hub)
        js = w.nc.jetstream(timeout=SHORT)
        await _all_refused(
            js.publish("llmfleet.audit.gw.gw1", b"forged"),
            js.key_value(KEYS_BUCKET),
            js.publish("$KV.LLMFLEET_QUOTA.alice.rpm", b"0"),
        )
        await w.expect_denied(
            "llmfleet.audit.gw.gw1",
            f"$JS.API.STREAM.INFO.{KEYS_STREAM}",
            "$KV.LLMFLEET_QUOTA.alice.rpm",
        )
    assert await _audit_subjects(hub) == before
    a, kv = await _admin_kv(hub, QUOTA_BUCKET)
    try:
        assert (await kv.get("alice.rpm")).value == b"7"
    finally:
        await a.close()


async def test_scoped_worker_example_has_the_worker_audit_right(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """accounts.conf's commented WORKER_SIM_PERMISSIONS, switched on as it says."""
    text = (NATS_DIR / "accounts.conf").read_text()
    text, n = re.subn(r"^#> ?", "", text, flags=re.M)
    assert n > 10, "accounts.conf has no `#> ` example any more: update the test"
    worker_user = (
        '      { user: "worker", password: $NATS_WORKER_PASSWORD, '
        "permissions: $WORKER_PERMISSIONS }\n"
    )
    assert worker_user in text
    text = text.replace(
        worker_user,
        worker_user + '      { user: "worker-sim", password: "ws-pw", '
        "permissions: $WORKER_SIM_PERMISSIONS }\n",
    )
    hub = start_hub(tmp_path_factory.mktemp("ctlscoped"), text)
    hub.passwords["worker-sim"] = "ws-pw"
    try:
        async with actor(hub, "gateway", "mkaudit") as g:
            await ensure_audit_stream(g.js, AuditSettings())
        async with actor(hub, "worker-sim", "ws") as w:
            assert (await w.js.publish("llmfleet.audit.wk.ws", b"e")).stream == AUDIT_STREAM
            await _refused(w.nc.jetstream(timeout=SHORT).publish("llmfleet.audit.gw.x", b"f"))
            await w.expect_denied("llmfleet.audit.gw.x")
        assert await _audit_subjects(hub) == {"llmfleet.audit.wk.ws": 1}
    finally:
        hub.stop()


async def test_leaf_workers_publish_only_worker_audit_events(
    hub: OneNodeHub, leaf: Leaf, state: None
) -> None:
    """A worker on a GPU host behind the leaf server audits as workers do (the plain
    subject crosses the leaf connection unmapped, the PubAck comes back into its inbox);
    nothing else of the control layer crosses."""
    nc = await nats.connect(
        leaf.url, name="leaf-audit", inbox_prefix=names.worker_inbox_prefix("leafw")
    )
    try:
        js = nc.jetstream(timeout=SHORT)
        deadline = time.monotonic() + 5
        while True:  # the hub's interest reaches a new leaf connection in a moment
            try:
                ack = await js.publish("llmfleet.audit.wk.leafw", b"via-leaf")
                break
            except nats.js.errors.NoStreamResponseError:
                assert time.monotonic() < deadline, "no audit stream behind the leaf"
                await asyncio.sleep(0.1)
        assert ack.stream == AUDIT_STREAM
        assert _leaf_violations(hub) == []
        before = await _audit_subjects(hub)
        await _all_refused(
            js.publish("llmfleet.audit.gw.gw1", b"forged"),
            js.publish("$KV.LLMFLEET_KEYS.k.mallory", b"{}"),
            js.publish("$KV.LLMFLEET_QUOTA.alice.rpm", b"0"),
            js.key_value(KEYS_BUCKET),
            js.key_value(QUOTA_BUCKET),
        )
    finally:
        await nc.close()
    assert await _audit_subjects(hub) == before
    await _absent(hub, KEYS_BUCKET, "k.mallory")


# ---- batch producers --------------------------------------------------------------------


@pytest.mark.parametrize("producer", PRODUCERS)
async def test_batch_producers_have_no_control_rights(
    hub: OneNodeHub, state: None, producer: str
) -> None:
    before = await _audit_subjects(hub)
    async with actor(hub, producer, "ctl") as p:
        js = p.nc.jetstream(timeout=SHORT)
        await _all_refused(
            js.publish("llmfleet.audit.gw.gw1", b"forged"),
            js.publish("llmfleet.audit.wk.w1", b"forged"),
            js.publish(f"llmfleet.audit.wk.{producer}", b"forged"),
            js.publish("$KV.LLMFLEET_KEYS.k.mallory", b'{"admin":true}'),
            js.publish("$KV.LLMFLEET_QUOTA.alice.rpm", b"0"),
            js.key_value(KEYS_BUCKET),
            js.key_value(QUOTA_BUCKET),
        )
        api_subjects = [
            f"$JS.API.{verb}.{stream}"
            for stream in (KEYS_STREAM, QUOTA_STREAM, AUDIT_STREAM)
            for verb in ("STREAM.CREATE", "STREAM.MSG.GET", "DIRECT.GET", "CONSUMER.CREATE")
        ]
        for subject in api_subjects:
            await p.nc.publish(subject, b"{}", reply=p.nc.new_inbox())
        await p.nc.publish(
            f"$JS.API.DIRECT.GET.{KEYS_STREAM}.$KV.LLMFLEET_KEYS.k.alice", b"", reply="x"
        )
        for subject in ("$KV.LLMFLEET_KEYS.>", "$KV.LLMFLEET_QUOTA.>", "llmfleet.audit.>"):
            await p.nc.subscribe(subject)
        await p.nc.flush()
        await p.expect_denied(
            "llmfleet.audit.gw.gw1",
            "llmfleet.audit.wk.w1",
            f"llmfleet.audit.wk.{producer}",
            "$KV.LLMFLEET_KEYS.k.mallory",
            "$KV.LLMFLEET_QUOTA.alice.rpm",
            f"$JS.API.STREAM.INFO.{KEYS_STREAM}",
            f"$JS.API.STREAM.INFO.{QUOTA_STREAM}",
            *api_subjects,
            f"$JS.API.DIRECT.GET.{KEYS_STREAM}.$KV.LLMFLEET_KEYS.k.alice",
            "$KV.LLMFLEET_KEYS.>",
            "$KV.LLMFLEET_QUOTA.>",
            "llmfleet.audit.>",
        )
    assert await _audit_subjects(hub) == before
    await _absent(hub, KEYS_BUCKET, "k.mallory")
    a, kv = await _admin_kv(hub, QUOTA_BUCKET)
    try:
        assert (await kv.get("alice.rpm")).value == b"7"
    finally:
        await a.close()


# ---- the whole matrix, from accounts.conf's text -----------------------------------------

_BLOCK = re.compile(r"^([A-Z_]+_PERMISSIONS) = \{\n(.*?)^\}\n", re.S | re.M)
_SECTION = re.compile(r"(publish|subscribe): \{\s*allow: \[(.*?)\]\s*\}", re.S)
_USER = re.compile(r'\{ user: "([^"]+)", password: [^,]+, permissions: \$([A-Z_]+) \}')


def role_rights() -> dict[str, dict[str, list[str]]]:
    """user -> {"publish": [...], "subscribe": [...]}: accounts.conf's allow lists (the
    commented scoped-worker example as `worker-sim`). Fails on anything this reading does
    not model (a deny list, allow_responses), so the matrix below cannot go stale."""
    text = (NATS_DIR / "accounts.conf").read_text()
    text = re.sub(r"^#> ?", "", text, flags=re.M)
    text = "\n".join(line.split("#", 1)[0].rstrip() for line in text.splitlines()) + "\n"
    blocks: dict[str, dict[str, list[str]]] = {}
    for name, body in _BLOCK.findall(text):
        assert "deny" not in body and "allow_responses" not in body, name
        sections = {kind: re.findall(r'"([^"]+)"', allow) for kind, allow in _SECTION.findall(body)}
        assert set(sections) == {"publish", "subscribe"}, name
        blocks[name] = sections
    users = {user: blocks[var] for user, var in _USER.findall(text)}
    users["worker-sim"] = blocks["WORKER_SIM_PERMISSIONS"]
    return users


def matches(pattern: str, subject: str) -> bool:
    p, s = pattern.split("."), subject.split(".")
    for i, tok in enumerate(p):
        if tok == ">":
            return len(s) > i
        if i >= len(s) or (tok != "*" and tok != s[i]):
            return False
    return len(p) == len(s)


def allowed(rights: dict[str, list[str]], kind: str, subject: str) -> bool:
    return any(matches(pattern, subject) for pattern in rights[kind])


ROLES = ("admin", "gateway", "worker", "worker-sim", "leaf", *PRODUCERS)
K, Q, A, R = KEYS_STREAM, QUOTA_STREAM, AUDIT_STREAM, RESPONSES_STREAM
PUBLISH_MATRIX: dict[str, set[str]] = {
    "$KV.LLMFLEET_KEYS.k.x": {"admin"},
    "$KV.LLMFLEET_KEYS.cfg.prices": {"admin"},
    "$KV.LLMFLEET_QUOTA.x.rpm": {"gateway"},
    "llmfleet.audit.gw.x": {"gateway"},
    "llmfleet.audit.wk.x": {"worker", "worker-sim", "leaf"},
    f"$JS.API.STREAM.CREATE.{K}": {"admin"},
    f"$JS.API.STREAM.UPDATE.{K}": {"admin"},
    f"$JS.API.STREAM.INFO.{K}": {"admin", "gateway"},
    f"$JS.API.STREAM.MSG.GET.{K}": {"admin", "gateway"},
    f"$JS.API.DIRECT.GET.{K}.$KV.LLMFLEET_KEYS.k.x": {"admin", "gateway"},
    f"$JS.API.CONSUMER.CREATE.{K}": {"admin", "gateway"},
    f"$JS.FC.{K}.c.1": {"admin", "gateway"},
    f"$JS.API.STREAM.CREATE.{Q}": {"gateway"},
    f"$JS.API.STREAM.UPDATE.{Q}": set(),
    f"$JS.API.STREAM.INFO.{Q}": {"admin", "gateway"},
    f"$JS.API.STREAM.MSG.GET.{Q}": {"admin", "gateway"},
    f"$JS.API.CONSUMER.CREATE.{Q}": {"admin"},
    f"$JS.API.STREAM.CREATE.{A}": {"gateway"},
    f"$JS.API.STREAM.UPDATE.{A}": {"gateway"},
    f"$JS.API.STREAM.INFO.{A}": {"admin", "gateway"},
    f"$JS.API.STREAM.MSG.GET.{A}": {"admin"},
    f"$JS.API.CONSUMER.CREATE.{A}": {"admin"},
    f"$JS.API.CONSUMER.CREATE.{A}.tail.llmfleet.audit.>": {"admin"},
    f"$JS.ACK.{A}.c.1.1.1.1.0": {"admin"},
    "$KV.LLMFLEET_RESPONSES.resp_x": {"gateway"},
    "$KV.LLMFLEET_RESPONSES.resp_x.0": {"gateway"},
    f"$JS.API.STREAM.CREATE.{R}": {"gateway"},
    f"$JS.API.STREAM.UPDATE.{R}": {"gateway"},
    f"$JS.API.STREAM.INFO.{R}": {"admin", "gateway"},
    f"$JS.API.STREAM.MSG.GET.{R}": {"gateway"},
    f"$JS.API.DIRECT.GET.{R}": {"gateway"},
    f"$JS.API.DIRECT.GET.{R}.$KV.LLMFLEET_RESPONSES.resp_x": {"gateway"},
    f"$JS.API.CONSUMER.CREATE.{R}": set(),
    f"$JS.API.CONSUMER.CREATE.{R}.c.$KV.LLMFLEET_RESPONSES.>": set(),
    f"$JS.FC.{R}.c.1": set(),
    **{f"$JS.API.STREAM.{verb}.{s}": set() for verb in ("PURGE", "DELETE") for s in (K, Q, A, R)},
    **{f"$JS.API.STREAM.MSG.DELETE.{s}": set() for s in (K, Q, A, R)},
    **{f"$JS.hub.API.STREAM.INFO.{s}": set() for s in (K, Q, A, R)},
}
SUBSCRIBE_MATRIX: dict[str, set[str]] = {
    "$KV.LLMFLEET_KEYS.k.x": set(),
    "$KV.LLMFLEET_QUOTA.x.rpm": set(),
    "$KV.LLMFLEET_RESPONSES.resp_x": set(),
    "llmfleet.audit.gw.x": set(),
    "llmfleet.audit.wk.x": set(),
    "_INBOX.x": set(),
}


def test_control_rights_matrix_of_accounts_conf() -> None:
    rights = role_rights()
    assert set(ROLES) <= set(rights)
    got = {
        (kind, subject): {r for r in ROLES if allowed(rights[r], kind, subject)}
        for kind, matrix in (("publish", PUBLISH_MATRIX), ("subscribe", SUBSCRIBE_MATRIX))
        for subject in matrix
    }
    want = {("publish", s): r for s, r in PUBLISH_MATRIX.items()}
    want |= {("subscribe", s): r for s, r in SUBSCRIBE_MATRIX.items()}
    assert got == want


# ---- what permissions cannot stop -------------------------------------------------------


async def test_a_key_republished_into_the_bucket_is_never_honoured(
    hub: OneNodeHub, state: None
) -> None:
    """A role that may create or update any stream can aim a republish at
    `$KV.LLMFLEET_KEYS.>`, and the server stores it (NATS permissions cannot look inside
    a stream config; nats-server 2.15). Gateways hold STREAM.UPDATE of LLMFLEET_AUDIT,
    so a gateway taken over could plant a key: the entry lands, but every gateway's
    keyring sees the `Nats-Stream` header republish adds, and treats it as absent."""
    secret = new_secret()
    forged = KeyRecord(
        name="trojan",
        secrets=(Secret(sha256=hash_secret(secret), created_at=time.time()),),
        models=("*",),
        admin=True,
    )
    async with actor(hub, "gateway", "republish") as g:
        config = stream_config(AuditSettings())
        config.republish = api.RePublish(
            src="llmfleet.audit.gw.*", dest="$KV.LLMFLEET_KEYS.k.{{wildcard(1)}}"
        )
        try:
            await g.js.update_stream(config)
            await g.js.publish("llmfleet.audit.gw.trojan", ENCODER.encode(forged))
        finally:
            await g.js.update_stream(stream_config(AuditSettings()))
        a, kv = await _admin_kv(hub, KEYS_BUCKET)
        try:
            assert (await kv.get("k.trojan")).value  # permissions did not stop it
        finally:
            await a.close()
        ring = Keyring()
        watch = asyncio.create_task(ring.run(g.js))
        try:
            async with asyncio.timeout(5):
                await ring.ready.wait()
            assert ring.lookup(secret) is None and ring.record("trojan") is None
            assert ring.forged >= 1
        finally:
            watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watch
    a, kv = await _admin_kv(hub, KEYS_BUCKET)
    try:
        await kv.delete("k.trojan")
    finally:
        await a.close()
