"""Logins with real clients: `docker login`/pull/logout, skopeo --creds, tokens, anonymous mirrors.

Users are made with the real `cargohold user` command; the server is the real process.
"""

from __future__ import annotations

import base64
import socket
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from rig.clients import Containerd, Dockerd, skopeo_copy, write_hosts_toml
from rig.hub import Hub
from rig.server import Cargohold
from rig.util import CommandError, http_request, wait_until

ALICE = ("alice", "alice-secret")
BOB = ("bob", "bob-secret")


def user_command(srv: Cargohold, *args: str, password: str | None = None) -> subprocess.CompletedProcess[str]:
    """`cargohold user ARGS --config FILE` as an operator runs it."""
    cmd = [sys.executable, "-m", "cargohold", "user", *args, "--config", str(srv.config_path)]
    if password is not None:
        cmd.append("--password-stdin")
    return subprocess.run(cmd, input=password or "", capture_output=True, text=True, timeout=60, check=True)


def auth_server(
    cargohold: Callable[..., Cargohold], auth: dict[str, Any], *users: tuple[str, str], **top: Any
) -> Cargohold:
    srv = cargohold(start=False, **top)
    srv.config["auth"] = {"htpasswd": str(srv.workdir / "htpasswd"), **auth}
    srv.write_config()
    for name, password in users:
        user_command(srv, "add", name, password=password)
    return srv.start()


def docker_login(d: Dockerd, registry: str, user: str, password: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [d.docker_bin, "login", registry, "-u", user, "--password-stdin"],
        input=password, capture_output=True, text=True, timeout=60, env=d.env(), check=False,
    )  # fmt: skip


def scope_query(name: str) -> str:
    """How a pull scope shows in the access log's /token line."""
    return "scope=" + urllib.parse.quote(f"repository:{name}:pull", safe="")


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def test_docker_login_pull_logout_rules_and_removed_user(
    hub: Hub, dockerd: Dockerd, cargohold: Callable[..., Cargohold]
) -> None:
    rules = [{"users": ["alice"], "repositories": ["library/*"]}, {"users": ["bob"]}]
    srv = auth_server(cargohold, {"rules": rules}, ALICE, BOB)
    multi, oci = hub.images["multi"], hub.images["oci"]
    wrong = docker_login(dockerd, srv.netloc, "alice", "wrong")
    assert wrong.returncode != 0 and "unauthorized" in wrong.stderr.lower()
    unknown = docker_login(dockerd, srv.netloc, "mallory", "x")
    assert unknown.returncode != 0
    with pytest.raises(CommandError):  # not logged in
        dockerd.pull(f"{srv.netloc}/{multi.ref}")
    assert hub.manifest_count() == 0

    assert docker_login(dockerd, srv.netloc, *ALICE).returncode == 0
    assert dockerd.pull(f"{srv.netloc}/{multi.ref}") == multi.digest
    assert f"alice GET /token?account=alice&{scope_query(multi.repo)}" in srv.log_text()  # the token flow
    with pytest.raises(CommandError, match="denied"):  # alice may pull library/* only
        dockerd.pull(f"{srv.netloc}/{oci.ref}")
    assert hub.manifest_count(repo=oci.repo) == 0  # the denied pull never reached upstream
    dockerd.docker("logout", srv.netloc)
    dockerd.remove_all_images()
    with pytest.raises(CommandError):
        dockerd.pull(f"{srv.netloc}/{multi.ref}")

    assert docker_login(dockerd, srv.netloc, *BOB).returncode == 0
    assert dockerd.pull(f"{srv.netloc}/{oci.ref}") == oci.digest
    dockerd.remove_all_images()
    user_command(srv, "remove", "bob")
    wait_until(  # the server rereads the file within seconds, no restart
        lambda: http_request("GET", f"{srv.url}/v2/", headers=basic(*BOB)).status == 401,
        timeout=10,
        what="bob to be refused",
    )
    with pytest.raises(CommandError, match=r"(?i)unauthorized"):
        dockerd.pull(f"{srv.netloc}/{oci.ref}")
    assert srv.starts == 1


