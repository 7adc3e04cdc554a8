"""deploy/Dockerfile built and run as docs/deploy.md says, standalone (docker-compose.yml): the first user,
the certificate from an ACME CA (pebble for Let's Encrypt), pulls with dockerd and skopeo, HEALTHCHECK,
the non-root user, a quick clean stop, and an upgrade that keeps users, cache and certificate.

The tests of this module run in order on one volume, like one deployment's life."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from deployrig import (
    DOMAIN,
    Container,
    build_image,
    compose_service,
    data_dir_of,
    docker_input,
    docker_run_args,
    env_file,
    first_user,
    output_lines,
    registry_ca,
    start_container,
    strings,
    wait_healthy,
)

from rig.certs import peer_certificate
from rig.clients import Dockerd, skopeo_copy
from rig.hub import Hub
from rig.images import Image
from rig.pebble import Pebble
from rig.util import free_port, wait_until

CA_IN_CONTAINER = "/etc/cargohold/acme-ca.pem"


@dataclass
class Standalone:
    dockerd: Dockerd
    image: str
    volume: str
    env: dict[str, str]
    pebble: Pebble
    root: Path  # what pebble's certificates chain to
    https_port: int
    workdir: Path

    @property
    def registry(self) -> str:
        return f"{DOMAIN}:{self.https_port}"

    def volumes(self, data: str | None = None) -> dict[str, str]:
        return {data or self.volume: "/data", str(self.pebble.ca_pem): f"{CA_IN_CONTAINER}:ro"}

    def start(self, image: str | None = None) -> Container:
        name = f"cargohold-{uuid.uuid4().hex[:8]}"
        return start_container(self.dockerd, image or self.image, name, self.env, self.volumes())

    def certificate_serial(self) -> int:
        """The serial of the certificate the container serves, once it is pebble's (not the placeholder)."""
        return served_serial(self.https_port, self.root)


def served_serial(port: int, root: Path) -> int:
    """Waits until 127.0.0.1:port serves a certificate for DOMAIN that chains to `root`."""
    seen: list[int] = []

    def served() -> bool:
        seen.append(peer_certificate(port, root, DOMAIN).serial_number)  # raises until it verifies
        return True

    wait_until(
        served,
        timeout=90,
        interval=0.5,
        what=f"a certificate from the ACME CA on port {port}",
    )
    return seen[-1]


@pytest.fixture(scope="module")
def standalone(
    deploy_dockerd: Dockerd, image: str, hub_session: Hub, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Standalone]:
    workdir = tmp_path_factory.mktemp("standalone")
    https_port, http_port = free_port(), free_port()
    with Pebble(workdir / "pebble", http_port=http_port) as pebble:  # Let's Encrypt, validating on "port 80"
        root = workdir / "root.pem"
        root.write_bytes(pebble.root_pem())
        env = strings(
            compose_service("docker-compose.yml", env_file(workdir, ACME_DIRECTORY=pebble.directory))["environment"]
        )
        env |= {
            # Loopback instead of ports 443 and 80; the public URL names the port clients use.
            "CARGOHOLD_LISTEN": f"127.0.0.1:{https_port}",
            "CARGOHOLD_HTTP_LISTEN": f"127.0.0.1:{http_port}",
            "CARGOHOLD_EXTERNAL_URL": f"https://{DOMAIN}:{https_port}",
            "CARGOHOLD_UPSTREAMS__0__URL": hub_session.url,  # the rig's Docker Hub
            "CARGOHOLD_TLS__ACME__CA_BUNDLE": CA_IN_CONTAINER,  # pebble's ACME endpoint is not publicly trusted
        }
        volume = f"cargohold-test-{uuid.uuid4().hex[:8]}"
        deploy_dockerd.docker("volume", "create", volume)
        try:
            with registry_ca(f"{DOMAIN}:{https_port}", root.read_bytes()):
                yield Standalone(deploy_dockerd, image, volume, env, pebble, root, https_port, workdir)
        finally:
            deploy_dockerd.docker("volume", "rm", "-f", volume, check=False)


@pytest.fixture
def running(standalone: Standalone) -> Iterator[Container]:
    c = standalone.start()
    yield c
    print(c.logs()[-6000:])
    c.remove()


def login_and_pull(s: Standalone, image: Image) -> str:
    """`docker login` to the registry, `docker pull` through it; the digest docker reports."""
    docker_input(s.dockerd, "login", s.registry, "-u", "alice", "--password-stdin", stdin="alice-password\n")
    ref = f"{s.registry}/{image.repo}:{image.tag}"
    try:
        return s.dockerd.pull(ref)
    finally:
        s.dockerd.docker("rmi", ref, check=False)


