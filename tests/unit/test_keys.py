"""Virtual keys as pure decisions: globs over whole ids, default deny, expiry, periods."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from control.keys import (
    KeyRecord,
    Price,
    Secret,
    cost_micros,
    hash_secret,
    live_hashes,
    may_run,
    model_matches,
    new_secret,
    parse_duration,
    parse_expiry,
    parse_models,
    period_end,
    period_id,
    usable,
)


@pytest.mark.parametrize(
    ("pattern", "model", "allowed"),
    [
        ("qwen*", "qwen2.5:7b", True),
        ("qwen*", "qwen-7b", True),
        ("qwen*", "qwen/Qwen3-8B", True),
        ("qwen*", "qwen", True),
        ("qwen*", "qwenx-evil", False),  # a * after a letter never continues the word
        ("qwen*", "qwené-private", False),  # in any script
        ("qwen*", "qwen\u0661", True),  # a digit (Arabic-Indic one) starts a version
        ("qwen?*", "qwenx-evil", True),  # ... unless the pattern says so
        ("Qwen*", "qwen3", False),  # case-sensitive
        ("bedrock/*", "bedrock/claude", True),
        ("bedrock/*", "bedrockz/claude", False),  # LiteLLM #33030
        ("bedrock/*", "bedrock", False),
        ("llama3*", "llama3.1-8b", True),
        ("llama3*", "llama30b", False),  # nor a number
        ("*", "anything/at:all", True),
        ("*-7b", "qwen-7b", True),
        ("m[ab]", "ma", True),
        ("m[!ab]", "ma", False),
        ("m[!ab]", "mc", True),
        ("a.b", "axb", False),  # . is literal
        ("exact", "exact", True),
        ("exact", "exactly", False),  # no prefix matching
        ("exact", "Exact", False),
    ],
)
def test_globs_match_whole_ids(pattern: str, model: str, allowed: bool) -> None:
    assert model_matches(pattern, model) is allowed


def _key(**kw: object) -> KeyRecord:
    return KeyRecord(name="k", secrets=(Secret(sha256="h", created_at=0.0),), **kw)  # type: ignore[arg-type]


def test_default_deny_an_empty_list_runs_nothing() -> None:
    """LiteLLM #26656 / #28464 / #23850: models=[] ran every model."""
    assert not may_run(_key(), "any")
    assert not may_run(_key(models=()), "")
    assert may_run(_key(models=("*",)), "any")
    assert parse_models("") == ()
    assert parse_models(" , ,") == ()
    assert parse_models("a, b,a") == ("a", "b")


def test_expired_and_revoked_keys_are_unusable() -> None:
    assert usable(_key(), 100.0)
    assert not usable(_key(expires_at=100.0), 100.0)
    assert usable(_key(expires_at=101.0), 100.0)
    assert not usable(_key(revoked_at=50.0), 100.0)
    assert not usable(_key(revoked_at=130.0), 100.0)  # an admin clock ahead: revoked now


def test_rotated_secrets_live_until_their_overlap_ends() -> None:
    rec = KeyRecord(
        name="k",
        secrets=(
            Secret(sha256="old", created_at=0.0, expires_at=200.0),
            Secret(sha256="new", created_at=100.0),
        ),
    )
    assert live_hashes(rec, 150.0) == ["old", "new"]
    assert live_hashes(rec, 200.0) == ["new"]


def test_secrets_are_long_random_and_hashed() -> None:
    a, b = new_secret(), new_secret()
    assert a.startswith("sk-llmf-") and a != b
    assert len(a) - len("sk-llmf-") >= 27  # 160 bits in base64url
    assert hash_secret(a) != a and len(hash_secret(a)) == 64


def test_durations_and_dates() -> None:
    assert parse_duration("90s") == 90
    assert parse_duration("2w") == 14 * 86400
    with pytest.raises(ValueError):
        parse_duration("10 parsecs")
    assert parse_expiry("1h", now=1000.0) == 4600.0
    assert parse_expiry("2027-01-31") == datetime(2027, 1, 31, tzinfo=UTC).timestamp()
    with pytest.raises(ValueError):
        parse_expiry("soon")


def test_periods_are_utc_and_never_reset_in_place() -> None:
    t = datetime(2026, 12, 31, 23, 59, tzinfo=UTC).timestamp()
    assert period_id("day", t) == "d20261231"
    assert period_id("month", t) == "m202612"
    assert period_id("total", t) == "total"
    assert period_id("month", t + 120) == "m202701"  # a new period is a new entry
    assert period_end("day", t) == datetime(2027, 1, 1, tzinfo=UTC).timestamp()
    assert period_end("month", t) == datetime(2027, 1, 1, tzinfo=UTC).timestamp()
    assert period_end("total", t) is None


def test_cost_in_micro_units_rounds_up() -> None:
    price = Price(input=0.5, output=1.5)  # per 1M tokens
    assert cost_micros(price, 1000, 1000) == 2000  # 0.0005 + 0.0015 = 0.002
    assert cost_micros(price, 1, 0) == 1  # 0.5 micro rounds up
    assert cost_micros(None, 1000, 1000) == 0
