"""Token signing and checking: the key made once with 0600, expiry, tampering, scopes."""

from __future__ import annotations

import base64
import json
import time
import tracemalloc
from pathlib import Path

import jwt
import pytest

from cargohold.auth.tokens import (
    KEY_FILE,
    REFRESH_AUDIENCE,
    ExpiredToken,
    InvalidToken,
    Scope,
    Tokens,
    load_or_create_key,
    parse_scopes,
)


def test_key_is_made_once_private_and_reused(tmp_path: Path) -> None:
    key = load_or_create_key(tmp_path)
    path = tmp_path / KEY_FILE
    assert path.stat().st_mode & 0o777 == 0o600
    again = load_or_create_key(tmp_path)
    assert again.private_numbers() == key.private_numbers()
    assert sorted(p.name for p in tmp_path.iterdir()) == [KEY_FILE]
    token = Tokens(key, 60).issue("alice", [])
    assert Tokens(again, 60).verify(token).user == "alice"  # tokens survive a restart


def test_issue_and_verify_access(tmp_path: Path) -> None:
    tokens = Tokens(load_or_create_key(tmp_path), 60)
    token = tokens.issue("alice", parse_scopes(["repository:library/alpine:pull"]))
    grant = tokens.verify(token)
    assert grant.user == "alice" and grant.access == {"library/alpine": frozenset({"pull"})}
    claims = json.loads(base64.urlsafe_b64decode(token.split(".")[1] + "=="))
    assert claims["access"] == [{"type": "repository", "name": "library/alpine", "actions": ["pull"]}]
    assert claims["exp"] - claims["iat"] == 60
    assert tokens.verify(tokens.issue(None, [])).user is None


def test_expired_token_is_refused(tmp_path: Path) -> None:
    key = load_or_create_key(tmp_path)
    old = Tokens(key, 60, clock=lambda: time.time() - 3600).issue("alice", [])
    with pytest.raises(InvalidToken, match="expired"):
        Tokens(key, 60).verify(old)


def test_refresh_tokens_expire_and_need_an_expiry(tmp_path: Path) -> None:
    key = load_or_create_key(tmp_path)
    tokens = Tokens(key, 60, refresh_ttl=3600)
    assert tokens.verify_refresh(tokens.issue_refresh("alice", "fp")) == ("alice", "fp")
    old = Tokens(key, 60, refresh_ttl=3600, clock=lambda: time.time() - 7200).issue_refresh("alice", "fp")
    with pytest.raises(ExpiredToken):
        tokens.verify_refresh(old)
    now = int(time.time())  # as issued before refresh tokens had an expiry
    ageless = jwt.encode(
        {"iss": "cargohold", "sub": "alice", "aud": REFRESH_AUDIENCE, "iat": now, "pwd": "fp"}, key, algorithm="ES256"
    )
    with pytest.raises(InvalidToken) as refused:
        tokens.verify_refresh(ageless)
    assert not isinstance(refused.value, ExpiredToken)


def test_tampered_or_foreign_tokens_are_refused(tmp_path: Path) -> None:
    tokens = Tokens(load_or_create_key(tmp_path), 60)
    token = tokens.issue("alice", parse_scopes(["repository:acme/x:pull"]))
    head, payload, sig = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=="))
    claims["sub"] = "admin"
    forged = base64.urlsafe_b64encode(json.dumps(claims).encode()).decode().rstrip("=")
    for bad in (f"{head}.{forged}.{sig}", token[:-4] + "AAAA", "not-a-jwt", ""):
        with pytest.raises(InvalidToken):
            tokens.verify(bad)
    (tmp_path / "other").mkdir()
    other = Tokens(load_or_create_key(tmp_path / "other"), 60)
    with pytest.raises(InvalidToken):
        other.verify(token)
    unsigned = base64.urlsafe_b64encode(b'{"alg":"none","typ":"JWT"}').decode().rstrip("=")
    with pytest.raises(InvalidToken):
        tokens.verify(f"{unsigned}.{payload}.")


def test_scope_parsing() -> None:
    scopes = parse_scopes(
        ["repository:library/alpine:pull,push repository:localhost:5000/acme/tool:pull", "registry:catalog:*", "junk"]
    )
    assert scopes == [
        Scope("repository", "library/alpine", frozenset({"pull", "push"})),
        Scope("repository", "localhost:5000/acme/tool", frozenset({"pull"})),
    ]
    assert str(scopes[0]) == "repository:library/alpine:pull,push"


def test_remembered_tokens_stay_small_whatever_a_client_asks_for(tmp_path: Path) -> None:
    """A client asking /token for 100 scopes gets a token of about 8 KB, and each one it sent was
    remembered whole with its 100 names until it expired: 3,000 of them took RSS from 74 to 322 MB."""
    tokens = Tokens(load_or_create_key(tmp_path), 300)
    many = parse_scopes([f"repository:a/r{i:03}:pull" for i in range(100)])
    issued = [tokens.issue(None, many) for _ in range(200)]
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        assert all(len(tokens.verify(token).access) == 100 for token in issued)
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert grown < 1 << 20, grown  # was about 8.6 MB (43 KB a token)
    one = tokens.issue("alice", parse_scopes(["repository:library/alpine:pull"]))
    assert tokens.verify(one) is tokens.verify(one)  # a pull's token is remembered