def test_skopeo_creds_and_fresh_challenge_for_bad_tokens(
    hub: Hub, cargohold: Callable[..., Cargohold], tmp_path: Path
) -> None:
    srv = auth_server(cargohold, {}, ALICE)
    im = hub.images["oci"]
    out = skopeo_copy(f"{srv.netloc}/{im.ref}", tmp_path / "ok", creds=ALICE)
    assert out.digest == im.digest and set(im.blob_digests) <= set(out.blobs)
    for creds in (("alice", "nope"), ("nobody", "x"), None):
        with pytest.raises(CommandError):
            skopeo_copy(f"{srv.netloc}/{im.ref}", tmp_path / "bad", creds=creds)

    url = f"{srv.url}/v2/{im.repo}/manifests/{im.tag}"
    challenge = http_request("GET", url).header("WWW-Authenticate") or ""
    assert challenge == (f'Bearer realm="{srv.url}/token",service="cargohold",scope="repository:{im.repo}:pull"')
    token_url = f"{srv.url}/token?service=cargohold&scope=repository:{im.repo}:pull"
    token = http_request("GET", token_url, headers=basic(*ALICE)).json()["token"]  # type: ignore[index]
    accept = {"Accept": im.media_type or "*/*"}
    assert http_request("GET", url, headers={**accept, "Authorization": f"Bearer {token}"}).status == 200

    expired = _expired_token(srv, im.repo)
    tampered = token[:-6] + ("AAAAAA" if not token.endswith("AAAAAA") else "BBBBBB")
    manifests_before = hub.manifest_count()
    for bad in (expired, tampered):
        res = http_request("GET", url, headers={**accept, "Authorization": f"Bearer {bad}"})
        assert res.status == 401
        assert res.json()["errors"][0]["code"] == "UNAUTHORIZED"  # type: ignore[index]
        assert res.header("WWW-Authenticate") == challenge + ',error="invalid_token"'
    assert hub.manifest_count() == manifests_before


def _expired_token(srv: Cargohold, repo: str) -> str:
    """A token signed with the server's own key (from data_dir) that expired an hour ago."""
    from cargohold.auth.tokens import Scope, Tokens, load_or_create_key

    tokens = Tokens(load_or_create_key(srv.data_dir), 60, clock=lambda: time.time() - 3600)
    return tokens.issue("alice", [Scope("repository", repo, frozenset({"pull"}))])


def test_failed_logins_are_throttled(cargohold: Callable[..., Cargohold]) -> None:
    srv = auth_server(cargohold, {"max_failed_logins": 2, "failed_login_window": "10m"}, ALICE)
    for _ in range(2):
        assert http_request("GET", f"{srv.url}/token", headers=basic("alice", "guess")).status == 401
    res = http_request("GET", f"{srv.url}/token", headers=basic(*ALICE))
    assert res.status == 429 and res.json()["errors"][0]["code"] == "TOOMANYREQUESTS"  # type: ignore[index]
    assert 0 < int(res.header("Retry-After") or 0) <= 600
    assert http_request("GET", f"{srv.url}/v2/", headers=basic(*ALICE)).status == 429
    log = srv.log_text()
    assert "alice-secret" not in log and "guess" not in log  # credentials are never logged


def test_anonymous_pulls_for_dockerd_registry_mirrors_by_network(
    hub: Hub, dockerd: Dockerd, cargohold: Callable[..., Cargohold]
) -> None:
    """dockerd's registry-mirrors never sends credentials: anonymous pulls from its network only."""
    im = hub.images["manifestlist"]
    open_to_loopback = auth_server(cargohold, {"anonymous": ["127.0.0.0/8"]}, ALICE)
    dockerd.reconfigure(mirrors=[open_to_loopback.url])
    assert dockerd.pull("multiarch-test") == im.digest
    assert hub.manifest_count(repo="library/multiarch-test") >= 1

    dockerd.remove_all_images()
    hub.reset_counts()
    elsewhere_only = auth_server(cargohold, {"anonymous": ["10.0.0.0/8"]}, ALICE)
    dockerd.reconfigure(mirrors=[elsewhere_only.url])
    with pytest.raises(CommandError):
        dockerd.pull("multiarch-test")
    assert hub.manifest_count() == 0
    assert " 401 " in elsewhere_only.log_text()


