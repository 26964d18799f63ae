"""The routes file: model aliases with fallback chains (pure: text in, `Routes` out).

```yaml
default_model: chat            # a request with no `model` (a --default-model flag wins)
models: [qwen2.5:7b, gemma-3-270m]   # optional: when given, a chain may name only these
aliases:
  chat:
    description: General chat, falls back to the small model
    chain: [qwen2.5:7b, gemma-3-270m]
    fallback_on: [unavailable, queue_timeout]    # default: every reason
    hop_timeout: 10            # seconds one hop may wait for a worker
```

A gateway loads it from `--routes FILE` (again on SIGHUP) or from the KV entry
`control.store.ROUTES_KEY` of `LLMFLEET_KEYS` (`llmfleet routes push`, watched by
control/routes_watch.py). A chain may name other aliases: `parse_routes` flattens every
alias at parse time (depth first, in place, the first of duplicates kept), so
`Routes.chain()` is one dict lookup. The hops a nested alias brings in are tried with the
OUTER alias's `fallback_on` and `hop_timeout`: what the client asked for decides how
patiently it is served.

    ValueError
    └── RoutesError      one line: the source (a file name, a KV revision) and what is
                         wrong (`routes.yaml: alias 'chat': cycle chat -> small -> chat`)
"""

from __future__ import annotations

import math
from typing import Any

import msgspec
import yaml

from common.names import escape_model

FALLBACK_REASONS: tuple[str, ...] = (
    "unavailable",
    "queue_timeout",
    "worker_lost",
    "upstream_error",
    "rate_limited",
    "context_length_exceeded",
)
"""Why a hop may give way to the next (gateway/routing.py `reason_of` names them)."""

MAX_BYTES = 1024 * 1024
MAX_ALIASES = 1000
MAX_HOPS = 16
MAX_EVENTS = 200_000  # YAML parser events (a 1 MiB file of short items has fewer)
MAX_DEPTH = 16  # nested mappings and lists; a routes file needs 4
_NOT_IN_IDS = frozenset("*?[]")  # glob characters: keys' model lists use them, ids do not


class RoutesError(ValueError):
    """What is wrong with a routes file, as one line: `<source>: <what>`."""

    def __init__(self, source: str, what: str, line: int | None = None) -> None:
        super().__init__(f"{source}: {what}")
        self.source = source
        self.what = what
        self.line = line  # 1-based, for YAML syntax errors


