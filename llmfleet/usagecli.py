"""`llmfleet usage [NAME]` and `llmfleet prices set|list|delete`.

Usage is read, never written, from the ledgers the gateways keep in the KV bucket
LLMFLEET_QUOTA (control/ledger.py): `<key>.use.<period>` for the current day, month and
total, and each budget's `<key>.btok.<period>` / `<key>.bcost.<period>` (granted = spent
+ reserved by requests in flight) in the key's budget period. A missing bucket or entry
counts as zero. Costs are stored in micro-units and printed in the price table's unit.
Prices live in LLMFLEET_KEYS (`cfg.prices`), changed compare-and-set.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from typing import Any

import msgspec
import nats.js.errors
from rich.console import Group
from rich.table import Table
from rich.text import Text

from control import ledger as L
from control.keys import KeyRecord, Price, PriceTable, period_end, period_id
from control.store import ControlError, KeyMissing, StoreUnavailable, open_bucket, quota_config
from llmfleet.adminconn import API_TIMEOUT_S, Target, admin_session, console, print_json, when
from llmfleet.keyscli import bucket_missing, open_store, state

PERIODS = ("day", "month", "total")


class PeriodUsage(msgspec.Struct, frozen=True, kw_only=True):
    period: str  # day | month | total
    period_id: str  # d20261202 | m202612 | total
    requests: int
    prompt_tokens: int
    completion_tokens: int
    cost: float
    refused: int


class BudgetUse(msgspec.Struct, frozen=True, kw_only=True):
    kind: str  # tokens | cost
    period: str
    period_id: str
    limit: float
    used: float  # spent + reserved by requests in flight
    remaining: float
    ends_at: float | None  # None: a total budget never resets


class KeyUsage(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    state: str
    usage: tuple[PeriodUsage, ...]
    budgets: tuple[BudgetUse, ...]


class UsageReport(msgspec.Struct, frozen=True):
    """`llmfleet usage --json`."""

    at: float
    keys: tuple[KeyUsage, ...]


class NoPrice(ControlError):
    def __init__(self, model: str) -> None:
        super().__init__(f"no price is set for {model!r}")
        self.model = model


# ---- decisions (pure) ------------------------------------------------------------------


def ledger_keys(record: KeyRecord, now: float) -> list[str]:
    """The LLMFLEET_QUOTA entries `key_usage` reads for `record`."""
    keys = [L.usage_key(record.name, period_id(p, now)) for p in PERIODS]
    budget_period = period_id(record.budget_period, now)
    if record.budget_tokens is not None:
        keys.append(L.budget_key(record.name, "btok", budget_period))
    if record.budget_cost is not None:
        keys.append(L.budget_key(record.name, "bcost", budget_period))
    return keys


def key_usage(record: KeyRecord, entries: dict[str, bytes], now: float) -> KeyUsage:
    """What `entries` (ledger key -> stored value; missing: zero) say about `record`."""
    usage = []
    for p in PERIODS:
        pid = period_id(p, now)
        u = _decode(L.USAGE_DECODER, entries.get(L.usage_key(record.name, pid)), L.Usage())
        usage.append(
            PeriodUsage(
                period=p,
                period_id=pid,
                requests=u.requests,
                prompt_tokens=u.prompt_tokens,
                completion_tokens=u.completion_tokens,
                cost=u.cost_micros / 1e6,
                refused=u.refused,
            )
        )
    budgets = []
    pid = period_id(record.budget_period, now)
    ends = period_end(record.budget_period, now)
    for kind, dim, limit, scale in (
        ("tokens", "btok", record.budget_tokens, 1.0),
        ("cost", "bcost", record.budget_cost, 1e6),
    ):
        if limit is None:
            continue
        raw = entries.get(L.budget_key(record.name, dim, pid))
        used = _decode(L.BUDGET_DECODER, raw, L.Budget()).granted / scale
        budgets.append(
            BudgetUse(
                kind=kind,
                period=record.budget_period,
                period_id=pid,
                limit=limit,
                used=used,
                remaining=max(0.0, limit - used),
                ends_at=ends,
            )
        )
    return KeyUsage(
        name=record.name, state=state(record, now), usage=tuple(usage), budgets=tuple(budgets)
    )


def _decode(decoder: Any, raw: bytes | None, empty: Any) -> Any:
    if not raw:
        return empty
    try:
        return decoder.decode(raw)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return empty  # not a ledger the gateways wrote: count nothing


# ---- rendering ---------------------------------------------------------------------------


def _amount(kind: str, x: float) -> str:
    return f"{x:,.0f}" if kind == "tokens" else f"{x:,.4f}"


def render_usage(report: UsageReport) -> Group:
    ut = Table(title="usage", title_justify="left")
    for col in ("key", "state", "period", "requests", "prompt", "completion", "cost", "refused"):
        ut.add_column(col, justify="left" if col in ("key", "state", "period") else "right")
    bt = Table(title="budgets", title_justify="left")
    for col in ("key", "budget", "period", "used", "limit", "remaining", "resets"):
        bt.add_column(
            col, justify="left" if col in ("key", "budget", "period", "resets") else "right"
        )
    for k in report.keys:
        for i, u in enumerate(k.usage):
            ut.add_row(
                k.name if i == 0 else "",
                k.state if i == 0 else "",
                f"{u.period} ({u.period_id})" if u.period != "total" else "total",
                f"{u.requests:,}",
                f"{u.prompt_tokens:,}",
                f"{u.completion_tokens:,}",
                f"{u.cost:,.4f}",
                f"{u.refused:,}",
            )
        for b in k.budgets:
            bt.add_row(
                k.name,
                b.kind,
                b.period,
                _amount(b.kind, b.used),
                _amount(b.kind, b.limit),
                Text(_amount(b.kind, b.remaining), style="red" if b.remaining <= 0 else ""),
                when(b.ends_at, report.at) if b.ends_at is not None else "never",
            )
    parts: list[Any] = [ut]
    if bt.row_count:
        parts.append(bt)
    return Group(*parts)


def price_table(table: PriceTable) -> Table:
    t = Table(title="prices per 1M tokens", title_justify="left")
    t.add_column("model")
    t.add_column("input", justify="right")
    t.add_column("output", justify="right")
    for model in sorted(table.models):
        p = table.models[model]
        t.add_row(Text(model), f"{p.input:g}", f"{p.output:g}")
    return t


# ---- commands ----------------------------------------------------------------------------


async def _entries(js: Any, keys: list[str]) -> dict[str, bytes]:
    """The values of these LLMFLEET_QUOTA entries that exist."""
    try:
        kv = await open_bucket(js, quota_config(), create=False)
    except StoreUnavailable as exc:
        if bucket_missing(exc):
            return {}  # no gateway with --auth keys has counted anything yet
        raise

    async def get(key: str) -> bytes | None:
        try:
            return (await kv.get(key)).value
        except nats.js.errors.KeyNotFoundError:
            return None

    values = await asyncio.gather(*(get(k) for k in keys))
    return {k: v for k, v in zip(keys, values, strict=True) if v}


async def run_usage(args: argparse.Namespace, target: Target) -> None:
    """`llmfleet usage [NAME] [--json]`."""
    async with admin_session(target) as nc:
        js = nc.jetstream(timeout=API_TIMEOUT_S)
        now = time.time()
        store = await open_store(js, create=False)
        if args.name:
            if store is None:
                raise KeyMissing(args.name)
            records = [await store.get(args.name)]
        else:
            records = await store.list() if store is not None else []
        wanted = [k for r in records for k in ledger_keys(r, now)]
        entries = await _entries(js, wanted)
        report = UsageReport(now, tuple(key_usage(r, entries, now) for r in records))
        if args.json:
            print_json(report)
        elif not records:
            console(sys.stdout).print("no keys (make one with `llmfleet keys create NAME`)")
        else:
            console(sys.stdout).print(render_usage(report))


async def run_prices(args: argparse.Namespace, target: Target) -> None:
    """`llmfleet prices set MODEL --input X --output Y | list | delete MODEL`."""
    async with admin_session(target) as nc:
        js = nc.jetstream(timeout=API_TIMEOUT_S)
        action = args.prices_command
        store = await open_store(js, create=action == "set", replicas=args.replicas)
        if action == "list":
            table = await store.prices() if store is not None else PriceTable()
        elif action == "set":
            assert store is not None
            price = Price(args.input, args.output)
            table = await store.update_prices(lambda t: PriceTable({**t.models, args.model: price}))
        else:
            if store is None:
                raise NoPrice(args.model)
            table = await store.update_prices(lambda t: _without(t, args.model))
        if args.json:
            print_json(table)
            return
        c = console(sys.stdout)
        if action == "set":
            c.print(
                Text(f"price of {args.model} set: {args.input:g} input, {args.output:g} output")
            )
        elif action == "delete":
            c.print(Text(f"price of {args.model} deleted"))
        c.print(price_table(table) if table.models else "no prices set: every request costs 0")


def _without(table: PriceTable, model: str) -> PriceTable:
    if model not in table.models:
        raise NoPrice(model)
    return PriceTable({m: p for m, p in table.models.items() if m != model})
