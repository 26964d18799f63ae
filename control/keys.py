"""Virtual keys: what one is, how its secret is made and checked, what it may run.

A key is a `KeyRecord` stored in the KV bucket `LLMFLEET_KEYS` under `k.<name>`; only the
SHA-256 of its secret is stored (secrets are 160 random bits, so a fast hash is enough:
nobody can guess one to test against it). Pure functions, no I/O.
"""

from __future__ import annotations

import functools
import hashlib
import re
import secrets
import time
from datetime import UTC, datetime

import msgspec

SECRET_PREFIX = "sk-llmf-"
SECRET_BYTES = 20  # 160 bits
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
PERIODS = ("day", "month", "total")
MAX_MODELS = 256  # model patterns per key


class Secret(msgspec.Struct, frozen=True, kw_only=True):
    """One valid secret of a key, by hash. A rotated-out secret keeps working until
    `expires_at` (the overlap window)."""

    sha256: str
    created_at: float
    expires_at: float | None = None


class KeyRecord(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """A virtual key. `models` are exact ids or globs over whole ids (`*` for all); an
    empty list runs nothing. `None` limits are unlimited."""

    name: str
    secrets: tuple[Secret, ...]
    models: tuple[str, ...] = ()
    admin: bool = False
    rpm: int | None = None
    tpm: int | None = None
    max_parallel: int | None = None
    budget_tokens: int | None = None
    budget_cost: float | None = None  # in the price table's currency
    budget_period: str = "month"
    expires_at: float | None = None
    revoked_at: float | None = None
    created_at: float = 0.0
    updated_at: float = 0.0
    description: str = ""

    @property
    def limited(self) -> bool:
        """Whether any fleet-wide limit applies (else admission needs no quota)."""
        return any(
            v is not None
            for v in (
                self.rpm,
                self.tpm,
                self.max_parallel,
                self.budget_tokens,
                self.budget_cost,
            )
        )

    @property
    def counts_tokens(self) -> bool:
        return (
            self.tpm is not None or self.budget_tokens is not None or self.budget_cost is not None
        )


class Price(msgspec.Struct, frozen=True):
    """Cost per million tokens, in one currency for the whole table."""

    input: float = 0.0
    output: float = 0.0


class PriceTable(msgspec.Struct, frozen=True):
    """`cfg.prices` in the keys bucket: model id (or glob) -> Price."""

    models: dict[str, Price] = {}

    def price(self, model: str) -> Price | None:
        if model in self.models:
            return self.models[model]
        for pattern in sorted(self.models, key=len, reverse=True):
            if model_matches(pattern, model):
                return self.models[pattern]
        return None


def new_secret() -> str:
    return SECRET_PREFIX + secrets.token_urlsafe(SECRET_BYTES)


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8", "surrogateescape")).hexdigest()


RESERVED_NAMES = frozenset({"anonymous", "api-key", "unauthenticated", "_other"})


def check_name(name: str) -> str:
    if not NAME_RE.match(name):
        raise ValueError(
            f"key name {name!r}: 1-64 of A-Z a-z 0-9 _ -, starting with a letter or digit"
        )
    if name in RESERVED_NAMES:
        raise ValueError(f"key name {name!r} is reserved (the audit uses it)")
    return name


def model_matches(pattern: str, model: str) -> bool:
    """Whether `pattern` allows `model`: the same id, or a glob over the whole id
    (case-sensitive; `?` is one character, `[...]` a set, `*` any run).

    A `*` right after a letter never continues that word, and one right after a digit
    never continues that number: `qwen*` is the qwen family (`qwen2.5:7b`, `qwen-7b`,
    `qwen/x`) and never `qwenx-evil`; `llama3*` matches `llama3.1-8b`, not `llama30b`.
    Say it when you mean it: `qwen?*` matches `qwenx-evil`. `bedrock/*` never matches
    `bedrockz/x` (LiteLLM #33030 did), and `*` alone matches every id."""
    if pattern == model:
        return True
    if not any(c in pattern for c in "*?["):
        return False
    return _glob(pattern).fullmatch(model) is not None


@functools.lru_cache(maxsize=4096)
def _glob(pattern: str) -> re.Pattern[str]:
    out: list[str] = []
    i, n = 0, len(pattern)
    prev = ""
    while i < n:
        c = pattern[i]
        if c == "*":
            if prev.isalpha():  # any script's letters: `qwen*` never matches `qwené-x`
                out.append(r"(?:(?![^\W\d_]).*)?")
            elif prev.isdigit():
                out.append(r"(?:(?!\d).*)?")
            else:
                out.append(".*")
            while i < n and pattern[i] == "*":
                i += 1
            prev = "*"
            continue
        if c == "?":
            out.append(".")
        elif c == "[":
            j = pattern.find("]", i + 2)
            if j < 0:
                out.append(re.escape(c))
            else:
                body = pattern[i + 1 : j]
                neg = body.startswith("!")
                body = body[1:] if neg else body
                out.append("[" + ("^" if neg else "") + body.replace("\\", "\\\\") + "]")
                i = j + 1
                prev = "]"
                continue
        else:
            out.append(re.escape(c))
        prev = c if c != "?" else "?"
        i += 1
    return re.compile("".join(out), re.DOTALL)


def may_run(record: KeyRecord, model: str) -> bool:
    """Default deny: a key with no models may run none; `*` runs all."""
    return any(model_matches(p, model) for p in record.models)


def usable(record: KeyRecord, now: float) -> bool:
    """Not revoked (at once, whatever the admin's clock said) and not expired."""
    if record.revoked_at is not None:
        return False
    return record.expires_at is None or now < record.expires_at


def live_hashes(record: KeyRecord, now: float) -> list[str]:
    return [s.sha256 for s in record.secrets if s.expires_at is None or now < s.expires_at]


def parse_models(value: str) -> tuple[str, ...]:
    """`--models a,b,qwen*` (empty: none). Each pattern is checked for what a glob
    would make of it."""
    out: list[str] = []
    for raw in value.split(","):
        m = raw.strip()
        if not m:
            continue
        if len(m) > 256 or any(ord(c) < 32 for c in m):
            raise ValueError(f"model pattern {m!r}: at most 256 printable characters")
        if m not in out:
            out.append(m)
    if len(out) > MAX_MODELS:
        raise ValueError(f"at most {MAX_MODELS} model patterns per key")
    return tuple(out)


_DURATION = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhdw])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(value: str) -> float:
    """`90s`, `30m`, `12h`, `7d`, `2w` as seconds; ValueError otherwise."""
    m = _DURATION.match(value.strip())
    if not m:
        raise ValueError(f"expected a duration like 30m, 12h, 7d, 2w: {value!r}")
    return float(m.group(1)) * _UNITS[m.group(2)]