def test_containerd_logs_in_through_hosts_toml(
    hub: Hub, containerd: Containerd, hosts_dir: Path, cargohold: Callable[..., Cargohold]
) -> None:
    """containerd sends `?ns=docker.io`; its token asks for the scope our challenge names."""
    srv = auth_server(cargohold, {"rules": [{"users": ["alice"], "upstream": "docker.io"}]}, ALICE)
    write_hosts_toml(hosts_dir, srv.url)
    im = hub.images["multi"]
    with pytest.raises(CommandError):
        containerd.pull(f"docker.io/{im.ref}", hosts_dir=hosts_dir)
    pulled = containerd.pull(f"docker.io/{im.ref}", hosts_dir=hosts_dir, user=ALICE)
    assert pulled.digest == im.digest
    # With credentials containerd uses the OAuth2 form (POST /token, grant_type=password), not GET.
    assert "alice POST /token 200" in srv.log_text()
    assert "alice GET /token" not in srv.log_text()


def test_no_request_reaches_upstream_without_a_valid_login(hub: Hub, cargohold: Callable[..., Cargohold]) -> None:
    """With logins on, every missing or bad credential gets 401 UNAUTHORIZED with a challenge, on every
    registry route, and nothing at all is asked upstream; /health stays open. (Failed-login throttling
    is set out of the way: it is tested above.)"""
    srv = auth_server(cargohold, {"max_failed_logins": 10_000}, ALICE)
    im = hub.images["oci"]
    paths = [
        "/v2/",
        f"/v2/{im.repo}/manifests/{im.tag}",
        f"/v2/{im.repo}/manifests/{im.digest}",
        f"/v2/{im.repo}/blobs/{im.blob_digests[0]}",
        f"/v2/{im.repo}/tags/list",
    ]
    bad_credentials: list[dict[str, str]] = [
        {},
        basic("alice", "wrong"),
        basic("nobody", "alice-secret"),
        {"Authorization": "Basic !!!not-base64"},
        {"Authorization": "Bearer not.a.jwt"},
        {"Authorization": "Bearer " + _expired_token(srv, im.repo)},
        {"Authorization": "Digest username=alice"},
    ]
    hub.reset_counts()
    for path in paths:
        for headers in bad_credentials:
            for method in ("GET", "HEAD"):
                res = http_request(method, srv.url + path, headers=headers)
                assert res.status == 401, (method, path, headers, res.status)
                assert (res.header("WWW-Authenticate") or "").startswith(f'Bearer realm="{srv.url}/token"')
                if method == "GET":
                    assert res.json()["errors"][0]["code"] == "UNAUTHORIZED"  # type: ignore[index]
    assert hub.requests == []
    assert http_request("GET", f"{srv.url}/health").status == 200


# -- issue 21: what a security review got through ------------------------------------------------

# Tests that tell clients apart by address trust the loopback proxy's X-Forwarded-For (that is the
# setting they are about); everything else stays as shipped.
BEHIND_PROXY = {"rate_limit": {"trusted_proxies": ["127.0.0.0/8"]}}


def _no_traceback(srv: Cargohold) -> None:
    assert "Traceback" not in srv.log_text()


def _form(**fields: str) -> dict[str, Any]:
    return {
        "body": urllib.parse.urlencode(fields).encode(),
        "headers": {"Content-Type": "application/x-www-form-urlencoded"},
    }


