"""Shared fixtures: real servers on loopback (see tests/rig and docs "Test rig").

Fixtures
  hub_session (session)  the Docker Hub look-alike, started once, standard images pushed once
  hub         (function) the same hub, reset (no faults, no counts, default flags) around each test
  hub_images  (session)  hub.images: key -> pushed Image (see STANDARD IMAGES below)
  hub2        (function) a second, independent hub (own registry, token service, users, images;
                         see HUB2 IMAGES), reset around each test like `hub`
  hosts_entries (session) Docker Hub names -> 127.0.0.1 in /etc/hosts (root)
  dockerd     (function) a session dockerd with no images and no mirrors at test start (root)
  containerd  (session)  a private containerd; pull into a fresh namespace per pull (root)
  podman      (function) rig.clients.Podman: rootful, vfs storage of its own; .pull(ref) -> digest (root)
  hosts_dir   (function) an empty dir for containerd hosts.toml files
  cargohold   (function) factory: cargohold(overrides=None, *, tag_ttl=..., upstream=..., env=...,
                         start=True, **top_level) -> rig.server.Cargohold, stopped at teardown
  pebble      (function) factory: pebble(http_port, validity=None) -> rig.pebble.Pebble, an ACME CA
                         validating HTTP-01 against 127.0.0.1:http_port, stopped at teardown

STANDARD IMAGES (hub.images[key].ref):
  multi         library/alpine-test:latest     Docker schema2, 3 gzip layers
  oci           acme/tool:1.0                  OCI manifest, 2 gzip layers
  big           acme/big:latest                OCI, a small gzip layer + a 128 MiB uncompressed tar layer
  index         acme/multiarch:latest          OCI index, linux/<this arch> + the other of amd64/arm64
  manifestlist  library/multiarch-test:latest  Docker manifest list, same two platforms
  layers21      acme/layers21:latest           Docker schema2, 21 small layers
  private       acme/private:latest            anonymous pulls denied; user pusher/pushpass may
Tests that retag or delete must use their own repos (e.g. push a fresh simple_image first).

HUB2 IMAGES (hub2.images[key].ref; tokens for service "hub2.test"; user h2user/h2pass):
  app           team/app:1.0                   Docker schema2, 2 layers
  secret        team/secret:latest             anonymous pulls denied; h2user may
  tool          mirror/tool:1.0                the same image, byte for byte, as hub's acme/tool:1.0

Markers: docker, containerd (tests using those fixtures get them automatically; skipped only
when not root), slow.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

_TESTS = str(Path(__file__).resolve().parent)
if _TESTS not in sys.path:  # `rig` is imported as a top-level package (also by bench scripts)
    sys.path.insert(0, _TESTS)

from rig.clients import Containerd, Dockerd, Podman, ensure_hosts_entries  # noqa: E402
from rig.hub import Hub  # noqa: E402
from rig.images import Image, simple_image  # noqa: E402
from rig.pebble import Pebble  # noqa: E402
from rig.server import Cargohold  # noqa: E402
from rig.util import tail  # noqa: E402

IS_ROOT = os.geteuid() == 0


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "docker: needs the rig's dockerd (root)")
    config.addinivalue_line("markers", "containerd: needs the rig's containerd (root)")
    config.addinivalue_line("markers", "slow: takes more than a few seconds")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark tests by the daemons they use; skip those (with the reason) only when not root."""
    for item in items:
        names = set(getattr(item, "fixturenames", ()))
        if names & {"dockerd", "dockerd_session"}:
            item.add_marker(pytest.mark.docker)
        if "containerd" in names:
            item.add_marker(pytest.mark.containerd)
        if not IS_ROOT and (item.get_closest_marker("docker") or item.get_closest_marker("containerd")):
            item.add_marker(pytest.mark.skip(reason="dockerd/containerd tests must run as root"))


