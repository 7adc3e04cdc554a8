"""The auth middleware and /token on an in-process cargohold in front of an in-process upstream.

The upstream answers tags/list for any repository and counts requests, so a refused request is
seen never to reach it. Clients are told apart by X-Forwarded-For from a trusted loopback proxy.
"""

from __future__ import annotations

import asyncio
import base64
import json
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from cargohold.app import build_app
from cargohold.auth import htpasswd, logins
from cargohold.auth.service import Auth, password_fingerprint
from cargohold.auth.tokens import Tokens, load_or_create_key
from cargohold.config import ConfigError, Settings
from cargohold.identity import IDENTITY
from cargohold.keys import AUTH

PASSWORDS = {"alice": "alice-pw", "bob": "bob-pw", "carol": "carol-pw"}


def basic(user: str, password: str | None = None) -> dict[str, str]:
    raw = f"{user}:{PASSWORDS.get(user, '') if password is None else password}".encode()
    return {"Authorization": "Basic " + base64.b64encode(raw).decode()}


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def from_ip(address: str, headers: dict[str, str] | None = None) -> dict[str, str]:
    return {"X-Forwarded-For": address, **(headers or {})}


def fake_upstream(counts: Counter[str]) -> web.Application:
    async def tags(request: web.Request) -> web.Response:
        counts[request.match_info["name"]] += 1
        return web.json_response({"name": request.match_info["name"], "tags": ["latest"]})

    app = web.Application()
    app.router.add_get("/v2/{name:.+}/tags/list", tags)
    return app


async def whoami(request: web.Request) -> web.Response:
    who = request[IDENTITY]
    return web.json_response({"user": who.user, "groups": sorted(who.groups), "key": who.key})


Client = Callable[..., Coroutine[Any, Any, TestClient]]


@pytest.fixture
async def make_client(tmp_path: Path) -> AsyncIterator[tuple[Client, Counter[str]]]:
    counts: Counter[str] = Counter()
    upstream = TestServer(fake_upstream(counts), host="127.0.0.1")
    await upstream.start_server()
    path = tmp_path / "htpasswd"
    for user, password in PASSWORDS.items():
        htpasswd.set_user(path, user, htpasswd.hash_password(password, rounds=4))
    clients: list[TestClient] = []

    async def make(auth: dict[str, Any] | None = None, **top: Any) -> TestClient:
        config: dict[str, Any] = {
            "data_dir": str(tmp_path / "data"),
            "upstreams": [
                {"name": "docker.io", "url": str(upstream.make_url(""))},
                {"name": "ghcr.io", "url": str(upstream.make_url("")), "hosts": ["ghcr.mirror.test"]},
            ],
            "rate_limit": {"trusted_proxies": ["127.0.0.0/8"]},
            **top,
        }
        if auth is not None:
            config["auth"] = {"htpasswd": str(path), **auth}
        app = build_app(Settings.model_validate(config))
        app.router.add_get("/whoami", whoami)
        client = TestClient(TestServer(app, host="127.0.0.1"))
        await client.start_server()
        clients.append(client)
        return client

    yield make, counts
    for client in clients:
        await client.close()
    await upstream.close()


async def _error(resp: Any) -> str:
    return (await resp.json())["errors"][0]["code"]


async def _token(client: TestClient, *scopes: str, user: str = "alice", password: str | None = None) -> str:
    resp = await client.get("/token", params=[("service", "cargohold"), *(("scope", s) for s in scopes)],
                            headers=basic(user, password))
    assert resp.status == 200, await resp.text()
    body = await resp.json()
    assert body["token"] == body["access_token"] and body["expires_in"] == 300
    assert resp.headers["Cache-Control"] == "no-store"
    return str(body["token"])


async def test_without_auth_section_everything_stays_open(make_client: Any) -> None:
    make, counts = make_client
    client = await make()
    assert (await client.get("/v2/")).status == 200
    assert (await client.get("/v2/library/alpine/tags/list")).status == 200
    assert (await (await client.get("/whoami")).json())["user"] is None
    resp = await client.get("/token")
    assert resp.status == 404 and await _error(resp) == "UNSUPPORTED"


