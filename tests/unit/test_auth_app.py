"""The auth middleware and /token on an in-process cargohold in front of an in-process upstream.

The upstream answers tags/list for any repository and counts requests, so a refused request is
seen never to reach it. Clients are told apart by X-Forwarded-For from a trusted loopback proxy.
"""

from __future__ import annotations

import asyncio
import base64
import gc
import json
import logging
import threading
import time
import tracemalloc
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
from cargohold.badrequests import QuietBadRequests
from cargohold.config import ConfigError, Settings
from cargohold.handlers import token as token_handler
from cargohold.identity import IDENTITY
from cargohold.keys import AUTH, PROXY, SETTINGS
from cargohold.tasks import Tasks

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
    resp = await client.get(
        "/token", params=[("service", "cargohold"), *(("scope", s) for s in scopes)], headers=basic(user, password)
    )
    assert resp.status == 200, await resp.text()
    body = await resp.json()
    assert body["token"] == body["access_token"] and body["expires_in"] == 300
    assert resp.headers["Cache-Control"] == "no-store"
    return str(body["token"])


async def test_without_auth_section_everything_stays_open(make_client: Any) -> None:
    make, _ = make_client
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
    make, _ = make_client
    client = await make({"groups": {"devs": ["alice"]}})
    checks: list[bytes] = []
    real = logins.verify_password

    def counting(password: bytes, hashed: bytes) -> bool:
        checks.append(password)
        return real(password, hashed)

    monkeypatch.setattr(logins, "verify_password", counting)
    results = await asyncio.gather(
        *(client.get("/v2/library/alpine/tags/list", headers=basic("alice")) for _ in range(8))
    )
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


async def test_failed_logins_are_throttled_per_user_and_address_and_per_address(make_client: Any) -> None:
    make, _ = make_client
    client = await make({"max_failed_logins": 3, "failed_login_window": "1h"})
    for _ in range(3):
        assert (await client.get("/v2/", headers=from_ip("192.0.2.1", basic("alice", "guess")))).status == 401
    resp = await client.get("/v2/", headers=from_ip("192.0.2.1", basic("alice")))  # that name from that address
    assert resp.status == 429 and await _error(resp) == "TOOMANYREQUESTS"
    assert 3500 < int(resp.headers["Retry-After"]) <= 3600
    resp = await client.get("/token", headers=from_ip("192.0.2.1", basic("alice")))
    assert resp.status == 429 and "Retry-After" in resp.headers
    assert (await client.get("/v2/", headers=from_ip("192.0.2.1", basic("bob")))).status == 200  # a NAT's other users
    for user in ("bob", "carol") * 3:  # the address itself: three times the limit, whatever the names
        assert (await client.get("/v2/", headers=from_ip("192.0.2.1", basic(user, "guess")))).status == 401
    assert (await client.get("/v2/", headers=from_ip("192.0.2.1", basic("dave", "x")))).status == 429
    assert (await client.get("/v2/", headers=from_ip("192.0.2.2", basic("bob")))).status == 200


async def test_an_ipv6_64_has_a_budget_of_failed_logins_for_all_its_addresses(make_client: Any) -> None:
    """A host holds a whole /64: a fresh address for every guess was a fresh count. Its addresses now
    share one, at ten times an address's (a subnet's hosts share a /64 too); each address keeps its own."""
    make, _ = make_client
    client = await make({"max_failed_logins": 3, "failed_login_window": "1h"})  # an address: 9, a /64: 90
    for i in range(10):
        hop = f"[2001:db8:0:7::{i + 1}]"
        for user in ("alice", "bob", "carol") * 3:  # an address's nine, three per name
            assert (await client.get("/v2/", headers=from_ip(hop, basic(user, "guess")))).status == 401
        if i == 0:  # one address at its limit does not hold back its neighbours
            assert (await client.get("/v2/", headers=from_ip("[2001:db8:0:7::99]", basic("alice")))).status == 200
    resp = await client.get("/v2/", headers=from_ip("[2001:db8:0:7:abcd::1]", basic("alice")))
    assert resp.status == 429 and 3500 < int(resp.headers["Retry-After"]) <= 3600  # the /64's ninety are spent
    assert (await client.get("/token", headers=from_ip("[2001:db8:0:7::abc]", basic("alice")))).status == 429
    assert (await client.get("/v2/", headers=from_ip("[2001:db8:0:8::1]", basic("alice")))).status == 200
    assert (await client.get("/v2/", headers=from_ip("192.0.2.1", basic("alice")))).status == 200


