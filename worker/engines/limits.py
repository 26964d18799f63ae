"""The one completion-length limit an engine runs with.

A request says how long it may run with `max_tokens` / `max_completion_tokens` (and, on
completions, OpenAI's default of 16). Engines also read fields of their own
(llama.cpp's `n_predict`, TGI's `max_new_tokens`, Ollama's `num_predict`), which would
let a request run past the limit the gateway reserved for (its key's tpm and budgets):
with a limit, they are dropped and the limit is written as `max_tokens`.
"""

from __future__ import annotations

from typing import Any

ENGINE_LENGTH_FIELDS = ("n_predict", "max_new_tokens", "num_predict", "max_completion_tokens")


def enforce_limit(
    body: dict[str, Any], limit: int | None, keep_name: bool = False
) -> dict[str, Any]:
    """`body` with `limit` as its only length field (unchanged when `limit` is None):
    `max_tokens`, or with `keep_name` the client's `max_completion_tokens` if it used
    that (an upstream may accept only one of the two)."""
    if limit is None:
        return body
    name = "max_tokens"
    if keep_name and "max_completion_tokens" in body:
        name = "max_completion_tokens"
    for field in (*ENGINE_LENGTH_FIELDS, "max_tokens"):
        body.pop(field, None)
    body[name] = limit
    return body
