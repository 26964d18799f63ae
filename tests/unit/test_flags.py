"""The CLI is generated from the settings: every flag's default is the settings field's,
written once, and the composition roots read the flags back into the same settings."""

from __future__ import annotations

import pytest

from gateway.settings import GatewaySettings
from llmfleet.flags import (
    GATEWAY_FLAGS,
    LLAMACPP_FLAGS,
    NATS_TLS_FLAGS,
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
ALL_GATEWAY = (*NATS_TLS_FLAGS, *GATEWAY_FLAGS)
ALL_WORKER_TLS = (*NATS_TLS_FLAGS, *ALL_WORKER)
TLS_ARGV = ["--nats-ca", "/tls/ca.pem", "--nats-cert", "/tls/c.pem", "--nats-key", "/tls/k.pem"]


@pytest.fixture(autouse=True)
def _no_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os  # noqa: PLC0415

    for k in [k for k in os.environ if k.startswith("LLMFLEET_")]:
        monkeypatch.delenv(k)


def test_no_flags_means_the_settings_defaults() -> None:
    args = build_parser().parse_args(["gateway"])
    assert settings_from(args, GatewaySettings(URL), ALL_GATEWAY) == GatewaySettings(URL)
    args = build_parser().parse_args(["worker"])
    assert settings_from(args, WorkerSettings(URL), ALL_WORKER_TLS) == WorkerSettings(URL)


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


def test_nats_tls_flags_reach_the_gateway_and_worker_settings() -> None:
    p = build_parser()
    g = settings_from(p.parse_args(["gateway", *TLS_ARGV]), GatewaySettings(URL), ALL_GATEWAY)
    w = settings_from(p.parse_args(["worker", *TLS_ARGV]), WorkerSettings(URL), ALL_WORKER_TLS)
    for s in (g, w):
        assert (s.nats_ca, s.nats_cert, s.nats_key) == ("/tls/ca.pem", "/tls/c.pem", "/tls/k.pem")
    # Not given, or empty: None (no TLS settings; a tls:// URL uses the system store).
    g = settings_from(p.parse_args(["gateway", "--nats-ca", ""]), GatewaySettings(URL), ALL_GATEWAY)
    assert (g.nats_ca, g.nats_cert, g.nats_key) == (None, None, None)
    # One declaration serves both: the two settings agree on the defaults.
    for f in NATS_TLS_FLAGS:
        assert getattr(GatewaySettings(URL), f.path) is getattr(WorkerSettings(URL), f.path) is None


def test_nats_tls_flags_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLMFLEET_NATS_CA", "/env/ca.pem")
    monkeypatch.setenv("LLMFLEET_NATS_CERT", "/env/c.pem")
    monkeypatch.setenv("LLMFLEET_NATS_KEY", "/env/k.pem")
    args = build_parser().parse_args(["worker", "--nats-key", "/flag/k.pem"])
    s = settings_from(args, WorkerSettings(URL), ALL_WORKER_TLS)
    assert (s.nats_ca, s.nats_cert, s.nats_key) == ("/env/ca.pem", "/env/c.pem", "/flag/k.pem")


def test_nats_tls_flags_go_wherever_nats_does() -> None:
    p = build_parser()
    for argv in (["status"], ["drain", "w-1"], ["gateway"], ["worker"]):
        args = p.parse_args([*argv, *TLS_ARGV])
        assert (args.nats_ca, args.nats_cert, args.nats_key) == (
            "/tls/ca.pem", "/tls/c.pem", "/tls/k.pem"
        )  # fmt: skip
    args = p.parse_args(["dev"])  # runs its own broker, on loopback without TLS
    assert not hasattr(args, "nats_url") and not hasattr(args, "nats_ca")
    with pytest.raises(SystemExit):
        p.parse_args(["dev", "--nats-ca", "x"])


def test_a_bad_tls_file_fails_the_composition_root() -> None:
    """Before anything connects: TLSFilesError, a ValueError the CLI shows."""
    from common.natsconn import TLSFilesError  # noqa: PLC0415
    from llmfleet.roots import build_gateway, build_worker  # noqa: PLC0415

    p = build_parser()
    with pytest.raises(TLSFilesError, match="--nats-cert needs --nats-key"):
        build_gateway(p.parse_args(["gateway", "--nats-cert", "/tls/c.pem"]), URL)
    with pytest.raises(TLSFilesError, match="no such file"):
        build_worker(p.parse_args(["worker", "--model", "m", "--nats-ca", "/nowhere.pem"]), URL)