def test_failed_logins_for_a_user_never_lock_her_out_elsewhere(cargohold: Callable[..., Cargohold]) -> None:
    """Issue 21.2: ten failures for alice from one address made alice 429 from every address."""
    srv = auth_server(cargohold, {"max_failed_logins": 3}, ALICE, **BEHIND_PROXY)
    attacker = {"X-Forwarded-For": "198.51.100.66"}
    for _ in range(10):
        http_request("GET", f"{srv.url}/token", headers={**attacker, **basic("alice", "guess")})
    assert http_request("GET", f"{srv.url}/v2/", headers={**attacker, **basic(*ALICE)}).status == 429
    alice = {"X-Forwarded-For": "192.0.2.7"}
    assert http_request("GET", f"{srv.url}/v2/", headers={**alice, **basic(*ALICE)}).status == 200
    assert http_request("GET", f"{srv.url}/token", headers={**alice, **basic(*ALICE)}).status == 200
    form = _form(grant_type="password", username="alice", password=ALICE[1])
    res = http_request("POST", f"{srv.url}/token", body=form["body"], headers={**alice, **form["headers"]})
    assert res.status == 200
    _no_traceback(srv)


def test_a_forwarded_hop_that_is_not_an_address_is_an_outsider(hub: Hub, cargohold: Callable[..., Cargohold]) -> None:
    """Issue 21.4: from a trusted proxy inside the anonymous network, `unknown` or `ip:port` hops were
    served as the proxy itself."""
    im = hub.images["oci"]
    srv = auth_server(cargohold, {"anonymous": ["127.0.0.0/8", "10.0.0.0/8"]}, ALICE, **BEHIND_PROXY)
    url = f"{srv.url}/v2/{im.repo}/tags/list"
    assert http_request("GET", url).status == 200  # the proxy itself is inside
    for hop in ("10.9.9.9:4321", "[::ffff:10.9.9.9]:443"):  # a port is no reason to refuse
        assert http_request("GET", url, headers={"X-Forwarded-For": hop}).status == 200, hop
    for hop in ("192.0.2.9:4321", "[2001:db8::1]:443", "unknown", "for=10.9.9.9", "10.9.9.9, garbage"):
        assert http_request("GET", url, headers={"X-Forwarded-For": hop}).status == 401, hop
    _no_traceback(srv)


def test_status_page_and_ready_show_only_what_the_viewer_may_pull(
    hub: Hub, cargohold: Callable[..., Cargohold]
) -> None:
    """Issue 21.5: a user with no rights, and anonymous clients, saw every cached repository and the
    upstream URL on `/`."""
    im = hub.images["oci"]
    rules = [{"users": ["alice"], "repositories": [im.repo]}, {"repositories": ["nothing/*"]}]
    srv = auth_server(cargohold, {"rules": rules, "anonymous": True}, ALICE, BOB)
    accept = {"Accept": im.media_type or "*/*"}
    assert (
        http_request("GET", f"{srv.url}/v2/{im.repo}/manifests/{im.tag}", headers={**accept, **basic(*ALICE)}).status
        == 200
    )
    name = f"{im.repo}:{im.tag}"
    assert name in http_request("GET", f"{srv.url}/", headers=basic(*ALICE)).body.decode()
    for headers in (basic(*BOB), {}):
        page = http_request("GET", f"{srv.url}/", headers=headers).body.decode()
        assert name not in page and hub.url not in page and 'id="hit-ratio"' in page
    assert http_request("GET", f"{srv.url}/ready").json() == {"status": "ready"}
    _no_traceback(srv)


def test_user_names_with_a_newline_are_refused_and_a_bad_line_is_not_fatal(cargohold: Callable[..., Cargohold]) -> None:
    """Issue 21.13: `user add $'mallory\\n'` was accepted, and `serve` then refused to start."""
    srv = auth_server(cargohold, {}, ALICE)
    with pytest.raises(subprocess.CalledProcessError) as refused:
        user_command(srv, "add", "mallory\n", password="m-secret")
    assert "invalid user name" in refused.value.stderr
    htpasswd_file = srv.workdir / "htpasswd"
    htpasswd_file.write_text(htpasswd_file.read_text() + "mallory\n:$2y$10$" + "a" * 53 + "\n")  # as the old one wrote
    srv.restart()
    assert http_request("GET", f"{srv.url}/v2/", headers=basic(*ALICE)).status == 200
    assert "htpasswd entry left out" in srv.log_text()
    _no_traceback(srv)


