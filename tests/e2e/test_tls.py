"""HTTPS: certificates from files (reloaded on change) and from a real ACME CA (pebble, HTTP-01
validated against cargohold's plain-HTTP listener), pulled with skopeo and dockerd that verify them."""

from __future__ import annotations

import asyncio
import http.client
import logging
import os
import re
import shutil
import socket
import ssl
import stat
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from aiohttp import web
from cryptography import x509

from cargohold.config import AcmeConfig, Settings
from cargohold.tls.acme import AcmeManager
from cargohold.tls.context import CertReloader
from cargohold.tls.plain import plain_http_app
from rig.certs import TestCA, peer_certificate
from rig.clients import Dockerd, ensure_hosts_entries, skopeo_copy
from rig.images import Image
from rig.pebble import Pebble
from rig.server import Cargohold
from rig.util import free_port, http_request, wait_until

DOMAIN = "registry.cargohold.test"


@pytest.fixture(scope="module")
def domain() -> str:
    """The mirror's public name, mapped to 127.0.0.1 (clients verify the certificate against it)."""
    if os.geteuid() != 0:
        pytest.skip("editing /etc/hosts needs root")
    ensure_hosts_entries([DOMAIN])
    return DOMAIN


def _context(cafile: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(cafile))


def served_cert(port: int, cafile: Path, name: str = DOMAIN) -> x509.Certificate:
    return peer_certificate(port, cafile, name)


def https_get(conn: http.client.HTTPSConnection, path: str = "/v2/") -> tuple[int, int]:
    """GET on conn: (status, serial of the certificate this connection was made with)."""
    conn.request("GET", path)
    resp = conn.getresponse()
    resp.read()
    assert conn.sock is not None
    der = conn.sock.getpeercert(binary_form=True)
    assert der is not None
    return resp.status, x509.load_der_x509_certificate(der).serial_number


@dataclass
class Pollers:
    """Threads sending requests, each on a new connection (a new handshake), until stopped."""

    port: int
    cafile: Path
    host: str = DOMAIN
    serials: list[int] = field(default_factory=list)
    statuses: list[int] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)

    def _poll(self) -> None:
        while not self._stop.is_set():
            conn = http.client.HTTPSConnection(self.host, self.port, timeout=10, context=_context(self.cafile))
            try:
                status, serial = https_get(conn)
                self.statuses.append(status)
                self.serials.append(serial)
            except Exception as exc:  # noqa: BLE001 - every failure is what the test counts
                self.failures.append(repr(exc))
            finally:
                conn.close()

    def __enter__(self) -> Pollers:
        self._threads = [threading.Thread(target=self._poll, daemon=True) for _ in range(2)]
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=30)


def start_tls(srv: Cargohold, cafile: Path, name: str = DOMAIN, timeout: float = 60) -> x509.Certificate:
    """Start srv (its /health check speaks plain HTTP) and wait until HTTPS verifies against cafile."""
    srv.start(wait=False)
    wait_until(lambda: served_cert(srv.port, cafile, name) is not None, timeout=timeout, interval=0.2, what="HTTPS")
    return served_cert(srv.port, cafile, name)


def acme_server(
    cargohold: Callable[..., Cargohold],
    pebble: Callable[..., Pebble],
    tmp_path: Path,
    validity: int | None = None,
    **settings: object,
) -> tuple[Cargohold, Path]:
    """cargohold with tls.acme against a fresh pebble; returns once it serves pebble's certificate
    (the placeholder before it does not verify), with pebble's root in a file."""
    http_port = free_port()
    ca = pebble(http_port, validity=validity)
    acme = {"domains": [DOMAIN], "email": "ops@example.com", "directory": ca.directory, "ca_bundle": str(ca.ca_pem)}
    srv = cargohold(start=False, http_listen=f"127.0.0.1:{http_port}", tls={"acme": acme}, **settings)
    root = tmp_path / "pebble-root.pem"
    root.write_bytes(ca.root_pem())
    start_tls(srv, root)
    return srv, root


