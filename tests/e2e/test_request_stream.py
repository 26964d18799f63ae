"""The request stream's layout as gateways and workers keep it, on a real broker: bounds
against one producer's abuse (a request message is at most `max_msg_bytes`, larger bodies
going by reference into the producer's own byte-capped bucket; the catalog's orphan-model
discovery never fetches the per-subject counts of a stream holding more than
MAX_LISTED_SUBJECTS subjects), a foreign config stripped, and the migration from
protocol 1 (a gateway migrates the stream's subjects, workers their consumers' filters)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import nats
import nats.js.errors
import pytest
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DiscardPolicy,
    RePublish,
    RetentionPolicy,
    StorageType,
    StreamConfig,
    SubjectTransform,
)

from common import names
from common.queue import MAX_LISTED_SUBJECTS, ensure_consumer, ensure_stream, queued_models
from common.settings import QueueSettings
from llmfleet.broker import EmbeddedNats


@pytest.fixture
def broker() -> Iterator[EmbeddedNats]:
    with EmbeddedNats() as server:
        yield server


async def test_request_size_and_subject_count_are_bounded(broker: EmbeddedNats) -> None:
    nc = await nats.connect(broker.url)
    js = nc.jetstream()
    try:
        settings = QueueSettings(max_msg_bytes=64 * 1024)
        await ensure_stream(js, settings, update=True)
        await js.publish(names.request_subject("m", "p"), b"x" * 60_000)
        with pytest.raises(nats.js.errors.APIError):
            await js.publish(names.request_subject("m", "p"), b"x" * 70_000)
        assert await queued_models(js) == {"m"}
        for i in range(MAX_LISTED_SUBJECTS + 1):  # a producer inventing models
            await nc.publish(names.request_subject(f"made-up-{i}", "p"), b"")
        await nc.flush()
        want, deadline = MAX_LISTED_SUBJECTS + 2, time.monotonic() + 10.0
        while (await js.stream_info(names.REQUEST_STREAM)).state.messages < want:
            assert time.monotonic() < deadline, "the broker never stored them all"
            await asyncio.sleep(0.05)
        assert await queued_models(js) == set()  # too many to list: none fetched
    finally:
        await nc.close()


async def test_a_gateway_strips_a_foreign_stream_config(broker: EmbeddedNats) -> None:
    """A request stream someone else created (a compromised worker, after a broker restart
    emptied the memory stream) with a transform that re-labels one producer's requests as
    another's, a republish that copies them out, and rollups: the gateway removes them."""
    nc = await nats.connect(broker.url)
    js = nc.jetstream()
    try:
        await js.add_stream(
            StreamConfig(
                name=names.REQUEST_STREAM,
                subjects=[names.REQUEST_SUBJECTS],
                retention=RetentionPolicy.WORK_QUEUE,
                storage=StorageType.MEMORY,
                discard=DiscardPolicy.OLD,
                subject_transform=SubjectTransform(
                    src="llmfleet.req.*.etl", dest="llmfleet.req.{{wildcard(1)}}.gateway"
                ),
                republish=RePublish(src=">", dest="spy.>"),
                allow_rollup_hdrs=True,
            )
        )
        await ensure_stream(js, QueueSettings(), update=True)
        cfg = (await js.stream_info(names.REQUEST_STREAM)).config
        assert cfg.subject_transform is None and cfg.republish is None
        assert not cfg.allow_rollup_hdrs and cfg.discard == DiscardPolicy.NEW
        ack = await js.publish(names.request_subject("m", "etl"), b"{}")
        msg = await js.get_msg(names.REQUEST_STREAM, seq=ack.seq)
        assert msg.subject == names.request_subject("m", "etl")  # not re-labelled
    finally:
        await nc.close()


async def test_a_version_1_stream_and_consumer_are_migrated(broker: EmbeddedNats) -> None:
    nc = await nats.connect(broker.url)
    js = nc.jetstream()
    try:
        await js.add_stream(
            StreamConfig(
                name=names.REQUEST_STREAM,
                subjects=["llmfleet.req.*"],
                storage=StorageType.MEMORY,
                retention=RetentionPolicy.WORK_QUEUE,
            )
        )
        old = ConsumerConfig(
            durable_name="llmfleet-m",
            filter_subject="llmfleet.req.m",
            ack_policy=AckPolicy.EXPLICIT,
            max_waiting=4096,
        )
        await js.add_consumer(names.REQUEST_STREAM, old)
        await ensure_stream(js, QueueSettings(), update=False)  # a worker leaves it alone
        info = await js.stream_info(names.REQUEST_STREAM)
        assert info.config.subjects == ["llmfleet.req.*"]
        await ensure_stream(js, QueueSettings(), update=True)  # a gateway migrates it
        info = await js.stream_info(names.REQUEST_STREAM)
        assert info.config.subjects == [names.REQUEST_SUBJECTS]
        await ensure_consumer(js, "m", QueueSettings())  # a worker migrates its consumer
        cinfo = await js.consumer_info(names.REQUEST_STREAM, "llmfleet-m")
        assert cinfo.config.filter_subject == names.model_filter("m")
        ack = await js.publish(names.request_subject("m", "p"), b"{}")
        assert ack.stream == names.REQUEST_STREAM
        cinfo = await js.consumer_info(names.REQUEST_STREAM, "llmfleet-m")
        assert cinfo.num_pending == 1  # the migrated consumer sees version 2 requests
    finally:
        await nc.close()