async def test_challenge_and_open_paths(make_client: Any) -> None:
    make, counts = make_client
    client = await make({})
    assert (await client.get("/health")).status == 200
    resp = await client.get("/v2/")
    assert resp.status == 401 and await _error(resp) == "UNAUTHORIZED"
    realm = f"http://{client.host}:{client.port}/token"
    assert resp.headers["WWW-Authenticate"] == f'Bearer realm="{realm}",service="cargohold"'
    resp = await client.get("/v2/alpine/tags/list")
    assert resp.status == 401
    assert resp.headers["WWW-Authenticate"].endswith(',scope="repository:alpine:pull"')
    resp = await client.get("/v2/library/alpine/tags/list", params={"ns": "ghcr.io"})
    assert 'scope="repository:ghcr.io/library/alpine:pull"' in resp.headers["WWW-Authenticate"]
    for path in ("/", "/metrics", "/whoami", "/v2/nope/blobs/uploads/"):
        assert (await client.get(path)).status == 401, path
    assert not counts
    behind_proxy = await make({}, external_url="https://mirror.example.com/")
    resp = await behind_proxy.get("/v2/")
    assert resp.headers["WWW-Authenticate"].startswith('Bearer realm="https://mirror.example.com/token",')
    # Behind a trusted proxy that ends TLS, without external_url: the forwarded scheme and host.
    forwarded = {"X-Forwarded-Proto": "https", "X-Forwarded-Host": "mirror.example.com"}
    resp = await client.get("/v2/", headers=forwarded)
    assert resp.headers["WWW-Authenticate"].startswith('Bearer realm="https://mirror.example.com/token",')


async def test_basic_auth_sets_identity_and_costs_one_bcrypt(make_client: Any, monkeypatch: Any) -> None:
    make, counts = make_client
    client = await make({"groups": {"devs": ["alice"]}})
    checks: list[bytes] = []
    real = logins.verify_password

    def counting(password: bytes, hashed: bytes) -> bool:
        checks.append(password)
        return real(password, hashed)

    monkeypatch.setattr(logins, "verify_password", counting)
    results = await asyncio.gather(*(client.get("/v2/library/alpine/tags/list", headers=basic("alice")) for _ in range(8)))
    assert [r.status for r in results] == [200] * 8
    resp = await client.get("/whoami", headers=basic("alice"))
    assert await resp.json() == {"user": "alice", "groups": ["devs"], "key": "user:alice"}
    assert len(checks) == 1
    assert (await client.get("/v2/", headers=basic("alice", "wrong"))).status == 401
    assert (await client.get("/v2/", headers=basic("mallory", "x"))).status == 401
    assert len(checks) == 3  # a wrong password is checked (never cached), an unknown user costs the same
    resp = await client.get("/v2/", headers=basic("alice", "é" * 40))
    assert resp.status == 401 and "72 bytes" in (await resp.json())["errors"][0]["message"]


async def test_token_flow_and_access_claims(make_client: Any) -> None:
    make, counts = make_client
    client = await make({"rules": [{"users": ["alice"], "repositories": ["library/*"]}]})
    resp = await client.get("/token", params={"scope": "repository:library/alpine:pull"})
    assert resp.status == 401 and resp.headers["WWW-Authenticate"] == 'Basic realm="cargohold"'
    resp = await client.get("/token", headers=basic("alice", "nope"))
    assert resp.status == 401 and resp.headers["WWW-Authenticate"] == 'Basic realm="cargohold"'
    login = await _token(client)  # what `docker login` asks: no scope
    assert (await client.get("/v2/", headers=bearer(login))).status == 200
    resp = await client.get("/v2/library/alpine/tags/list", headers=bearer(login))
    assert resp.status == 401 and 'error="insufficient_scope"' in resp.headers["WWW-Authenticate"]
    token = await _token(client, "repository:alpine:pull,push", "repository:acme/tool:pull")
    claims = json.loads(base64.urlsafe_b64decode(token.split(".")[1] + "=="))
    assert claims["access"] == [{"type": "repository", "name": "alpine", "actions": ["pull"]}]
    assert (await client.get("/v2/library/alpine/tags/list", headers=bearer(token))).status == 200
    assert (await client.get("/v2/alpine/tags/list", headers=bearer(token))).status == 200
    resp = await client.get("/v2/acme/tool/tags/list", headers=bearer(token))
    assert resp.status == 403 and await _error(resp) == "DENIED"
    resp = await client.get("/v2/acme/tool/tags/list", headers=basic("alice"))
    assert resp.status == 403 and await _error(resp) == "DENIED"
    resp = await client.get("/v2/acme/tool/tags/list", headers=basic("bob"))
    assert resp.status == 403
    for bad in (token[:-3] + "abc", "garbage"):
        resp = await client.get("/v2/library/alpine/tags/list", headers=bearer(bad))
        assert resp.status == 401 and 'error="invalid_token"' in resp.headers["WWW-Authenticate"]
    assert counts == Counter({"library/alpine": 2})


