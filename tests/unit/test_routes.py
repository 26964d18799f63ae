"""The routes file (control/routes.py): parsing, defaults, flattening, and each way a file
can be wrong, as one line naming the file; and the watch's handling of one KV message
(control/routes_watch.py) without a broker (tests/e2e/test_routes_cli.py has the real one)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import msgspec
import pytest

from control.keyring import Keyring
from control.routes import (
    FALLBACK_REASONS,
    MAX_BYTES,
    Alias,
    Routes,
    RoutesError,
    describe,
    parse_routes,
)
from control.routes_watch import RoutesWatch
from control.store import ROUTES_KEY

EXAMPLE = """\
default_model: chat            # used when a request has no `model` (a --default-model flag wins)
models: [qwen2.5:7b, gemma-3-270m]   # optional: the model ids chains may name
aliases:
  chat:
    description: General chat, falls back to the small model
    chain: [qwen2.5:7b, gemma-3-270m]
    fallback_on: [unavailable, queue_timeout, worker_lost, upstream_error, rate_limited,
                  context_length_exceeded]
    hop_timeout: 10            # seconds one hop may wait for a worker before the next is tried
"""


def error(text: str | bytes) -> str:
    with pytest.raises(RoutesError) as info:
        parse_routes(text, "routes.yaml")
    line = str(info.value)
    assert "\n" not in line and line.startswith("routes.yaml: ")
    return line


def one(chain: str, **fields: str) -> str:
    extra = "".join(f", {k}: {v}" for k, v in fields.items())
    return f"aliases:\n  chat: {{chain: {chain}{extra}}}\n"


# ---- what a good file says ------------------------------------------------------------------


def test_the_example() -> None:
    r = parse_routes(EXAMPLE, "routes.yaml")
    assert r.default_model == "chat"
    assert r.models == ("qwen2.5:7b", "gemma-3-270m")
    chat = r.aliases["chat"]
    assert chat == Alias(
        chain=("qwen2.5:7b", "gemma-3-270m"),
        description="General chat, falls back to the small model",
        fallback_on=FALLBACK_REASONS,
        hop_timeout=10.0,
    )
    assert isinstance(chat.hop_timeout, float)
    assert r.chain("chat") == ("qwen2.5:7b", "gemma-3-270m")
    assert r.chain("qwen2.5:7b") is None and r.chain("nope") is None
    assert describe(r) == [
        ("chat", chat.description, chat.chain, FALLBACK_REASONS, 10.0),
    ]
    assert parse_routes(EXAMPLE.encode()) == r  # bytes too


def test_defaults() -> None:
    r = parse_routes("aliases:\n  a:\n    chain: [m]\n")
    assert r.default_model is None and r.models is None
    assert r.aliases["a"] == Alias(chain=("m",))
    a = r.aliases["a"]
    assert (a.description, a.fallback_on, a.hop_timeout) == ("", FALLBACK_REASONS, 10.0)
    # Without `models`, a target may be any model id.
    assert parse_routes(one("[anything/at-all:1]")).chain("chat") == ("anything/at-all:1",)
    # An empty fallback_on is allowed: the alias never falls back.
    assert parse_routes(one("[m]", fallback_on="[]")).aliases["chat"].fallback_on == ()
    assert parse_routes(one("[m]", hop_timeout="0.25")).aliases["chat"].hop_timeout == 0.25


@pytest.mark.parametrize(
    "text", ["", "\n", "# nothing but a comment\n", "---\n", "aliases:\n", "models:\naliases:\n"]
)
def test_an_empty_file_is_no_routes(text: str) -> None:
    assert parse_routes(text) == Routes()
    assert Routes().chain("chat") is None


def test_flattening_nested_aliases_depth_first_without_duplicates() -> None:
    r = parse_routes(
        """
aliases:
  chat: {chain: [big, small, big, q3], hop_timeout: 3, fallback_on: [worker_lost]}
  big: {chain: [q7, q3], hop_timeout: 60}
  small: {chain: [g, tiny, q7]}
  tiny: {chain: [g, t]}
  top: {chain: [chat, big, extra]}
