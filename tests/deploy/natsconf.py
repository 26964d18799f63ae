"""Run the deploy/nats configs with real nats-server processes on loopback.

The configs are copied to a temporary directory and only their network layout is
rewritten: listen addresses, ports, route URLs, the store directory and (for several
nodes on one host) one copy per node. `settings.conf` and `accounts.conf` (every
permission) are copied byte for byte. Each rewrite must match the deployed text exactly,
so a config change that breaks the rewrite fails loudly instead of testing something else.
Passwords come from the environment, as in production (`$NATS_..._PASSWORD`).

With `tls=<directory of certificates>` (made by deploy/nats/tls/gen-certs.sh), the
documented TLS switch is thrown as an operator would: the `# TLS:` lines of hub.conf and
the `tls {}` block of leaf.conf are uncommented, and tls.conf's certificate paths
(/etc/nats/tls/) point at that directory.
"""

from __future__ import annotations

import http.client
import json
import shutil
import signal
import subprocess
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from llmfleet.broker import find_binary, free_port, wait_for_port

REPO = Path(__file__).resolve().parents[2]
NATS_DIR = REPO / "deploy" / "nats"
UNCHANGED = ("settings.conf", "accounts.conf")

PASSWORDS = {
    "sys": "sys-test-pw",
    "gateway": "gateway-test-pw",
    "worker": "worker-test-pw",
    "leaf": "leaf-test-pw",
    "batch-etl": "etl-test-pw",
    "batch-evals": "evals-test-pw",
    "admin": "admin-test-pw",
}


def password_env() -> dict[str, str]:
    """The environment accounts.conf reads its passwords from."""
    return {f"NATS_{user.replace('-', '_').upper()}_PASSWORD": pw for user, pw in PASSWORDS.items()}


def rewrite(text: str, pairs: list[tuple[str, str]]) -> str:
    """Replace each `old` (which must occur in `text`) by `new`."""
    for old, new in pairs:
        if old not in text:
            raise AssertionError(f"deploy config no longer contains {old!r}: update the test")
        text = text.replace(old, new)
    return text


def rewrite_file(path: Path, pairs: list[tuple[str, str]]) -> None:
    path.write_text(rewrite(path.read_text(), pairs))


CERT_DIR = "/etc/nats/tls/"
"""Where tls.conf and leaf.conf expect the certificates (deploy/nats mounted at /etc/nats)."""

HUB_TLS_SWITCH = [
    ('# include "tls.conf"', 'include "tls.conf"'),
    ("# tls: $ROUTE_TLS", "tls: $ROUTE_TLS"),
    ("# tls: $LEAFNODE_TLS", "tls: $LEAFNODE_TLS"),
]
"""hub.conf's three `TLS:` lines, uncommented."""

LEAF_TLS_BLOCK = """      # tls {
      #   ca_file: "/etc/nats/tls/ca.pem"
      #   cert_file: "/etc/nats/tls/leaf-cert.pem"
      #   key_file: "/etc/nats/tls/leaf-key.pem"
      # }
"""
"""leaf.conf's commented TLS block for the hub connection."""


def hub_layout(
    d: Path, client: int, http: int, route: int, leaf: int, routes: list[int]
) -> list[tuple[str, str]]:
    """hub.conf's network layout on loopback: this node's ports, the other nodes' routes
    (`routes[j]` for nats-<j+1>), the store under `d`."""
    pairs = [
        ('listen: "0.0.0.0:4222"', f'listen: "127.0.0.1:{client}"'),
        ('http: "127.0.0.1:8222"', f'http: "127.0.0.1:{http}"'),
        ('store_dir: "/data"', f'store_dir: "{d / "store"}"'),
        ('listen: "0.0.0.0:6222"', f'listen: "127.0.0.1:{route}"'),
        ('host: "0.0.0.0"\n  port: 7422', f'host: "127.0.0.1"\n  port: {leaf}'),
    ]
    pairs += [
        (f"nats-route://nats-{j + 1}:6222", f"nats-route://127.0.0.1:{port}")
        for j, port in enumerate(routes)
    ]
    return pairs


class Server:
    """One nats-server process on a config file; logs to `<dir>/server.log`. `args`
    replaces the command line `-c <conf>` (e.g. compose's `--config ... --name ...`)."""

    def __init__(
        self, conf: Path, port: int, env: dict[str, str], args: list[str] | None = None
    ) -> None:
        self.conf = conf
        self.port = port
        self.env = env
        self.args = args if args is not None else ["-c", str(conf)]
        self.log_path = conf.parent / "server.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [find_binary(), *self.args],
                cwd=self.conf.parent,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                start_new_session=True,
            )
        wait_for_port("127.0.0.1", self.port, 15.0, self.proc)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


class HubNode(Server):
    def __init__(self, name: str, conf: Path, port: int, http_port: int, leaf_port: int) -> None:
        super().__init__(conf, port, password_env())
        self.name = name
        self.http_port = http_port
        self.leaf_port = leaf_port

    def monitor(self, path: str) -> Any:
        url = f"http://127.0.0.1:{self.http_port}{path}"
        with urllib.request.urlopen(url, timeout=2) as resp:
            return json.loads(resp.read())


