"""Attack 3: request bodies passed by reference (object store `LLMFLEET_BODIES_<producer>`).

The gateway's bucket holds a real body (put by the gateway user, as the gateway does for a
request over max_payload): a completion that echoes a secret prompt, so any leak of it
into an attacker's reply stream is visible. `batch-etl` cannot read, replace, purge or
delete that bucket (NATS refuses each); a request of its own whose `Llmfleet-Body-Ref`
names the gateway's bucket is answered 400 without the body; a link object in its own
bucket that points into the gateway's is refused the same way. Control: a body in its own
bucket is served.
"""

from __future__ import annotations

import asyncio
import base64
import json
import secrets
import time
from typing import Any

import nats.errors
import nats.js.errors
import pytest
from nats.js.api import ObjectStoreConfig, StorageType

from common import names
from common import protocol as p
from common.bodies import BodyReader, BodyStore
from tests.natshelp import request_headers
from tests.security.stack import (
    MODEL,
    Actor,
    OneNodeHub,
    Stack,
    actor,
    assert_unharmed,
    before,
    honest_chat,
    read_stream,
)

SECRET = "gateway-secret-" + secrets.token_hex(6)
GW_BUCKET = names.body_bucket(names.GATEWAY_PRODUCER)
ETL_BUCKET = names.body_bucket("batch-etl")
DENIED = (nats.errors.Error, nats.js.errors.Error, TimeoutError)


def _echo_body(prompt: str) -> bytes:
    """A completion that echoes its prompt: whoever runs it sends the prompt back."""
    return json.dumps({"model": MODEL, "prompt": prompt, "echo": True, "max_tokens": 2}).encode()


def _meta_subject(bucket: str, name: str) -> str:
    return f"$O.{bucket}.M.{base64.urlsafe_b64encode(name.encode()).decode()}"


@pytest.fixture(scope="module")
async def gateway_object(stack: Stack, hub: OneNodeHub) -> str:
    """A body in the gateway's bucket, put by the gateway user with the gateway's code."""
    name = "gw-" + secrets.token_hex(6)
    async with actor(hub, "gateway", "bodies") as g:
        ref = await BodyStore(g.js).put(name, _echo_body(SECRET), 1024 * 1024)
        assert g.errors == []
    assert ref == f"{GW_BUCKET}/{name}"
    return name


@pytest.fixture(scope="module")
def gateway_flags() -> tuple[str, ...]:
    return ("--producer-buckets", "batch-etl")  # the gateway creates batch-etl's bucket


@pytest.fixture(scope="module")
async def etl_bucket(stack: Stack, hub: OneNodeHub) -> None:
    """batch-etl's own bucket: the gateway made it (`--producer-buckets`); batch-etl may
    use it but not create a stream, not even that one (a stream's config could capture
    or republish anyone's subjects)."""
    async with actor(hub, "batch-etl", "bucket") as a:
        await a.js.object_store(ETL_BUCKET)  # there, and readable
        with pytest.raises(DENIED):
            await a.js.create_object_store(
                "LLMFLEET_BODIES_batch-etl2", ObjectStoreConfig(storage=StorageType.MEMORY)
            )
        capture = {"name": "SPY", "subjects": ["_LLMFLEET.r.>"], "storage": "memory"}
        await a.nc.publish(
            f"$JS.API.STREAM.CREATE.OBJ_{ETL_BUCKET}",
            json.dumps(capture).encode(),
            reply=a.nc.new_inbox(),
        )
        await a.nc.flush()
        await a.expect_denied(
            "$JS.API.STREAM.CREATE.OBJ_LLMFLEET_BODIES_batch-etl2",
            f"$JS.API.STREAM.CREATE.OBJ_{ETL_BUCKET}",
        )