_REPORTERS = pytest.StashKey[list[tuple[str, Callable[[], str]]]]()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """When a test fails, add sections with what the servers it used saw (hub requests, logs)."""
    rep = yield
    if rep.failed and rep.when in ("setup", "call"):
        for title, fn in item.stash.get(_REPORTERS, []):
            try:
                rep.sections.append((title, fn()))
            except Exception as exc:  # noqa: BLE001 - a report must not break reporting
                rep.sections.append((title, f"(could not collect: {exc})"))
    return rep


def _on_failure(request: pytest.FixtureRequest, title: str, fn: Callable[[], str]) -> None:
    request.node.stash.setdefault(_REPORTERS, []).append((title, fn))


def _hub_report(h: Hub) -> str:
    lines = [f"{len(h.requests)} requests (last 60):"]
    for r in h.requests[-60:]:
        q = "?" + r.query_string if r.query_string else ""
        lines.append(
            f"{r.service:8} {r.method:5} {r.path}{q} -> {r.status} auth={r.has_auth} "
            f"bytes={r.bytes_sent}{' ' + r.fault if r.fault else ''}{' ABORTED' if r.aborted else ''}"
        )
    lines.append(f"--- registry log tail ({h.log_path}) ---")
    lines.append(tail(h.log_path, 3000))
    return "\n".join(lines)


# -- hub --------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def rig_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Session cache for built artefacts (the big layer file)."""
    return tmp_path_factory.mktemp("rig-cache")


@pytest.fixture(scope="session")
def hub_session(tmp_path_factory: pytest.TempPathFactory, rig_cache_dir: Path) -> Iterator[Hub]:
    """The hub, started and seeded once per session."""
    with Hub(tmp_path_factory.mktemp("hub")) as h:
        h.seed(rig_cache_dir)
        h.reset_counts()
        yield h


@pytest.fixture
def hub(hub_session: Hub, request: pytest.FixtureRequest) -> Iterator[Hub]:
    """The session hub with a clean slate: no faults, zero counts, default flags."""
    hub_session.reset()
    _on_failure(request, "hub", lambda: _hub_report(hub_session))
    yield hub_session
    hub_session.reset()


@pytest.fixture(scope="session")
def hub_images(hub_session: Hub) -> dict[str, Image]:
    return hub_session.images


HUB2_USER = ("h2user", "h2pass")


@pytest.fixture(scope="session")
def hub2_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hub]:
    """A second Docker Hub look-alike, started and seeded once per session."""
    h = Hub(
        tmp_path_factory.mktemp("hub2"),
        users=dict([HUB2_USER]),
        private_repos=("team/secret",),
        service="hub2.test",
        issuer="cargohold-rig-auth-2",
    )
    with h:
        h.images["app"] = h.push_image(simple_image("hub2-app"), "team/app", "1.0")
        h.images["secret"] = h.push_image(simple_image("hub2-secret"), "team/secret", "latest")
        h.images["tool"] = h.push_image(simple_image("oci", layers=2, oci=True), "mirror/tool", "1.0")
        h.reset_counts()
        yield h


@pytest.fixture
def hub2(hub2_session: Hub, request: pytest.FixtureRequest) -> Iterator[Hub]:
    """The second hub with a clean slate, like `hub`."""
    hub2_session.reset()
    _on_failure(request, "hub2", lambda: _hub_report(hub2_session))
    yield hub2_session
    hub2_session.reset()


# -- clients ----------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def hosts_entries() -> list[str]:
    """Map Docker Hub's names to 127.0.0.1 so a client falling back past a mirror stays local."""
    if not IS_ROOT:
        pytest.skip("editing /etc/hosts needs root")
    return ensure_hosts_entries()


@pytest.fixture(scope="session")
def dockerd_session(tmp_path_factory: pytest.TempPathFactory, hosts_entries: list[str]) -> Iterator[Dockerd]:
    if not IS_ROOT:
        pytest.skip("dockerd needs root")
    with Dockerd(tmp_path_factory.mktemp("dockerd")) as d:
        yield d


