"""The NATS configs of deploy/nats, run by real nats-server processes on loopback.

A 3-node hub cluster (nats-<n>.conf + hub.conf + settings.conf + accounts.conf), a GPU-host
leaf server (leaf.conf), and the real llmfleet gateway and worker processes logged in with
their role's credentials. Checks that the cluster forms, that every role can do its job
without a single permission violation, that a worker behind a leaf node pulls from the
hub's stream, and that the denials the roles rely on are enforced and reported.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import nats
import nats.errors
import openai
import pytest
import yaml
from nats.aio.client import Client

from common import names
from common.natsconn import flush
from llmfleet.broker import free_port
from tests.deploy.natsconf import (
    NATS_DIR,
    REPO,
    UNCHANGED,
    Hub,
    HubNode,
    Leaf,
    hub_layout,
    rewrite_file,
    start_with_retries,
    violations,
)
from tests.natshelp import publish_request, request_headers
from tests.procs import Fleet, Gateway, Proc

MB = 1024 * 1024


# ---- fixtures ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hub]:
    h = start_with_retries(lambda _: Hub(tmp_path_factory.mktemp("hub")))
    assert isinstance(h, Hub)
    try:
        yield h
    finally:
        h.stop()


@pytest.fixture(scope="module")
def leaf(hub: Hub, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Leaf]:
    leaf_ports = [n.leaf_port for n in hub.nodes]
    lf = start_with_retries(lambda _: Leaf(tmp_path_factory.mktemp("leafhost"), leaf_ports))
    assert isinstance(lf, Leaf)
    try:
        deadline = time.monotonic() + 15
        while hub.nodes[0].monitor("/leafz").get("leafnodes", 0) < 1:
            assert time.monotonic() < deadline, "the leaf never connected:\n" + lf.log()
            time.sleep(0.1)
        yield lf
    finally:
        lf.stop()


class Roles:
    """Real llmfleet processes, each logged in as its role."""

    def __init__(self, hub: Hub, leaf: Leaf, workdir: Path) -> None:
        self.hub_workers = Fleet(hub.url("worker"), workdir / "hub-workers")
        self.leaf_workers = Fleet(leaf.url, workdir / "leaf-workers")
        self.gateways = Fleet(hub.url("gateway"), workdir / "gateways")
        for f in (self.hub_workers, self.leaf_workers, self.gateways):
            f.workdir.mkdir()

    def start(self) -> None:
        self.hub_worker: Proc = self.hub_workers.worker(
            "--worker-id", "hub-w", "--model", "sim-model", "--stream-replicas", "3"
        )
        # On the GPU host: connects to its local leaf server, without credentials. Every
        # role passes --stream-replicas 3: whoever starts first creates the stream.
        self.leaf_worker: Proc = self.leaf_workers.worker(
            "--worker-id", "leaf-w", "--model", "leaf-model", "--sim-itl-ms", "1",
            "--stream-replicas", "3",
        )  # fmt: skip
        self.gw: Gateway = self.gateways.gateway(
            "--stream-replicas", "3", wait_models=("sim-model", "leaf-model")
        )

    def stop(self) -> None:
        for f in (self.gateways, self.hub_workers, self.leaf_workers):
            f.stop_all()


@pytest.fixture(scope="module")
def roles(hub: Hub, leaf: Leaf, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Roles]:
    r = Roles(hub, leaf, tmp_path_factory.mktemp("roles"))
    try:
        r.start()
        yield r
    finally:
        r.stop()


async def _connect(url: str, name: str, **kw: object) -> tuple[Client, list[Exception]]:
    errors: list[Exception] = []

    async def on_error(exc: Exception) -> None:
        errors.append(exc)

    nc = await nats.connect(url.split(","), name=name, error_cb=on_error, **kw)  # type: ignore[arg-type]
    return nc, errors


async def _expect_errors(errors: list[Exception], *needles: str, timeout: float = 3.0) -> None:
    """Until every needle appears (case-insensitively) in some permissions error."""
    deadline = time.monotonic() + timeout
    while True:
        texts = [str(e).lower() for e in errors]
        missing = [n for n in needles if not any(n.lower() in t for t in texts)]
        if not missing:
            assert all("permissions violation" in t for t in texts), texts
            return
        assert time.monotonic() < deadline, f"no permissions error for {missing}; got {texts}"
        await asyncio.sleep(0.05)


def _role_violations(hub: Hub, *client_names: str) -> list[str]:
    return [v for v in violations(hub.log()) if any(n in v for n in client_names)]


# ---- the cluster ------------------------------------------------------------------------


def test_three_node_cluster_forms_with_the_deployed_settings(hub: Hub) -> None:
    names_ = {n.name for n in hub.nodes}
    for node in hub.nodes:
        routez = node.monitor("/routez")
        assert {r["remote_name"] for r in routez["routes"]} == names_ - {node.name}
        jsz = node.monitor("/jsz")
        assert jsz["meta_cluster"]["cluster_size"] == 3
        assert jsz["meta_cluster"]["leader"] in names_
        assert jsz["config"]["domain"] == "hub"
        varz = node.monitor("/varz")
        assert varz["server_name"] == node.name
        assert varz["max_payload"] == 8 * MB
        assert varz["ping_max"] == 2
        assert varz["ping_interval"] == 10 * 10**9  # nanoseconds
        assert varz["leaf"]["port"] == node.leaf_port
        assert varz["cluster"]["name"] == "llmfleet"
        # Only the network layout was rewritten: settings and permissions are the deployed
        # files, byte for byte.
        for f in UNCHANGED:
            assert (node.conf.parent / f).read_bytes() == (NATS_DIR / f).read_bytes()


def test_compose_command_line_names_the_node_and_opens_monitoring(tmp_path: Path) -> None:
    """nats-1's command from docker-compose.yml, on compose.conf: the node's name comes
    from `--name`, and compose.conf's `http` replaces hub.conf's loopback one."""
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    command = [str(a) for a in compose["services"]["nats-1"]["command"]]
    assert command[:2] == ["--config", "/etc/nats/compose.conf"]
    hub_http: list[int] = []  # hub.conf's own monitoring port, per attempt

    def make(_: int) -> HubNode:
        d = tmp_path / f"etc-nats-{len(hub_http)}"  # stands for /etc/nats
        d.mkdir()
        for f in ("compose.conf", "hub.conf", *UNCHANGED):
            shutil.copyfile(NATS_DIR / f, d / f)
        client, hub_port, http, route, leaf = (free_port() for _ in range(5))
        hub_http.append(hub_port)
        rewrite_file(d / "hub.conf", hub_layout(d, client, hub_port, route, leaf, [route] * 3))
        # compose.conf's own line: from every interface of a container to this loopback
        rewrite_file(d / "compose.conf", [('http: "0.0.0.0:8222"', f'http: "127.0.0.1:{http}"')])
        node = HubNode("nats-1", d / "compose.conf", client, http, leaf)
        node.args = [a.replace("/etc/nats/", f"{d}/") for a in command]
        return node

    node = start_with_retries(make)
    assert isinstance(node, HubNode)
    try:
        varz = node.monitor("/varz")
        assert varz["server_name"] == "nats-1"
        assert (varz["http_host"], varz["http_port"]) == ("127.0.0.1", node.http_port)
        with pytest.raises(OSError):  # hub.conf's address is not served: compose.conf won
            socket.create_connection(("127.0.0.1", hub_http[-1]), timeout=1).close()
    finally:
        node.stop()


async def test_request_stream_is_replicated_on_three_nodes(roles: Roles, hub: Hub) -> None:
    nc, errors = await _connect(
        hub.url("admin"), "admin-check", inbox_prefix=names.ADMIN_INBOX_PREFIX
    )
    try:
        info = await nc.jetstream().stream_info(names.REQUEST_STREAM)
    finally:
        await nc.close()
    assert info.config.num_replicas == 3
    assert info.cluster is not None and len(info.cluster.replicas or []) == 2
    assert errors == []


# ---- the roles doing their jobs ---------------------------------------------------------


async def test_chat_through_gateway_and_worker_with_role_credentials(
    roles: Roles, hub: Hub
) -> None:
    async with openai.AsyncOpenAI(base_url=roles.gw.base_url, api_key="x", max_retries=0) as c:
        raw = await c.chat.completions.with_raw_response.create(
            model="sim-model", messages=[{"role": "user", "content": "hi"}], max_tokens=6
        )
        reply = raw.parse()
        assert raw.headers["x-llmfleet-worker"] == "hub-w"
        assert reply.choices[0].message.content
        assert reply.usage is not None and reply.usage.completion_tokens == 6

        stream = await c.chat.completions.create(
            model="sim-model",
            messages=[{"role": "user", "content": "hi"}],
            max_tokens=5,
            stream=True,
        )
        parts = [ch.choices[0].delta.content or "" async for ch in stream if ch.choices]
        # 5 sim tokens (words); a worker may merge tokens that arrive together into one delta
        assert len("".join(parts).split()) == 5
    assert _role_violations(hub, "llmfleet-gateway-", "llmfleet-worker-") == []


async def test_responses_are_stored_with_role_credentials(roles: Roles, hub: Hub) -> None:
    """/v1/responses on the replicated hub: the gateway created LLMFLEET_RESPONSES at start
    and stores, continues, lists and deletes responses with its role's rights alone."""
    async with openai.AsyncOpenAI(base_url=roles.gw.base_url, api_key="x", max_retries=0) as c:
        first = await c.responses.create(model="sim-model", input="hi", max_output_tokens=4)
        assert first.status == "incomplete" and first.output_text
        assert (await c.responses.retrieve(first.id)).output_text == first.output_text
        second = await c.responses.create(
            model="sim-model", input="more", previous_response_id=first.id
        )
        assert second.previous_response_id == first.id and second.status == "completed"
        items = await c.responses.input_items.list(second.id)
        assert [i.type for i in items.data] == ["message"]
        await c.responses.delete(first.id)
        with pytest.raises(openai.NotFoundError):
            await c.responses.retrieve(first.id)
    assert _role_violations(hub, "llmfleet-gateway-", "llmfleet-worker-") == []


