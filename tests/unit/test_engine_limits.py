"""A request runs with the one length limit the gateway reserved for."""

from __future__ import annotations

from worker.engines.limits import enforce_limit


def test_engine_specific_length_fields_cannot_outrun_max_tokens() -> None:
    body = {"max_tokens": 1, "n_predict": 1000, "max_new_tokens": 999, "num_predict": 5}
    assert enforce_limit(body, 1) == {"max_tokens": 1}


def test_the_completions_default_is_written_out() -> None:
    assert enforce_limit({"prompt": "x"}, 16) == {"prompt": "x", "max_tokens": 16}


def test_the_clients_field_name_is_kept_for_upstreams() -> None:
    body = {"max_completion_tokens": 7, "max_tokens": 9, "n_predict": 50}
    assert enforce_limit(dict(body), 7, keep_name=True) == {"max_completion_tokens": 7}
    assert enforce_limit(dict(body), 7) == {"max_tokens": 7}


def test_no_limit_leaves_the_body_alone() -> None:
    assert enforce_limit({"n_predict": 3}, None) == {"n_predict": 3}
