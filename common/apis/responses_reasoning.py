"""A reasoning item's `encrypted_content`: the thinking blocks a client sends back. Pure.

`encrypted_content` is opaque, not secret: "llmf1." + base64url(JSON of the blocks), the
reasoning the client was shown plus its signatures (the engine's upstream checks those).
`ResponseStream` (responses_stream.py) encodes it; `responses_to_chat` (responses_chat.py)
decodes it, and drops one that does not decode.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Sequence
from typing import Any

REASONING_PREFIX = "llmf1."


def encode_reasoning(blocks: Sequence[dict[str, Any]]) -> str:
    """`encrypted_content` for thinking blocks (`{"type": "thinking", "thinking",
    "signature"}` or `{"type": "redacted_thinking", "data"}`)."""
    raw = json.dumps(list(blocks), separators=(",", ":")).encode()
    return REASONING_PREFIX + base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_reasoning(value: str) -> list[dict[str, Any]] | None:
    """The blocks of an `encrypted_content` this gateway made, or None (not ours, damaged)."""
    if not value.startswith(REASONING_PREFIX):
        return None
    data = value[len(REASONING_PREFIX) :]
    try:
        blocks = json.loads(base64.urlsafe_b64decode(data + "=" * (-len(data) % 4)))
    except (ValueError, binascii.Error):
        return None
    if not isinstance(blocks, list) or not all(_is_block(b) for b in blocks):
        return None
    return blocks


def _is_block(b: Any) -> bool:
    if not isinstance(b, dict):
        return False
    if b.get("type") == "thinking":
        return isinstance(b.get("thinking"), str) and isinstance(b.get("signature"), str)
    return b.get("type") == "redacted_thinking" and isinstance(b.get("data"), str)
