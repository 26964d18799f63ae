"""Confused deputies: making a worker publish where the attacker cannot.

A worker answers a ping (and its micro endpoints) on the reply subject the requester names.
With `allow_responses` that answer was allowed onto any subject, so a ping naming
`llmfleet.ctl.<other worker>.drain` as its reply drained that worker; the same works
between workers behind one leaf node, where no permission applies at all. Now workers
answer only into inboxes (`_LLMFLEET.r.`, `_LLMFLEET.admin.`, `_INBOX.`), and the drain
endpoint serves only requests whose reply is one. Batch producers may not ping at all
(nor publish `llmfleet.discover`): the gateway role, which may, tries here.
"""

from __future__ import annotations

import asyncio

from common import names
from common import protocol as p
from tests.security.stack import (
    OneNodeHub,
    Stack,
    actor,
    announcements,
    assert_unharmed,
    before,
)


async def test_a_ping_whose_reply_is_a_drain_endpoint_drains_nobody(
    stack: Stack, hub: OneNodeHub
) -> None:
    was = before(stack)
    async with actor(hub, "gateway", "deputy") as g:
        for target in ("sim-a", "sim-b"):
            other = "sim-b" if target == "sim-a" else "sim-a"
            for reply in (
                names.service_subject(other, "drain"),
                names.service_subject(target, "drain"),
                names.service_subject(other, "status"),
                f"{names.HEARTBEAT_PREFIX}{other}",
            ):
                await g.nc.publish(names.control_subject(target), p.encode(p.Ping()), reply=reply)
        await g.nc.flush()
    # the drain endpoint itself, asked with a reply that is no inbox: refused too
    async with actor(hub, "admin", "deputy") as adm:
        for target in ("sim-a", "sim-b"):
            await adm.nc.publish(
                names.service_subject(target, "drain"), b"", reply="llmfleet.discover"
            )
        await adm.nc.flush()
    await asyncio.sleep(1.0)
    states = {w: a.state for w, a in (await announcements(hub)).items()}
    assert states == {"sim-a": "ready", "sim-b": "ready"}, states
    await assert_unharmed(stack, was)


async def test_batch_producers_cannot_ping_or_discover(stack: Stack, hub: OneNodeHub) -> None:
    async with actor(hub, "batch-etl", "noping") as a:
        await a.nc.publish(names.control_subject("sim-a"), p.encode(p.Ping()))
        await a.nc.publish(names.DISCOVER_SUBJECT, b"")
        await a.nc.flush()
        await a.expect_denied(names.control_subject("sim-a"), names.DISCOVER_SUBJECT)