async def test_nobody_can_lock_another_user_out(make_client: Any) -> None:
    """Issue 21.2: failures for `alice` from attacker addresses never refuse her right password elsewhere,
    on Basic, GET /token and the password grant; a window later the attacker is where he started."""
    make, _ = make_client
    client = await make({"max_failed_logins": 3, "failed_login_window": "1h"})
    for i in range(10):  # one attacker address after another, each to its own limit and beyond
        for _ in range(4):
            await client.get("/v2/", headers=from_ip(f"198.51.100.{i}", basic("alice", "guess")))
    assert (await client.get("/v2/", headers=from_ip("192.0.2.7", basic("alice")))).status == 200
    assert (await client.get("/token", headers=from_ip("192.0.2.8", basic("alice")))).status == 200
    await _oauth(client, ip="192.0.2.9", grant_type="password", username="alice", password="alice-pw")
    assert (await client.get("/v2/", headers=from_ip("198.51.100.0", basic("alice")))).status == 429


async def test_removed_user_is_refused_without_restart(make_client: Any, tmp_path: Path) -> None:
    make, _ = make_client
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


async def test_a_changed_password_stops_a_remembered_basic_header_at_once(make_client: Any, tmp_path: Path) -> None:
    """A Basic header proven once is not checked again within a minute (`Logins.check_basic`), but only
    while its user's hash is the one it was proven against."""
    make, _ = make_client
    client = await make({})
    assert (await client.get("/v2/library/alpine/tags/list", headers=basic("bob"))).status == 200
    htpasswd.set_user(tmp_path / "htpasswd", "bob", htpasswd.hash_password("new-pw", rounds=4))
    users = client.server.app[AUTH].users
    old = users.hash_of("bob")
    for _ in range(100):  # the watcher rereads the file every second
        if users.hash_of("bob") != old:
            break
        await asyncio.sleep(0.1)
    assert (await client.get("/v2/library/alpine/tags/list", headers=basic("bob"))).status == 401
    assert (await client.get("/v2/library/alpine/tags/list", headers=basic("bob", "new-pw"))).status == 200


async def test_an_admission_is_remembered_for_its_credentials_address_and_repository_only(
    make_client: Any, monkeypatch: Any
) -> None:
    """`Auth.admitted`: the same credentials from the same address for the same repository are not checked
    again within the second; a token for one repository never lets another in through it."""
    make, _ = make_client
    client = await make({})
    auth = client.server.app[AUTH]
    checked: list[str] = []
    real = auth.tokens.verify

    def counting(token: str) -> Any:
        checked.append(token)
        return real(token)

    monkeypatch.setattr(auth.tokens, "verify", counting)
    token = await _token(client, "repository:library/alpine:pull", user="bob")
    for _ in range(3):
        assert (await client.get("/v2/library/alpine/tags/list", headers=bearer(token))).status == 200
    assert len(checked) == 1
    resp = await client.get("/v2/library/busybox/tags/list", headers=bearer(token))
    assert resp.status == 401 and 'error="insufficient_scope"' in resp.headers["WWW-Authenticate"]
    assert (await client.get("/v2/library/alpine/tags/list", headers=from_ip("192.0.2.5", bearer(token)))).status == 200
    assert len(checked) == 3  # another repository, another address: checked
    # A Host no DNS name can be (any string a client sends) is not remembered: checked each time.
    for _ in range(2):
        resp = await client.get("/v2/library/alpine/tags/list", headers={"Host": "h" * 1000, **bearer(token)})
        assert resp.status == 200
    assert len(checked) == 5