async def test_anonymous_by_network(make_client: Any) -> None:
    make, counts = make_client
    client = await make({"anonymous": ["10.0.0.0/8"], "rules": [{"repositories": ["library/*"]}, {"users": ["*"]}]})
    assert (await client.get("/v2/", headers=from_ip("10.1.2.3"))).status == 200
    assert (await client.get("/v2/library/alpine/tags/list", headers=from_ip("10.1.2.3"))).status == 200
    resp = await client.get("/v2/acme/tool/tags/list", headers=from_ip("10.1.2.3"))
    assert resp.status == 401 and await _error(resp) == "UNAUTHORIZED"  # log in to get more
    assert (await client.get("/v2/acme/tool/tags/list", headers=from_ip("10.1.2.3", basic("bob")))).status == 200
    resp = await client.get("/v2/library/alpine/tags/list", headers=from_ip("192.0.2.1"))
    assert resp.status == 401
    resp = await client.get("/token", params={"scope": "repository:library/alpine:pull"}, headers=from_ip("10.9.9.9"))
    assert resp.status == 200
    anon = (await resp.json())["token"]
    assert (await client.get("/v2/library/alpine/tags/list", headers=from_ip("10.9.9.9", bearer(anon)))).status == 200
    resp = await client.get("/v2/library/alpine/tags/list", headers=from_ip("192.0.2.1", bearer(anon)))
    assert resp.status == 401
    assert (await client.get("/token", headers=from_ip("192.0.2.1"))).status == 401
    assert counts == Counter({"library/alpine": 2, "acme/tool": 1})


async def test_failed_logins_are_throttled_per_address_and_per_user(make_client: Any) -> None:
    make, counts = make_client
    client = await make({"max_failed_logins": 3, "failed_login_window": "1h"})
    for _ in range(3):
        assert (await client.get("/v2/", headers=from_ip("192.0.2.1", basic("alice", "guess")))).status == 401
    resp = await client.get("/v2/", headers=from_ip("192.0.2.1", basic("bob")))  # right password, same address
    assert resp.status == 429 and await _error(resp) == "TOOMANYREQUESTS"
    assert 3500 < int(resp.headers["Retry-After"]) <= 3600
    resp = await client.get("/token", headers=from_ip("192.0.2.1", basic("bob")))
    assert resp.status == 429 and "Retry-After" in resp.headers
    assert (await client.get("/v2/", headers=from_ip("192.0.2.2", basic("bob")))).status == 200
    for i in range(3):  # one user guessed at from many addresses
        assert (await client.get("/v2/", headers=from_ip(f"198.51.100.{i}", basic("carol", "guess")))).status == 401
    assert (await client.get("/v2/", headers=from_ip("198.51.100.99", basic("carol")))).status == 429
    assert (await client.get("/v2/", headers=from_ip("198.51.100.99", basic("bob")))).status == 200