class Alias(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One alias as written: `chain` may name aliases (`Routes.chain` has them expanded);
    its `fallback_on` and `hop_timeout` govern every hop of the flattened chain."""

    chain: tuple[str, ...]
    description: str = ""
    fallback_on: tuple[str, ...] = FALLBACK_REASONS
    hop_timeout: float = 10.0


class Routes(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Validated routes (build them with `parse_routes`; `Routes()` is no routes).
    `flat` holds each alias's flattened chain (model ids only)."""

    default_model: str | None = None
    aliases: dict[str, Alias] = {}
    models: tuple[str, ...] | None = None
    flat: dict[str, tuple[str, ...]] = {}

    def chain(self, alias: str) -> tuple[str, ...] | None:
        """The model ids `alias` tries, in order; None when `alias` is no alias."""
        return self.flat.get(alias)


class _Top(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A routes file's top level (its aliases are read one by one, to name them)."""

    default_model: str | None = None
    aliases: dict[str, Any] = {}
    models: tuple[str, ...] | None = None


RouteRow = tuple[str, str, tuple[str, ...], tuple[str, ...], float]
"""(alias, description, flattened chain, fallback_on, hop_timeout): one row of a table."""


def describe(routes: Routes) -> list[RouteRow]:
    """Every alias as a table row, in the file's order."""
    return [
        (name, a.description, routes.flat.get(name, ()), a.fallback_on, a.hop_timeout)
        for name, a in routes.aliases.items()
    ]


# ---- parsing -----------------------------------------------------------------------------


try:  # libyaml's parser: a 1 MiB file in tens of milliseconds, not seconds
    from yaml import CSafeLoader as _SafeLoader
except ImportError:  # pragma: no cover - PyYAML built without libyaml
    from yaml import SafeLoader as _SafeLoader  # type: ignore[assignment]


class _Loader(_SafeLoader):
    """safe_load, except that a key given twice in one mapping is an error (a second
    `chat:` would silently replace the first)."""

    def construct_mapping(self, node: Any, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *base`: merged keys may be overridden, that is its point
            key = self.construct_object(key_node, deep=deep)
            try:
                dup = key in seen
                seen.add(key)
            except TypeError:
                continue  # an unhashable key: construct_mapping reports it
            if dup:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
        return super().construct_mapping(node, deep=deep)


def parse_routes(text: bytes | str, source: str = "routes") -> Routes:
    """The routes `text` says (an empty file: no routes); RoutesError naming `source`."""
    doc = _load(text.encode() if isinstance(text, str) else text, source)
    if doc is None:
        return Routes()
    if not isinstance(doc, dict):
        raise RoutesError(
            source,
            f"expected a mapping (default_model, models, aliases), got {_kind(doc)}",
        )
    # A section left empty (`aliases:` with every alias commented out) is no section.
    doc = {k: v for k, v in doc.items() if v is not None}
    try:
        top = msgspec.convert(doc, _Top)
    except msgspec.ValidationError as exc:
        raise RoutesError(source, _convert_error(str(exc), Routes)) from None
    if len(top.aliases) > MAX_ALIASES:
        raise RoutesError(source, f"{len(top.aliases)} aliases, at most {MAX_ALIASES}")
    aliases: dict[str, Alias] = {}
    for name, body in top.aliases.items():
        if body is None:
            raise RoutesError(source, f"alias {_shown(name)}: empty (it needs a chain)")
        try:
            aliases[name] = msgspec.convert(body, Alias)
        except msgspec.ValidationError as exc:
            raise RoutesError(
                source, f"alias {_shown(name)}: {_convert_error(str(exc), Alias)}"
            ) from None
    return _validate(top, aliases, source)


def _load(raw: bytes, source: str) -> Any:
    """The YAML document in `raw` (None: empty), within the size, depth and alias limits."""
    if len(raw) > MAX_BYTES:
        raise RoutesError(source, f"{len(raw)} bytes, at most {MAX_BYTES} (1 MiB)")
    try:
        text = raw.decode("utf-8")
        _check_depth(text, source)
        doc = yaml.load(text, Loader=_Loader)  # a SafeLoader: no tags
    except UnicodeDecodeError as exc:
        raise RoutesError(source, f"not UTF-8 text (byte {exc.start})") from None
    except yaml.MarkedYAMLError as exc:
        raise _yaml_error(source, exc) from None
    except yaml.YAMLError as exc:
        raise RoutesError(source, f"not YAML: {exc}") from None
    except RoutesError:
        raise
    except (ValueError, OverflowError, RecursionError) as exc:  # e.g. a 5000-digit number
        raise RoutesError(source, f"a value YAML cannot read: {str(exc)[:200]}") from None
    return doc


def _check_depth(text: str, source: str) -> None:
    """RoutesError past MAX_DEPTH levels of nesting, read from the parser's events (no
    recursion): libyaml's composer recurses per level, and `[[[[...` a megabyte deep
    would overflow the C stack, not raise."""
    depth = 0
    for n, event in enumerate(yaml.parse(text, Loader=_Loader)):
        if isinstance(event, yaml.AliasEvent) or n > MAX_EVENTS:
            # `*name` (and `<<: *name`) copies a node: nested ten deep, a few hundred
            # bytes expand to gigabytes. A routes file has no need for them.
            mark = event.start_mark
            line = mark.line + 1 if mark is not None else None
            at = f"line {line}: " if line is not None else ""
            what = "YAML aliases (*name) are not allowed" if n <= MAX_EVENTS else "too long"
            raise RoutesError(source, f"{at}{what}", line)
        if isinstance(event, yaml.CollectionStartEvent):
            depth += 1
            if depth > MAX_DEPTH:
                mark = event.start_mark
                line = mark.line + 1 if mark is not None else None
                at = f"line {line}: " if line is not None else ""
                raise RoutesError(source, f"{at}nested deeper than {MAX_DEPTH} levels", line)
        elif isinstance(event, yaml.CollectionEndEvent):
            depth -= 1


def _yaml_error(source: str, exc: yaml.MarkedYAMLError) -> RoutesError:
    mark = exc.problem_mark or exc.context_mark
    what = exc.problem or "invalid YAML"
    if exc.context:
        what = f"{what} ({exc.context})"
    if mark is None:
        return RoutesError(source, what)
    return RoutesError(source, f"line {mark.line + 1}: {what}", line=mark.line + 1)


_KINDS: dict[type, str] = {dict: "a mapping", list: "a list", str: "a string"}


def _kind(value: object) -> str:
    return _KINDS.get(type(value), type(value).__name__)


_TYPES = {
    "`str`": "a string",
    "`str | null`": "a string",
    "`float`": "a number",
    "`int`": "an integer",
    "`bool`": "true or false",
    "`array`": "a list",
    "`object`": "a mapping",
    "`null`": "nothing",
}


def _convert_error(message: str, struct: type[msgspec.Struct]) -> str:
    """msgspec's `Expected `float`, got `str` - at `$.hop_timeout`` in the words of the
    file: `hop_timeout: expected a number, got a string`; an unknown field with the
    known ones."""
    what, sep, where = message.partition(" - at `")
    where = where.rstrip("`")
    if where.startswith("key` in `"):  # a mapping key of the wrong type
        where = where.removeprefix("key` in `")
        what = what.replace("Expected", "a name: expected", 1)
    where = where.removeprefix("$").removeprefix(".")
    unknown = what.removeprefix("Object contains unknown field ")
    if unknown != what:
        fields = ", ".join(f for f in struct.__struct_fields__ if f != "flat")
        what = f"unknown field {unknown.strip('`')!r} (known: {fields})"
    else:
        what = what[:1].lower() + what[1:]
        for name, words in _TYPES.items():
            what = what.replace(name, words)
    return f"{where}: {what}" if sep and where else what


def _shown(name: str) -> str:
    """A name as an error line quotes it: repr, long ones cut."""
    return repr(name) if len(name) <= 60 else repr(name[:60]) + "..."


def _check_id(source: str, what: str, model: str) -> None:
    """A model id (or alias name) must be one a request could name: escapable (1 to 200
    bytes), printable, no spaces, no glob characters."""
    try:
        escape_model(model)
    except ValueError as exc:
        raise RoutesError(source, f"{what} {_shown(model)}: {exc}") from None
    if not model.isprintable() or any(c.isspace() or c in _NOT_IN_IDS for c in model):
        raise RoutesError(
            source, f"{what} {_shown(model)}: not a valid model id (no spaces, controls or *?[])"
        )


def _validate(f: _Top, aliases: dict[str, Alias], source: str) -> Routes:
    known = None if f.models is None else frozenset(f.models)
    for m in f.models or ():
        _check_id(source, "model", m)
    for name, alias in aliases.items():
        where = f"alias {_shown(name)}"
        _check_id(source, "alias", name)
        if known is not None and name in known:
            raise RoutesError(source, f"{where}: is also a model id in models (rename it)")
        if not alias.chain:
            raise RoutesError(source, f"{where}: the chain is empty")
        for target in alias.chain:
            _check_id(source, f"{where}: target", target)
            if known is not None and target not in aliases and target not in known:
                raise RoutesError(
                    source, f"{where}: unknown target {target!r} (not an alias, not in models)"
                )
        for reason in alias.fallback_on:
            if reason not in FALLBACK_REASONS:
                raise RoutesError(
                    source,
                    f"{where}: unknown fallback_on reason {reason!r} "
                    f"(valid: {', '.join(FALLBACK_REASONS)})",
                )
        if not (0 < alias.hop_timeout < math.inf):  # NaN fails this too
            raise RoutesError(
                source, f"{where}: hop_timeout must be a number of seconds above 0, finite"
            )
    if f.default_model is not None:
        _check_id(source, "default_model", f.default_model)
        dm = f.default_model
        if known is not None and dm not in aliases and dm not in known:
            raise RoutesError(
                source, f"default_model {dm!r}: unknown (not an alias, not in models)"
            )
    flat = _flatten(aliases, source)
    return Routes(default_model=f.default_model, aliases=aliases, models=f.models, flat=flat)


def _flatten(aliases: dict[str, Alias], source: str) -> dict[str, tuple[str, ...]]:
    """Every alias's chain with the aliases in it expanded in place, depth first, the
    first of duplicates kept; RoutesError for a cycle (its path) or over MAX_HOPS hops.
    Iterative (a nesting 1000 aliases deep is no recursion limit), each alias once."""
    flat: dict[str, tuple[str, ...]] = {}
    for root in aliases:
        if root in flat:
            continue
        stack: list[tuple[str, int]] = [(root, 0)]  # (alias, next target to look at)
        on_path = {root: 0}  # alias -> its place in `stack`
        while stack:
            name, i = stack[-1]
            chain = aliases[name].chain
            if i < len(chain):
                stack[-1] = (name, i + 1)
                target = chain[i]
                if target in aliases and target not in flat:
                    if target in on_path:
                        cycle = [n for n, _ in stack[on_path[target] :]] + [target]
                        raise RoutesError(source, f"alias {target!r}: cycle {' -> '.join(cycle)}")
                    on_path[target] = len(stack)
                    stack.append((target, 0))
                continue
            hops: dict[str, None] = {}  # ordered set
            for target in chain:
                for model in flat.get(target, (target,)):
                    hops.setdefault(model)
            if len(hops) > MAX_HOPS:
                raise RoutesError(
                    source,
                    f"alias {name!r}: the chain flattens to {len(hops)} hops, at most {MAX_HOPS}",
                )
            flat[name] = tuple(hops)
            stack.pop()
            del on_path[name]
    return flat
