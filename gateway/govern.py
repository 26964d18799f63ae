"""Governance on the request path: who calls (gateway/auth.py), what they may run,
whether their limits admit the request (control/quota.py), a fair share of each model's
queue, and the audit event each request leaves (common/audit.py).

`Governor` is built once by the composition root and used by every `Call`:

    authenticate(scope)         headers only, before the body      401 / 403
    (which models: gateway/routing.py, `Router.plan`: forbidden == missing, 404)
    admit(p, parsed)            reserve (prompt bound + max tokens) 429 rate_limit_exceeded
                                                                    429 insufficient_quota
    enter_queue / leave_queue   per key and model, this gateway    429 key_queue_full
    finish(...)                 settle the reservation, usage metrics, the audit event

The prompt's reservation is its body size in bytes: no tokenizer produces more tokens
than bytes (byte-level BPE, byte fallback), so a reservation is never short and a
budget is never overrun by a prompt. A request with no max tokens, from a key that
counts tokens, runs with `max_tokens` = `--reserve-tokens` so that its completion
cannot overrun either.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import msgspec

from common import audit
from common.audit import AuditEvent, AuditUnavailable, AuditWriter
from common.errors import RateLimited, ServiceUnavailable
from common.telemetry import Telemetry
from control.keys import Price, cost_micros
from control.quota import Quota, Ticket
from gateway.auth import Authenticator, Principal
from gateway.http import Scope
from gateway.validate import Parsed

MAX_KEY_LABELS = 200  # distinct keys in metrics; the rest count as `_other`
OTHER = "_other"

_body = msgspec.json.Decoder(dict[str, Any])
_encode = msgspec.json.Encoder().encode


class AuditRequired(ServiceUnavailable):
    code = "audit_unavailable"


class Governor:
    def __init__(
        self,
        auth: Authenticator,
        *,
        quota: Quota | None = None,
        audit_writer: AuditWriter | None = None,
        audit_required: bool = False,
        gateway_id: str = "",
        reserve_tokens: int = 4096,
        key_queue_cap: int = 0,  # queued requests per key and model here (0: no cap)
        telemetry: Telemetry | None = None,
    ) -> None:
        self.auth = auth
        self.quota = quota
        self.audit = audit_writer
        self.audit_required = audit_required and audit_writer is not None
        self.gateway_id = gateway_id
        self.reserve_tokens = reserve_tokens
        self.key_queue_cap = key_queue_cap
        self._queued: dict[tuple[str, str], int] = {}
        self._key_counts: dict[tuple[str, str], int] = {}
        self._key_labels: dict[str, str] = {}
        self.refused_queue = 0
        if telemetry is not None:
            telemetry.observe(
                "counter",
                "llmfleet.gateway.key.requests",
                "{request}",
                f"Finished requests per key (at most {MAX_KEY_LABELS} keys, then _other) "
                "and outcome (ok, client_error, server_error, refused)",
                lambda: self._read_keys("requests"),
            )
            telemetry.observe(
                "counter",
                "llmfleet.gateway.audit.events",
                "{event}",
                "Audit events by outcome: written, failed (no PubAck; retried), dropped",
                self._read_audit,
            )
            telemetry.observe(
                "counter",
                "llmfleet.gateway.key.tokens",
                "{token}",
                "Tokens per key and gen_ai.token.type (input, output)",
                lambda: self._read_keys("tokens"),
            )

    # ---- who, and which model -----------------------------------------------------------

    def authenticate(self, scope: Scope) -> Principal:
        return self.auth.authenticate(scope)

    # ---- limits -------------------------------------------------------------------------

    async def admit(
        self, principal: Principal, parsed: Parsed, models: Sequence[str] = ()
    ) -> tuple[Parsed, Ticket | None]:
        """Reserve the request against its key's limits (nothing for unlimited keys):
        the (maybe rewritten) request and the ticket to settle, or 429/503. `models` are
        the models it may be served by (an alias's hops): the reservation is priced at
        the dearest, so it is never short whichever serves it (`reprice` then)."""
        record = principal.record
        if record is None or not record.limited or self.quota is None:
            return parsed, None
        most = parsed.max_completion
        if most is None and record.counts_tokens:
            most = self.reserve_tokens * parsed.n
            parsed = _with_max_tokens(parsed, self.reserve_tokens)
        tokens = len(parsed.body) + (most or 0)
        keyring = self.auth.keyring
        if record.budget_cost is not None and keyring is not None and not keyring.prices_ok:
            raise ServiceUnavailable(  # fail closed: not "every request is free"
                "The price table cannot be read, so cost budgets cannot be checked.",
                code="limits_unavailable",
                retry_after=5.0,
            )
        prices = [self._price(m) for m in models or (parsed.model,)]
        price = max(prices, key=lambda pr: cost_micros(pr, len(parsed.body), most or 0))
        cost = cost_micros(price, len(parsed.body), most or 0)

        def cost_per(prompt: int, completion: int) -> int:
            return cost_micros(price, prompt, completion)

        ticket = await self.quota.admit(record, tokens, cost, cost_per)
        return parsed, ticket

    def reprice(self, ticket: Ticket | None, model: str) -> None:
        """The request is served by `model`: its usage is charged at that model's price."""
        if ticket is None or ticket.cost_per is None:
            return
        price = self._price(model)

        def cost_per(prompt: int, completion: int) -> int:
            return cost_micros(price, prompt, completion)

        ticket.cost_per = cost_per

    def settle(
        self,
        principal: Principal | None,
        ticket: Ticket | None,
        prompt: int,
        completion: int,
        model: str,
    ) -> None:
        """The request ended: settle its reservation to the real usage, and count the
        usage of every virtual key (limited or not)."""
        if self.quota is None:
            return
        if ticket is not None:
            self.quota.settle(ticket, prompt, completion)
        elif principal is not None and principal.record is not None and model:
            cost = cost_micros(self._price(model), prompt, completion)
            self.quota.record_usage(principal.name, prompt, completion, cost)

    def _price(self, model: str) -> Price | None:
        """The model's price (usage cost for every key; cost budgets spend it)."""
        keyring = self.auth.keyring
        return None if keyring is None else keyring.prices.price(model)

    # ---- the per-key share of a model's queue -------------------------------------------

    def enter_queue(self, principal: Principal, model: str) -> None:
        """Count a request waiting for a worker; 429 key_queue_full past the cap. Only
        virtual keys have shares (with one shared key or none, everyone is one caller)."""
        if not self.key_queue_cap or principal.record is None:
            return
        k = (principal.name, model)
        n = self._queued.get(k, 0)
        if n >= self.key_queue_cap:
            self.refused_queue += 1
            raise RateLimited(
                f"Key '{principal.name}' has {n} requests waiting for '{model}' here, "
                f"its share of the queue; retry when some are answered.",
                code="key_queue_full",
                retry_after=1.0,
            )
        self._queued[k] = n + 1

    def leave_queue(self, principal: Principal, model: str) -> None:
        if not self.key_queue_cap or principal.record is None:
            return
        k = (principal.name, model)
        n = self._queued.get(k, 0) - 1
        if n > 0:
            self._queued[k] = n
        else:
            self._queued.pop(k, None)

    # ---- audit --------------------------------------------------------------------------

    def check_audit(self) -> None:
        """With --audit-required, refuse new work while the audit stream refuses ours."""
        if self.audit_required and self.audit is not None and not self.audit.healthy:
            raise AuditRequired(
                "The audit log cannot be written, and this gateway requires it.",
                retry_after=2.0,
            )

    async def write_required(self, event: AuditEvent) -> None:
        """`--audit-required`: store the event before the answer is complete."""
        assert self.audit is not None
        try:
            await self.audit.write(event, event.request_id)
        except AuditUnavailable as exc:
            raise AuditRequired(
                "The audit log cannot be written, and this gateway requires it.",
                retry_after=2.0,
            ) from exc

    def record(self, event: AuditEvent, written: bool) -> None:
        """The request ended: per-key metrics, and its audit event (unless written).
        A request that named no valid key is counted (`unauthenticated` in the per-key
        metrics), never stored: anyone could fill the broker's disk with those."""
        self._count(event)
        if self.audit is not None and not written and event.key:
            self.audit.submit(event, event.request_id)  # the gateway's random id

    def event(self, **fields: Any) -> AuditEvent:
        return AuditEvent(ts=audit.now(), gateway=self.gateway_id, **fields)

    # ---- metrics ------------------------------------------------------------------------

    def _label(self, key: str) -> str:
        label = self._key_labels.get(key)
        if label is None:
            label = key if len(self._key_labels) < MAX_KEY_LABELS else OTHER
            if label != OTHER:
                self._key_labels[key] = label
        return label

    def _count(self, ev: AuditEvent) -> None:
        label = self._label(ev.key or "unauthenticated")
        if ev.status == 200 and not ev.error:
            outcome = "ok"
        elif ev.status == 429:
            outcome = "refused"
        elif ev.status < 500:
            outcome = "client_error"
        else:
            outcome = "server_error"
        for k, n in (
            ((label, "r:" + outcome), 1),
            ((label, "t:input"), ev.prompt_tokens),
            ((label, "t:output"), ev.completion_tokens),
        ):
            if n:
                self._key_counts[k] = self._key_counts.get(k, 0) + n

    def _read_audit(self) -> list[tuple[int, dict[str, str]]]:
        if self.audit is None:
            return []
        st = self.audit.stats()
        return [
            (st.written, {"outcome": "written"}),
            (st.failed, {"outcome": "failed"}),
            (st.dropped, {"outcome": "dropped"}),
        ]

    def stats(self) -> dict[str, Any]:
        """For `GET /stats` (admin keys only under `--auth keys`)."""
        out: dict[str, Any] = {"auth": self.auth.mode, "refused_key_queue": self.refused_queue}
        if self.audit is not None:
            out["audit"] = msgspec.structs.asdict(self.audit.stats())
            out["audit"]["required"] = self.audit_required
        if self.quota is not None:
            out["quota"] = dict(self.quota.counters)
        if self.auth.keyring is not None:
            out["keys"] = len(self.auth.keyring.names)
        return out

    def _read_keys(self, kind: str) -> list[tuple[int, dict[str, str]]]:
        out = []
        for (key, what), n in list(self._key_counts.items()):
            if kind == "requests" and what.startswith("r:"):
                out.append((n, {"llmfleet.key": key, "outcome": what[2:]}))
            elif kind == "tokens" and what.startswith("t:"):
                out.append((n, {"llmfleet.key": key, "gen_ai.token.type": what[2:]}))
        return out


def _with_max_tokens(parsed: Parsed, max_tokens: int) -> Parsed:
    """The request with `max_tokens` set (it had none): the completion cannot overrun
    the reservation."""
    doc = _body.decode(parsed.body)
    doc["max_tokens"] = max_tokens
    doc.pop("max_completion_tokens", None)
    return msgspec.structs.replace(parsed, body=_encode(doc), max_completion=max_tokens * parsed.n)


def ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)