async def test_removed_user_is_refused_without_restart(make_client: Any, tmp_path: Path) -> None:
    make, counts = make_client
    client = await make({})
    token = await _token(client, "repository:library/alpine:pull", user="bob")
    assert (await client.get("/v2/library/alpine/tags/list", headers=basic("bob"))).status == 200
    htpasswd.remove_user(tmp_path / "htpasswd", "bob")
    users = client.server.app[AUTH].users
    for _ in range(100):  # the watcher rereads the file every second
        if "bob" not in users:
            break
        await asyncio.sleep(0.1)
    assert (await client.get("/v2/library/alpine/tags/list", headers=basic("bob"))).status == 401
    resp = await client.get("/v2/library/alpine/tags/list", headers=bearer(token))
    assert resp.status == 401 and 'error="invalid_token"' in resp.headers["WWW-Authenticate"]
    assert (await client.get("/v2/", headers=basic("alice"))).status == 200


def test_bad_htpasswd_stops_the_start(tmp_path: Path) -> None:
    path = tmp_path / "htpasswd"
    path.write_text("alice:$apr1$abc$def\n")
    settings = Settings.model_validate({"data_dir": str(tmp_path / "d"), "auth": {"htpasswd": str(path)}})
    with pytest.raises(ConfigError, match=r"auth\.htpasswd: .*htpasswd line 1: user 'alice': Apache MD5"):
        Auth.open(settings)



async def test_token_names_resolve_at_the_host_the_client_used(make_client: Any) -> None:
    """At ghcr.mirror.test (routed to ghcr.io by `hosts`) a token for `owner/app` means ghcr.io/owner/app."""
    make, counts = make_client
    client = await make({"rules": [{"users": ["alice"], "upstream": "ghcr.io", "repositories": ["owner/*"]}]})
    at_ghcr = {"Host": "ghcr.mirror.test"}
    resp = await client.get("/token", params={"scope": "repository:owner/app:pull"}, headers={**basic("alice"), **at_ghcr})
    token = (await resp.json())["token"]
    resp = await client.get("/v2/owner/app/tags/list", headers={**bearer(token), **at_ghcr})
    assert resp.status == 200, await resp.text()
    # The same token at the default host names docker.io/owner/app, which alice may not pull.
    resp = await client.get("/v2/owner/app/tags/list", headers=bearer(token))
    assert resp.status in (401, 403)
    assert counts == Counter({"owner/app": 1})


# -- POST /token: the OAuth2 form ---------------------------------------------------------------


async def _oauth(client: TestClient, status: int = 200, ip: str = "192.0.2.10", **form: str) -> dict[str, Any]:
    resp = await client.post("/token", data={"service": "cargohold", "client_id": "test", **form}, headers=from_ip(ip))
    assert resp.status == status, await resp.text()
    return dict(await resp.json())


def _claims(token: str) -> dict[str, Any]:
    return dict(json.loads(base64.urlsafe_b64decode(token.split(".")[1] + "==")))


async def _wait_reread(client: TestClient, present: Callable[[], bool]) -> None:
    for _ in range(100):  # the watcher rereads the htpasswd file every second
        if present():
            return
        await asyncio.sleep(0.1)
    raise AssertionError("the htpasswd change was not picked up")