async def test_a_bad_htpasswd_line_is_left_out_not_fatal(make_client: Any, tmp_path: Path, caplog: Any) -> None:
    """Issue 21.13: one bad line (here what `user add $'mallory\\n'` wrote before the fix) used to stop
    the start; now it is logged and left out, and every other user logs in."""
    make, _ = make_client
    path = tmp_path / "htpasswd"
    hashed = htpasswd.hash_password("m-pw", rounds=4)
    path.write_text(path.read_text() + f"mallory\n:{hashed}\ndave:$apr1$abc$def\n")
    client = await make({})
    assert (await client.get("/v2/", headers=basic("alice"))).status == 200
    assert (await client.get("/v2/", headers=basic("mallory", "m-pw"))).status == 401
    assert "line 4: not a `user:hash` entry" in caplog.text and "line 6: user 'dave': Apache MD5" in caplog.text
    path.unlink()
    settings = Settings.model_validate({"data_dir": str(tmp_path / "d"), "auth": {"htpasswd": str(path)}})
    with pytest.raises(ConfigError, match=r"auth\.htpasswd: cannot read htpasswd file"):
        Auth.open(settings, Tasks())


async def test_token_names_resolve_at_the_host_the_client_used(make_client: Any) -> None:
    """At ghcr.mirror.test (routed to ghcr.io by `hosts`) a token for `owner/app` means ghcr.io/owner/app."""
    make, counts = make_client
    client = await make({"rules": [{"users": ["alice"], "upstream": "ghcr.io", "repositories": ["owner/*"]}]})
    at_ghcr = {"Host": "ghcr.mirror.test"}
    resp = await client.get(
        "/token", params={"scope": "repository:owner/app:pull"}, headers={**basic("alice"), **at_ghcr}
    )
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
    body = await _oauth(
        client,
        grant_type="password",
        username="alice",
        password="alice-pw",
        scope="repository:library/alpine:pull,push repository:acme/tool:pull",
    )
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
    bob = (await _oauth(client, grant_type="password", username="bob", password="bob-pw", access_type="offline"))[
        "refresh_token"
    ]
    carol = (await _oauth(client, grant_type="password", username="carol", password="carol-pw", access_type="offline"))[
        "refresh_token"
    ]
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
    make, _ = make_client
    client = await make({"max_failed_logins": 3, "failed_login_window": "1h"})
    for form in (
        {"grant_type": "client_credentials"},
        {},
        {"grant_type": "password", "username": "alice"},
        {"grant_type": "refresh_token"},
    ):
        error = await _oauth(client, 400, **form)
        assert error["errors"][0]["code"] == "UNSUPPORTED"
    for _ in range(3):
        await _oauth(client, 401, ip="192.0.2.1", grant_type="password", username="alice", password="guess")
    resp = await client.post(
        "/token",
        data={"grant_type": "password", "username": "alice", "password": "alice-pw"},
        headers=from_ip("192.0.2.1"),
    )
    assert resp.status == 429 and "Retry-After" in resp.headers
    await _oauth(client, ip="192.0.2.1", grant_type="password", username="bob", password="bob-pw")
    for _ in range(9):  # guessing refresh tokens counts against the address (three times the limit)
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
    renewed = await _oauth(
        client, grant_type="password", username="alice", password="new-secret", access_type="offline"
    )
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
        (
            "multipart/form-data; boundary=xx",
            _multipart(b"Content-Disposition: form-data; name=a", b"Content-Type: text/plain; charset=bogus"),
        ),  # LookupError
        (
            "multipart/form-data; boundary=xx",
            _multipart(b"Content-Disposition: form-data; name=a", b"Content-Transfer-Encoding: bogus"),
        ),  # RuntimeError
        (
            "multipart/form-data; boundary=xx",
            _multipart(b"Content-Disposition: form-data; name=a", b"no colon here"),
        ),  # HttpProcessingError
        ("application/x-www-form-urlencoded; charset=bogus", b"grant_type=password"),  # LookupError
        ("application/x-www-form-urlencoded", b"grant_type=\xff\xfe"),  # UnicodeDecodeError
    ],
    ids=[
        "no-boundary",
        "part-without-name",
        "part-charset",
        "part-transfer-encoding",
        "part-header",
        "form-charset",
        "form-bytes",
    ],
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
    resp = await client.post(
        "/token",
        data=b"a=" + b"x" * (100 << 10),  # over client_max_size
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert resp.status == 413 and (await resp.json())["errors"][0]["code"] == "UNSUPPORTED"
    assert "Traceback" not in caplog.text


# -- issue 21: what a security review got through ------------------------------------------------


@pytest.mark.parametrize(
    "hop", ["192.0.2.9:4321", "[2001:db8::1]:443", "unknown", "for=192.0.2.1", "10.9.9.9, garbage"]
)
async def test_an_unparseable_forwarded_hop_is_an_outsider_not_the_proxy(make_client: Any, hop: str) -> None:
    """Issue 21.4: from a trusted proxy (loopback, inside the anonymous network), a hop that is not a
    bare address used to be served as the proxy itself."""
    make, counts = make_client
    client = await make({"anonymous": ["127.0.0.0/8"]})
    assert (await client.get("/v2/library/alpine/tags/list")).status == 200  # the proxy itself is inside
    resp = await client.get("/v2/library/alpine/tags/list", headers=from_ip(hop))
    assert resp.status == 401, hop
    who = await (await client.get("/whoami", headers=from_ip(hop, basic("alice")))).json()
    assert who["user"] == "alice"
    resp = await client.get("/v2/", headers=from_ip(hop, basic("alice", "guess")))
    assert resp.status == 401
    throttle = client.server.app[AUTH].logins.per_address
    assert throttle.retry_after(["ip:127.0.0.1"]) == 0 and len(throttle) == 1  # counted under its own key
    assert counts == Counter({"library/alpine": 1})


async def test_failed_login_table_stays_small_under_huge_names(make_client: Any) -> None:
    """Issue 21.6: 60 KB user names from many addresses used to be kept whole in the failed-login table."""
    make, _ = make_client
    client = await make({})
    name = "n" * 60_000
    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot()
        for i in range(100):
            resp = await client.post(
                "/token",
                data={"grant_type": "password", "username": f"{name}{i}", "password": "x"},
                headers=from_ip(f"198.51.100.{i}"),
            )
            assert resp.status == 401 and name not in await resp.text()
        gc.collect()
        grown = sum(stat.size_diff for stat in tracemalloc.take_snapshot().compare_to(before, "filename"))
    finally:
        tracemalloc.stop()
    assert grown < 2_000_000  # 100 names of 60 KB would be 6 MB (twice over, with the per-user key)
    logins = client.server.app[AUTH].logins
    assert len(logins.per_address) == 100 and len(logins.per_login) == 100


async def test_too_long_a_password_is_refused_alike_everywhere(make_client: Any, tmp_path: Path) -> None:
    """Issue 21.6: a password bcrypt cannot check whole is refused (not truncated) by every door."""
    make, _ = make_client
    client = await make({})
    long = "x" * 73
    htpasswd.set_user(tmp_path / "htpasswd", "dave", htpasswd.hash_password(long[:72], rounds=4))  # as Apache would
    await _wait_reread(client, lambda: "dave" in client.server.app[AUTH].users)
    for resp in (
        await client.get("/v2/", headers=basic("dave", long)),
        await client.get("/token", headers=basic("dave", long)),
        await client.post("/token", data={"grant_type": "password", "username": "dave", "password": long}),
    ):
        assert resp.status == 401 and "72 bytes" in (await resp.json())["errors"][0]["message"]
    with pytest.raises(htpasswd.PasswordError, match="72 bytes"):
        htpasswd.hash_password(long)


async def test_a_slow_token_form_is_cut_off(make_client: Any, monkeypatch: Any) -> None:
    """Issue 21.9: a POST /token body dribbled a byte at a time used to hold its connection forever."""
    monkeypatch.setattr(token_handler, "FORM_TIMEOUT", 0.5, raising=False)  # raising: the test ran on the old code too
    make, _ = make_client
    client = await make({})
    reader, writer = await asyncio.open_connection(client.host, client.port)
    writer.write(
        b"POST /token HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\n"
        b"Content-Length: 1000\r\n\r\ngrant_type="
    )
    await writer.drain()

    async def dribble() -> None:
        for _ in range(200):
            writer.write(b"p")
            await writer.drain()
            await asyncio.sleep(0.1)

    dribbling = asyncio.ensure_future(dribble())
    answer = b""
    try:
        while chunk := await asyncio.wait_for(reader.read(65536), 20):  # until the server closes the connection
            answer += chunk
            dribbling.cancel()  # more bytes after the answer only make the server's close a reset
    except ConnectionResetError:  # the server closed with our dribbled bytes unread: after its answer, a reset
        pass
    finally:
        dribbling.cancel()
        writer.close()
    assert answer.startswith(b"HTTP/1.1 408 ") and b'"code": "UNSUPPORTED"' in answer


async def test_corrupt_gzip_token_form_is_400(make_client: Any, caplog: Any) -> None:
    """Issue 21.12: a form that says gzip and is not used to be a 500 with a traceback."""
    make, _ = make_client
    client = await make({})
    quiet = QuietBadRequests()  # as `cargohold serve` installs it: aiohttp meets the error again draining the body
    logging.getLogger("aiohttp.server").addFilter(quiet)
    try:
        resp = await client.post(
            "/token",
            data=b"\x1f\x8b\x08\x00garbage-not-deflate",
            headers={"Content-Type": "application/x-www-form-urlencoded", "Content-Encoding": "gzip"},
        )
        assert resp.status == 400 and (await resp.json())["errors"][0]["code"] == "UNSUPPORTED"
    finally:
        logging.getLogger("aiohttp.server").removeFilter(quiet)
    assert "Traceback" not in caplog.text and not any(r.exc_info for r in caplog.records)


async def test_tokens_cover_host_routed_upstreams_behind_external_url(make_client: Any) -> None:
    """Issue 21.14: behind external_url, /token resolved the scope under its own Host (docker.io), so a
    rule on ghcr.io gave `"access": []`. The realm now names the Host the pull is routed by."""
    make, counts = make_client
    client = await make(
        {"rules": [{"users": ["alice"], "upstream": "ghcr.io", "repositories": ["plain/*"]}]},
        external_url="https://mirror.example.com",
    )
    at_ghcr = {"Host": "ghcr.mirror.test"}
    resp = await client.get("/v2/plain/app/tags/list", headers=at_ghcr)
    challenge = resp.headers["WWW-Authenticate"]
    assert 'realm="https://mirror.example.com/token?route=ghcr.mirror.test"' in challenge
    # The client asks the realm (at the external host: here the same server) with its own parameters added.
    resp = await client.get(
        "/token", params={"route": "ghcr.mirror.test", "scope": "repository:plain/app:pull"}, headers=basic("alice")
    )
    token = (await resp.json())["token"]
    assert _claims(token)["access"] == [{"type": "repository", "name": "plain/app", "actions": ["pull"]}]
    assert (await client.get("/v2/plain/app/tags/list", headers={**bearer(token), **at_ghcr})).status == 200
    resp = await client.get("/v2/plain/app/tags/list", headers=bearer(token))  # docker.io/plain/app: no rule
    assert resp.status in (401, 403)
    form = {"grant_type": "password", "username": "alice", "password": "alice-pw", "scope": "repository:plain/app:pull"}
    resp = await client.post("/token", params={"route": "ghcr.mirror.test"}, data=form)
    assert (await resp.json())["scope"] == "repository:plain/app:pull"
    resp = await client.get("/v2/plain/app/tags/list")  # at the external host itself: no route to name
    assert 'realm="https://mirror.example.com/token"' in resp.headers["WWW-Authenticate"]
    assert counts == Counter({"plain/app": 1})


async def test_a_removed_and_re_added_user_does_not_get_old_tokens_back(make_client: Any, tmp_path: Path) -> None:
    """Issue 21, minor: access tokens are bound to the password hash, as refresh tokens are."""
    make, _ = make_client
    client = await make({})
    users = client.server.app[AUTH].users
    old = await _token(client, "repository:library/alpine:pull", user="bob")
    htpasswd.remove_user(tmp_path / "htpasswd", "bob")
    await _wait_reread(client, lambda: "bob" not in users)
    htpasswd.set_user(tmp_path / "htpasswd", "bob", htpasswd.hash_password("new-bob", rounds=4))
    await _wait_reread(client, lambda: "bob" in users)
    resp = await client.get("/v2/library/alpine/tags/list", headers=bearer(old))
    assert resp.status == 401 and 'error="invalid_token"' in resp.headers["WWW-Authenticate"]
    new = await _token(client, "repository:library/alpine:pull", user="bob", password="new-bob")
    assert (await client.get("/v2/library/alpine/tags/list", headers=bearer(new))).status == 200
    anonymous = await make({"anonymous": True})  # anonymous tokens carry no password to bind to
    resp = await anonymous.get("/token", params={"scope": "repository:library/alpine:pull"})
    anon = (await resp.json())["token"]
    assert "pwd" not in _claims(anon)
    assert (await anonymous.get("/v2/library/alpine/tags/list", headers=bearer(anon))).status == 200


async def _status(client: TestClient, headers: dict[str, str] | None = None) -> str:
    resp = await client.get("/", headers=headers or {})
    assert resp.status == 200, await resp.text()
    return await resp.text()


async def test_status_page_shows_each_viewer_only_what_they_may_pull(make_client: Any) -> None:
    """Issue 21.5: a user with no rights (and anonymous clients) saw every cached repository and the
    upstream URLs on `/`, and /ready's checks."""
    make, _ = make_client
    rules = {
        "rules": [{"users": ["alice"], "repositories": ["library/*"]}, {"users": ["bob"], "repositories": ["acme/*"]}],
        "anonymous": True,
    }
    client = await make(rules)
    index = client.server.app[PROXY].index
    await index.put_tag(
        "docker.io", "library/alpine", "3", "sha256:" + "a" * 64, "application/vnd.oci.image.index.v1+json"
    )
    await index.put_tag("docker.io", "acme/many", "1", "sha256:" + "b" * 64, "application/vnd.oci.image.index.v1+json")
    upstream_url = str(client.server.app[SETTINGS].upstreams[0].url)
    alice = await _status(client, basic("alice"))
    assert "library/alpine:3" in alice and "acme/many" not in alice and upstream_url not in alice
    bob = await _status(client, basic("bob"))
    assert "acme/many:1" in bob and "library/alpine" not in bob
    carol = await _status(client, basic("carol"))
    assert "acme/many" not in carol and "library/alpine" not in carol and upstream_url not in carol
    anonymous = await _status(client)
    assert "acme/many" not in anonymous and "library/alpine" not in anonymous and "Log in" in anonymous
    assert 'id="hit-ratio"' in anonymous and "<td>docker.io</td>" in anonymous  # the aggregates stay
    assert await (await client.get("/ready")).json() == {"status": "ready"}
    public = await make(rules, status={"public": True})
    everything = await _status(public)
    assert "library/alpine:3" in everything and "acme/many:1" in everything and upstream_url in everything
    assert set(await (await public.get("/ready")).json()) == {"status", "checks", "upstreams"}


async def test_metrics_need_a_login_where_anonymous_clients_may_pull(make_client: Any) -> None:
    """/metrics names the upstream account, content mirrors and sync entries: an anonymous client let in
    to pull read all of it, even though the status page shows it only aggregates (issue 21.5)."""
    make, _ = make_client
    client = await make({"anonymous": True})
    assert (await client.get("/v2/")).status == 200  # admitted anonymously: that admission must not carry over
    resp = await client.get("/metrics")
    assert resp.status == 401 and await _error(resp) == "UNAUTHORIZED"
    assert resp.headers["WWW-Authenticate"].startswith("Bearer realm=")
    assert "cargohold_upstream_pulls" not in await resp.text()
    resp = await client.get("/metrics", headers=basic("carol"))
    assert resp.status == 200 and 'account="anonymous"' in await resp.text()
    token = await _token(client, user="alice")
    assert (await client.get("/metrics", headers=bearer(token))).status == 200
    public = await make({"anonymous": True}, status={"public": True})
    assert (await public.get("/metrics")).status == 200
    assert (await (await make()).get("/metrics")).status == 200  # an open mirror: everyone may see everything


async def test_ready_names_offline_upstreams_only_to_those_who_see_everything(make_client: Any) -> None:
    """/ready needs no login; behind logins it said `{"status"}` only, but still listed the offline
    upstreams by name (internal registry names) to anyone who could reach the port."""
    make, _ = make_client
    upstreams = [
        {"name": "docker.io", "url": "http://127.0.0.1:9"},
        {"name": "registry.corp.internal", "url": "http://127.0.0.1:9", "offline": True},
    ]
    client = await make({}, upstreams=upstreams)
    assert await (await client.get("/ready")).json() == {"status": "ready"}
    public = await make({}, upstreams=upstreams, status={"public": True})
    body = await (await public.get("/ready")).json()
    assert body["offline"] == ["registry.corp.internal"] and body["upstreams"]["registry.corp.internal"] == "offline"
    assert (await (await (await make(upstreams=upstreams)).get("/ready")).json())["offline"] == [
        "registry.corp.internal"
    ]


async def test_an_anonymous_client_the_rules_limit_cannot_map_the_routing(make_client: Any) -> None:
    """An anonymous client let in for library/* only got 404 "no upstream registry is configured under
    this name" for an unknown upstream, but 401 naming the upstream for a configured one: enough to list
    the upstreams (internal registries) and which names each serves."""
    make, counts = make_client
    client = await make({"anonymous": True, "rules": [{"repositories": ["library/*"]}, {"users": ["*"]}]})
    answers = []
    for name in ("registry.other.internal/team/app", "ghcr.io/secret/app", "acme/tool"):
        resp = await client.get(f"/v2/{name}/tags/list")
        assert resp.status == 401 and resp.headers["WWW-Authenticate"].endswith(f',scope="repository:{name}:pull"')
        answers.append(await resp.json())
    assert (
        answers[0]
        == answers[1]
        == answers[2]
        == {"errors": [{"code": "UNAUTHORIZED", "message": "log in to pull this repository", "detail": {}}]}
    )
    assert (await client.get("/v2/library/alpine/tags/list")).status == 200
    # A logged-in user still learns what is wrong with a name, and which upstream a refusal is about.
    resp = await client.get("/v2/registry.other.internal/team/app/tags/list", headers=basic("bob"))
    assert resp.status == 404
    open_to_anonymous = await make({"anonymous": True})  # may pull everything: nothing to hide
    assert (await open_to_anonymous.get("/v2/registry.other.internal/team/app/tags/list")).status == 404
    assert counts == Counter({"library/alpine": 1})
