"""A real 3-node nats-server cluster with JetStream, routes on loopback, for fault tests."""

from __future__ import annotations

import asyncio
import signal
import tempfile
from pathlib import Path

import nats

from llmfleet.broker import EmbeddedNats, free_port


class NatsCluster:
    def __init__(self, size: int = 3) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="llmfleet-cluster-")
        self.client_ports = [free_port() for _ in range(size)]
        self.route_ports = [free_port() for _ in range(size)]
        self.nodes: list[EmbeddedNats] = []
        for i in range(size):
            routes = ", ".join(
                f'"nats-route://127.0.0.1:{p}"' for j, p in enumerate(self.route_ports) if j != i
            )
            extra = (
                "cluster {\n"
                '  name: "llmfleet-test"\n'
                f'  listen: "127.0.0.1:{self.route_ports[i]}"\n'
                f"  routes: [{routes}]\n"
                "}\n"
            )
            self.nodes.append(
                EmbeddedNats(
                    port=self.client_ports[i],
                    store_dir=str(Path(self._tmp.name) / f"n{i}"),
                    server_name=f"n{i}",
                    extra=extra,
                )
            )

    @property
    def urls(self) -> str:
        return ",".join(f"nats://127.0.0.1:{p}" for p in self.client_ports)

    def start(self) -> NatsCluster:
        for n in self.nodes:
            n.start()
        asyncio.run(self.wait_jetstream())
        return self

    async def wait_jetstream(self, timeout: float = 30.0) -> None:
        """Until the JetStream meta group has a leader (the cluster can take streams)."""
        async with asyncio.timeout(timeout):
            while True:
                try:
                    nc = await nats.connect(self.urls.split(","), connect_timeout=1)
                    try:
                        await nc.jetstream(timeout=1).account_info()
                        return
                    finally:
                        await nc.close()
                except Exception:
                    await asyncio.sleep(0.25)

    def kill(self, i: int) -> None:
        proc = self.nodes[i].proc
        assert proc is not None
        proc.kill()
        proc.wait()
        self.nodes[i].proc = None

    def restart(self, i: int) -> None:
        self.nodes[i].start()

    def freeze(self, i: int) -> None:
        proc = self.nodes[i].proc
        assert proc is not None
        proc.send_signal(signal.SIGSTOP)

    def thaw(self, i: int) -> None:
        proc = self.nodes[i].proc
        assert proc is not None
        proc.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        for n in self.nodes:
            if n.proc is not None:
                n.proc.send_signal(signal.SIGCONT)
            n.stop()
        self._tmp.cleanup()