async def test_body_over_max_payload_goes_through_the_object_store(roles: Roles, hub: Hub) -> None:
    # 9 MB > max_payload (8 MB): the gateway puts it in LLMFLEET_BODIES_gateway, the worker reads
    # it with an ordered consumer, the gateway deletes it: object-store rights of both roles.
    big = "x " * (9 * MB // 2)
    async with httpx.AsyncClient(timeout=60) as http:
        r = await http.post(
            roles.gw.base_url + "/chat/completions",
            json={
                "model": "sim-model",
                "messages": [{"role": "user", "content": big}],
                "max_tokens": 3,
            },
        )
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 3
    assert _role_violations(hub, "llmfleet-gateway-", "llmfleet-worker-") == []


async def test_worker_behind_a_leaf_node_serves_requests_from_the_hub(
    roles: Roles, hub: Hub, leaf: Leaf
) -> None:
    leafz = hub.nodes[0].monitor("/leafz")
    assert [lf["account"] for lf in leafz["leafs"]] == ["LLMFLEET"]
    async with openai.AsyncOpenAI(base_url=roles.gw.base_url, api_key="x", max_retries=0) as c:
        raw = await c.chat.completions.with_raw_response.create(
            model="leaf-model", messages=[{"role": "user", "content": "hi"}], max_tokens=4
        )
        assert raw.headers["x-llmfleet-worker"] == "leaf-w"
        assert raw.parse().usage.completion_tokens == 4  # type: ignore[union-attr]
        stream = await c.chat.completions.create(
            model="leaf-model",
            messages=[{"role": "user", "content": "hi"}],
            max_tokens=40,
            stream=True,
        )
        parts = [ch.choices[0].delta.content or "" async for ch in stream if ch.choices]
        assert len([p for p in parts if p]) >= 1 and "".join(parts).count(" ") >= 30
    # The leaf's user may not publish requests: a client on the GPU host cannot queue work.
    nc, _ = await _connect(leaf.url, "leaf-denial")
    try:
        with pytest.raises((nats.errors.Error, TimeoutError)):
            await nc.jetstream(timeout=1).publish(
                names.request_subject("leaf-model", "leaf"), b"{}"
            )
    finally:
        await nc.close()
    assert not [v for v in violations(hub.log()) if "lid:" in v and "llmfleet.req" not in v]


async def test_batch_producer_publishes_and_reads_its_own_prefix(roles: Roles, hub: Hub) -> None:
    nc, errors = await _connect(
        hub.url("batch-etl"), "batch-etl-ok", inbox_prefix="_LLMFLEET.r.batch-etl"
    )
    try:
        reply = "_LLMFLEET.r.batch-etl.job1.r1"
        sub = await nc.subscribe(reply)
        await nc.flush()
        body = json.dumps(
            {
                "model": "sim-model",
                "messages": [{"role": "user", "content": "hi"}],
                "max_tokens": 4,
            }
        ).encode()
        seq = await publish_request(
            nc.jetstream(), "sim-model", body, request_headers(reply), producer="batch-etl"
        )
        assert seq > 0
        kinds = []
        while not kinds or kinds[-1] not in ("done", "error"):
            kinds.append(json.loads((await sub.next_msg(timeout=10)).data)["type"])
        assert kinds[0] == "accepted" and kinds[-1] == "done"
        assert kinds.count("delta") >= 1
        # It may cancel its own requests (it may not ping workers: see the denials).
        cancel = names.cancel_subject("hub-w", "batch-etl")
        await nc.publish(cancel, b'{"type":"cancel","request_id":"x"}')
        await nc.flush()
    finally:
        await nc.close()
    assert errors == []
    assert _role_violations(hub, "batch-etl-ok", "llmfleet-worker-") == []


# ---- what the roles must not do ---------------------------------------------------------


async def test_batch_producer_denials(roles: Roles, hub: Hub) -> None:
    etl, errors = await _connect(
        hub.url("batch-etl"), "etl-denied", inbox_prefix="_LLMFLEET.r.batch-etl"
    )
    evals, evals_errors = await _connect(
        hub.url("batch-evals"), "evals", inbox_prefix="_LLMFLEET.r.batch-evals"
    )
    gw_nc, _ = await _connect(hub.url("gateway"), "gw-control")
    worker_nc, _ = await _connect(hub.url("worker"), "worker-control")
    try:
        spy_gw = await etl.subscribe("_LLMFLEET.r.gateway.>")
        spy_evals = await etl.subscribe("_LLMFLEET.r.batch-evals.>")
        spy_inbox = await etl.subscribe("_INBOX.>")
        spy_admin = await etl.subscribe("_LLMFLEET.admin.>")
        await etl.publish(names.service_subject("hub-w", "drain"), b"")
        await etl.publish("llmfleet.hb.fake", b"{}")
        # Nothing every worker or gateway answers: no ping, no discover.
        await etl.publish(names.control_subject("hub-w"), b'{"type":"ping"}')
        await etl.publish(names.DISCOVER_SUBJECT, b"")
        # No stream of its own (a stream's config could capture anyone's subjects).
        await etl.publish("$JS.API.STREAM.CREATE.OBJ_LLMFLEET_BODIES_batch-etl", b"{}")
        # Nobody else's name: not the gateway's requests, cancels or bodies.
        await etl.publish(names.request_subject("sim-model", "gateway"), b"{}")
        await etl.publish(names.cancel_subject("hub-w", "gateway"), b"{}")
        await etl.publish("$O.LLMFLEET_BODIES_gateway.M.x", b"{}")
        # No ack, delete or consumer rights on the queue.
        await etl.publish("$JS.ACK.LLMFLEET_REQUESTS.llmfleet-sim-model.1.1.1.1.0", b"-NAK")
        await etl.publish("$JS.API.STREAM.MSG.DELETE.LLMFLEET_REQUESTS", b"{}")
        await etl.publish("$JS.API.CONSUMER.CREATE.LLMFLEET_REQUESTS.x", b"{}")
        await etl.flush()
        await _expect_errors(
            errors,
            'subscription to "_llmfleet.r.gateway.>"',
            'subscription to "_llmfleet.r.batch-evals.>"',
            'subscription to "_inbox.>"',
            'subscription to "_llmfleet.admin.>"',
            'publish to "llmfleet.ctl.hub-w.drain"',
            'publish to "llmfleet.hb.fake"',
            'publish to "llmfleet.ctl.hub-w"',
            'publish to "llmfleet.discover"',
            'publish to "$js.api.stream.create.obj_llmfleet_bodies_batch-etl"',
            'publish to "llmfleet.req.sim-model.gateway"',
            'publish to "llmfleet.cancel.hub-w.gateway"',
            'publish to "$o.llmfleet_bodies_gateway.m.x"',
            'publish to "$js.ack.llmfleet_requests.llmfleet-sim-model.1.1.1.1.0"',
            'publish to "$js.api.stream.msg.delete.llmfleet_requests"',
            'publish to "$js.api.consumer.create.llmfleet_requests.x"',
        )
        # Control: the legitimate readers of those prefixes get what a worker publishes
        # there; the producer's denied subscriptions get nothing.
        gw_sub = await gw_nc.subscribe("_LLMFLEET.r.gateway.probe.1")
        evals_sub = await evals.subscribe("_LLMFLEET.r.batch-evals.probe.1")
        await flush(gw_nc)  # nats-py's own flush can overtake the SUB (docs: NATS notes)
        await flush(evals)
        await worker_nc.publish("_LLMFLEET.r.gateway.probe.1", b"to-gateway")
        await worker_nc.publish("_LLMFLEET.r.batch-evals.probe.1", b"to-evals")
        await worker_nc.flush()
        assert (await gw_sub.next_msg(timeout=2)).data == b"to-gateway"
        assert (await evals_sub.next_msg(timeout=2)).data == b"to-evals"
        for spy in (spy_gw, spy_evals, spy_inbox, spy_admin):
            with pytest.raises(nats.errors.TimeoutError):
                await spy.next_msg(timeout=0.3)
        # Nor may a producer touch the stream itself.
        with pytest.raises((nats.errors.Error, TimeoutError)):
            await etl.jetstream(timeout=1).delete_stream(names.REQUEST_STREAM)
        await _expect_errors(errors, 'publish to "$js.api.stream.delete.llmfleet_requests"')
    finally:
        for nc in (etl, evals, gw_nc, worker_nc):
            await nc.close()
    assert evals_errors == []
    assert roles.hub_worker.alive()  # the drain above never reached it


async def test_worker_and_gateway_denials(roles: Roles, hub: Hub) -> None:
    w, w_errors = await _connect(
        hub.url("worker"), "worker-denied", inbox_prefix=names.worker_inbox_prefix("w-denied")
    )
    g, g_errors = await _connect(
        hub.url("gateway"), "gateway-denied", inbox_prefix=names.gateway_inbox_prefix("g-denied")
    )
    try:
        await w.publish("llmfleet.req.sim-model.gateway", b"{}")
        await w.subscribe("llmfleet.req.>")
        await w.subscribe("_LLMFLEET.r.gateway.>")
        await w.subscribe("_LLMFLEET.r.>")
        await w.subscribe("_INBOX.>")  # nobody's answers: each role has its own prefix
        await w.subscribe("_LLMFLEET.admin.>")
        await w.flush()
        await _expect_errors(
            w_errors,
            'publish to "llmfleet.req.sim-model.gateway"',
            'subscription to "llmfleet.req.>"',
            'subscription to "_llmfleet.r.gateway.>"',
            'subscription to "_llmfleet.r.>"',
            'subscription to "_inbox.>"',
            'subscription to "_llmfleet.admin.>"',
        )
        await g.publish("llmfleet.hb.fake", b"{}")
        await g.publish(names.service_subject("hub-w", "drain"), b"")
        await g.subscribe("_LLMFLEET.r.batch-etl.>")
        await g.publish(names.request_subject("sim-model", "batch-etl"), b"{}")
        await g.subscribe("_INBOX.>")
        await g.flush()
        await _expect_errors(
            g_errors,
            'publish to "llmfleet.hb.fake"',
            'publish to "llmfleet.ctl.hub-w.drain"',
            'subscription to "_llmfleet.r.batch-etl.>"',
            'publish to "llmfleet.req.sim-model.batch-etl"',
            'subscription to "_inbox.>"',
        )
    finally:
        await w.close()
        await g.close()
    assert roles.hub_worker.alive()


# ---- the operator -----------------------------------------------------------------------


async def test_admin_reads_queues_and_services(roles: Roles, hub: Hub) -> None:
    nc, errors = await _connect(hub.url("admin"), "admin-ok", inbox_prefix=names.ADMIN_INBOX_PREFIX)
    try:
        info = await nc.jetstream().consumer_info(
            names.REQUEST_STREAM, names.consumer_name("sim-model")
        )
        assert info.name == "llmfleet-sim-model"
        assert info.stream_name == names.REQUEST_STREAM
        # A ctl ping answered by a worker on the hub and one behind the leaf node
        # (allow_responses, across the leaf connection too).
        for worker in ("hub-w", "leaf-w"):
            pong = await nc.request(names.control_subject(worker), b'{"type":"ping"}', timeout=2)
            assert json.loads(pong.data)["type"] == "pong"
        # nats micro discovery reaches every worker, each answering once.
        inbox = nc.new_inbox()
        sub = await nc.subscribe(inbox)
        await nc.publish(f"$SRV.PING.{names.SERVICE_NAME}", b"", reply=inbox)
        seen = []
        with pytest.raises(nats.errors.TimeoutError):
            while True:
                seen.append(json.loads((await sub.next_msg(timeout=1)).data))
        assert sorted(s["metadata"]["worker"] for s in seen) == ["hub-w", "leaf-w"]
        # The operator cannot queue requests.
        await nc.publish("llmfleet.req.sim-model.admin", b"{}")
        await nc.flush()
        await _expect_errors(errors, 'publish to "llmfleet.req.sim-model.admin"')
    finally:
        await nc.close()


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLMFLEET_")}
    return subprocess.run(
        [sys.executable, "-m", "llmfleet", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )


def test_status_and_drain_cli_with_admin_credentials(roles: Roles, hub: Hub) -> None:
    url = hub.url("admin")
    r = _cli("status", "--nats", url, "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert {w["worker"] for w in doc["workers"]} == {"hub-w", "leaf-w"}
    assert [g["state"] for g in doc["gateways"]] == ["ready"]  # gateway announcements too
    assert {"sim-model", "leaf-model"} <= {m["model"] for m in doc["models"]}

    r = _cli("drain", "leaf-w", "--nats", url, "--wait", "--timeout", "30")
    assert r.returncode == 0, r.stderr
    roles.leaf_worker.popen.wait(30)
    assert roles.leaf_worker.popen.returncode == 0
    # By now the gateway has polled the queues for /metrics too (--queue-poll 5 s).
    assert _role_violations(hub, "llmfleet-cli", "llmfleet-worker-", "llmfleet-gateway-") == []


def test_documented_producer_example_runs_as_a_batch_producer(roles: Roles, hub: Hub) -> None:
    """docs/examples/produce.py, logged in as `batch-etl`: no permission it lacks."""
    example = Path(__file__).parents[2] / "docs" / "examples" / "produce.py"
    r = subprocess.run(
        [sys.executable, str(example), "--nats", hub.url("batch-etl"), "--name", "batch-etl", "hi"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    kinds = [json.loads(line)["type"] for line in r.stdout.splitlines() if line.startswith("{")]
    assert kinds[0] == "accepted" and kinds[-1] == "done", r.stdout
    assert _role_violations(hub, "produce-batch-etl") == []