def test_acme_certificate_serves_skopeo_and_docker_over_https(
    domain: str,
    cargohold: Callable[..., Cargohold],
    pebble: Callable[..., Pebble],
    dockerd: Dockerd,
    hub_images: dict[str, Image],
    tmp_path: Path,
) -> None:
    srv, root = acme_server(cargohold, pebble, tmp_path)
    acme_dir = srv.data_dir / "acme"
    for secret in ("account.key", "key.pem"):
        assert stat.S_IMODE((acme_dir / secret).stat().st_mode) == 0o600, secret
    stored = x509.load_pem_x509_certificate((acme_dir / "cert.pem").read_bytes())
    served = served_cert(srv.port, root)
    assert served.serial_number == stored.serial_number
    san = served.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == [DOMAIN]
    assert "GET /.well-known/acme-challenge/" in srv.log_text()  # pebble's validation reached cargohold
    assert ", event loop uvloop," in srv.log_text()  # `loop: auto` serves HTTPS on uvloop (eventloop.py)

    image = hub_images["multi"]
    ref = f"{DOMAIN}:{srv.port}/{image.ref}"
    cert_dir = tmp_path / "skopeo-certs"
    cert_dir.mkdir()
    shutil.copy(root, cert_dir / "ca.crt")
    copied = skopeo_copy(ref, tmp_path / "copy", tls_verify=True, extra_args=["--src-cert-dir", str(cert_dir)])
    assert copied.digest == image.digest

    docker_certs = Path("/etc/docker/certs.d") / f"{DOMAIN}:{srv.port}"
    docker_certs.mkdir(parents=True, exist_ok=True)
    shutil.copy(root, docker_certs / "ca.crt")
    try:
        assert dockerd.pull(ref) == image.digest
    finally:
        shutil.rmtree(docker_certs)

    # A restart serves the stored certificate from the first handshake and orders nothing.
    srv.stop()
    srv.start(wait=False)
    wait_until(lambda: served_cert(srv.port, root).serial_number == stored.serial_number, timeout=30, what="restart")
    assert srv.log_text().count("ACME certificate for registry.cargohold.test issued") == 1

    plain = srv.config["http_listen"]
    moved = http_request("GET", f"http://{plain}/v2/{image.ref}/tags/list?n=1", headers={"Host": f"{DOMAIN}:80"})
    assert moved.status == 308
    assert moved.header("Location") == f"https://{DOMAIN}:{srv.port}/v2/{image.ref}/tags/list?n=1"
    assert http_request("GET", f"http://{plain}/health").status == 200
    unknown = http_request("GET", f"http://{plain}/.well-known/acme-challenge/nope")
    assert unknown.status == 404 and unknown.json()["errors"][0]["code"] == "UNSUPPORTED"  # type: ignore[index]


def test_acme_renewal_replaces_the_certificate_without_dropping_requests(
    domain: str, cargohold: Callable[..., Cargohold], pebble: Callable[..., Pebble], tmp_path: Path
) -> None:
    # 15 s certificates: cargohold renews at two thirds, about 10 s after issue. The pollers send
    # requests back to back from one address for that long, over the shipped requests budget (20/s):
    # this test is about certificates, so that budget is off.
    unlimited = {"requests_per_second": 0, "burst": 0}
    srv, root = acme_server(cargohold, pebble, tmp_path, validity=15, rate_limit=unlimited)
    first = served_cert(srv.port, root).serial_number
    kept = http.client.HTTPSConnection(DOMAIN, srv.port, timeout=10, context=_context(root))
    assert https_get(kept) == (200, first)
    with Pollers(srv.port, root) as pollers:
        wait_until(
            lambda: served_cert(srv.port, root).serial_number != first,
            timeout=60,
            interval=0.2,
            what="the renewed certificate",
        )
        renewed = served_cert(srv.port, root).serial_number
        wait_until(lambda: pollers.serials.count(renewed) >= 20, timeout=20, what="pollers on the renewed certificate")
    assert pollers.failures == []
    assert set(pollers.statuses) == {200}
    assert first in pollers.serials and renewed in pollers.serials
    assert https_get(kept) == (200, first)  # an open connection keeps its certificate
    kept.close()
    stored = x509.load_pem_x509_certificate((srv.data_dir / "acme" / "cert.pem").read_bytes())
    assert stored.serial_number != first


