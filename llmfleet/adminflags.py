"""The admin commands' flags: `keys ACTION`, `usage`, `prices ACTION` and `audit tail`
(llmfleet/keyscli.py, usagecli.py, auditcli.py). Every action takes `--nats` (the URL may
carry user:password) or `--creds FILE`, and the TLS flags, as `llmfleet status` does.
Values are checked here, with control.keys's parsers: a bad one is a usage error (exit 2).
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from typing import Any

from control.keys import PERIODS, check_name, parse_duration, parse_expiry, parse_models
from llmfleet.flags import _nats_url_arg, add, env_default

LIMITS = ("rpm", "tpm", "max-parallel", "budget-tokens", "budget-cost")
"""What `keys update --clear` removes (the flags' names)."""


def _checked(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """An argparse type from a parser that raises ValueError with a readable message."""

    def conv(raw: str) -> Any:
        try:
            return parse(raw)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    conv.__name__ = getattr(parse, "__name__", "value")
    return conv


def _positive(kind: Callable[[str], Any]) -> Callable[[str], Any]:
    def parse(raw: str) -> Any:
        value = kind(raw)
        if not (0 < value < math.inf):  # NaN fails this too
            raise ValueError(f"must be a number above 0: {raw}")
        return value

    return _checked(parse)


def _not_negative(raw: str) -> float:
    value = float(raw)
    if not (0 <= value < math.inf):
        raise ValueError(f"must be a number, 0 or more: {raw}")
    return value


def _one_model(raw: str) -> str:
    got = parse_models(raw)
    if len(got) != 1:
        raise ValueError(f"one model id or glob: {raw!r}")
    return got[0]


def _admin_conn(p: argparse.ArgumentParser) -> None:
    _nats_url_arg(p)
    add(
        p,
        "--creds",
        "",
        "NATS credentials file (user JWT + NKey seed) of an admin user; or put user:password "
        "in the --nats URL",
        env="LLMFLEET_NATS_CREDS",
        metavar="FILE",
    )


def _json_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print one JSON document")


def _key_limits(p: argparse.ArgumentParser, update: bool) -> None:
    p.add_argument("name", type=_checked(check_name), metavar="NAME", help="the key's name")
    p.add_argument(
        "--models",
        type=_checked(parse_models),
        default=None,
        metavar="LIST",
        help="models it may run: ids or globs over whole ids, comma separated; '*': all"
        + ("; '': none" if update else " (default: none, so it runs no model)"),
    )
    p.add_argument("--rpm", type=_positive(int), metavar="N", help="requests per minute")
    p.add_argument("--tpm", type=_positive(int), metavar="N", help="tokens per minute")
    p.add_argument(
        "--max-parallel", type=_positive(int), metavar="N", help="requests running at once"
    )
    p.add_argument(
        "--budget-tokens", type=_positive(int), metavar="N", help="tokens per budget period"
    )
    p.add_argument(
        "--budget-cost",
        type=_positive(float),
        metavar="X",
        help="cost per budget period, in the unit of `llmfleet prices`",
    )
    p.add_argument(
        "--budget-period",
        choices=PERIODS,
        default=None,
        help="what the budgets count over (UTC)" + ("" if update else " (default: month)"),
    )
    p.add_argument(
        "--expires",
        type=_checked(parse_expiry),
        metavar="WHEN",
        help="a duration from now (30d, 12h) or a date/time (2027-01-31, UTC)",
    )
    p.add_argument("--description", default=None, metavar="TEXT", help="a note for admins")
    if update:
        p.add_argument(
            "--admin",
            action=argparse.BooleanOptionalAction,
            default=None,
            help="may (or may not) read /stats and /v1/health",
        )
    else:
        p.add_argument(
            "--admin",
            action="store_const",
            const=True,
            default=None,
            help="an admin key: may also read /stats and /v1/health",
        )
    _json_flag(p)


def _keys_args(keys: argparse.ArgumentParser, parents: list[argparse.ArgumentParser]) -> None:
    actions = keys.add_subparsers(dest="keys_command", required=True, metavar="ACTION")

    def action(name: str, help: str) -> argparse.ArgumentParser:
        p = actions.add_parser(name, help=help, parents=parents)
        _admin_conn(p)
        return p

    create = action("create", "make a key and print its secret (once)")
    _key_limits(create, update=False)
    create.add_argument(
        "--replicas",
        type=_positive(int),
        default=env_default("--keys-replicas", 1, int),
        help="replicas of the LLMFLEET_KEYS bucket, if this makes it (3 on a cluster) "
        "[env LLMFLEET_KEYS_REPLICAS]",
    )
    _json_flag(action("list", "list the keys (never their secrets)"))
    show = action("show", "show one key")
    show.add_argument("name", type=_checked(check_name), metavar="NAME")
    _json_flag(show)
    update = action("update", "change a key's models, limits, expiry or admin right")
    _key_limits(update, update=True)
    update.add_argument(
        "--add-models", type=_checked(parse_models), metavar="LIST", help="models to add"
    )
    update.add_argument(
        "--remove-models", type=_checked(parse_models), metavar="LIST", help="models to remove"
    )
    update.add_argument("--no-expires", action="store_true", help="never expires")
    update.add_argument(
        "--clear",
        action="append",
        choices=LIMITS,
        metavar="LIMIT",
        help="remove a limit (rpm, tpm, max-parallel, budget-tokens, budget-cost); repeatable",
    )
    revoke = action("revoke", "revoke a key: every gateway answers it 401 within 2 s")
    revoke.add_argument("name", type=_checked(check_name), metavar="NAME")
    _json_flag(revoke)
    rotate = action("rotate", "give a key a new secret (printed once); the old ones expire")
    rotate.add_argument("name", type=_checked(check_name), metavar="NAME")
    rotate.add_argument(
        "--overlap",
        type=_checked(parse_duration),
        default=3600.0,
        metavar="DURATION",
        help="how long the old secrets keep working (0s: stop now) [default 1h]",
    )
    _json_flag(rotate)


def admin_args(sub: Any, parents: list[argparse.ArgumentParser]) -> None:
    """`keys ...`, `usage`, `prices ...` and `audit tail`."""
    keys = sub.add_parser("keys", help="manage virtual keys (admin)", parents=parents)
    _keys_args(keys, parents)

    usage = sub.add_parser("usage", help="per-key usage and budgets (admin)", parents=parents)
    _admin_conn(usage)
    usage.add_argument(
        "name",
        nargs="?",
        default=None,
        type=_checked(check_name),
        metavar="NAME",
        help="one key (default: all)",
    )
    _json_flag(usage)

    prices = sub.add_parser(
        "prices", help="the price table budgets count cost with (admin)", parents=parents
    )
    pa = prices.add_subparsers(dest="prices_command", required=True, metavar="ACTION")
    pset = pa.add_parser("set", help="set a model's price per 1M tokens", parents=parents)
    pset.add_argument("model", type=_checked(_one_model), metavar="MODEL", help="an id or glob")
    pset.add_argument(
        "--input",
        type=_checked(_not_negative),
        required=True,
        metavar="X",
        help="per 1M prompt tokens",
    )
    pset.add_argument(
        "--output",
        type=_checked(_not_negative),
        required=True,
        metavar="Y",
        help="per 1M completion tokens",
    )
    plist = pa.add_parser("list", help="list the prices", parents=parents)
    pdel = pa.add_parser("delete", help="remove a model's price", parents=parents)
    pdel.add_argument("model", metavar="MODEL")
    for p in (pset, plist, pdel):
        _admin_conn(p)
        _json_flag(p)
        p.add_argument(
            "--replicas",
            type=_positive(int),
            default=env_default("--keys-replicas", 1, int),
            help=argparse.SUPPRESS,
        )

    audit = sub.add_parser("audit", help="read the audit trail (admin)", parents=parents)
    aa = audit.add_subparsers(dest="audit_command", required=True, metavar="ACTION")
    tail = aa.add_parser("tail", help="print the last events, oldest first", parents=parents)
    _admin_conn(tail)
    tail.add_argument(
        "--follow", "-f", action="store_true", help="then print new events until Ctrl-C"
    )
    tail.add_argument("--key", default="", metavar="NAME", help="only this key (a glob works)")
    tail.add_argument(
        "--model", default="", metavar="M", help="only this model, asked or served (a glob works)"
    )
    tail.add_argument(
        "--since",
        default="",
        metavar="T",
        help="only events since: 10m, 2h, 7d or a date/time (UTC)",
    )
    tail.add_argument(
        "-n",
        type=_checked(_count),
        default=100,
        metavar="N",
        help="how many of the last events [default 100]",
    )
    tail.add_argument(
        "--json", action="store_true", help="one JSON object per line (the event as stored)"
    )


def _count(raw: str) -> int:
    value = int(raw)
    if value < 0:
        raise ValueError(f"must be 0 or more: {raw}")
    return value
