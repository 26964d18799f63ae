"""The JetStream work queue: one stream for all requests, one shared pull consumer per model.

Memory storage (interactive traffic: a restart of the broker drops queued requests, whose
clients time out anyway), work-queue retention (a message is gone once a worker acks it),
a bound per subject, i.e. per model and producer, with discard-new (a flood makes that
producer's publishes for that model fail fast -> HTTP 429, and nobody else's), no total
byte bound of its own by default (the broker's room is the bound: running out of it is
its own error, `queue_storage_full`), and a duplicate window so a re-published request id
is not queued twice.
"""

from __future__ import annotations

import logging
import time

import msgspec
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    DiscardPolicy,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.errors import BadRequestError, NotFoundError

from common import names
from common.settings import QueueSettings

STREAM_NAME_IN_USE = 10058  # JetStream: the stream exists with another configuration

log = logging.getLogger(__name__)


def stream_config(settings: QueueSettings) -> StreamConfig:
    return StreamConfig(
        name=names.REQUEST_STREAM,
        subjects=[names.REQUEST_SUBJECTS],
        retention=RetentionPolicy.WORK_QUEUE,
        storage=StorageType.MEMORY if settings.storage == "memory" else StorageType.FILE,
        discard=DiscardPolicy.NEW,
        discard_new_per_subject=True,
        max_msgs_per_subject=settings.max_per_model,
        max_bytes=settings.max_bytes,
        max_age=settings.max_age_s,
        max_msg_size=settings.max_msg_bytes,
        duplicate_window=settings.duplicate_window_s,
        num_replicas=settings.replicas,
    )


async def ensure_stream(
    js: JetStreamContext, settings: QueueSettings, *, update: bool = False
) -> None:
    """Create the request stream unless it exists.

    Gateways own queue policy: with `update=True` an existing stream whose limits differ
    from `settings` is updated to them. Workers pass `update=False` and leave it alone.
    """
    try:
        info = await js.stream_info(names.REQUEST_STREAM)
    except NotFoundError:
        try:
            await js.add_stream(stream_config(settings))
            log.info("created stream %s", names.REQUEST_STREAM)
            return
        except BadRequestError as exc:
            if exc.err_code != STREAM_NAME_IN_USE:
                raise
            # Another process (a worker starting beside this gateway) created it in
            # between, with its own settings: read it, and update it if ours differ.
            info = await js.stream_info(names.REQUEST_STREAM)
    cfg = info.config
    wanted = (settings.max_per_model, settings.max_bytes, [names.REQUEST_SUBJECTS])
    if (cfg.subjects or []) != wanted[2] and not update:
        log.error(
            "stream %s captures %s, not %s (protocol 1): start a gateway of this version "
            "to migrate it (docs/protocol.md)",
            names.REQUEST_STREAM,
            cfg.subjects,
            names.REQUEST_SUBJECTS,
        )
    if not update:
        return
    foreign = _foreign_settings(cfg)
    if foreign:
        log.error("stream %s had %s set; removed", names.REQUEST_STREAM, ", ".join(foreign))
    current = (cfg.max_msgs_per_subject, cfg.max_bytes, cfg.subjects or [])
    if current != wanted or cfg.max_msg_size != settings.max_msg_bytes or foreign:
        cfg.max_msgs_per_subject, cfg.max_bytes, cfg.subjects = wanted
        cfg.max_msg_size = settings.max_msg_bytes
        cfg.republish = None
        cfg.subject_transform = None
        cfg.no_ack = False
        cfg.allow_rollup_hdrs = False
        cfg.discard = DiscardPolicy.NEW
        cfg.discard_new_per_subject = True
        await js.update_stream(cfg)
        log.info("updated stream %s to %s", names.REQUEST_STREAM, wanted)


def _foreign_settings(cfg: StreamConfig) -> list[str]:
    """Settings llmfleet never makes that would leak or alter requests (a stream created by
    someone else, say a compromised worker after a broker restart): a gateway removes the
    ones an update can change (republish, subject transforms, no-ack, rollups) and reports
    sources, mirrors and another retention, which need the stream re-created."""
    found = []
    if cfg.republish is not None:
        found.append("republish")
    if cfg.allow_rollup_hdrs:
        found.append("allow_rollup_hdrs")
    if cfg.subject_transform is not None:
        found.append("subject_transform")
    if cfg.no_ack:
        found.append("no_ack")
    if cfg.sources or cfg.mirror is not None:
        found.append("sources/mirror (delete and re-create the stream)")
    if cfg.retention not in (None, RetentionPolicy.WORK_QUEUE):
        found.append("retention (delete and re-create the stream)")
    return found


