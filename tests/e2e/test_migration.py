"""Protocol 1 -> 2: a gateway of this version migrates the stream's subjects, and workers
their consumers' filters, on a real broker that still has the version 1 layout."""

from __future__ import annotations

from collections.abc import Iterator

import nats
import pytest
from nats.js.api import AckPolicy, ConsumerConfig, RetentionPolicy, StorageType, StreamConfig

from common import names
from common.queue import ensure_consumer, ensure_stream
from common.settings import QueueSettings
from llmfleet.broker import EmbeddedNats


@pytest.fixture
def broker() -> Iterator[EmbeddedNats]:
    with EmbeddedNats() as server:
        yield server


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
