"""Attack 9, second half: a worker scoped to one model (accounts.conf's commented example).

The hub runs accounts.conf with its `#> ` lines uncommented (WORKER_SIM_PERMISSIONS) and a
user `worker-sim` that has them, exactly as that file tells an operator to do. A real
`llmfleet worker` logged in as `worker-sim` creates and pulls `llmfleet-sim-model` and
serves a request without a single violation; the same user trying to create a consumer
for another model, or `llmfleet-sim-model` with another filter (by the filtered subject,
the legacy subjects, or a body that disagrees with its subject), to pull or ack another
model's consumer, to delete its own, or to read requests directly, is refused, and the
other model's request is never delivered to it.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import AsyncIterator, Iterator

import pytest

from common import names
from common.queue import consumer_config, ensure_consumer, ensure_stream
from common.settings import QueueSettings
from tests.deploy.natsconf import NATS_DIR
from tests.natshelp import request_headers
from tests.procs import Fleet
from tests.security.stack import (
    MODEL,
    OneNodeHub,
    actor,
    announcements,
    chat_body,
    read_stream,
    start_hub,
)

OTHER = "other-model"
STREAM = names.REQUEST_STREAM
PASSWORD = "worker-sim-test-pw"
WORKER_USER = (
    '      { user: "worker", password: $NATS_WORKER_PASSWORD, permissions: $WORKER_PERMISSIONS }\n'
)
SCOPED_USER = (
    '      { user: "worker-sim", password: $NATS_WORKER_SIM_PASSWORD, '
    "permissions: $WORKER_SIM_PERMISSIONS }\n"
)


def scoped_accounts() -> str:
    """accounts.conf with the scoped-worker example switched on, as its comment says."""
    text = (NATS_DIR / "accounts.conf").read_text()
    text, uncommented = re.subn(r"^#> ?", "", text, flags=re.M)
    assert uncommented > 10, "accounts.conf has no `#> ` example any more: update the test"
    assert "WORKER_SIM_PERMISSIONS = {" in text
    assert WORKER_USER in text, "accounts.conf's worker user line changed: update the test"
    return text.replace(WORKER_USER, WORKER_USER + SCOPED_USER)


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OneNodeHub]:
    h = start_hub(
        tmp_path_factory.mktemp("scopedhub"), scoped_accounts(), NATS_WORKER_SIM_PASSWORD=PASSWORD
    )
    h.passwords["worker-sim"] = PASSWORD
    try:
        yield h
    finally:
        h.stop()


@pytest.fixture(scope="module")
async def scoped_worker(
    hub: OneNodeHub, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[None]:
    """`llmfleet worker` as `worker-sim`. The gateway creates the stream (the scoped worker
    may not), and a full worker has made another model's consumer."""
    async with actor(hub, "gateway", "stream") as g:
        await ensure_stream(g.js, QueueSettings(), update=True)
    async with actor(hub, "worker", "other") as w:
        await ensure_consumer(w.js, OTHER, QueueSettings())
    fleet = Fleet(hub.url("worker-sim"), tmp_path_factory.mktemp("scoped"))
    try:
        fleet.worker("--worker-id", "scoped", "--model", MODEL)
        yield
    finally:
        fleet.stop_all()