async def _link(a: Actor, name: str, bucket: str, target: str | None) -> None:
    """An object-store link (what nats.go's AddLink writes; nats-py has no add_link): the
    meta of `name` in the producer's own bucket, pointing at `bucket`/`target`."""
    link: dict[str, Any] = {"bucket": bucket} | ({"name": target} if target else {})
    meta = {
        "name": name,
        "bucket": ETL_BUCKET,
        "nuid": secrets.token_hex(11),
        "size": 0,
        "chunks": 0,
        "mtime": "2026-01-01T00:00:00Z",
        "options": {"link": link},
    }
    await a.js.publish(
        _meta_subject(ETL_BUCKET, name), json.dumps(meta).encode(), headers={"Nats-Rollup": "sub"}
    )


async def _run_with_ref(a: Actor, ref: str, timeout: float = 10.0) -> list[dict[str, Any]]:
    """A completion request of `a` whose body is `ref`; its whole reply stream."""
    reply = a.reply()
    sub = await a.nc.subscribe(reply)
    await a.nc.flush()
    headers = request_headers(reply, op="completion", **{p.H_BODY_REF: ref})
    await a.js.publish(names.request_subject(MODEL, a.role), b"", headers=headers)
    try:
        return await read_stream(sub, timeout=timeout)
    finally:
        await sub.unsubscribe()


def _assert_refused(msgs: list[dict[str, Any]], status: int, says: str) -> None:
    assert [m["type"] for m in msgs] == ["accepted", "error"], msgs
    assert msgs[-1]["status"] == status, msgs
    assert says in msgs[-1]["error"]["message"], msgs
    assert SECRET not in json.dumps(msgs)


async def test_batch_producer_cannot_read_replace_or_purge_the_gateway_bucket(
    stack: Stack, hub: OneNodeHub, gateway_object: str
) -> None:
    was = before(stack)
    meta = _meta_subject(GW_BUCKET, gateway_object)
    stream = f"OBJ_{GW_BUCKET}"
    async with actor(hub, "batch-etl", "bodies") as a:
        with pytest.raises(DENIED):  # opening it is a stream-info request, refused
            await a.js.object_store(GW_BUCKET)
        # Read the meta and the chunks, by direct get, by message get, by a consumer, by
        # subscribing; replace the meta, write a chunk; purge and delete the stream.
        forged = {"name": gateway_object, "bucket": GW_BUCKET, "nuid": "x", "size": 0}
        attempts = {
            f"$JS.API.DIRECT.GET.{stream}.{meta}": b"",
            f"$JS.API.DIRECT.GET.{stream}": json.dumps({"last_by_subj": meta}).encode(),
            f"$JS.API.STREAM.MSG.GET.{stream}": json.dumps({"last_by_subj": meta}).encode(),
            f"$JS.API.CONSUMER.CREATE.{stream}": b"{}",
            f"$JS.API.CONSUMER.CREATE.{stream}.spy.$O.{GW_BUCKET}.C.>": b"{}",
            meta: json.dumps(forged).encode(),
            f"$O.{GW_BUCKET}.C.x": b"replaced",
            f"$JS.API.STREAM.PURGE.{stream}": b"{}",
            f"$JS.API.STREAM.DELETE.{stream}": b"",
            f"$JS.API.STREAM.UPDATE.{stream}": b"{}",
        }
        for subject, data in attempts.items():
            await a.nc.publish(subject, data, reply=a.nc.new_inbox())
        await a.nc.subscribe(f"$O.{GW_BUCKET}.>")
        await a.nc.flush()
        await a.expect_denied(f"$JS.API.STREAM.INFO.{stream}", *attempts, f"$O.{GW_BUCKET}.>")
    # The gateway's body is untouched (read as a worker reads it).
    async with actor(hub, "worker", "check") as w:
        got = await BodyReader(w.js).get("gateway", f"{GW_BUCKET}/{gateway_object}")
    assert got == _echo_body(SECRET)
    await assert_unharmed(stack, was)