@pytest.fixture
def dockerd(dockerd_session: Dockerd, request: pytest.FixtureRequest) -> Dockerd:
    """The session dockerd with no images and no mirrors (use .reconfigure(mirrors=[...]))."""
    d = dockerd_session
    d.remove_all_images()
    if d.mirrors or d.insecure_registries:
        d.reconfigure(mirrors=[], insecure_registries=[])
    _on_failure(request, "dockerd log", lambda: tail(d.log_path, 3000))
    return d


@pytest.fixture(scope="session")
def containerd(tmp_path_factory: pytest.TempPathFactory, hosts_entries: list[str]) -> Iterator[Containerd]:
    if not IS_ROOT:
        pytest.skip("containerd needs root")
    with Containerd(tmp_path_factory.mktemp("containerd")) as c:
        yield c


@pytest.fixture
def podman(tmp_path: Path) -> Iterator[Podman]:
    """Rootful podman with its own storage in tmp_path (vfs) and a short-lived run root."""
    if not IS_ROOT:
        pytest.skip("rootful podman needs root")
    with Podman(tmp_path / "podman") as p:
        yield p


@pytest.fixture
def hosts_dir(tmp_path: Path) -> Path:
    """A containerd --hosts-dir for this test (write_hosts_toml(hosts_dir, mirror_url))."""
    d = tmp_path / "hosts.d"
    d.mkdir()
    return d


# -- cargohold --------------------------------------------------------------------------------


@pytest.fixture
def cargohold(
    hub: Hub, tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[Callable[..., Cargohold]]:
    """Factory for cargohold servers in front of `hub`.

    cargohold(overrides=None, *, tag_ttl=None, upstream=None, env=None, start=True, timeout=20,
              **top_level) -> Cargohold (.url, .port, .netloc, .data_dir, .config, .log_text(),
              .stop(), .kill(), .restart())
    overrides/top_level are deep-merged into the config; tag_ttl/upstream into upstreams[0].
    """
    servers: list[Cargohold] = []

    def factory(
        overrides: dict[str, Any] | None = None,
        *,
        tag_ttl: str | int | None = None,
        upstream: dict[str, Any] | None = None,
        env: dict[str, str] | None = None,
        start: bool = True,
        timeout: float = 20,
        **top_level: Any,
    ) -> Cargohold:
        up = dict(upstream or {})
        if tag_ttl is not None:
            up["tag_ttl"] = tag_ttl
        over = {**(overrides or {}), **top_level}
        srv = Cargohold(tmp_path_factory.mktemp("cargohold"), hub.url, overrides=over, upstream=up, env=env)
        servers.append(srv)
        _on_failure(request, f"cargohold log {srv.netloc}", lambda: tail(srv.log_path, 6000))
        if start:
            srv.start(timeout=timeout)
        return srv

    yield factory
    for srv in servers:
        srv.stop()
    crashed = {srv.log_path: srv.crashes() for srv in servers if srv.crashes()}
    if crashed:
        said = "; ".join(f"{len(lines)} lines in {path}, first: {lines[0]}" for path, lines in crashed.items())
        pytest.fail(f"cargohold logged a traceback or an unhandled exception: {said}", pytrace=False)


# -- ACME -------------------------------------------------------------------------------------


@pytest.fixture
def pebble(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[Callable[..., Pebble]]:
    """Factory: pebble(http_port, validity=None) -> a started Pebble (a new root CA each)."""
    started: list[Pebble] = []

    def factory(http_port: int, validity: int | None = None) -> Pebble:
        p = Pebble(tmp_path_factory.mktemp("pebble"), http_port=http_port, validity=validity)
        started.append(p)
        _on_failure(request, "pebble log", p.log_text)
        return p.start()

    yield factory
    for p in started:
        p.stop()