class Hub:
    """The 3-node hub cluster: deploy/nats/nats-<n>.conf, hub.conf, settings.conf,
    accounts.conf, one directory per node (they share one host here); with `tls`, also
    tls.conf, switched on (module docstring)."""

    def __init__(self, workdir: Path, size: int = 3, tls: Path | None = None) -> None:
        self.workdir = workdir
        client = [free_port() for _ in range(size)]
        route = [free_port() for _ in range(size)]
        http = [free_port() for _ in range(size)]
        leaf = [free_port() for _ in range(size)]
        self.nodes: list[HubNode] = []
        for i in range(size):
            name = f"nats-{i + 1}"
            d = workdir / name
            d.mkdir(parents=True)
            files = [f"{name}.conf", "hub.conf", *UNCHANGED] + (["tls.conf"] if tls else [])
            for f in files:
                shutil.copyfile(NATS_DIR / f, d / f)
            pairs = hub_layout(d, client[i], http[i], route[i], leaf[i], route)
            if tls is not None:
                pairs += HUB_TLS_SWITCH
                rewrite_file(d / "tls.conf", [(f'"{CERT_DIR}', f'"{tls}/')])
            rewrite_file(d / "hub.conf", pairs)
            self.nodes.append(HubNode(name, d / f"{name}.conf", client[i], http[i], leaf[i]))

    def url(self, user: str, scheme: str = "nats") -> str:
        """Every node's URL with `user`'s credentials, comma separated (as for --nats)."""
        pw = PASSWORDS[user]
        return ",".join(f"{scheme}://{user}:{pw}@127.0.0.1:{n.port}" for n in self.nodes)

    def start(self, timeout: float = 20.0) -> None:
        for n in self.nodes:
            n.start()
        deadline = time.monotonic() + timeout
        while True:
            try:
                if all(n.monitor("/jsz").get("meta_cluster", {}).get("leader") for n in self.nodes):
                    return
            except (OSError, ValueError, http.client.HTTPException):
                pass  # not serving monitoring yet
            if time.monotonic() > deadline:
                raise TimeoutError("no JetStream meta leader:\n" + self.nodes[0].log()[-3000:])
            time.sleep(0.1)

    def log(self) -> str:
        return "".join(n.log() for n in self.nodes)

    def stop(self) -> None:
        for n in self.nodes:
            n.stop()


class Leaf(Server):
    """deploy/nats/leaf.conf on a loopback port, dialing out to one hub node's 7422.

    With `tls`, its `tls {}` block is uncommented (the hub's CA, the leaf certificate);
    `client_cert=False` leaves the certificate out (the hub must refuse that leaf)."""

    def __init__(
        self,
        workdir: Path,
        hub_leaf_ports: list[int],
        tls: Path | None = None,
        client_cert: bool = True,
    ) -> None:
        d = workdir / "leaf"
        d.mkdir(parents=True)
        for f in ("leaf.conf", "settings.conf"):
            shutil.copyfile(NATS_DIR / f, d / f)
        port = free_port()
        conf = d / "leaf.conf"
        pairs = [('listen: "127.0.0.1:4222"', f'listen: "127.0.0.1:{port}"')]
        if tls is not None:
            block = LEAF_TLS_BLOCK.replace("# ", "").replace(CERT_DIR, f"{tls}/")
            if not client_cert:
                block = "".join(line for line in block.splitlines(True) if "leaf-" not in line)
            pairs.append((LEAF_TLS_BLOCK, block))
        rewrite_file(conf, pairs)
        pw = PASSWORDS["leaf"]
        # The leaf needs only the hub's leafnode URL with the `leaf` user's credentials.
        env = {"NATS_HUB_LEAF_URL": f"nats-leaf://leaf:{pw}@127.0.0.1:{hub_leaf_ports[0]}"}
        super().__init__(conf, port, env)

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"


def violations(log: str) -> list[str]:
    """nats-server's permission-violation log lines (`... Publish Violation - Subject ...`)."""
    return [line for line in log.splitlines() if "Violation - " in line]


def start_with_retries(make: Callable[[int], Hub | Server], attempts: int = 3) -> Hub | Server:
    """Start what `make(attempt)` builds; new free ports on each attempt.

    A port from `free_port` can be taken by another process before nats-server binds it
    (other test suites may run on this machine at the same time): the server then exits
    at once, or (a route port taken by another test's nats-server) the cluster never
    elects a JetStream leader. A second attempt with other ports succeeds.
    """
    for attempt in range(attempts):
        thing = make(attempt)
        try:
            thing.start()
        except (RuntimeError, TimeoutError):  # a server exited, or no cluster formed
            thing.stop()
            if attempt == attempts - 1:
                raise
            continue
        except BaseException:
            thing.stop()
            raise
        return thing
    raise AssertionError("unreachable")
