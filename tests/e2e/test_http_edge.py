"""The gateway's HTTP edge against raw sockets, on real processes: a huge request head is
refused (431) without the gateway's memory growing, a slow head is cut off (408), too many
connections get 503 in the OpenAI envelope; `/metrics` needs a token when auth is on, or is
served on a listener of its own; and no answer names a worker's upstream."""

from __future__ import annotations

import json
import select
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from llmfleet.broker import free_port
from tests.procs import Fleet, Gateway, upstream_process

KEY = "edge-api-key"
METRICS_TOKEN = "edge-metrics-token"
HEAD_TIMEOUT = 1.5
MAX_CONNECTIONS = 8
PROXIED = "edge-proxied"
FAILING = "error-500"  # the test upstream fails this model with its own text


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with upstream_process(tmp_path_factory.mktemp("upstream"), "--ttft-ms", "1") as url:
        yield url


@pytest.fixture(scope="module")
def gw(fleet: Fleet, upstream: str) -> Gateway:
    for model in (PROXIED, FAILING):
        fleet.worker(
            "--engine", "openai", "--model", model, "--upstream", upstream + "/v1",
            "--upstream-api-key", "sk-upstream-secret-123456",
        )  # fmt: skip
    return fleet.gateway(
        "--api-key", KEY, "--metrics-token", METRICS_TOKEN,
        "--header-timeout", str(HEAD_TIMEOUT), "--max-header-bytes", "65536",
        "--max-connections", str(MAX_CONNECTIONS),
        wait_models=(PROXIED, FAILING),
    )  # fmt: skip


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def connect(gw: Gateway) -> socket.socket:
    return socket.create_connection(("127.0.0.1", gw.port), timeout=10)


def read_answer(s: socket.socket, timeout: float = 10.0) -> bytes:
    """Everything the gateway sends until it closes the connection."""
    s.settimeout(timeout)
    data = b""
    try:
        while chunk := s.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    return data


def status_and_error(answer: bytes) -> tuple[int, dict[str, object]]:
    head, _, body = answer.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, json.loads(body)["error"]


def send_until_answered(s: socket.socket, pieces: Iterator[bytes]) -> int:
    """Send `pieces` until the gateway answers or closes; returns the bytes sent."""
    sent = 0
    for piece in pieces:
        if select.select([s], [], [], 0)[0]:
            break
        try:
            s.sendall(piece)
        except OSError:  # closed under us: what it answered is still to be read
            break
        sent += len(piece)
    return sent


# ---- request heads --------------------------------------------------------------------------


def test_a_huge_header_is_refused_before_it_is_buffered(gw: Gateway) -> None:
    for _ in range(3):  # warm up: the first requests allocate what any request needs
        assert httpx.get(gw.url + "/healthz").status_code == 200
    before = rss_mib(gw.popen.pid)
    for shape in ("one header", "many headers"):
        s = connect(gw)
        s.sendall(b"GET /v1/models HTTP/1.1\r\nHost: edge\r\n")
        # 32 MiB offered, so that buffering it would show in the RSS (the kernel's socket
        # buffers take a few MiB whatever the gateway does: `sent` is only bounded).
        if shape == "one header":
            s.sendall(b"X-Huge: ")
            pieces = (b"a" * 65536 for _ in range(512))  # one header, never ended
        else:
            pieces = (b"X-H%d: %s\r\n" % (i, b"b" * 1000) for i in range(32 * 1024))
        sent = send_until_answered(s, pieces)
        answer = read_answer(s)
        s.close()
        status, err = status_and_error(answer)
        assert status == 431, answer[:300]
        assert err["code"] == "request_header_fields_too_large"
        assert b"connection: close" in answer.lower()
        assert sent < 16 * 2**20, f"{shape}: {sent} bytes went in before the gateway answered"
    grown = rss_mib(gw.popen.pid) - before
    assert grown < 8, f"RSS grew by {grown:.1f} MiB"


def test_large_but_allowed_headers_are_served(gw: Gateway) -> None:
    auth = {"authorization": f"Bearer {KEY}", "x-padding": "p" * 40_000}
    r = httpx.get(gw.base_url + "/models", headers=auth)
    assert r.status_code == 200


def test_a_slow_head_is_cut_off_after_the_header_timeout(gw: Gateway) -> None:
    s = connect(gw)
    t0 = time.monotonic()
    s.sendall(b"GET /healthz HTTP/1.1\r\nHost: edge\r\n")
    closed_at = None
    for i in range(40):  # one header byte every 0.1 s: never a whole head
        try:
            s.sendall(b"X-Slow-%d: 1\r\n" % i)
        except OSError:
            break
        if select.select([s], [], [], 0.1)[0]:
            closed_at = time.monotonic() - t0
            break
    answer = read_answer(s)
    s.close()
    closed_at = closed_at or time.monotonic() - t0
    assert HEAD_TIMEOUT - 0.2 < closed_at < HEAD_TIMEOUT + 1.5, closed_at
    status, err = status_and_error(answer)
    assert (status, err["code"]) == (408, "request_timeout")