async def test_oauth_password_and_refresh_grants(make_client: Any, tmp_path: Path) -> None:
    make, counts = make_client
    client = await make({"rules": [{"users": ["alice"], "repositories": ["library/*"]}, {"users": ["bob"]}]})
    body = await _oauth(client, grant_type="password", username="alice", password="alice-pw",
                        scope="repository:library/alpine:pull,push repository:acme/tool:pull")
    assert set(body) == {"access_token", "expires_in", "scope", "issued_at"}  # no access_type=offline: no refresh
    assert body["expires_in"] == 300 and body["scope"] == "repository:library/alpine:pull"
    assert _claims(body["access_token"])["sub"] == "alice"
    assert (await client.get("/v2/library/alpine/tags/list", headers=bearer(body["access_token"]))).status == 200

    offline = await _oauth(client, grant_type="password", username="alice", password="alice-pw", access_type="offline")
    refresh = offline["refresh_token"]
    again = await _oauth(client, grant_type="refresh_token", refresh_token=refresh, scope="repository:alpine:pull")
    assert _claims(again["access_token"])["sub"] == "alice" and again["scope"] == "repository:alpine:pull"
    assert "refresh_token" not in again
    assert (await client.get("/v2/library/alpine/tags/list", headers=bearer(again["access_token"]))).status == 200
    # Neither kind of token passes for the other.
    resp = await client.get("/v2/library/alpine/tags/list", headers=bearer(refresh))
    assert resp.status == 401 and 'error="invalid_token"' in resp.headers["WWW-Authenticate"]
    await _oauth(client, 401, grant_type="refresh_token", refresh_token=again["access_token"])
    await _oauth(client, 401, grant_type="refresh_token", refresh_token=refresh[:-4] + "AAAA")

    # A changed password or a removed user revokes the user's refresh tokens.
    bob = (await _oauth(client, grant_type="password", username="bob", password="bob-pw", access_type="offline"))["refresh_token"]
    carol = (await _oauth(client, grant_type="password", username="carol", password="carol-pw", access_type="offline"))["refresh_token"]
    await _oauth(client, grant_type="refresh_token", refresh_token=bob)
    users = client.server.app[AUTH].users
    htpasswd.remove_user(tmp_path / "htpasswd", "bob")
    htpasswd.set_user(tmp_path / "htpasswd", "carol", htpasswd.hash_password("carol-new", rounds=4))
    old_carol = users.hash_of("carol")
    await _wait_reread(client, lambda: "bob" not in users and users.hash_of("carol") != old_carol)
    error = await _oauth(client, 401, grant_type="refresh_token", refresh_token=bob)
    assert error["errors"][0]["code"] == "UNAUTHORIZED"
    await _oauth(client, 401, grant_type="refresh_token", refresh_token=carol)
    await _oauth(client, grant_type="refresh_token", refresh_token=refresh)  # alice's still works
    assert counts == Counter({"library/alpine": 2})


async def test_oauth_form_errors_and_throttling(make_client: Any) -> None:
    make, counts = make_client
    client = await make({"max_failed_logins": 3, "failed_login_window": "1h"})
    for form in ({"grant_type": "client_credentials"}, {}, {"grant_type": "password", "username": "alice"},
                 {"grant_type": "refresh_token"}):
        error = await _oauth(client, 400, **form)
        assert error["errors"][0]["code"] == "UNSUPPORTED"
    for _ in range(3):
        await _oauth(client, 401, ip="192.0.2.1", grant_type="password", username="alice", password="guess")
    resp = await client.post("/token", data={"grant_type": "password", "username": "bob", "password": "bob-pw"},
                             headers=from_ip("192.0.2.1"))
    assert resp.status == 429 and "Retry-After" in resp.headers
    for _ in range(3):  # guessing refresh tokens counts against the address too
        await _oauth(client, 401, ip="192.0.2.2", grant_type="refresh_token", refresh_token="guess")
    await _oauth(client, 429, ip="192.0.2.2", grant_type="refresh_token", refresh_token="guess")
    assert (await client.post("/token", data={"grant_type": "password"})).status == 400
    noauth = await make()
    assert (await noauth.post("/token", data={"grant_type": "password"})).status == 404


async def test_refresh_token_is_bound_to_the_hash_the_password_was_checked_against(
    make_client: Any, tmp_path: Path, monkeypatch: Any
) -> None:
    """The htpasswd file is reread (password changed) while bcrypt checks the old password: the
    refresh token must carry the old hash's fingerprint, so the change revokes it."""
    make, _ = make_client
    client = await make({})
    users = client.server.app[AUTH].users
    entered, release = threading.Event(), threading.Event()
    real = logins.verify_password

    def held(password: bytes, stored: bytes) -> bool:
        ok = real(password, stored)
        entered.set()
        release.wait(30)
        return ok

    monkeypatch.setattr(logins, "verify_password", held)
    form = {"grant_type": "password", "username": "alice", "password": "alice-pw", "access_type": "offline"}
    login = asyncio.ensure_future(client.post("/token", data=form, headers=from_ip("192.0.2.7")))
    assert await asyncio.to_thread(entered.wait, 30)
    old = users.hash_of("alice")
    htpasswd.set_user(tmp_path / "htpasswd", "alice", htpasswd.hash_password("new-secret", rounds=4))
    await _wait_reread(client, lambda: users.hash_of("alice") != old)
    release.set()
    resp = await login
    assert resp.status == 200, await resp.text()
    refresh = (await resp.json())["refresh_token"]
    monkeypatch.setattr(logins, "verify_password", real)
    await _oauth(client, 401, grant_type="refresh_token", refresh_token=refresh)
    await _oauth(client, 401, grant_type="password", username="alice", password="alice-pw")
    renewed = await _oauth(client, grant_type="password", username="alice", password="new-secret", access_type="offline")
    await _oauth(client, grant_type="refresh_token", refresh_token=renewed["refresh_token"])