async def test_body_ref_into_the_gateway_bucket_is_400_without_the_body(
    stack: Stack, hub: OneNodeHub, gateway_object: str, etl_bucket: None
) -> None:
    was = before(stack)
    async with actor(hub, "batch-etl", "ref") as a:
        for ref in (
            f"{GW_BUCKET}/{gateway_object}",
            f"{GW_BUCKET}/../{ETL_BUCKET}/{gateway_object}",
            f"{ETL_BUCKET}/../{GW_BUCKET}/{gateway_object}",  # a name, looked up as one
            f"LLMFLEET_BODIES_batch-evals/{gateway_object}",
        ):
            msgs = await _run_with_ref(a, ref)
            assert msgs[-1]["type"] == "error" and msgs[-1]["status"] == 400, (ref, msgs)
            assert SECRET not in json.dumps(msgs)
    await assert_unharmed(stack, was)


async def test_link_into_the_gateway_bucket_is_refused(
    stack: Stack, hub: OneNodeHub, gateway_object: str, etl_bucket: None
) -> None:
    was = before(stack)
    async with actor(hub, "batch-etl", "link") as a:
        # Control: a body in its own bucket is read and served (the prompt comes back).
        own = await a.js.object_store(ETL_BUCKET)
        await own.put("own", _echo_body("my own words"))
        msgs = await _run_with_ref(a, f"{ETL_BUCKET}/own")
        assert msgs[-1]["type"] == "done", msgs
        text = "".join(c["content"] for m in msgs if m["type"] == "delta" for c in m["choices"])
        assert text.startswith("my own words")

        await _link(a, "to-object", GW_BUCKET, gateway_object)
        await _link(a, "to-bucket", GW_BUCKET, None)
        _assert_refused(await _run_with_ref(a, f"{ETL_BUCKET}/to-object"), 400, "link")
        _assert_refused(await _run_with_ref(a, f"{ETL_BUCKET}/to-bucket"), 400, "link")
        assert a.errors == []  # writing links into its own bucket is its right
    await assert_unharmed(stack, was)


async def test_link_out_of_the_workers_reach_is_refused_before_it_is_followed(
    stack: Stack, hub: OneNodeHub, etl_bucket: None
) -> None:
    mark = hub.mark()
    async with actor(hub, "batch-etl", "far-link") as a:
        await _link(a, "far", "LLMFLEET_REQUESTS", "x")
        started = time.monotonic()
        msgs = await _run_with_ref(a, f"{ETL_BUCKET}/far")
        took = time.monotonic() - started
    assert hub.fleet_violations(mark) == [], "the attacker made a worker break its rights"
    _assert_refused(msgs, 400, "link")
    assert took < 2.0


async def test_a_body_whose_chunks_never_come_does_not_hold_every_slot(
    stack: Stack, hub: OneNodeHub, etl_bucket: None
) -> None:
    slots = 2 * 8  # sim-a and sim-b, 8 slots each (the default --max-concurrency)
    async with actor(hub, "batch-etl", "stall") as a:
        digest = base64.urlsafe_b64encode(b"\0" * 32).decode()
        meta = {
            "name": "stall",
            "bucket": ETL_BUCKET,
            "nuid": "nochunkshere",
            "size": 10,
            "chunks": 1,
            "digest": f"SHA-256={digest}",
        }
        await a.js.publish(
            _meta_subject(ETL_BUCKET, "stall"),
            json.dumps(meta).encode(),
            headers={"Nats-Rollup": "sub"},
        )
        listen = await a.nc.subscribe(a.reply("stall") + ".>")  # keeps the jobs "wanted"
        for i in range(slots):
            headers = request_headers(
                a.reply(f"stall.{i}"), **{p.H_BODY_REF: f"{ETL_BUCKET}/stall"}
            )
            await a.js.publish(names.request_subject(MODEL, "batch-etl"), b"", headers=headers)
        await asyncio.sleep(1.5)
        try:
            async with stack.client() as c:
                got = await honest_chat(
                    c, "is anyone free", 3, extra_headers={"x-llmfleet-timeout": "4"}
                )
            assert got.completion_tokens == 3
        finally:
            await listen.unsubscribe()  # the workers then cancel the stalled jobs
