"""The image behind a real Traefik 3 (docker-compose.traefik.yml): Traefik ends TLS with a certificate from
pebble, routes by the compose labels, and tells cargohold who the client is with X-Forwarded-For.

Clients of the forwarding checks connect from other loopback addresses (127.0.0.2, 127.0.0.3) than Traefik
and cargohold (127.0.0.1), so what cargohold names as the client can only have come from Traefik."""

from __future__ import annotations

import base64
import http.client
import re
import socket
import ssl
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from deployrig import (
    DOMAIN,
    Container,
    Traefik,
    compose_service,
    docker_input,
    env_file,
    first_user,
    registry_ca,
    start_container,
    strings,
    wait_healthy,
)

from cargohold.auth.logins import ADDRESS_FACTOR
from rig.certs import peer_certificate
from rig.clients import Dockerd
from rig.hub import Hub
from rig.images import Image, big_image
from rig.pebble import Pebble
from rig.util import free_port, wait_until

BIG = 256 << 20


@dataclass
class BehindTraefik:
    dockerd: Dockerd
    traefik: Traefik
    container: Container
    root: Path

    @property
    def registry(self) -> str:
        return f"{DOMAIN}:{self.traefik.https_port}"

    def get(self, source: str, headers: dict[str, str]) -> tuple[int, str]:
        """GET /v2/ through Traefik from `source` (a loopback address): (status, body)."""
        ctx = ssl.create_default_context(cafile=str(self.root))
        raw = socket.create_connection(("127.0.0.1", self.traefik.https_port), timeout=30, source_address=(source, 0))
        with ctx.wrap_socket(raw, server_hostname=DOMAIN) as tls:
            conn = http.client.HTTPConnection(DOMAIN, self.traefik.https_port, timeout=30)
            conn.sock = tls
            conn.request("GET", "/v2/", headers=headers)
            resp = conn.getresponse()
            return resp.status, resp.read().decode(errors="replace")


@pytest.fixture(scope="module")
def behind(
    deploy_dockerd: Dockerd, image: str, hub_session: Hub, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[BehindTraefik]:
    workdir = tmp_path_factory.mktemp("traefik")
    port = free_port()
    # The Traefik network's subnet is loopback here (TRAEFIK_TRUSTED_NETWORKS, as docs/deploy.md says to set it).
    service = compose_service("docker-compose.traefik.yml", env_file(workdir, TRAEFIK_TRUSTED_NETWORKS="127.0.0.1/32"))
    labels = strings(service["labels"])
    env = strings(service["environment"])
    # The labels' service port is the one cargohold listens on; here a free loopback port stands for it.
    assert env["CARGOHOLD_LISTEN"].endswith(":" + labels["traefik.http.services.cargohold.loadbalancer.server.port"])
    traefik = Traefik(workdir / "traefik", labels, backend=f"127.0.0.1:{port}")
    env |= {
        "CARGOHOLD_LISTEN": f"127.0.0.1:{port}",
        "CARGOHOLD_EXTERNAL_URL": f"https://{DOMAIN}:{traefik.https_port}",  # Traefik's port stands for 443
        "CARGOHOLD_UPSTREAMS__0__URL": hub_session.url,
    }
    volume = f"cargohold-test-{uuid.uuid4().hex[:8]}"
    deploy_dockerd.docker("volume", "create", volume)
    with Pebble(workdir / "pebble", http_port=traefik.http_port) as pebble:  # validates on Traefik's "web"
        traefik.acme_directory, traefik.acme_ca = pebble.directory, pebble.ca_pem
        root = workdir / "root.pem"
        root.write_bytes(pebble.root_pem())
        first_user(deploy_dockerd, image, volume)
        container = start_container(deploy_dockerd, image, f"cargohold-{uuid.uuid4().hex[:8]}", env, {volume: "/data"})
        try:
            with traefik, registry_ca(f"{DOMAIN}:{traefik.https_port}", root.read_bytes()):
                wait_until(
                    lambda: peer_certificate(traefik.https_port, root, DOMAIN) is not None,
                    timeout=90,
                    interval=0.5,
                    what="Traefik's certificate from pebble",
                )
                yield BehindTraefik(deploy_dockerd, traefik, container, root)
        finally:
            print(container.logs()[-8000:])
            container.remove()
            deploy_dockerd.docker("volume", "rm", "-f", volume, check=False)


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def test_docker_login_and_pull_through_traefik(behind: BehindTraefik, hub_images: dict[str, Image]) -> None:
    wait_healthy(behind.container)
    status, _ = behind.get("127.0.0.1", {})
    assert status == 401
    docker_input(behind.dockerd, "login", behind.registry, "-u", "alice", "--password-stdin", stdin="alice-password\n")
    image = hub_images["multi"]
    ref = f"{behind.registry}/{image.repo}:{image.tag}"
    assert behind.dockerd.pull(ref) == image.digest
    behind.dockerd.docker("rmi", ref)


def test_a_256_mib_layer_through_traefik(
    behind: BehindTraefik, hub_session: Hub, rig_cache_dir: Path, tmp_path: Path
) -> None:
    image = hub_session.push_image(big_image(rig_cache_dir, BIG, seed="deploy-big"), "acme/big256", "latest")
    docker_input(behind.dockerd, "login", behind.registry, "-u", "alice", "--password-stdin", stdin="alice-password\n")
    ref = f"{behind.registry}/acme/big256:latest"
    try:
        assert behind.dockerd.pull(ref, timeout=900) == image.digest
    finally:
        behind.dockerd.docker("rmi", ref, check=False)
    assert "Traceback" not in behind.container.logs()


def test_client_address_comes_from_traefik_and_only_from_it(behind: BehindTraefik) -> None:
    # Wrong passwords from 127.0.0.2 (under new names, so only the address adds up) until the
    # failed-login limit of its address (ADDRESS_FACTOR times the per-login 10 per window) refuses it.
    limit = 10 * ADDRESS_FACTOR
    statuses = [behind.get("127.0.0.2", basic(f"guess{i}", "wrong"))[0] for i in range(limit + 1)]
    assert statuses == [401] * limit + [429]
    logs = behind.container.logs()
    assert "failed login for user 'guess0' from 127.0.0.2" in logs
    assert re.search(r"^.*127\.0\.0\.2 - GET /v2/ 429 ", logs, re.MULTILINE)  # the access log names the client
    assert any(line.startswith("127.0.0.2 ") for line in behind.traefik.access_lines())
    # A client naming the blocked address itself is not believed: Traefik replaces its X-Forwarded-For.
    status, body = behind.get("127.0.0.3", {**basic("alice", "alice-password"), "X-Forwarded-For": "127.0.0.2"})
    assert status == 200, body
    assert re.search(r"^.*127\.0\.0\.3 alice GET /v2/ 200 ", behind.container.logs(), re.MULTILINE)
