from __future__ import annotations

import pytest

from llmfleet.cli import build_parser
from worker.engines.sim import embed_text
from worker.engines.sim_plan import apply_stop, sim_text


def test_sim_text_is_deterministic() -> None:
    assert sim_text(b"k", 5) == sim_text(b"k", 5)
    assert sim_text(b"k", 5) != sim_text(b"j", 5)
    pieces = sim_text(b"k", 4)
    assert not pieces[0].startswith(" ") and all(x.startswith(" ") for x in pieces[1:])


def test_apply_stop_cuts_before_the_stop_string() -> None:
    assert apply_stop(["a", " b", " c"], [" b"]) == (["a"], " b")
    assert apply_stop(["ab", "cd"], ["c"]) == (["ab"], "c")
    assert apply_stop(["ab", "cd"], ["bc"]) == (["ab"], "bc")
    assert apply_stop(["ab", "cd"], ["zz"]) == (["ab", "cd"], None)
    assert apply_stop(["abcd"], ["c"]) == (["ab"], "c")
    assert apply_stop(["abcd"], ["d", "b"]) == (["a"], "b")  # the earliest hit wins


def test_embeddings_rank_shared_words_higher() -> None:
    def cos(a: list[float], b: list[float]) -> float:
        return sum(x * y for x, y in zip(a, b, strict=True))

    q = embed_text("the cat sat on the mat", 64)
    near = embed_text("a cat sat on a mat", 64)
    far = embed_text("quantum chromodynamics lattice", 64)
    assert cos(q, near) > cos(q, far)


def test_flags_win_over_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLMFLEET_NATS_URL", "nats://from-env:4222")
    monkeypatch.setenv("LLMFLEET_MAX_CONCURRENCY", "3")
    args = build_parser().parse_args(["worker"])
    assert args.nats_url == "nats://from-env:4222"
    assert args.max_concurrency == 3
    args = build_parser().parse_args(
        ["worker", "--nats", "nats://flag:1", "--max-concurrency", "5"]
    )
    assert args.nats_url == "nats://flag:1"
    assert args.max_concurrency == 5


def test_bad_environment_value_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLMFLEET_PORT", "eighty")
    with pytest.raises(SystemExit, match="LLMFLEET_PORT"):
        build_parser()


def test_schema_instance_validates_common_shapes() -> None:
    from worker.engines.sim_plan import schema_instance  # noqa: PLC0415

    schema = {
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "age": {"type": "integer", "minimum": 3},
            "tags": {"type": "array", "items": {"type": "string"}, "minItems": 1},
            "kind": {"enum": ["a", "b"]},
            "pet": {"$ref": "#/$defs/Pet"},
            "maybe": {"anyOf": [{"type": "number"}, {"type": "null"}]},
        },
        "$defs": {"Pet": {"type": "object", "properties": {"ok": {"type": "boolean"}}}},
    }
    assert schema_instance(schema) == {
        "name": "sim",
        "age": 3,
        "tags": ["sim"],
        "kind": "a",
        "pet": {"ok": False},
        "maybe": 0.0,
    }
