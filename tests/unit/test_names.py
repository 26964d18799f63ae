from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from common import names

TOKEN = re.compile(r"^[A-Za-z0-9_=-]+$")


@given(st.text(min_size=1, max_size=60).filter(lambda s: len(s.encode()) <= 200))
def test_escape_round_trips_and_is_one_safe_token(model_id: str) -> None:
    token = names.escape_model(model_id)
    assert names.unescape_model(token) == model_id
    assert TOKEN.match(token)  # no '.', '*', '>', whitespace: one subject token, valid name


@pytest.mark.parametrize(
    ("model_id", "token"),
    [
        ("qwen2.5:7b", "qwen2=2E5=3A7b"),
        ("meta-llama/Llama-3.1-8B-Instruct", "meta-llama=2FLlama-3=2E1-8B-Instruct"),
        ("a*b>c", "a=2Ab=3Ec"),
        ("plain_name-1", "plain_name-1"),
        ("é", "=C3=A9"),
    ],
)
def test_known_escapes(model_id: str, token: str) -> None:
    assert names.escape_model(model_id) == token


def test_escape_is_injective_for_equals_sign() -> None:
    assert names.escape_model("a=2E") != names.escape_model("a.")
    assert names.unescape_model(names.escape_model("a=2E")) == "a=2E"


@pytest.mark.parametrize("bad", ["", "x" * 201])
def test_escape_rejects_empty_and_long(bad: str) -> None:
    with pytest.raises(ValueError, match="model id"):
        names.escape_model(bad)


@pytest.mark.parametrize("bad", ["a.b", "=2", "=zz", "a b", "=2e"])
def test_unescape_rejects_foreign_text(bad: str) -> None:
    with pytest.raises(ValueError, match="escaped"):
        names.unescape_model(bad)


def test_subjects() -> None:
    assert names.request_subject("qwen2.5:7b", "etl") == "llmfleet.req.qwen2=2E5=3A7b.etl"
    assert names.model_filter("qwen2.5:7b") == "llmfleet.req.qwen2=2E5=3A7b.*"
    assert names.parse_request_subject("llmfleet.req.qwen2=2E5=3A7b.etl") == ("qwen2.5:7b", "etl")
    for bad in ("llmfleet.req.m", "llmfleet.req.m.a.b", "llmfleet.req.a.b=", "x.req.m.p"):
        with pytest.raises(ValueError):
            names.parse_request_subject(bad)
    assert names.consumer_name("qwen2.5:7b") == "llmfleet-qwen2=2E5=3A7b"
    assert names.control_subject("w1") == "llmfleet.ctl.w1"
    with pytest.raises(ValueError, match="worker id"):
        names.check_worker_id("bad.id")


@pytest.mark.parametrize(
    "reply",
    [
        "x y",
        "_LLMFLEET.r.etl.a b",
        "$JS.API.STREAM.NAMES",
        "_LLMFLEET.r.gateway.gw1.1",  # another producer's space
        "_LLMFLEET.r.etl",
        "_LLMFLEET.r.etl.",
        "_LLMFLEET.r.etl.a..b",
        "_LLMFLEET.r.etl.*",
        "_LLMFLEET.r.etl.>",
        "_LLMFLEET.r.etl.a\tb",
        "_LLMFLEET.r.etl.é",
        "_LLMFLEET.r.etl." + "a" * 300,
    ],
)
def test_reply_subjects_outside_the_producers_space_are_refused(reply: str) -> None:
    with pytest.raises(ValueError):
        names.check_reply(reply, "etl")


def test_a_reply_subject_in_the_producers_space_is_taken() -> None:
    assert names.check_reply("_LLMFLEET.r.etl.job1.7", "etl") == "_LLMFLEET.r.etl.job1.7"
