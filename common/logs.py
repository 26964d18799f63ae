"""Log setup: `--log-format text|json`, and request fields carried by contextvars.

A request's task calls `bind(request_id=..., model=...)`; every log line it (or a child
task) writes then carries those fields in JSON mode without threading them through calls.
Fields given with `extra=` win. The access log (one line per finished request at the
gateway) is the `llmfleet.access` logger; it never holds prompt or completion text.

JSON lines: {"ts", "level", "logger", "message", then request_id / model / worker and any
`extra` fields that are set, then "exc" with the traceback if there is one}.
"""

from __future__ import annotations

import contextvars
import logging
import sys
import time
from typing import Any

import msgspec

ACCESS_LOGGER = "llmfleet.access"

request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "llmfleet_request_id", default=None
)
model_var: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "llmfleet_model", default=None
)
worker_var: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "llmfleet_worker", default=None
)

# Attributes every LogRecord has: anything else on a record came from `extra=`.
_STANDARD = frozenset(
    vars(logging.LogRecord("", 0, "", 0, "", (), None)).keys() | {"message", "asctime"}
)
_CONTEXT = (("request_id", request_id_var), ("model", model_var), ("worker", worker_var))


def bind(
    *, request_id: str | None = None, model: str | None = None, worker: str | None = None
) -> None:
    """Set the request fields for the current task (and tasks it starts from now on)."""
    if request_id is not None:
        request_id_var.set(request_id)
    if model is not None:
        model_var.set(model)
    if worker is not None:
        worker_var.set(worker)


def _extra(record: logging.LogRecord) -> dict[str, Any]:
    """The fields a record got from `extra=` (None values left out)."""
    return {
        k: v
        for k, v in record.__dict__.items()
        if v is not None and k not in _STANDARD and k[0] != "_"
    }


_CORE = ("ts", "level", "logger", "message")
_encoder = msgspec.json.Encoder(enc_hook=str)


class JsonFormatter(logging.Formatter):
    """One JSON object per line (see the module doc). Built for the access log's rate:
    msgspec encodes, and the timestamp's seconds part is formatted once per second."""

    def __init__(self) -> None:
        super().__init__()
        self._sec = -1
        self._sec_text = ""

    def format(self, record: logging.LogRecord) -> str:
        sec = int(record.created)
        if sec != self._sec:
            self._sec_text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))
            self._sec = sec
        doc: dict[str, Any] = {
            "ts": f"{self._sec_text}.{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name, var in _CONTEXT:
            v = var.get()
            if v is not None:
                doc[name] = v
        for k, v in _extra(record).items():
            if k not in _CORE:
                doc[k] = v  # given with extra=: wins over the context
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            doc["exc"] = record.exc_text
        return _encoder.encode(doc).decode()


class TextFormatter(logging.Formatter):
    """The classic one-line format; `extra=` fields are appended as key=value."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extra = _extra(record)
        if not extra:
            return line
        head, sep, tail = line.partition("\n")  # keep a traceback below the fields
        fields = " ".join(f"{k}={v}" for k, v in extra.items())
        return f"{head} {fields}{sep}{tail}"


def setup_logging(level: str, fmt: str = "text") -> None:
    """Configure the root logger once per process (stderr)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
