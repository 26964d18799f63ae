"""Who is calling, and what they may do: `--auth none | api-key | keys`.

    none      everyone is `anonymous` and may run every model
    api-key   one shared secret (`--api-key`); its bearer is `api-key`, runs every model
    keys      virtual keys (control/keys.py), kept current by a `Keyring` watch: the
              key's name is the principal; it runs only the models its patterns allow

The secret comes from `Authorization: Bearer` or, for Anthropic-style clients,
`x-api-key`. Everything here runs on the headers alone, before any body is read. A
missing, unknown, expired or revoked key is 401 `invalid_api_key`; a model the key may
not run is answered exactly like a model that does not exist (`model_not_found`).
"""

from __future__ import annotations

import hmac

import msgspec

from common.errors import Forbidden, ModelNotFound, Unauthorized
from control.keyring import Keyring
from control.keys import KeyRecord, may_run
from gateway.http import Scope, header

MODES = ("none", "api-key", "keys")


class Principal(msgspec.Struct, frozen=True):
    """The caller, as the gateway vouches for it (audit, limits, usage)."""

    name: str
    record: KeyRecord | None = None  # None: not a virtual key (runs every model)
    admin: bool = True  # may read /stats and /v1/health

    def may_run(self, model: str) -> bool:
        return self.record is None or may_run(self.record, model)


ANONYMOUS = Principal("anonymous")
API_KEY = Principal("api-key")


def model_not_found(model: str) -> ModelNotFound:
    """The one 404 for a model that does not exist, is gone, or the key may not run."""
    return ModelNotFound(
        f"The model '{model}' does not exist or no worker serves it.", param="model"
    )


def presented_secret(scope: Scope) -> str:
    """The bearer token, else the `x-api-key` header, else ''."""
    given = header(scope, b"authorization")
    if given is not None:
        return given[7:].strip() if given[:7].lower() == "bearer " else ""
    return (header(scope, b"x-api-key") or "").strip()


class Authenticator:
    def __init__(self, mode: str, api_key: str | None, keyring: Keyring | None) -> None:
        if mode not in MODES:
            raise ValueError(f"--auth: one of {', '.join(MODES)}, not {mode!r}")
        if mode == "api-key" and not api_key:
            raise ValueError("--auth api-key needs --api-key")
        if mode == "keys" and keyring is None:
            raise ValueError("--auth keys needs the keyring")
        self.mode = mode
        self.api_key = api_key
        self.keyring = keyring

    def authenticate(self, scope: Scope) -> Principal:
        """The caller, or Unauthorized (401 invalid_api_key)."""
        if self.mode == "none":
            return ANONYMOUS
        secret = presented_secret(scope)
        if self.mode == "api-key":
            assert self.api_key is not None
            if secret and hmac.compare_digest(secret.encode(), self.api_key.encode()):
                return API_KEY
            raise Unauthorized("Incorrect API key provided.")
        assert self.keyring is not None
        record = self.keyring.lookup(secret)
        if record is None:
            raise Unauthorized("Incorrect API key provided." if secret else "No API key provided.")
        return Principal(record.name, record, admin=record.admin)

    def authenticate_admin(self, scope: Scope) -> Principal:
        """For routes that show the whole fleet: under `--auth keys`, admin keys only
        (403 permission_denied for the others)."""
        principal = self.authenticate(scope)
        if not principal.admin:
            raise Forbidden("This route needs an admin key.")
        return principal

    def bears(self, scope: Scope, secret: str) -> bool:
        """The request presents `secret` (compared in constant time)."""
        given = presented_secret(scope)
        return bool(given) and hmac.compare_digest(given.encode(), secret.encode())
