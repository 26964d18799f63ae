"""Credentials out of texts that leave the worker: upstream error messages reach clients.

An upstream's error text may echo what it was sent (the worker's API key in a header, a URL
with a password) or name an account. `scrub` is pure and idempotent: the secrets the
worker knows (its upstream API key, the upstream URL) are replaced wherever they appear,
and anything shaped like a credential whatever its value:

    Bearer / Basic credentials          Authorization: Bearer sk-...   -> Bearer ***
    API-key shaped tokens               sk-..., sk-proj-..., hf_..., JWTs (eyJ...)
    key=value pairs naming a secret     api_key=..., "token": "...", password: ...
    URLs with userinfo                  https://user:pw@host/         -> https://***@host/

The text is also cut to `MAX_MESSAGE_CHARS`: an error message is a sentence, not a body.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

MAX_MESSAGE_CHARS = 2000
REDACTED = "***"

_CHARS = r"[A-Za-z0-9._~+/=-]"
# A credential after an auth scheme: 6+ token characters with a digit or punctuation, a
# capital inside, or 20+ long (prose such as "Bearer token required" is left alone).
_CREDENTIAL = (
    rf"(?={_CHARS}{{6}})(?:{_CHARS}*[0-9._~+/=-]{_CHARS}*"
    rf"|[A-Za-z][a-z]*[A-Z]{_CHARS}*|{_CHARS}{{20,}})"
)
_AUTH_SCHEME = re.compile(rf"(?i:\b(bearer|basic)(\s+)){_CREDENTIAL}")
_KEY_SHAPED = re.compile(
    r"\b(?:sk|pk|rk)-[A-Za-z0-9_-]{6,}"  # OpenAI-style (sk-, sk-proj-, sk-ant-...)
    r"|\bhf_[A-Za-z0-9]{10,}"  # Hugging Face
    r"|\bgh[pousr]_[A-Za-z0-9]{10,}"  # GitHub
    r"|\bAKIA[0-9A-Z]{12,}"  # AWS access key id
    r"|\beyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*"  # a JWT
)
_SECRET_PAIR = re.compile(
    r"(?i)\b((?:x-)?api[ _-]?key(?: provided)?|access[_-]?token|auth[_-]?token|refresh[_-]?token|"
    r"authorization|token|secret|client[_-]?secret|password|passwd)"
    r"""(["']?\s*[:=]\s*["']?)"""
    r"""(?!\*\*\*)((?:(?:bearer|basic)\s+)?[^\s"'&,;}\]]+)"""
)
_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/\s@?#]+@")


def scrub(text: str, secrets: Iterable[str | None] = ()) -> str:
    """`text` without the given `secrets` (empty ones ignored) or anything credential-shaped,
    at most `MAX_MESSAGE_CHARS` long."""
    for s in sorted({s for s in secrets if s}, key=len, reverse=True):
        text = text.replace(s, REDACTED)
    text = text[: MAX_MESSAGE_CHARS * 4]  # bound the pattern work; the known secrets are out
    text = _USERINFO.sub(rf"\1{REDACTED}@", text)
    text = _SECRET_PAIR.sub(rf"\1\2{REDACTED}", text)
    text = _AUTH_SCHEME.sub(rf"\1\2{REDACTED}", text)
    text = _KEY_SHAPED.sub(REDACTED, text)
    if len(text) > MAX_MESSAGE_CHARS:
        text = text[: MAX_MESSAGE_CHARS - 3] + "..."
    return text
