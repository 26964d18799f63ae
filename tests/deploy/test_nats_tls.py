"""TLS on the hub, switched on as deploy/README.md says, with real nats-server processes.

A throwaway CA and certificates come from deploy/nats/tls/gen-certs.sh (the openssl CLI)
at test time; the 3-node hub runs hub.conf with its `TLS:` lines uncommented and
tls.conf pointing at them, a GPU-host leaf server runs leaf.conf with its `tls {}` block.
Checks that TLS clients (nats-py with the CA, and llmfleet's own processes with
`--nats-ca` or SSL_CERT_FILE), TLS routes and a leaf server with a client certificate
work, and that a plain-text client, a client without the CA and a leaf without a
certificate are refused. One node with tls.conf's client block at `verify: true` checks
llmfleet's client certificates (`--nats-cert`, `--nats-key`, issued with the README's
commands); plain nats-servers check that llmfleet never logs in to a server without TLS
where TLS is required (a tls:// URL, or the TLS flags).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import shutil
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nats
import nats.errors
import openai
import pytest

from common import names, natsconn
from llmfleet.broker import free_port
from tests.deploy.natsconf import (
    CERT_DIR,
    NATS_DIR,
    PASSWORDS,
    REPO,
    Hub,
    Leaf,
    Server,
    rewrite,
    start_with_retries,
    violations,
)
from tests.procs import Fleet

GEN_CERTS = NATS_DIR / "tls" / "gen-certs.sh"
README = REPO / "deploy" / "README.md"


# ---- fixtures ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """gen-certs.sh's CA, server and leaf certificates (valid for 127.0.0.1)."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl CLI is not installed: deploy/nats/tls/gen-certs.sh needs it")
    out = tmp_path_factory.mktemp("certs")
    r = subprocess.run(
        ["sh", str(GEN_CERTS), str(out)], capture_output=True, text=True, timeout=60, check=False
    )
    assert r.returncode == 0, r.stdout + r.stderr
    for f in ("ca.pem", "server-cert.pem", "server-key.pem", "leaf-cert.pem", "leaf-key.pem"):
        assert (out / f).is_file(), f
    assert (out / "server-key.pem").stat().st_mode & 0o077 == 0  # keys: owner only
    return out


@pytest.fixture(scope="module")
def hub(certs: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hub]:
    h = start_with_retries(lambda _: Hub(tmp_path_factory.mktemp("tlshub"), tls=certs))
    assert isinstance(h, Hub)
    try:
        yield h
    finally:
        h.stop()


@pytest.fixture(scope="module")
def leaf(hub: Hub, certs: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Leaf]:
    ports = [n.leaf_port for n in hub.nodes]
    lf = start_with_retries(lambda _: Leaf(tmp_path_factory.mktemp("tlsleaf"), ports, tls=certs))
    assert isinstance(lf, Leaf)
    try:
        _wait_leafs(hub, 1, lf)
        yield lf
    finally:
        lf.stop()