def test_first_start_without_users_says_so_in_one_line(standalone: Standalone) -> None:
    """The documented first-run mistake: started before `user add`."""
    args = docker_run_args(standalone.env, standalone.volumes())
    proc = standalone.dockerd.docker("run", "--rm", *args, standalone.image, check=False)
    assert proc.returncode == 2
    assert output_lines(proc) == [
        "cargohold: config error: auth.htpasswd: cannot read htpasswd file /data/htpasswd: No such file or directory"
    ]


def test_first_user(standalone: Standalone) -> None:
    first_user(standalone.dockerd, standalone.image, standalone.volume)
    listed = standalone.dockerd.docker(
        "run", "--rm", "-v", f"{standalone.volume}:/data", standalone.image, "user", "list"
    )
    assert "alice" in listed.stdout
    htpasswd = data_dir_of(standalone.dockerd, standalone.volume) / "htpasswd"
    assert htpasswd.stat().st_uid == 10001  # the volume belongs to the image's user


def test_serves_its_acme_certificate_and_turns_healthy(standalone: Standalone, running: Container) -> None:
    standalone.certificate_serial()
    wait_healthy(running)
    assert running.exec("id", "-u").strip() == "10001"
    assert running.inspect()["Config"]["User"] == "cargohold"


def test_pulls_with_docker_and_skopeo(standalone: Standalone, running: Container, hub_images: dict[str, Image]) -> None:
    standalone.certificate_serial()
    image = hub_images["multi"]
    assert login_and_pull(standalone, image) == image.digest
    oci = hub_images["oci"]
    copied = skopeo_copy(
        f"{standalone.registry}/{oci.repo}:{oci.tag}",
        standalone.workdir / "skopeo",
        creds=("alice", "alice-password"),
        tls_verify=True,
        extra_args=["--src-cert-dir", str(Path("/etc/docker/certs.d") / standalone.registry)],
    )
    assert copied.digest == oci.digest
    assert "Traceback" not in running.logs()


def test_docker_stop_is_quick_and_clean(standalone: Standalone, running: Container) -> None:
    standalone.certificate_serial()
    took = running.stop()
    print(f"docker stop took {took:.2f}s")
    state = running.inspect()["State"]
    assert state["ExitCode"] == 0  # stopped by itself on SIGTERM, not killed after docker's 10 s
    logs = running.logs()
    assert "stopping" in logs and "Traceback" not in logs


def test_rebuilt_image_keeps_users_cache_and_certificate(
    standalone: Standalone, hub_session: Hub, hub_images: dict[str, Image]
) -> None:
    """docs/deploy.md's upgrade: a new image, the same volume."""
    old = standalone.start()
    serial = standalone.certificate_serial()
    old.stop()
    old.remove()
    new_image = f"{standalone.image}-upgraded"
    build_image(standalone.dockerd, new_image, f"org.cargohold.test.rebuild={uuid.uuid4().hex}")
    assert standalone.dockerd.docker("image", "inspect", "-f", "{{.Id}}", new_image).stdout != (
        standalone.dockerd.docker("image", "inspect", "-f", "{{.Id}}", standalone.image).stdout
    )
    new = standalone.start(new_image)
    try:
        assert standalone.certificate_serial() == serial  # no new order at the CA
        hub_session.reset_counts()
        image = hub_images["multi"]
        assert login_and_pull(standalone, image) == image.digest  # alice's login survived
        assert hub_session.requests_matching("GET", "/blobs/") == []  # the layers came from the cache
        assert "Traceback" not in new.logs()
    finally:
        print(new.logs())
        new.remove()
        standalone.dockerd.docker("rmi", new_image, check=False)


def test_data_volume_it_cannot_write_is_one_line(standalone: Standalone, tmp_path: Path) -> None:
    """A bind mount owned by root with mode 0700: the non-root user cannot use it."""
    locked = tmp_path / "data"
    locked.mkdir(mode=0o700)
    args = docker_run_args(standalone.env, standalone.volumes(str(locked)))
    proc = standalone.dockerd.docker("run", "--rm", *args, standalone.image, check=False)
    lines = output_lines(proc)
    assert proc.returncode == 2 and len(lines) == 1, lines
    assert lines[0].endswith("cannot start: tls.acme: cannot write /data/acme: Permission denied")
