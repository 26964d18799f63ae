"""The CLI is generated from the settings: every flag's default is the settings field's,
written once, and the composition roots read the flags back into the same settings."""

from __future__ import annotations

import pytest

from gateway.settings import GatewaySettings
from llmfleet.flags import (
    GATEWAY_FLAGS,
    LLAMACPP_FLAGS,
    OPENAI_FLAGS,
    SIM_FLAGS,
    WORKER_FLAGS,
    WORKER_REPLICAS,
    build_parser,
    settings_from,
)
from worker.settings import WorkerSettings

URL = "nats://x:4222"
ALL_WORKER = (*WORKER_FLAGS, WORKER_REPLICAS, *SIM_FLAGS, *OPENAI_FLAGS, *LLAMACPP_FLAGS)


@pytest.fixture(autouse=True)
def _no_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os  # noqa: PLC0415

    for k in [k for k in os.environ if k.startswith("LLMFLEET_")]:
        monkeypatch.delenv(k)


def test_no_flags_means_the_settings_defaults() -> None:
    args = build_parser().parse_args(["gateway"])
    assert settings_from(args, GatewaySettings(URL), GATEWAY_FLAGS) == GatewaySettings(URL)
    args = build_parser().parse_args(["worker"])
    assert settings_from(args, WorkerSettings(URL), ALL_WORKER) == WorkerSettings(URL)


def test_gateway_flags_reach_their_fields() -> None:
    argv = ["gateway", "--queue-timeout", "5", "--cors-origins", "a, b", "--max-n", "8",
            "--api-key", "k", "--resume-on-failure", "--stream-replicas", "3"]  # fmt: skip
    s = settings_from(build_parser().parse_args(argv), GatewaySettings(URL), GATEWAY_FLAGS)
    assert s.dispatch.queue_timeout_s == 5.0 and s.dispatch.stall_timeout_s == 5.0
    assert s.cors_origins == ("a", "b") and s.limits.max_n == 8 and s.api_key == "k"
    assert s.resume_on_failure and s.queue.replicas == 3
    assert s.default_model is None  # empty means None


def test_worker_flags_reach_the_engine_settings() -> None:
    argv = ["worker", "--engine", "openai", "--upstream", "http://u/v1", "--n-threads", "0",
            "--n-gpu-layers", "-1", "--max-concurrency", "3", "--sim-tokens", "7"]  # fmt: skip
    s = settings_from(build_parser().parse_args(argv), WorkerSettings(URL), ALL_WORKER)
    assert s.engine.kind == "openai" and s.engine.openai.base_url == "http://u/v1"
    assert s.engine.llamacpp.n_threads is None  # 0 means llama.cpp's default
    assert s.engine.llamacpp.n_gpu_layers == -1 and s.max_concurrency == 3
    assert s.engine.sim.tokens == 7


def test_an_environment_variable_sets_a_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLMFLEET_QUEUE_TIMEOUT", "9")
    s = settings_from(build_parser().parse_args(["gateway"]), GatewaySettings(URL), GATEWAY_FLAGS)
    assert s.dispatch.queue_timeout_s == 9.0


def test_global_flags_go_before_or_after_the_command() -> None:
    p = build_parser()
    assert p.parse_args(["gateway", "--log-level", "warning"]).log_level == "warning"
    assert p.parse_args(["--log-level", "debug", "worker"]).log_level == "debug"
    assert p.parse_args(["status"]).log_level == "info"