def test_token_form_bodies_are_bounded_and_checked(cargohold: Callable[..., Cargohold]) -> None:
    """Issues 21.9 and 21.12: corrupt gzip was a 500 with a traceback; a dribbled body was never cut off."""
    srv = auth_server(cargohold, {}, ALICE)
    res = http_request(
        "POST",
        f"{srv.url}/token",
        body=b"\x1f\x8b\x08\x00garbage",
        headers={"Content-Type": "application/x-www-form-urlencoded", "Content-Encoding": "gzip"},
    )
    assert res.status == 400 and res.json()["errors"][0]["code"] == "UNSUPPORTED"  # type: ignore[index]
    with socket.create_connection((srv.host, srv.port), timeout=60) as conn:
        conn.sendall(
            b"POST /token HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\n"
            b"Content-Length: 100000\r\n\r\ngrant_type="
        )
        for _ in range(5):  # a byte a second for a while: a body that trickles is still cut off as a whole
            conn.sendall(b"p")
            time.sleep(1)
        # Then nothing more (bytes sent after the answer would only turn the server's close into a reset,
        # which can discard the answer before it is read): read until the server answers and closes.
        answer = b""
        conn.settimeout(60)
        while chunk := conn.recv(4096):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 408 ")
    _no_traceback(srv)


def test_tokens_for_host_routed_upstreams_behind_external_url(hub: Hub, cargohold: Callable[..., Cargohold]) -> None:
    """Issue 21.14: behind external_url, /token resolved names under its own Host, so a rule on a
    Host-routed upstream gave no access, and the pull answered 401 insufficient_scope."""
    im = hub.images["oci"]
    routed = {"name": "ghcr.io", "url": hub.url, "hosts": ["ghcr.mirror.test"]}
    rules = [{"users": ["alice"], "upstream": "ghcr.io", "repositories": [im.repo]}]
    srv = cargohold(start=False, external_url="https://mirror.example.test")
    srv.config["upstreams"].append(routed)
    srv.config["auth"] = {"htpasswd": str(srv.workdir / "htpasswd"), "rules": rules}
    srv.write_config()
    user_command(srv, "add", *ALICE[:1], password=ALICE[1])
    srv.start()
    at_ghcr = {"Host": "ghcr.mirror.test", "Accept": im.media_type or "*/*"}
    url = f"{srv.url}/v2/{im.repo}/manifests/{im.tag}"
    challenge = http_request("GET", url, headers=at_ghcr).header("WWW-Authenticate") or ""
    realm = urllib.parse.urlsplit(challenge.split('realm="')[1].split('"')[0])
    assert realm.netloc == "mirror.example.test"
    query = realm.query + "&service=cargohold&scope=" + urllib.parse.quote(f"repository:{im.repo}:pull")
    token = http_request("GET", f"{srv.url}{realm.path}?{query}", headers=basic(*ALICE)).json()["token"]  # type: ignore[index]
    res = http_request("GET", url, headers={**at_ghcr, "Authorization": f"Bearer {token}"})
    assert res.status == 200, res.body[:300]
    _no_traceback(srv)


def test_tokens_of_a_removed_user_stay_dead_when_the_name_comes_back(
    hub: Hub, cargohold: Callable[..., Cargohold]
) -> None:
    """Issue 21, minor: access tokens are bound to the password hash, as refresh tokens are."""
    im = hub.images["oci"]
    srv = auth_server(cargohold, {}, BOB)
    scope = urllib.parse.quote(f"repository:{im.repo}:pull")
    token = http_request("GET", f"{srv.url}/token?scope={scope}", headers=basic(*BOB)).json()["token"]  # type: ignore[index]
    url, bearer = f"{srv.url}/v2/{im.repo}/tags/list", {"Authorization": f"Bearer {token}"}
    assert http_request("GET", url, headers=bearer).status == 200
    user_command(srv, "remove", "bob")
    wait_until(lambda: http_request("GET", url, headers=bearer).status == 401, timeout=10, what="bob's token refused")
    user_command(srv, "add", "bob", password="another-secret")
    wait_until(
        lambda: http_request("GET", f"{srv.url}/v2/", headers=basic("bob", "another-secret")).status == 200,
        timeout=10,
        what="bob back",
    )
    assert http_request("GET", url, headers=bearer).status == 401
    _no_traceback(srv)
