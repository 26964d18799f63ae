from __future__ import annotations

import json

import pytest

from common import protocol as p
from common.errors import InvalidRequest
from gateway.catalog import apply_announce, build_snapshot, expire
from gateway.settings import Limits
from gateway.validate import parse


def _ann(worker: str, state: str = "ready", models: tuple[str, ...] = ("m",)) -> p.WorkerAnnounce:
    return p.WorkerAnnounce(
        worker=worker,
        host="h",
        version="1",
        state=state,
        ttl_s=3.0,
        started_at=0.0,
        models=[p.ModelStatus(id=m, engine="sim", max_concurrency=2, created=10) for m in models],
    )


def test_catalog_groups_workers_by_model_and_expires() -> None:
    t = apply_announce({}, _ann("a"), now=0.0)
    t = apply_announce(t, _ann("b", models=("m", "n")), now=1.0)
    snap = build_snapshot(t)
    assert set(snap.models) == {"m", "n"}
    assert snap.models["m"].workers == ("a", "b") and snap.models["m"].slots == 4
    snap = build_snapshot(expire(t, now=3.5))  # a expired at 3.0, b lives to 4.0
    assert snap.models["m"].workers == ("b",)
    assert build_snapshot(expire(t, now=5.0)).models == {}


def test_catalog_stopped_removes_and_draining_adds_no_slots() -> None:
    t = apply_announce({}, _ann("a"), now=0.0)
    t = apply_announce(t, _ann("b", state="draining"), now=0.0)
    assert build_snapshot(t).models["m"].slots == 2
    t = apply_announce(t, _ann("a", state="stopped"), now=0.1)
    assert build_snapshot(t).models["m"].workers == ("b",)


LIMITS = Limits(max_tokens=100, max_n=4, max_messages=3, max_embedding_inputs=2, max_choices=4)


def test_parse_chat() -> None:
    body = (
        b'{"model":"m","messages":[{"role":"user","content":"x"}],"stream":true,'
        b'"stream_options":{"include_usage":true},"n":2}'
    )
    got = parse("chat", body, LIMITS)
    assert (got.op, got.model, got.stream, got.include_usage, got.n) == ("chat", "m", True, True, 2)
    assert got.body == body


@pytest.mark.parametrize(
    ("op", "body", "param"),
    [
        (
            "chat",
            b'{"model":"m","messages":[{"role":"user","content":"x"}],"max_tokens":101}',
            "max_tokens",
        ),
        ("chat", b'{"model":"m","messages":[{"role":"user","content":"x"}],"n":5}', "n"),
        ("chat", b'{"model":"","messages":[{"role":"user","content":"x"}]}', "model"),
        (
            "chat",
            b'{"model":"m","messages":['
            + b'{"role":"user","content":"x"},' * 3
            + b'{"role":"user","content":"x"}]}',
            "messages",
        ),
        ("completion", b'{"model":"m","prompt":["a",1]}', "prompt"),
        ("completion", b'{"model":"m","prompt":["a","b","c"],"n":2}', "n"),
        ("chat", b'{"model":"m","messages":[{"role":"user"}]}', "messages[0].content"),
        (
            "chat",
            b'{"model":"m","messages":[{"role":"user","content":"x"}],'
            b'"stream_options":{"include_usage":true}}',
            "stream_options",
        ),
        ("embedding", b'{"model":"m","input":["a","b","c"]}', "input"),
        ("embedding", b'{"model":"m","input":""}', "input"),
        ("embedding", b'{"model":"m","input":"x","encoding_format":"hex"}', "encoding_format"),
    ],
)
def test_parse_rejects_with_param(op: str, body: bytes, param: str) -> None:
    with pytest.raises(InvalidRequest) as e:
        parse(op, body, LIMITS)
    assert e.value.param == param
    assert e.value.status == 400


def test_parse_embedding_token_inputs() -> None:
    assert parse("embedding", b'{"model":"m","input":[1,2,3]}', LIMITS).op == "embedding"
    assert parse("embedding", b'{"model":"m","input":[[1],[2]]}', LIMITS).n == 1


def test_explicit_nulls_mean_defaults() -> None:
    body = (
        b'{"model":"m","messages":[{"role":"user","content":"x"}],"n":null,"stream":null,'
        b'"max_tokens":null,"temperature":null}'
    )
    got = parse("chat", body, LIMITS)
    assert (got.n, got.stream, got.include_usage) == (1, False, False)
    emb = parse("embedding", b'{"model":"m","input":"x","encoding_format":null}', LIMITS)
    assert emb.op == "embedding"


# ---- what a hostile or careless client can send about models, tokens and best_of ---------

HI = '"messages":[{"role":"user","content":"x"}]'


@pytest.mark.parametrize("model", ['"model":null,', '"model":"",', ""])
def test_a_missing_null_or_empty_model_goes_to_the_default_model(model: str) -> None:
    body = ("{" + model + HI + ',"temperature":0.5,"max_tokens":0}').encode()
    got = parse("chat", body, LIMITS, "sim-model")
    assert got.model == "sim-model"
    doc = json.loads(got.body)  # the body the worker gets names it, and keeps the rest
    assert doc["model"] == "sim-model" and doc["temperature"] == 0.5 and doc["max_tokens"] == 0
    with pytest.raises(InvalidRequest) as e:
        parse("chat", body, LIMITS)
    assert e.value.param == "model"


def test_a_named_model_is_never_replaced_by_the_default() -> None:
    body = ('{"model":"m",' + HI + "}").encode()
    got = parse("chat", body, LIMITS, "sim-model")
    assert got.model == "m" and got.body == body  # not even re-encoded


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ('"best_of":21', "best_of"),
        ('"best_of":-1', "best_of"),
        ('"best_of":1e9', "best_of"),
        ('"best_of":"3"', "best_of"),
        ('"best_of":2,"n":3', "best_of"),
        ('"best_of":5', "best_of"),  # over LIMITS.max_n (4)
        ('"max_tokens":-1', "max_tokens"),
        ('"max_tokens":101', "max_tokens"),
    ],
)
def test_bad_best_of_and_max_tokens_are_400_naming_them(extra: str, param: str) -> None:
    body = ('{"model":"m","prompt":"p",' + extra + "}").encode()
    with pytest.raises(InvalidRequest) as e:
        parse("completion", body, LIMITS)
    assert e.value.param == param


def test_best_of_times_prompts_is_bounded_even_with_n_1() -> None:
    body = json.dumps({"model": "m", "prompt": ["a", "b"], "best_of": 3}).encode()
    with pytest.raises(InvalidRequest) as e:  # 2 prompts x 3 > LIMITS.max_choices (4)
        parse("completion", body, LIMITS)
    assert e.value.param == "best_of"
    ok = parse(
        "completion",
        json.dumps({"model": "m", "prompt": ["a", "b"], "best_of": 2}).encode(),
        LIMITS,
    )
    assert ok.n == 2  # choices returned: prompts x n, not best_of