def test_idle_and_keep_alive_connections_are_closed(gw: Gateway) -> None:
    idle = connect(gw)  # never sends a byte
    t0 = time.monotonic()
    assert read_answer(idle) == b""
    assert time.monotonic() - t0 < HEAD_TIMEOUT + 1.5
    idle.close()

    # A served request, then a next head trickled in after it: cut off like the first.
    s = connect(gw)
    s.sendall(b"GET /healthz HTTP/1.1\r\nHost: edge\r\n\r\n")
    s.settimeout(5)
    first = b""
    while not first.endswith(b'{"status":"ok"}'):
        first += s.recv(4096)
    assert first.startswith(b"HTTP/1.1 200")
    t0 = time.monotonic()
    s.sendall(b"GET /healthz HTTP/1.1\r\n")
    for _ in range(30):
        if select.select([s], [], [], 0.1)[0]:
            break
        try:
            s.sendall(b"X: 1\r\n")
        except OSError:
            break
    answer = read_answer(s)
    s.close()
    assert time.monotonic() - t0 < HEAD_TIMEOUT + 1.5
    assert answer.startswith(b"HTTP/1.1 408")


def test_connections_past_the_limit_get_503_in_the_envelope(gw: Gateway) -> None:
    held = [connect(gw) for _ in range(MAX_CONNECTIONS)]
    try:
        for s in held:
            s.sendall(b"GET /healthz HTTP/1.1\r\n")  # open, head unfinished
        time.sleep(0.1)
        s = connect(gw)
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: edge\r\n\r\n")
        answer = read_answer(s, timeout=5)
        s.close()
        status, err = status_and_error(answer)
        assert (status, err["code"], err["type"]) == (503, "too_many_connections", "server_error")
        assert b"retry-after: 1" in answer.lower()
    finally:
        for h in held:
            h.close()
    time.sleep(0.1)
    assert httpx.get(gw.url + "/healthz").status_code == 200


def test_the_edge_refusals_are_counted(gw: Gateway) -> None:
    s = connect(gw)
    s.sendall(b"GET / HTTP/1.1\r\nX: " + b"c" * 200_000)
    assert read_answer(s).startswith(b"HTTP/1.1 431")
    s.close()
    auth = {"authorization": f"Bearer {METRICS_TOKEN}"}
    text = httpx.get(gw.url + "/metrics", headers=auth).text
    counts = {
        reason: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("llmfleet_gateway_http_refused_total{")
        for reason in ("headers_too_large", "header_timeouts", "overloaded")
        if f'llmfleet_refused_reason="{reason}"' in line
    }
    assert set(counts) == {"headers_too_large", "header_timeouts", "overloaded"}, text[-2000:]
    assert counts["headers_too_large"] >= 1


def test_unauthenticated_requests_are_refused_before_their_body(gw: Gateway) -> None:
    """A 401 goes out on the headers alone: the client has not sent its body yet."""
    s = connect(gw)
    s.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: edge\r\n"
        b"Content-Type: application/json\r\nContent-Length: 10000000\r\n\r\n"
    )
    s.settimeout(5)
    head = s.recv(4096)
    s.close()
    assert head.startswith(b"HTTP/1.1 401")


# ---- /metrics -------------------------------------------------------------------------------


def test_metrics_need_the_metrics_token_or_the_api_key(gw: Gateway) -> None:
    url = gw.url + "/metrics"
    for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": METRICS_TOKEN}):
        r = httpx.get(url, headers=headers)
        assert r.status_code == 401, headers
        assert r.json()["error"]["code"] == "invalid_api_key"
        assert PROXIED not in r.text
    for token in (METRICS_TOKEN, KEY):
        r = httpx.get(url, headers={"authorization": f"Bearer {token}"})
        assert r.status_code == 200
        assert "llmfleet_fleet_workers" in r.text and PROXIED in r.text


def test_metrics_on_their_own_listener(fleet: Fleet) -> None:
    mport = free_port()
    gw = fleet.gateway("--api-key", KEY, "--metrics-listen", f"127.0.0.1:{mport}")
    assert httpx.get(gw.url + "/metrics").status_code == 401
    auth = {"authorization": f"Bearer {KEY}"}
    assert httpx.get(gw.url + "/metrics", headers=auth).status_code == 200
    r = httpx.get(f"http://127.0.0.1:{mport}/metrics")
    assert r.status_code == 200 and "llmfleet_nats_reconnects_total" in r.text
    assert httpx.get(f"http://127.0.0.1:{mport}/v1/models", headers=auth).status_code == 404


def test_metrics_stay_open_without_an_api_key(fleet: Fleet) -> None:
    gw = fleet.gateway()
    assert httpx.get(gw.url + "/metrics").status_code == 200


# ---- no upstream in any answer --------------------------------------------------------------


def test_no_answer_names_the_upstream(gw: Gateway, upstream: str) -> None:
    auth = {"authorization": f"Bearer {KEY}"}
    host = upstream.removeprefix("http://")
    listing = httpx.get(gw.base_url + "/models", headers=auth)
    one = httpx.get(gw.base_url + f"/models/{PROXIED}", headers=auth)
    for r in (listing, one):
        assert r.status_code == 200
        assert host not in r.text and "127.0.0.1" not in r.text
    entry = one.json()
    assert entry["description"] == "served by an OpenAI-compatible upstream"

    body = {"model": FAILING, "messages": [{"role": "user", "content": "x"}]}
    r = httpx.post(gw.base_url + "/chat/completions", json=body, headers=auth, timeout=30)
    assert r.status_code == 502
    message = r.json()["error"]["message"]
    assert message == "The upstream failed with HTTP 500."  # not the upstream's own text
    assert "sk-upstream-secret" not in r.text and host not in r.text