def test_tls_from_files_reloads_a_changed_certificate(cargohold: Callable[..., Cargohold], tmp_path: Path) -> None:
    ca = TestCA.create()
    cafile = ca.write_root(tmp_path / "root.pem")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    first = ca.issue(cert, key, ["localhost"], ["127.0.0.1"])
    srv = cargohold(start=False, tls={"cert": str(cert), "key": str(key)})
    assert start_tls(srv, cafile, "127.0.0.1").serial_number == first.serial_number
    kept = http.client.HTTPSConnection("127.0.0.1", srv.port, timeout=10, context=_context(cafile))
    assert https_get(kept) == (200, first.serial_number)

    with socket.create_connection(("127.0.0.1", srv.port)) as raw:
        old_client = _context(cafile)
        old_client.maximum_version = ssl.TLSVersion.TLSv1_2
        with old_client.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            assert tls.version() == "TLSv1.2"
            assert any(aead in tls.cipher()[0] for aead in ("GCM", "CHACHA20"))

    cert.write_text("-----BEGIN CERTIFICATE-----\ntruncated\n")  # a renewal caught half-way
    wait_until(lambda: "did not load, keeping the old one" in srv.log_text(), timeout=30, what="the failed reload")
    assert served_cert(srv.port, cafile, "127.0.0.1").serial_number == first.serial_number

    second = ca.issue(cert, key, ["localhost"], ["127.0.0.1"])
    wait_until(
        lambda: served_cert(srv.port, cafile, "127.0.0.1").serial_number == second.serial_number,
        timeout=30,
        what="the new certificate",
    )
    assert https_get(kept) == (200, first.serial_number)
    kept.close()
    assert srv.stop() == 0  # SIGTERM: a graceful stop
    assert "stopping" in srv.log_text()


def test_unloadable_certificate_files_stop_start_up_with_one_line(
    cargohold: Callable[..., Cargohold], tmp_path: Path
) -> None:
    srv = cargohold(start=False, tls={"cert": str(tmp_path / "missing.pem"), "key": str(tmp_path / "missing.key")})
    srv.start(wait=False)
    wait_until(lambda: not srv.running, timeout=20, what="cargohold to exit")
    assert srv.stop() == 2
    assert "cannot start: tls.cert/tls.key: cannot load" in srv.log_text()
    assert "Traceback" not in srv.log_text()


async def until(predicate: Callable[[], bool], task: asyncio.Task[None], what: str, timeout: float = 60) -> None:
    """Poll on the event loop (bounded), failing early if the task under test ended."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        assert not task.done(), f"the ACME task ended while waiting for {what}"
        assert loop.time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


async def test_acme_retries_with_backoff_while_the_ca_is_down(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Nothing waits for the CA: the placeholder is served and orders are retried, doubling the wait."""
    caplog.set_level(logging.INFO, "cargohold")
    http_port = free_port()
    ca = Pebble(tmp_path / "pebble", http_port=http_port)  # not started yet: the CA is down
    config = AcmeConfig(domains=[DOMAIN], directory=ca.directory, ca_bundle=ca.ca_pem)
    manager = AcmeManager(config, tmp_path / "acme", retry_first=0.2)
    reloader = CertReloader(*manager.placeholder())
    runner = web.AppRunner(plain_http_app(Settings(), manager.challenges, 443))
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", http_port).start()
    task = asyncio.create_task(manager.run(reloader))
    try:

        def retries() -> list[str]:
            return [r.getMessage() for r in caplog.records if "failed, retrying in" in r.getMessage()]

        await until(lambda: len(retries()) >= 3, task, "three failed orders")
        assert [re.search(r"retrying in (\S+):", m).group(1) for m in retries()[:3]] == ["0.2s", "0.4s", "0.8s"]  # type: ignore[union-attr]
        assert "Connection refused" in retries()[0]
        await asyncio.to_thread(ca.start)
        await until(lambda: reloader.files == (manager.cert_path, manager.key_path), task, "the issued certificate")
        issued = x509.load_pem_x509_certificate(manager.cert_path.read_bytes())
        san = issued.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert san.get_values_for_type(x509.DNSName) == [DOMAIN]
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await runner.cleanup()
        ca.stop()
