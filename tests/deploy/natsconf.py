"""Run the deploy/nats configs with real nats-server processes on loopback.

The configs are copied to a temporary directory and only their network layout is
rewritten: listen addresses, ports, route URLs, the store directory and (for several
nodes on one host) one copy per node. `settings.conf` and `accounts.conf` (every
permission) are copied byte for byte. Each rewrite must match the deployed text exactly,
so a config change that breaks the rewrite fails loudly instead of testing something else.
Passwords come from the environment, as in production (`$NATS_..._PASSWORD`).
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


class Server:
    """One nats-server process on a config file; logs to `<dir>/server.log`."""

    def __init__(self, conf: Path, port: int, env: dict[str, str]) -> None:
        self.conf = conf
        self.port = port
        self.env = env
        self.log_path = conf.parent / "server.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [find_binary(), "-c", str(self.conf)],
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
    accounts.conf, one directory per node (they share one host here)."""

    def __init__(self, workdir: Path, size: int = 3) -> None:
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
            for f in (f"{name}.conf", "hub.conf", *UNCHANGED):
                shutil.copyfile(NATS_DIR / f, d / f)
            pairs = [
                ('listen: "0.0.0.0:4222"', f'listen: "127.0.0.1:{client[i]}"'),
                ('http: "0.0.0.0:8222"', f'http: "127.0.0.1:{http[i]}"'),
                ('store_dir: "/data"', f'store_dir: "{d / "store"}"'),
                ('listen: "0.0.0.0:6222"', f'listen: "127.0.0.1:{route[i]}"'),
                ('host: "0.0.0.0"\n  port: 7422', f'host: "127.0.0.1"\n  port: {leaf[i]}'),
            ]
            pairs += [
                (f"nats-route://nats-{j + 1}:6222", f"nats-route://127.0.0.1:{route[j]}")
                for j in range(size)
            ]
            hub = d / "hub.conf"
            hub.write_text(rewrite(hub.read_text(), pairs))
            self.nodes.append(HubNode(name, d / f"{name}.conf", client[i], http[i], leaf[i]))

    def url(self, user: str) -> str:
        """Every node's URL with `user`'s credentials, comma separated (as for --nats)."""
        pw = PASSWORDS[user]
        return ",".join(f"nats://{user}:{pw}@127.0.0.1:{n.port}" for n in self.nodes)

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
    """deploy/nats/leaf.conf on a loopback port, dialing out to one hub node's 7422."""

    def __init__(self, workdir: Path, hub_leaf_ports: list[int]) -> None:
        d = workdir / "leaf"
        d.mkdir(parents=True)
        for f in ("leaf.conf", "settings.conf"):
            shutil.copyfile(NATS_DIR / f, d / f)
        port = free_port()
        conf = d / "leaf.conf"
        conf.write_text(
            rewrite(conf.read_text(), [('listen: "127.0.0.1:4222"', f'listen: "127.0.0.1:{port}"')])
        )
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


def start_with_retries(make: Callable[[int], Hub | Leaf], attempts: int = 3) -> Hub | Leaf:
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
