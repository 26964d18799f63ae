"""Fixtures of the security suite: one hub and one fleet per test module (tests/security/
stack.py). A module changes the fleet by overriding `gateway_flags` or `worker_flags`."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.security.stack import OneNodeHub, Stack, start_hub


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OneNodeHub]:
    h = start_hub(tmp_path_factory.mktemp("sechub"))
    try:
        yield h
    finally:
        h.stop()


@pytest.fixture(scope="module")
def gateway_flags() -> tuple[str, ...]:
    return ()


@pytest.fixture(scope="module")
def worker_flags() -> tuple[str, ...]:
    return ()


@pytest.fixture(scope="module")
def stack(
    hub: OneNodeHub,
    gateway_flags: tuple[str, ...],
    worker_flags: tuple[str, ...],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Stack]:
    """A gateway (with the API key) and two sim workers, `sim-a` and `sim-b`."""
    s = Stack(hub, tmp_path_factory.mktemp("secfleet"))
    try:
        s.worker("sim-a", *worker_flags)
        s.worker("sim-b", *worker_flags)
        s.gateway(*gateway_flags)
        yield s
    finally:
        s.stop()