"""
    )
    assert r.chain("big") == ("q7", "q3")
    assert r.chain("tiny") == ("g", "t")
    assert r.chain("small") == ("g", "t", "q7")
    assert r.chain("chat") == ("q7", "q3", "g", "t")
    assert r.chain("top") == ("q7", "q3", "g", "t", "extra")
    # The outer alias's settings govern every hop it brings in.
    assert r.aliases["chat"].hop_timeout == 3 and r.aliases["chat"].fallback_on == ("worker_lost",)
    assert [row[2] for row in describe(r)] == [r.chain(a) for a in r.aliases]


def test_a_deep_but_short_nesting_is_fine() -> None:
    n = 1000  # deeper than Python's recursion limit: flattening is iterative
    text = "aliases:\n" + "".join(f"  a{i}: {{chain: [a{i + 1}]}}\n" for i in range(n - 1))
    r = parse_routes(text + f"  a{n - 1}: {{chain: [m]}}\n")
    assert r.chain("a0") == ("m",) and len(r.flat) == n


def test_the_chain_is_precomputed() -> None:
    r = parse_routes("aliases: {a: {chain: [b]}, b: {chain: [m]}}")
    assert r.flat == {"a": ("m",), "b": ("m",)}


# ---- what a bad file gets -------------------------------------------------------------------


def test_cycles_show_their_path() -> None:
    assert error(one("[chat]")) == "routes.yaml: alias 'chat': cycle chat -> chat"
    assert (
        error("aliases:\n  chat: {chain: [small]}\n  small: {chain: [m, chat]}\n")
        == "routes.yaml: alias 'chat': cycle chat -> small -> chat"
    )
    three = "aliases:\n  a: {chain: [m, b]}\n  b: {chain: [c]}\n  c: {chain: [n, a]}\n"
    assert error(three) == "routes.yaml: alias 'a': cycle a -> b -> c -> a"
    # A cycle below the alias being flattened names the alias where it starts.
    lead = "aliases:\n  top: {chain: [x]}\n  x: {chain: [y]}\n  y: {chain: [x]}\n"
    assert error(lead) == "routes.yaml: alias 'x': cycle x -> y -> x"
    # A diamond is no cycle.
    diamond = (
        "aliases:\n  a: {chain: [b, c]}\n  b: {chain: [d]}\n  c: {chain: [d]}\n  d: {chain: [m]}\n"
    )
    assert parse_routes(diamond).chain("a") == ("m",)


def test_unknown_targets_with_models() -> None:
    text = "models: [qwen2.5:7b, gemma-3-270m]\n" + one("[qwen2.5:7b, gema-3]")
    assert error(text) == (
        "routes.yaml: alias 'chat': unknown target 'gema-3' (not an alias, not in models)"
    )
    ok = "models: [m]\naliases:\n  a: {chain: [b]}\n  b: {chain: [m]}\n"
    assert parse_routes(ok).chain("a") == ("m",)  # aliases need not be listed
    assert "default_model 'x': unknown" in error("models: [m]\ndefault_model: x\n")
    assert "is also a model id in models" in error("models: [m]\naliases:\n  m: {chain: [m]}\n")


def test_unknown_fields() -> None:
    assert error(one("[m]", fallback="[unavailable]")) == (
        "routes.yaml: alias 'chat': unknown field 'fallback' "
        "(known: chain, description, fallback_on, hop_timeout)"
    )
    assert error("default: chat\n") == (
        "routes.yaml: unknown field 'default' (known: default_model, aliases, models)"
    )
    assert "unknown field 'flat'" in error("flat: {chat: [m]}\n")  # computed, never read


def test_bad_fallback_reason_lists_the_valid_ones() -> None:
    line = error(one("[m]", fallback_on="[unavailable, timeout]"))
    assert line == (
        "routes.yaml: alias 'chat': unknown fallback_on reason 'timeout' (valid: "
        "unavailable, queue_timeout, worker_lost, upstream_error, rate_limited, "
        "context_length_exceeded)"
    )


@pytest.mark.parametrize("value", ["0", "-1", ".nan", ".inf", "-.inf", "0.0"])
def test_hop_timeout_must_be_above_zero_and_finite(value: str) -> None:
    assert error(one("[m]", hop_timeout=value)) == (
        "routes.yaml: alias 'chat': hop_timeout must be a number of seconds above 0, finite"
    )


@pytest.mark.parametrize(
    ("value", "got"), [("ten", "a string"), ("'10'", "a string"), ("true", "true or false")]
)
def test_hop_timeout_must_be_a_number(value: str, got: str) -> None:
    assert error(one("[m]", hop_timeout=value)) == (
        f"routes.yaml: alias 'chat': hop_timeout: expected a number, got {got}"
    )


def test_wrong_types_name_the_place() -> None:
    assert error(one("qwen")) == "routes.yaml: alias 'chat': chain: expected a list, got a string"
    assert error(one("[1.5]")) == (
        "routes.yaml: alias 'chat': chain[0]: expected a string, got a number"
    )
    assert error("aliases: [a]\n") == "routes.yaml: aliases: expected a mapping, got a list"
    assert error("aliases:\n  123: {chain: [m]}\n") == (
        "routes.yaml: aliases: a name: expected a string, got an integer"
    )
    assert error("default_model: 5\n") == (
        "routes.yaml: default_model: expected a string, got an integer"
    )
    assert error("aliases:\n  chat:\n") == "routes.yaml: alias 'chat': empty (it needs a chain)"
    assert error("- a\n- b\n") == (
        "routes.yaml: expected a mapping (default_model, models, aliases), got a list"
    )
    assert "got a string" in error("just text\n")


def test_empty_chain() -> None:
    assert error(one("[]")) == "routes.yaml: alias 'chat': the chain is empty"


def test_bad_yaml_names_the_line() -> None:
    with pytest.raises(RoutesError) as info:
        parse_routes("aliases:\n  chat:\n    chain: [m]\n   bad: 1\n", "routes.yaml")
    assert str(info.value).startswith("routes.yaml: line 4: ") and info.value.line == 4
    assert error("aliases:\n  chat: {chain: [m]\n").startswith("routes.yaml: line 3: ")
    assert error("a: b: c\n").startswith("routes.yaml: line 1: mapping values are not allowed")
    # A key given twice would silently replace the first: an error instead.
    assert error("aliases:\n  chat: {chain: [a]}\n  chat: {chain: [b]}\n") == (
        "routes.yaml: line 3: duplicate key 'chat'"
    )
    assert "could not determine a constructor" in error("a: !!python/object:os.system {}\n")
    assert error(b"\xff\xfe\x00") == "routes.yaml: not UTF-8 text (byte 0)"


def test_anchors_and_merge_keys_are_refused() -> None:
    """`*name` copies a node: a few hundred bytes of nested merges expand to gigabytes and
    froze a gateway on SIGHUP (hostile review). A routes file is short: no aliases."""
    assert (
        error(
            "aliases:\n"
            "  a: &base {chain: [m], fallback_on: [worker_lost], hop_timeout: 2}\n"
            "  b: {<<: *base, chain: [n]}\n"
        )
        == "routes.yaml: line 3: YAML aliases (*name) are not allowed"
    )
    bomb = "x0: &x0 {a: 1}\n" + "".join(
        f"x{i}: &x{i} {{<<: [{', '.join([f'*x{i - 1}'] * 10)}]}}\n" for i in range(1, 8)
    )
    assert "YAML aliases" in error(bomb)
    assert "cannot read" in error("default_model: " + "9" * 5000 + "\n")


def test_too_big_too_deep_too_many() -> None:
    assert error("#" * MAX_BYTES + "\n") == (
        f"routes.yaml: {MAX_BYTES + 1} bytes, at most {MAX_BYTES} (1 MiB)"
    )
    parse_routes("#" * (MAX_BYTES - 1) + "\n")  # exactly 1 MiB is fine
    # libyaml's composer recurses per level: this must be an error, not a crash.
    assert error("[" * 200_000) == "routes.yaml: line 1: nested deeper than 16 levels"
    assert "nested deeper" in error("a: " + "{a: " * 50_000)
    many = "aliases:\n" + "".join(f"  a{i}: {{chain: [m]}}\n" for i in range(1001))
    assert error(many) == "routes.yaml: 1001 aliases, at most 1000"
    parse_routes("aliases:\n" + "".join(f"  a{i}: {{chain: [m]}}\n" for i in range(1000)))


def test_too_many_hops() -> None:
    sixteen = ", ".join(f"m{i}" for i in range(16))
    assert len(parse_routes(one(f"[{sixteen}]")).chain("chat") or ()) == 16
    assert error(one(f"[{sixteen}, m16]")) == (
        "routes.yaml: alias 'chat': the chain flattens to 17 hops, at most 16"
    )
    xs, ys = (", ".join(f"{c}{i}" for i in range(9)) for c in "xy")
    nine = f"aliases:\n  a: {{chain: [{xs}]}}\n  b: {{chain: [{ys}]}}\n  c: {{chain: [a, b, a]}}\n"
    assert error(nine) == "routes.yaml: alias 'c': the chain flattens to 18 hops, at most 16"


@pytest.mark.parametrize(
    ("text", "what"),
    [
        (one("['a b']"), "alias 'chat': target 'a b': not a valid model id"),
        (one('["tab\\there"]'), "alias 'chat': target 'tab\\there': not a valid model id"),
        (one("['qwen*']"), "alias 'chat': target 'qwen*': not a valid model id"),
        (one("['']"), "alias 'chat': target '': model id is empty"),
        (one("['" + "x" * 201 + "']"), "model id is longer than 200 bytes"),
        ("aliases:\n  'my alias': {chain: [m]}\n", "alias 'my alias': not a valid model id"),
        ("aliases:\n  '[x]': {chain: [m]}\n", "alias '[x]': not a valid model id"),
        ('models: ["a\\x01b"]\n', "model 'a\\x01b': not a valid model id"),
        ("default_model: 'two words'\n", "default_model 'two words': not a valid model id"),
    ],
)
def test_invalid_model_ids(text: str, what: str) -> None:
    assert what in error(text)


def test_model_ids_with_dots_colons_and_slashes_are_fine() -> None:
    r = parse_routes(one("[meta-llama/Llama-3.1-8B-Instruct, 'qwen2.5:7b', 'gpt=4', é-model]"))
    assert r.chain("chat") == ("meta-llama/Llama-3.1-8B-Instruct", "qwen2.5:7b", "gpt=4", "é-model")


def test_routes_are_frozen() -> None:
    r = parse_routes(EXAMPLE)
    with pytest.raises(AttributeError):
        r.default_model = "x"  # type: ignore[misc]
    assert msgspec.json.decode(msgspec.json.encode(r), type=Routes) == r


# ---- the keyring ignores the routes entry -----------------------------------------------------


def test_the_keyring_ignores_the_routes_entry() -> None:
    ring = Keyring()
    ring._load({ROUTES_KEY: EXAMPLE.encode()})
    assert ring.ready.is_set() and ring.names == [] and ring.prices_ok
    ring.apply(ROUTES_KEY, b"not: [a key")
    ring.apply(ROUTES_KEY, None)
    assert ring.names == [] and ring.prices_ok


# ---- the watch, one message at a time ---------------------------------------------------------


def msg(rev: int, data: bytes = b"", **headers: str) -> Any:
    meta = SimpleNamespace(sequence=SimpleNamespace(stream=rev))
    return SimpleNamespace(data=data, headers=headers or None, metadata=meta)


class Recorder:
    def __init__(self) -> None:
        self.applied: list[tuple[Routes, str]] = []
        self.rejected: list[str] = []
        self.watch = RoutesWatch(self.apply, self.rejected.append)

    def apply(self, routes: Routes, version: str) -> None:
        self.applied.append((routes, version))


def test_watch_applies_rejects_and_deletes() -> None:
    async def go() -> Recorder:
        r = Recorder()
        w = r.watch
        await w._handle(msg(3, EXAMPLE.encode()))
        await w._handle(msg(3, EXAMPLE.encode()))  # a fresh read: not handed over again
        await w._handle(msg(4, b"aliases:\n  chat: {chain: [chat]}\n"))
        await w._handle(msg(5, one("[m]").encode(), **{"Nats-Stream": "LLMFLEET_AUDIT"}))
        await w._handle(msg(6, b"", **{"KV-Operation": "DEL"}))
        w._absent()  # no entry now, and the last one in force was empty: nothing to do
        await w._handle(msg(7, one("[m]").encode()))
        w._absent()  # routes from KV were in force: dropped
        return r

    r = asyncio.run(go())
    assert [v for _, v in r.applied] == ["kv rev 3", "kv rev 6 (deleted)", "kv rev 7", "kv: none"]
    assert r.applied[0][0] == parse_routes(EXAMPLE)
    assert r.applied[1][0] == Routes() and r.applied[3][0] == Routes()
    assert r.rejected[0] == "LLMFLEET_KEYS.routes rev 4: alias 'chat': cycle chat -> chat"
    assert r.rejected[1] == (
        "LLMFLEET_KEYS.routes rev 5: republished from stream 'LLMFLEET_AUDIT', "
        "not written by an admin"
    )
    assert (r.watch.applied, r.watch.rejected, r.watch.forged) == (4, 2, 1)