def parse_expiry(value: str, now: float | None = None) -> float:
    """`--expires`: a duration from now (`30d`) or a date/time (`2027-01-31`,
    `2027-01-31T12:00:00Z`; UTC unless an offset is given), as a Unix time."""
    now = time.time() if now is None else now
    try:
        return now + parse_duration(value)
    except ValueError:
        pass
    try:
        dt = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"--expires: a duration (30d) or a date (2027-01-31): {value!r}") from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.timestamp()


def period_id(period: str, now: float) -> str:
    """The budget period `now` falls in (UTC): `d20261202`, `m202612` or `total`."""
    if period == "total":
        return "total"
    return _period_id(period, int(now))


@functools.lru_cache(maxsize=8)
def _period_id(period: str, second: int) -> str:  # once per second, not per request
    dt = datetime.fromtimestamp(second, UTC)
    return dt.strftime("d%Y%m%d") if period == "day" else dt.strftime("m%Y%m")


def period_end(period: str, now: float) -> float | None:
    """When the period `now` falls in ends (None for `total`)."""
    if period == "total":
        return None
    dt = datetime.fromtimestamp(now, UTC)
    if period == "day":
        start = dt.replace(hour=0, minute=0, second=0, microsecond=0)
        return start.timestamp() + 86400
    year, month = (dt.year + 1, 1) if dt.month == 12 else (dt.year, dt.month + 1)
    return datetime(year, month, 1, tzinfo=UTC).timestamp()


def cost_micros(price: Price | None, prompt: int, completion: int) -> int:
    """The cost of a request, in millionths of the currency unit (rounded up)."""
    if price is None:
        return 0
    # price per 1M tokens * tokens / 1M, in micro-units: price * tokens.
    return int(-(-(price.input * prompt + price.output * completion) // 1))


ENCODER = msgspec.json.Encoder()
RECORD_DECODER = msgspec.json.Decoder(KeyRecord)
PRICES_DECODER = msgspec.json.Decoder(PriceTable)
