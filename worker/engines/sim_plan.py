"""What the `sim` engine answers, decided up front (pure, deterministic, no timing).

Words are chosen by hashing (prompt, seed, choice, position). Output-shaping parameters
are honoured in the simplest valid way, so clients that depend on them work against sim:
`response_format` json_object / json_schema gives valid JSON (a minimal instance of the
schema), `tool_choice` "required" or a named function gives a tool call whose arguments
are a minimal instance of the function's parameter schema (streamed in pieces, as real
engines do: the call's id and name first, then the arguments' JSON word by word), `echo`
repeats the prompt, and `logprobs` adds (fixed, fake) log probabilities (with `echo`, the
prompt's too: the first token has none, as in OpenAI's format, so `echo` + `max_tokens: 0`
scores a prompt the way evaluation harnesses ask). With `tool_choice` "auto" sim answers
in text: it does not decide anything. A stop sequence that cut a choice is reported.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import msgspec

from common.openai_types import ChatRequest, CompletionRequest, prompt_texts

_VOCAB = (
    "the fleet serves every request with care and the broker keeps the queue fair while "
    "workers stream tokens back through reply inboxes so clients see answers arrive one "
    "word at a time from models loaded on hosts that joined over outbound links only"
).split()

FAKE_LOGPROB = -0.25


class Plan(msgspec.Struct):
    """One choice: its pieces (one per token), finish reason, and tool calls if any."""

    index: int
    pieces: list[str]
    finish_reason: str
    tool_calls: list[dict[str, Any]] | None = None  # pieces are then the arguments'
    echoed: int = 0  # leading pieces that repeat the prompt (not completion tokens)
    stop_sequence: str | None = None  # the stop string that ended it


def words(text: str) -> list[str]:
    return text.split()


def sim_word(key: bytes, i: int) -> str:
    h = hashlib.blake2b(key + i.to_bytes(4, "little"), digest_size=4).digest()
    return _VOCAB[int.from_bytes(h, "little") % len(_VOCAB)]


def sim_text(key: bytes, count: int) -> list[str]:
    """`count` words as pieces, the first without a leading space."""
    return [(" " if i else "") + sim_word(key, i) for i in range(count)]


def apply_stop(pieces: list[str], stop: list[str]) -> tuple[list[str], str | None]:
    """Cut `pieces` before the first stop string; returns (pieces, the stop string hit)."""
    if not stop:
        return pieces, None
    text = ""
    for i, piece in enumerate(pieces):
        text += piece
        hits = [(text.find(s), s) for s in stop if s and s in text]
        if hits:
            cut, hit = min(hits)
            before = "".join(pieces[:i])
            kept = pieces[:i]
            if cut > len(before):
                kept = [*kept, text[len(before) : cut]]
            return kept, hit
    return pieces, None


def schema_instance(schema: Any, root: Any = None, depth: int = 0) -> Any:
    """A minimal value that validates against a JSON schema (the common subset)."""
    root = schema if root is None else root
    if not isinstance(schema, dict) or depth > 16:
        return None
    if "$ref" in schema:
        ref = str(schema["$ref"])
        target: Any = root
        for part in ref.lstrip("#/").split("/"):
            target = target.get(part, {}) if isinstance(target, dict) else {}
        return schema_instance(target, root, depth + 1)
    if "const" in schema:
        return schema["const"]
    if schema.get("enum"):
        return schema["enum"][0]
    for key in ("anyOf", "oneOf", "allOf"):
        if schema.get(key):
            return schema_instance(schema[key][0], root, depth + 1)
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind == "object" or (kind is None and "properties" in schema):
        props = schema.get("properties", {})
        return {k: schema_instance(v, root, depth + 1) for k, v in props.items()}
    if kind == "array":
        n = int(schema.get("minItems", 0))
        return [schema_instance(schema.get("items", {}), root, depth + 1) for _ in range(n)]
    if kind in ("integer", "number"):
        return (int if kind == "integer" else float)(schema.get("minimum", 0))
    return _SCALARS.get(str(kind))


_SCALARS: dict[str, Any] = {"string": "sim", "boolean": False}


def _json_pieces(value: Any) -> list[str]:
    text = json.dumps(value)
    parts = text.split(" ")
    return [(" " if i else "") + p for i, p in enumerate(parts)]


def _chosen_tool(req: ChatRequest) -> dict[str, Any] | None:
    if not req.tools:
        return None
    choice = req.tool_choice
    functions = [t.get("function", {}) for t in req.tools if isinstance(t, dict)]
    if isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name")
        return next((f for f in functions if f.get("name") == name), None)
    if choice == "required":
        return functions[0] if functions else None
    return None


def _limit(
    pieces: list[str], limit: int | None, stop: list[str]
) -> tuple[list[str], str, str | None]:
    """(pieces, finish reason, the stop string that ended them)."""
    pieces, hit = apply_stop(pieces, stop)
    if hit is not None:
        return pieces, "stop", hit
    if limit is not None and len(pieces) >= limit:
        return pieces[:limit], "length", None
    return pieces, "stop", None


def _stops(stop: str | list[str] | None) -> list[str]:
    return [stop] if isinstance(stop, str) else list(stop or [])


def _chat_prompt(req: ChatRequest) -> str:
    return "\n".join(m.text() for m in req.messages)


def prompt_tokens(req: ChatRequest) -> int:
    """A chat request's prompt tokens: the words of its messages' text."""
    return len(words(_chat_prompt(req)))


def plan_chat(req: ChatRequest, default_tokens: int) -> tuple[list[Plan], int]:
    """The choices for a chat request, and its prompt tokens."""
    prompt = _chat_prompt(req)
    limit = req.token_limit()
    count = default_tokens if limit is None else min(limit, default_tokens)
    base = hashlib.blake2b(f"{req.seed}|{prompt}".encode(), digest_size=16).digest()
    tool = _chosen_tool(req)
    fmt = req.response_format or {}
    plans: list[Plan] = []
    for c in range(req.choices()):
        key = base + c.to_bytes(2, "little")
        if tool is not None:
            args = _json_pieces(schema_instance(tool.get("parameters", {})))
            call = {
                "index": 0,
                "id": "call_" + hashlib.blake2b(key, digest_size=8).hexdigest(),
                "type": "function",
                "function": {"name": tool.get("name", ""), "arguments": "".join(args)},
            }
            plans.append(Plan(c, args, "tool_calls", [call]))
            continue
        if fmt.get("type") == "json_object":
            pieces = _json_pieces({"answer": "".join(sim_text(key, count))})
            limit_here = limit
        elif fmt.get("type") == "json_schema":
            schema = (fmt.get("json_schema") or {}).get("schema", {})
            pieces = _json_pieces(schema_instance(schema))
            limit_here = limit
        else:
            natural = limit is None or limit > default_tokens
            pieces = sim_text(key, count)
            if req.continue_final_message and pieces:  # goes on after the partial answer
                pieces[0] = " " + pieces[0]
            limit_here = None if natural else count
        pieces, finish, hit = _limit(pieces, limit_here, _stops(req.stop))
        plans.append(Plan(c, pieces, finish, stop_sequence=hit))
    return plans, prompt_tokens(req)


def plan_completion(req: CompletionRequest, default_tokens: int) -> tuple[list[Plan], int]:
    """Choices for every prompt x n (index = prompt * n + choice), and prompt tokens."""
    prompts = [p if isinstance(p, str) else " ".join(map(str, p)) for p in prompt_texts(req.prompt)]
    limit = req.token_limit()
    count = min(limit, default_tokens)
    natural = limit > default_tokens
    plans: list[Plan] = []
    n = req.choices()
    for i, prompt in enumerate(prompts):
        base = hashlib.blake2b(f"{req.seed}|{prompt}".encode(), digest_size=16).digest()
        for c in range(n):
            pieces = sim_text(base + c.to_bytes(2, "little"), count)
            pieces, finish, hit = _limit(pieces, None if natural else count, _stops(req.stop))
            echoed = 0
            if req.echo:
                said = prompt_pieces(prompt)
                echoed = len(said)
                pieces = [*said, *((" " + pieces[0].lstrip(), *pieces[1:]) if pieces else ())]
            plans.append(Plan(i * n + c, pieces, finish, echoed=echoed, stop_sequence=hit))
    return plans, sum(len(words(p)) for p in prompts)


def chat_logprobs(piece: str, top: int) -> dict[str, Any]:
    entry = {"token": piece, "logprob": FAKE_LOGPROB, "bytes": list(piece.encode())}
    return {"content": [{**entry, "top_logprobs": [entry] * top}]}


def prompt_pieces(prompt: str) -> list[str]:
    """The prompt as sim tokens (words, each after the first with its leading space)."""
    said = words(prompt)
    return [(" " if i else "") + w for i, w in enumerate(said)] or [prompt]


def completion_logprobs(piece: str, offset: int, *, echo: bool = False) -> dict[str, Any]:
    """One piece's legacy logprobs; an echoed prompt's first token (offset 0) has none."""
    first = echo and offset == 0
    return {
        "tokens": [piece],
        "token_logprobs": [None if first else FAKE_LOGPROB],
        "top_logprobs": [None if first else {piece: FAKE_LOGPROB}],
        "text_offset": [offset],
    }
