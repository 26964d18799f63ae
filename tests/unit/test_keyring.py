"""The gateway's copy of the keys, and who a request's headers say is calling."""

from __future__ import annotations

import pytest

from common.errors import Forbidden, Unauthorized
from control.keyring import Keyring
from control.keys import ENCODER, KeyRecord, Secret, hash_secret
from control.store import KEY_PREFIX
from gateway.auth import Authenticator


class Clock:
    t = 1000.0

    def __call__(self) -> float:
        return self.t


def _entry(name: str, *secrets: Secret, **kw: object) -> tuple[str, bytes]:
    return KEY_PREFIX + name, ENCODER.encode(KeyRecord(name=name, secrets=secrets, **kw))  # type: ignore[arg-type]


def test_lookup_finds_live_secrets_only() -> None:
    clock = Clock()
    ring = Keyring(clock)
    old = Secret(sha256=hash_secret("sk-old"), created_at=0, expires_at=1500.0)
    new = Secret(sha256=hash_secret("sk-new"), created_at=900)
    ring._load(dict([_entry("alice", old, new, models=("m",))]))
    assert ring.ready.is_set()
    alice = ring.lookup("sk-old")
    assert alice is not None and alice.name == "alice"
    assert ring.lookup("sk-new") is not None
    assert ring.lookup("sk-other") is None and ring.lookup("") is None
    clock.t = 1500.0  # the overlap of the rotated-out secret is over
    assert ring.lookup("sk-old") is None and ring.lookup("sk-new") is not None


def test_revocation_expiry_and_deletion_apply_at_once() -> None:
    clock = Clock()
    ring = Keyring(clock)
    s = Secret(sha256=hash_secret("sk-a"), created_at=0)
    ring.apply(*_entry("a", s))
    assert ring.lookup("sk-a") is not None
    ring.apply(*_entry("a", s, revoked_at=999.0))
    assert ring.lookup("sk-a") is None
    ring.apply(*_entry("a", s, expires_at=1001.0))
    assert ring.lookup("sk-a") is not None
    clock.t = 1001.0
    assert ring.lookup("sk-a") is None
    ring.apply(KEY_PREFIX + "a", None)
    assert ring.record("a") is None


def test_malformed_or_misnamed_entries_are_ignored() -> None:
    ring = Keyring(Clock())
    s = Secret(sha256=hash_secret("sk-b"), created_at=0)
    ring.apply(KEY_PREFIX + "b", b"{not json")
    ring.apply(KEY_PREFIX + "c", _entry("b", s)[1])  # an entry that names another key
    assert ring.lookup("sk-b") is None
    good = b'{"models": {"m": {"input": 1.0, "output": 2.0}}}'
    ring.apply("cfg.prices", good)
    assert ring.prices_ok and ring.prices.price("m") is not None
    ring.apply("cfg.prices", b"[1,2]")  # a broken table keeps the last good one ...
    assert ring.prices.price("m") is not None
    assert not ring.prices_ok  # ... and cost budgets refuse until a good one comes
    ring.apply("cfg.prices", good)
    assert ring.prices_ok


def _scope(*headers: tuple[bytes, bytes]) -> dict[str, object]:
    return {"headers": list(headers)}


def test_bearer_and_x_api_key() -> None:
    ring = Keyring(Clock())
    ring._load(
        dict(
            [
                _entry("user", Secret(sha256=hash_secret("sk-u"), created_at=0)),
                _entry("root", Secret(sha256=hash_secret("sk-r"), created_at=0), admin=True),
            ]
        )
    )
    auth = Authenticator("keys", None, ring)
    assert auth.authenticate(_scope((b"authorization", b"Bearer sk-u"))).name == "user"
    assert auth.authenticate(_scope((b"x-api-key", b"sk-u"))).name == "user"
    for bad in [(), ((b"authorization", b"Bearer sk-x"),), ((b"authorization", b"sk-u"),)]:
        with pytest.raises(Unauthorized) as err:
            auth.authenticate(_scope(*bad))
        assert err.value.code == "invalid_api_key" and err.value.status == 401
    with pytest.raises(Forbidden):
        auth.authenticate_admin(_scope((b"x-api-key", b"sk-u")))
    assert auth.authenticate_admin(_scope((b"x-api-key", b"sk-r"))).admin
    # A virtual key is never a principal without models: default deny.
    assert not auth.authenticate(_scope((b"x-api-key", b"sk-u"))).may_run("m")


def test_modes() -> None:
    assert Authenticator("none", None, None).authenticate(_scope()).name == "anonymous"
    shared = Authenticator("api-key", "s3cret", None)
    assert shared.authenticate(_scope((b"x-api-key", b"s3cret"))).name == "api-key"
    with pytest.raises(Unauthorized):
        shared.authenticate(_scope((b"authorization", b"Bearer nope")))
    with pytest.raises(ValueError):
        Authenticator("keys", None, None)