async def test_a_scoped_worker_serves_its_model_and_nothing_else(
    hub: OneNodeHub, scoped_worker: None
) -> None:
    deadline = time.monotonic() + 15
    while "scoped" not in await announcements(hub, wait=0.5):
        assert time.monotonic() < deadline, "the scoped worker never announced"

    async with actor(hub, "batch-etl", "scoped") as a:
        reply = a.reply()
        sub = await a.nc.subscribe(reply)
        await a.nc.flush()
        await a.js.publish(
            names.request_subject(MODEL, "batch-etl"), chat_body(), headers=request_headers(reply)
        )
        msgs = await read_stream(sub)
        assert msgs[0]["worker"] == "scoped" and msgs[-1]["type"] == "done"
        await a.js.publish(
            names.request_subject(OTHER, "batch-etl"),
            chat_body(model=OTHER),
            headers=request_headers(a.reply()),
        )

    async with actor(hub, "worker-sim", "spy") as spy:
        # Allowed: its own model's consumer, with its own filter (what the worker does).
        await ensure_consumer(spy.js, MODEL, QueueSettings())
        assert spy.errors == []
        own = consumer_config(MODEL, QueueSettings())
        pull_inbox = f"{names.INBOX_ROOT}.w.spy.{OTHER}.1"
        attempts: dict[str, dict[str, object]] = {
            # Another model's consumer (with its filter), its own with another filter, a new
            # consumer name over its own model, the legacy subjects that carry no filter.
            f"$JS.API.CONSUMER.CREATE.{STREAM}.llmfleet-{OTHER}.llmfleet.req.{OTHER}.*": {
                "config": consumer_config(OTHER, QueueSettings()).as_dict()
            },
            f"$JS.API.CONSUMER.CREATE.{STREAM}.llmfleet-{MODEL}.llmfleet.req.{OTHER}.*": {},
            f"$JS.API.CONSUMER.CREATE.{STREAM}.llmfleet-{MODEL}.llmfleet.req.*.*": {},
            f"$JS.API.CONSUMER.CREATE.{STREAM}.spy.llmfleet.req.{MODEL}.*": {},
            f"$JS.API.CONSUMER.CREATE.{STREAM}.llmfleet-{MODEL}": {},
            f"$JS.API.CONSUMER.CREATE.{STREAM}": {},
            f"$JS.API.CONSUMER.DURABLE.CREATE.{STREAM}.llmfleet-{MODEL}": {},
            # Pull from, and ack for, another model's consumer; delete its own.
            f"$JS.API.CONSUMER.MSG.NEXT.{STREAM}.llmfleet-{OTHER}": {"batch": 1},
            f"$JS.ACK.{STREAM}.llmfleet-{OTHER}.1.1.1.1.0": {},
            f"$JS.API.CONSUMER.DELETE.{STREAM}.llmfleet-{MODEL}": {},
            f"$JS.API.STREAM.MSG.GET.{STREAM}": {"seq": 1},
        }
        for subject, body in attempts.items():
            data = json.dumps({"stream_name": STREAM, **body}).encode() if body else b""
            await spy.nc.publish(subject, data, reply=pull_inbox)
        await spy.nc.subscribe("llmfleet.req.>")
        await spy.nc.flush()
        await spy.expect_denied(*attempts, "llmfleet.req.>")

        # The one subject it may use, with a body that asks for more than the subject
        # says: JetStream refuses the mismatch (not a permission matter, the same refusal).
        allowed = f"$JS.API.CONSUMER.CREATE.{STREAM}.llmfleet-{MODEL}.llmfleet.req.{MODEL}.*"
        for change in (
            {"filter_subject": "llmfleet.req.>"},
            {"filter_subject": f"llmfleet.req.{OTHER}.*"},
            {"filter_subject": None, "filter_subjects": ["llmfleet.req.>"]},
            {"filter_subjects": [f"llmfleet.req.{MODEL}.*", f"llmfleet.req.{OTHER}.*"]},
        ):
            config = {k: v for k, v in {**own.as_dict(), **change}.items() if v is not None}
            answer = await spy.nc.request(
                allowed, json.dumps({"stream_name": STREAM, "config": config}).encode(), timeout=2
            )
            error = json.loads(answer.data).get("error")
            assert error is not None and error["code"] == 400, (change, answer.data)
        info = await spy.js.consumer_info(STREAM, names.consumer_name(MODEL))
        assert info.config.filter_subject == names.model_filter(MODEL)
        assert not info.config.filter_subjects

    async with actor(hub, "admin", "other") as admin:
        other = await admin.js.consumer_info(STREAM, names.consumer_name(OTHER))
    assert (other.num_pending, other.delivered.stream_seq) == (1, 0)  # never delivered
    assert hub.fleet_violations() == [], "the scoped worker needs a right it lacks"