def consumer_config(model_id: str, settings: QueueSettings) -> ConsumerConfig:
    # `name` (not only `durable_name`) makes nats-py create it on
    # `$JS.API.CONSUMER.CREATE.<stream>.<name>.<filter>`: a worker's permissions can then
    # allow exactly its models' consumers with exactly their filters.
    return ConsumerConfig(
        name=names.consumer_name(model_id),
        durable_name=names.consumer_name(model_id),
        filter_subject=names.model_filter(model_id),
        ack_policy=AckPolicy.EXPLICIT,
        deliver_policy=DeliverPolicy.ALL,
        ack_wait=settings.ack_wait_s,
        max_deliver=settings.max_deliver,
        max_waiting=4096,
        max_ack_pending=-1,
        description=f"llmfleet requests for {model_id}",
    )


async def ensure_consumer(js: JetStreamContext, model_id: str, settings: QueueSettings) -> None:
    """Create the model's shared durable pull consumer unless it exists."""
    name = names.consumer_name(model_id)
    try:
        info = await js.consumer_info(names.REQUEST_STREAM, name)
    except NotFoundError:
        await js.add_consumer(names.REQUEST_STREAM, consumer_config(model_id, settings))
        log.info("created consumer %s", name)
        return
    if info.config.filter_subject != names.model_filter(model_id):  # protocol 1's filter
        cfg = info.config
        cfg.name, cfg.filter_subject = name, names.model_filter(model_id)
        await js.add_consumer(names.REQUEST_STREAM, cfg)  # an update: only the filter changes
        log.info("updated consumer %s to filter %s", name, names.model_filter(model_id))


MAX_LISTED_SUBJECTS = 1024
"""`queued_models` reads the per-subject counts only up to this many subjects: a producer
that queues requests for 200,000 made-up models must not make every poll fetch them all."""


async def queued_models(js: JetStreamContext) -> set[str]:
    """Models with requests in the stream (waiting or being started), whether or not any
    worker serves them: the stream's per-subject counts, when there are at most
    MAX_LISTED_SUBJECTS subjects (else none: an empty set). Two JetStream API requests."""
    try:
        if await _num_subjects(js) > MAX_LISTED_SUBJECTS:
            return set()
        info = await js.stream_info(names.REQUEST_STREAM, subjects_filter=names.REQUEST_SUBJECTS)
    except NotFoundError:
        return set()
    out = set()
    for subject in info.state.subjects or {}:
        try:
            out.add(names.parse_request_subject(subject)[0])
        except ValueError:
            continue  # not published by an llmfleet producer: not a model we can name
    return out


class _State(msgspec.Struct):
    num_subjects: int = 0


class _Info(msgspec.Struct):
    state: _State = msgspec.field(default_factory=_State)


async def _num_subjects(js: JetStreamContext) -> int:
    """The stream's subject count (nats-py's StreamState does not read `num_subjects`)."""
    msg = await js._nc.request(f"$JS.API.STREAM.INFO.{names.REQUEST_STREAM}", b"", timeout=5.0)
    return msgspec.json.decode(msg.data, type=_Info).state.num_subjects


class QueueDepth(msgspec.Struct, frozen=True):
    """One model's queue as the broker sees it (from the model's consumer info).

    `pending`: requests no worker has taken yet; `starting`: taken by a worker but not yet
    answered (not acked: a request is acked at its first output); `pulls`: open pull
    requests, i.e. free worker slots waiting for work; `oldest_wait_s`: age of the oldest
    request not yet taken (0 when none waits).
    """

    model: str
    pending: int = 0
    starting: int = 0
    pulls: int = 0
    oldest_wait_s: float = 0.0
    redelivered: int = 0


async def queue_depth(
    js: JetStreamContext, model_id: str, *, now: float | None = None
) -> QueueDepth:
    """The queue of `model_id`, from its consumer (or, before any worker created that, from
    the stream's per-subject count).

    Costs one JetStream API request, plus one message lookup when requests wait.
    """
    subject = names.model_filter(model_id)
    try:
        info = await js.consumer_info(names.REQUEST_STREAM, names.consumer_name(model_id))
    except NotFoundError:
        info = None
    if info is None:  # no worker ever served it: everything on its subjects waits
        try:
            sinfo = await js.stream_info(names.REQUEST_STREAM, subjects_filter=subject)
        except NotFoundError:
            return QueueDepth(model=model_id)
        pending, delivered = sum(int(n) for n in (sinfo.state.subjects or {}).values()), 0
    else:
        pending = int(info.num_pending or 0)
        delivered = info.delivered.stream_seq if info.delivered else 0
    oldest = 0.0
    if pending:
        try:
            msg = await js.get_msg(
                names.REQUEST_STREAM, seq=(delivered or 0) + 1, subject=subject, next=True
            )
        except NotFoundError:
            msg = None
        if msg is not None and msg.time is not None:
            stamp = msg.time.timestamp()
            oldest = max(0.0, (time.time() if now is None else now) - stamp)
    if info is None:
        return QueueDepth(model=model_id, pending=pending, oldest_wait_s=oldest)
    return QueueDepth(
        model=model_id,
        pending=pending,
        starting=int(info.num_ack_pending or 0),
        pulls=int(info.num_waiting or 0),
        oldest_wait_s=oldest,
        redelivered=int(info.num_redelivered or 0),
    )