def _wait_leafs(hub: Hub, count: int, lf: Leaf, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while hub.nodes[0].monitor("/leafz").get("leafnodes", 0) < count:
        assert time.monotonic() < deadline, "the leaf never connected:\n" + lf.log()[-3000:]
        time.sleep(0.1)


def _ca_context(certs: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(certs / "ca.pem"))


class Single(Server):
    """One nats-server on loopback in `d`: `body` (config text) after its listen and
    monitoring lines; `port` to take a given client port again."""

    def __init__(self, d: Path, body: str, port: int | None = None) -> None:
        d.mkdir(parents=True, exist_ok=True)
        port = port or free_port()
        self.http_port = free_port()
        conf = d / "server.conf"
        conf.write_text(f'listen: "127.0.0.1:{port}"\nhttp: "127.0.0.1:{self.http_port}"\n{body}')
        super().__init__(conf, port, {})

    def monitor(self, path: str) -> Any:
        url = f"http://127.0.0.1:{self.http_port}{path}"
        with urllib.request.urlopen(url, timeout=2) as resp:
            return json.loads(resp.read())


PASSWORD = "plain-secret-pw"
AUTH = f'authorization {{ user: "u", password: "{PASSWORD}" }}\n'


def _logins(server: Single) -> list[tuple[str, str]]:
    """(name, authorized user) of every connection the server has seen, open or closed."""
    conns = server.monitor("/connz?state=all&auth=true")["connections"]
    return [(c.get("name", ""), c.get("authorized_user", "")) for c in conns]


def _readme_block(marker: str) -> str:
    """The code block of deploy/README.md's TLS section that contains `marker`."""
    tls = README.read_text().split("\n## TLS\n", 1)[1].split("\n## ", 1)[0]
    (block,) = [b for b in re.findall(r"```sh\n(.*?)```", tls, re.S) if marker in b]
    return "\n".join(line.strip() for line in block.splitlines())


@pytest.fixture(scope="module")
def client_cert(certs: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A client certificate and key, issued from the CA with deploy/README.md's commands."""
    d = tmp_path_factory.mktemp("client")
    for f in ("ca.pem", "ca-key.pem"):
        shutil.copyfile(certs / f, d / f)
    script = _readme_block("extendedKeyUsage = clientAuth")
    r = subprocess.run(
        ["sh", "-eu", "-c", script], cwd=d, capture_output=True, text=True, timeout=60, check=False
    )
    assert r.returncode == 0, r.stdout + r.stderr
    key = d / "gateway-key.pem"
    assert key.stat().st_mode & 0o077 == 0
    return d / "gateway-cert.pem", key


@pytest.fixture(scope="module")
def mtls(certs: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Single]:
    """One node with JetStream and deploy/nats/tls.conf's client `tls {}` block, switched
    to `verify: true` as deploy/README.md says (client certificates required)."""
    (block,) = re.findall(r"^tls \{\n.*?^\}\n", (NATS_DIR / "tls.conf").read_text(), re.M | re.S)
    block = rewrite(
        block, [(f'"{CERT_DIR}', f'"{certs}/'), ("  verify: false\n", "  verify: true\n")]
    )

    def make(attempt: int) -> Single:
        d = tmp_path_factory.mktemp(f"mtls{attempt}")
        return Single(d, f'jetstream {{ store_dir: "{d / "store"}" }}\n{block}')

    server = start_with_retries(make)
    assert isinstance(server, Single)
    try:
        yield server
    finally:
        server.stop()


def _tls_flags(certs: Path, client_cert: tuple[Path, Path] | None = None) -> list[str]:
    flags = ["--nats-ca", str(certs / "ca.pem")]
    if client_cert is not None:
        flags += ["--nats-cert", str(client_cert[0]), "--nats-key", str(client_cert[1])]
    return flags


async def _chat(base_url: str) -> str:
    async with openai.AsyncOpenAI(base_url=base_url, api_key="x", max_retries=0) as c:
        reply = await c.chat.completions.create(
            model="sim-model", messages=[{"role": "user", "content": "hi"}], max_tokens=4
        )
    return reply.choices[0].message.content or ""


# ---- the hub ----------------------------------------------------------------------------


def test_every_hub_port_requires_tls_and_the_cluster_forms_over_tls_routes(hub: Hub) -> None:
    names_ = {n.name for n in hub.nodes}
    for node in hub.nodes:
        varz = node.monitor("/varz")
        assert varz["tls_required"] is True and not varz.get("tls_verify")  # clients
        assert varz["leaf"]["tls_required"] is True and varz["leaf"]["tls_verify"] is True
        assert varz["cluster"]["tls_required"] is True and varz["cluster"]["tls_verify"] is True
        # The routes (which require TLS both ways) are up: the cluster formed over them.
        routez = node.monitor("/routez")
        assert {r["remote_name"] for r in routez["routes"]} == names_ - {node.name}
        assert node.monitor("/jsz")["meta_cluster"]["cluster_size"] == 3


async def test_client_with_the_ca_connects_over_tls(hub: Hub, certs: Path) -> None:
    nc = await nats.connect(
        hub.url("admin", scheme="tls").split(","),
        name="tls-admin",
        tls=_ca_context(certs),
        inbox_prefix=names.ADMIN_INBOX_PREFIX,
        allow_reconnect=False,
    )
    try:
        info = await nc.jetstream(timeout=5).account_info()
        assert info is not None
        port = nc.connected_url.port if nc.connected_url else None
    finally:
        await nc.close()
    node = next(n for n in hub.nodes if n.port == port)
    # The server saw a TLS connection with the admin's credentials (/connz?state=closed
    # still lists it once closed).
    conns = node.monitor("/connz?state=closed&auth=true")["connections"]
    (conn,) = [c for c in conns if c.get("name") == "tls-admin"]
    assert conn["tls_version"].startswith("1.") and conn["authorized_user"] == "admin"


async def test_client_without_the_ca_is_refused(hub: Hub, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)  # the system store: not our CA
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    with pytest.raises(ssl.SSLCertVerificationError, match="CERTIFICATE_VERIFY_FAILED"):
        await nats.connect(
            hub.url("gateway", scheme="tls").split(",")[0],
            allow_reconnect=False,
            connect_timeout=2,
        )


def test_plain_text_client_is_refused_before_it_can_log_in(hub: Hub) -> None:
    node = hub.nodes[0]
    with socket.create_connection(("127.0.0.1", node.port), timeout=5) as s:
        f = s.makefile("rb")
        info = json.loads(f.readline().split(b" ", 1)[1])
        assert info["tls_required"] is True
        connect = {"user": "gateway", "pass": PASSWORDS["gateway"], "name": "plain-probe"}
        s.sendall(b"CONNECT " + json.dumps(connect).encode() + b"\r\nPING\r\n")
        answer = b""
        try:
            while chunk := s.recv(4096):
                answer += chunk
        except (ConnectionResetError, TimeoutError):
            pass
    # No PONG, no +OK: the server closed the connection at the TLS handshake.
    assert b"PONG" not in answer and b"+OK" not in answer, answer
    conns = node.monitor("/connz?state=all")["connections"]
    assert not [c for c in conns if c.get("name") == "plain-probe"]


async def test_llmfleet_connects_with_the_ca_from_ssl_cert_file(
    hub: Hub, certs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The alternative to `--nats-ca`: without it, nats-py's default context is used for
    tls:// URLs, and it honours SSL_CERT_FILE."""
    monkeypatch.setenv("SSL_CERT_FILE", str(certs / "ca.pem"))
    nc = await natsconn.connect(
        hub.url("admin", scheme="tls"),
        name="llmfleet-tls-check",
        inbox_prefix=names.ADMIN_INBOX_PREFIX,
    )
    try:
        assert await natsconn.jetstream_ready(nc, natsconn.jetstream(nc))
    finally:
        await natsconn.close(nc)


def test_gateway_and_worker_serve_over_tls(
    hub: Hub, certs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The real processes, `--nats tls://...` and `--nats-ca`, as deploy/README.md says
    (and no SSL_CERT_FILE: the flag alone must do)."""
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)  # the processes inherit this
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    workers = Fleet(hub.url("worker", scheme="tls"), tmp_path / "workers")
    gateways = Fleet(hub.url("gateway", scheme="tls"), tmp_path / "gateways")
    for f in (workers, gateways):
        f.workdir.mkdir()
    ca = _tls_flags(certs)
    try:
        workers.worker(
            "--worker-id", "tls-w", "--model", "sim-model", "--stream-replicas", "3", *ca
        )
        gw = gateways.gateway("--stream-replicas", "3", *ca, wait_models=("sim-model",))
        assert asyncio.run(_chat(gw.base_url))
    finally:
        gateways.stop_all()
        workers.stop_all()
    assert [v for v in violations(hub.log()) if "llmfleet-" in v] == []


def test_gateway_worker_and_status_present_client_certificates(
    mtls: Single,
    certs: Path,
    client_cert: tuple[Path, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Mutual TLS on the client port: the processes and `llmfleet status` present the
    certificate from `--nats-cert` / `--nats-key`, and the server checked it."""
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    url = f"tls://127.0.0.1:{mtls.port}"
    flags = _tls_flags(certs, client_cert)
    fleet = Fleet(url, tmp_path)
    try:
        fleet.worker("--worker-id", "mtls-w", "--model", "sim-model", *flags)
        gw = fleet.gateway("--gateway-id", "mtls-gw", *flags, wait_models=("sim-model",))
        assert asyncio.run(_chat(gw.base_url))
        env = {k: v for k, v in os.environ.items() if not k.startswith("LLMFLEET_")}
        r = subprocess.run(
            [sys.executable, "-m", "llmfleet", "status", "--json", "--nats", url, *flags],
            capture_output=True, text=True, timeout=60, check=False, env=env,
        )  # fmt: skip
        assert r.returncode == 0, r.stderr
        assert [w["worker"] for w in json.loads(r.stdout)["workers"]] == ["mtls-w"]
        # The server saw the certificate (it shows only on open connections).
        conns = mtls.monitor("/connz?auth=true")["connections"]
        peers = {c.get("name", ""): c.get("tls_peer_certs", [{}])[0].get("subject") for c in conns}
        assert peers == {
            "llmfleet-worker-mtls-w": "CN=llmfleet gateway",
            "llmfleet-gateway-mtls-gw": "CN=llmfleet gateway",
        }, peers
    finally:
        fleet.stop_all()


async def test_a_client_without_a_certificate_is_refused_by_mutual_tls(
    mtls: Single, certs: Path
) -> None:
    with pytest.raises((ssl.SSLError, OSError, nats.errors.Error)):
        nc = await natsconn.open_client(
            [f"tls://127.0.0.1:{mtls.port}"],
            tls=natsconn.tls_context(str(certs / "ca.pem")),
            allow_reconnect=False,
            connect_timeout=2,
        )
        await nc.close()


@pytest.mark.parametrize("scheme", ["tls", "nats"])
async def test_llmfleet_refuses_a_plain_server_before_sending_credentials(
    scheme: str, certs: Path, tmp_path: Path
) -> None:
    """A server without TLS (or an attacker posing as the hub) where TLS is required: a
    tls:// URL, or a nats:// one with `--nats-ca`. Refused at its INFO, before CONNECT, so
    the password never crosses the network; the start fails at once instead of retrying.
    (nats-py alone would log in: it upgrades only when the server's INFO asks for TLS.)"""
    server = start_with_retries(lambda n: Single(tmp_path / f"plain{n}", AUTH))
    assert isinstance(server, Single)
    ca = str(certs / "ca.pem") if scheme == "nats" else None
    try:
        with pytest.raises(natsconn.TLSRequiredError, match="does not offer TLS") as refused:
            nc = await asyncio.wait_for(
                natsconn.connect(
                    f"{scheme}://u:{PASSWORD}@127.0.0.1:{server.port}",
                    name="downgrade-check",
                    tls_ca=ca,
                ),
                10,
            )
            await natsconn.close(nc)
        assert PASSWORD not in str(refused.value)
        # The same server without TLS settings: a nats:// login works (and shows up).
        nc = await natsconn.connect(f"nats://u:{PASSWORD}@127.0.0.1:{server.port}", name="plain")
        await natsconn.close(nc)
        deadline = time.monotonic() + 5
        while ("plain", "u") not in (logins := _logins(server)):
            assert time.monotonic() < deadline, logins
            await asyncio.sleep(0.05)
        # The refused connection (it read the server's INFO) never logged in, nor sent its
        # name; the others are nameless too (start_with_retries's port probe).
        others = [lg for lg in logins if lg != ("plain", "u")]
        assert set(others) <= {("", "")}, logins
    finally:
        server.stop()


async def test_a_server_that_turns_plain_is_skipped_on_reconnect(
    certs: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A TLS server replaced, on the same address, by one without TLS: the reconnecting
    client refuses it (logged, no login) and keeps trying until TLS is back."""
    caplog.set_level(logging.WARNING, logger="common.natsconn")
    body = f'tls {{ cert_file: "{certs}/server-cert.pem", key_file: "{certs}/server-key.pem" }}\n'
    tls_server = start_with_retries(lambda n: Single(tmp_path / f"tls{n}", body + AUTH))
    assert isinstance(tls_server, Single)
    url = f"tls://u:{PASSWORD}@127.0.0.1:{tls_server.port}"
    nc = await natsconn.connect(url, name="reconnect-check", tls_ca=str(certs / "ca.pem"))
    try:
        tls_server.stop()
        plain = Single(tmp_path / "plain", AUTH, port=tls_server.port)
        plain.start()
        try:
            deadline = time.monotonic() + 10
            while "does not offer TLS" not in caplog.text:
                assert time.monotonic() < deadline, caplog.text
                await asyncio.sleep(0.05)
            assert not nc.is_connected
            assert all(user == "" for _, user in _logins(plain))
        finally:
            plain.stop()
        tls_server.start()
        deadline = time.monotonic() + 10
        while not nc.is_connected:
            assert time.monotonic() < deadline, "never reconnected over TLS"
            await asyncio.sleep(0.05)
        assert nc._transport._io_writer.get_extra_info("ssl_object") is not None
    finally:
        await natsconn.close(nc)
        tls_server.stop()


async def test_a_server_that_offers_tls_without_requiring_it_is_upgraded(
    certs: Path, tmp_path: Path
) -> None:
    """`allow_non_tls`: INFO says `tls_available`; nats-py alone would stay plain."""
    body = (
        f'tls {{ cert_file: "{certs}/server-cert.pem", key_file: "{certs}/server-key.pem" }}\n'
        "allow_non_tls: true\n"
    )
    server = start_with_retries(lambda n: Single(tmp_path / f"opt{n}", body + AUTH))
    assert isinstance(server, Single)
    try:
        for url in (
            f"tls://u:{PASSWORD}@127.0.0.1:{server.port}",
            f"nats://u:{PASSWORD}@127.0.0.1:{server.port}",
        ):
            nc = await natsconn.connect(url, name="upgrade-check", tls_ca=str(certs / "ca.pem"))
            try:
                assert nc._transport._io_writer.get_extra_info("ssl_object") is not None, url
            finally:
                await natsconn.close(nc)
    finally:
        server.stop()


# ---- the TLS flags' files ---------------------------------------------------------------


def test_tls_files_are_checked_with_clear_errors(
    certs: Path, client_cert: tuple[Path, Path], tmp_path: Path
) -> None:
    ca, cert, key = str(certs / "ca.pem"), str(client_cert[0]), str(client_cert[1])
    assert natsconn.tls_context() is None  # no flags: nats-py's default context
    assert isinstance(natsconn.tls_context(ca, cert, key), ssl.SSLContext)
    with pytest.raises(natsconn.TLSFilesError, match="--nats-cert needs --nats-key"):
        natsconn.tls_context(ca, cert=cert)
    with pytest.raises(natsconn.TLSFilesError, match="--nats-key needs --nats-cert"):
        natsconn.tls_context(key=key)
    with pytest.raises(natsconn.TLSFilesError, match=r"--nats-ca /nowhere/ca\.pem: no such file"):
        natsconn.tls_context("/nowhere/ca.pem")
    (tmp_path / "junk.pem").write_text("not a certificate\n")
    with pytest.raises(natsconn.TLSFilesError, match=r"--nats-ca .*junk\.pem: not a PEM"):
        natsconn.tls_context(str(tmp_path / "junk.pem"))
    with pytest.raises(natsconn.TLSFilesError, match="not a matching PEM pair"):
        natsconn.tls_context(ca, cert, str(certs / "server-key.pem"))
    locked = tmp_path / "locked-key.pem"
    subprocess.run(
        ["openssl", "ec", "-in", key, "-aes256", "-passout", "pass:pw", "-out", str(locked)],
        capture_output=True, check=True, timeout=30,
    )  # fmt: skip
    with pytest.raises(natsconn.TLSFilesError, match="encrypted"):
        natsconn.tls_context(ca, cert, str(locked))


def test_the_cli_reports_a_bad_tls_file(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLMFLEET_")}
    for command in (["gateway"], ["worker", "--model", "m"], ["status"], ["drain", "w"]):
        r = subprocess.run(
            [sys.executable, "-m", "llmfleet", *command, "--nats-ca", str(tmp_path / "no.pem")],
            capture_output=True, text=True, timeout=60, check=False, env=env,
        )  # fmt: skip
        assert r.returncode != 0 and "--nats-ca" in r.stderr and "no such file" in r.stderr, (
            command,
            r.stderr,
        )


# ---- a GPU host's leaf server -----------------------------------------------------------


async def test_leaf_with_a_client_certificate_carries_traffic_over_tls(
    hub: Hub, leaf: Leaf, certs: Path
) -> None:
    (lf,) = hub.nodes[0].monitor("/leafz")["leafs"]
    assert lf["account"] == "LLMFLEET"
    # A subject the leaf user may receive: a gateway's discover on the hub reaches a
    # client of the leaf server (which connects to it locally, without TLS).
    local = await nats.connect(leaf.url, name="leaf-local", allow_reconnect=False)
    gw = await nats.connect(
        hub.url("gateway", scheme="tls").split(",")[0],
        tls=_ca_context(certs),
        inbox_prefix=names.gateway_inbox_prefix("tls-leaf"),
        allow_reconnect=False,
    )
    try:
        sub = await local.subscribe(names.DISCOVER_SUBJECT)
        await local.flush()
        deadline = time.monotonic() + 10
        while True:  # the subscription takes a moment to reach the hub
            await gw.publish(names.DISCOVER_SUBJECT, b"{}")
            try:
                msg = await sub.next_msg(timeout=0.2)
                break
            except nats.errors.TimeoutError:
                assert time.monotonic() < deadline, "nothing crossed the TLS leaf connection"
        assert msg.data == b"{}"
    finally:
        await local.close()
        await gw.close()


def test_leaf_without_a_client_certificate_is_refused(
    hub: Hub, leaf: Leaf, certs: Path, tmp_path: Path
) -> None:
    ports = [n.leaf_port for n in hub.nodes]
    bare = start_with_retries(
        lambda _: Leaf(tmp_path / "bare", ports, tls=certs, client_cert=False)
    )
    try:
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            assert hub.nodes[0].monitor("/leafz")["leafnodes"] == 1  # only the first leaf
            time.sleep(0.2)
        assert "certificate" in hub.nodes[0].log().lower()
    finally:
        bare.stop()


def test_leaf_conf_tls_block_is_the_documented_one() -> None:
    """The switch the tests throw is text in the shipped files (not a test-only config)."""
    leaf_conf = (NATS_DIR / "leaf.conf").read_text()
    hub_conf = (NATS_DIR / "hub.conf").read_text()
    tls_conf = (NATS_DIR / "tls.conf").read_text()
    assert hub_conf.count("# TLS:") == 3
    for var in ("LEAFNODE_TLS", "ROUTE_TLS"):
        assert f"{var} = {{" in tls_conf and f"# tls: ${var}" in hub_conf
    # clients: TLS, no client certificate; leaf nodes and routes: mutual TLS
    assert re.findall(r"^\s*verify: (\w+)", tls_conf, re.M) == ["false", "true", "true"]
    assert "\ntls {" in tls_conf
    assert '#   ca_file: "/etc/nats/tls/ca.pem"' in leaf_conf