async def test_refresh_tokens_expire(make_client: Any, tmp_path: Path) -> None:
    make, _ = make_client
    client = await make({"refresh_token_ttl": "2d", "max_failed_logins": 1})
    body = await _oauth(client, grant_type="password", username="alice", password="alice-pw", access_type="offline")
    claims = _claims(body["refresh_token"])
    assert claims["exp"] - claims["iat"] == 2 * 86400
    # One issued by this instance (same key, same password) three days ago has expired.
    auth = client.server.app[AUTH]
    past = Tokens(load_or_create_key(tmp_path / "data"), 300, 2 * 86400, clock=lambda: time.time() - 3 * 86400)
    old = past.issue_refresh("alice", password_fingerprint(auth.users.hash_of("alice") or b""))
    for _ in range(2):  # no guess: not counted against the address (max_failed_logins is 1)
        error = await _oauth(client, 401, ip="192.0.2.3", grant_type="refresh_token", refresh_token=old)
        assert error["errors"][0]["code"] == "UNAUTHORIZED" and "expired" in error["errors"][0]["message"]
    await _oauth(client, ip="192.0.2.3", grant_type="refresh_token", refresh_token=body["refresh_token"])
    assert Settings.model_validate({"auth": {"htpasswd": "x"}}).auth.refresh_token_ttl == 30 * 86400  # type: ignore[union-attr]


def _multipart(*part_headers: bytes) -> bytes:
    return b"--xx\r\n" + b"".join(h + b"\r\n" for h in part_headers) + b"\r\nvalue\r\n--xx--\r\n"


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        ("multipart/form-data", b"grant_type=password"),  # no boundary: ValueError
        ("multipart/form-data; boundary=xx", _multipart(b"Content-Disposition: form-data")),  # part without a name
        ("multipart/form-data; boundary=xx", _multipart(b"Content-Disposition: form-data; name=a",
                                                        b"Content-Type: text/plain; charset=bogus")),  # LookupError
        ("multipart/form-data; boundary=xx", _multipart(b"Content-Disposition: form-data; name=a",
                                                        b"Content-Transfer-Encoding: bogus")),  # RuntimeError
        ("multipart/form-data; boundary=xx", _multipart(b"Content-Disposition: form-data; name=a",
                                                        b"no colon here")),  # HttpProcessingError
        ("application/x-www-form-urlencoded; charset=bogus", b"grant_type=password"),  # LookupError
        ("application/x-www-form-urlencoded", b"grant_type=\xff\xfe"),  # UnicodeDecodeError
    ],
    ids=["no-boundary", "part-without-name", "part-charset", "part-transfer-encoding", "part-header",
         "form-charset", "form-bytes"],
)
async def test_malformed_token_forms_are_400_without_a_traceback(
    make_client: Any, caplog: Any, content_type: str, body: bytes
) -> None:
    make, _ = make_client
    client = await make({})
    resp = await client.post("/token", data=body, headers=from_ip("192.0.2.50", {"Content-Type": content_type}))
    assert resp.status == 400 and resp.content_type == "application/json", await resp.text()
    error = (await resp.json())["errors"][0]
    assert error["code"] == "UNSUPPORTED" and error["detail"]["reason"]
    assert "Traceback" not in caplog.text and not any(r.exc_info for r in caplog.records)


async def test_too_large_a_token_form_is_413(make_client: Any, caplog: Any) -> None:
    make, _ = make_client
    client = await make({})
    resp = await client.post("/token", data=b"a=" + b"x" * (100 << 10),  # over client_max_size
                             headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert resp.status == 413 and (await resp.json())["errors"][0]["code"] == "UNSUPPORTED"
    assert "Traceback" not in caplog.text
