"""The one SSE reader of the tests: what a client gets from a streaming response."""

from __future__ import annotations

import json
from typing import Any

Event = dict[str, Any] | str


def sse_events(raw: bytes, *, strict: bool = False) -> list[Event]:
    """The `data:` payloads of an SSE body in order: JSON objects, and `"[DONE]"` as is.

    `strict` also checks the framing the gateway promises: the body ends with a blank line
    and every event is exactly one `data: ` line (no comments, no other fields).
    """
    frames = raw.split(b"\n\n")
    if strict:
        assert raw.endswith(b"\n\n"), raw[-40:]
        assert all(f.startswith(b"data: ") and b"\n" not in f for f in frames[:-1]), raw[:200]
    out: list[Event] = []
    for frame in frames:
        if frame.startswith(b"data: "):
            body = frame[len(b"data: ") :]
            out.append("[DONE]" if body == b"[DONE]" else json.loads(body))
    return out


def sse_text(events: list[Event]) -> str:
    """The content of choice 0 across chat chunks (or text of completion chunks)."""
    parts = []
    for e in events:
        if isinstance(e, dict) and e.get("choices"):
            c = e["choices"][0]
            parts.append((c.get("delta") or {}).get("content") or c.get("text") or "")
    return "".join(parts)
