"""deploy/ in seconds, for `make test`: the compose files resolve with `.env.example` (docker-compose config),
the Dockerfile's shape, and the container's own command, config file and environment run outside a container
(ports, data volume and Let's Encrypt replaced by free loopback ports, a temp dir and pebble), with its
HEALTHCHECK command. The image itself is built and run, standalone and behind Traefik, by `make test-deploy`
(tests/deploy)."""

from __future__ import annotations

import base64
import http.client
import json
import socket
import ssl
import subprocess
import sys
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

from rig.certs import peer_certificate
from rig.clients import need_binary
from rig.pebble import Pebble
from rig.server import REPO_ROOT
from rig.util import CommandError, free_port, http_request, run, start_process, stop_process, tail, wait_until

DEPLOY = REPO_ROOT / "deploy"
EXAMPLE_DOMAIN = "registry.example.com"  # from .env.example; challtestsrv resolves every name to 127.0.0.1


def compose_config(file: str, env_file: Path = DEPLOY / ".env.example") -> dict[str, Any]:
    """`docker-compose config` of a deploy/ compose file: variables substituted, as compose would run it."""
    compose = need_binary("docker-compose")
    out = run([compose, "--env-file", str(env_file), "-f", str(DEPLOY / file), "config"], timeout=60, cwd=DEPLOY)
    return yaml.safe_load(out.stdout)


def dockerfile() -> dict[str, list[str]]:
    """Dockerfile instructions by keyword (continuation lines joined)."""
    found: dict[str, list[str]] = {}
    text = (DEPLOY / "Dockerfile").read_text().replace("\\\n", " ")
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            keyword, _, rest = line.strip().partition(" ")
            found.setdefault(keyword.upper(), []).append(" ".join(rest.split()))
    return found


def exec_form(value: str) -> list[str]:
    """The argv of a JSON (exec-form) instruction, with the image's `cargohold`/`python` made local."""
    local = {"cargohold": [sys.executable, "-m", "cargohold"], "python": [sys.executable]}
    argv = json.loads(value)
    return [*local.get(argv[0], [argv[0]]), *argv[1:]]


def _ports(service: Mapping[str, Any]) -> set[tuple[str, str]]:
    return {(str(p["published"]), str(p["target"])) for p in service["ports"]}


def _volume_targets(service: Mapping[str, Any]) -> set[str]:
    """Mount points, from docker-compose v1 (`vol:/data:rw`) or v2 (mappings) output."""
    return {v["target"] if isinstance(v, dict) else v.split(":")[1] for v in service["volumes"]}


# What .env.example leaves for the operator to fill in (a subnet, a password), as an operator would.
FILLED = {"TRAEFIK_TRUSTED_NETWORKS": "172.18.0.0/16", "REDIS_PASSWORD": "0123456789abcdef"}


def _filled_env(tmp_path: Path, **left_out: str) -> Path:
    """deploy/.env.example with FILLED set, minus the names in `left_out`."""
    lines = (DEPLOY / ".env.example").read_text().splitlines()
    settings = {k: v for k, v in FILLED.items() if k not in left_out}
    path = tmp_path / ".env"
    path.write_text("\n".join([*lines, *(f"{k}={v}" for k, v in settings.items())]) + "\n")
    return path


def test_compose_files_resolve_with_the_example_env(tmp_path: Path) -> None:
    standalone = compose_config("docker-compose.yml")["services"]["cargohold"]
    assert _ports(standalone) == {("80", "8080"), ("443", "8443")}
    assert standalone["build"]["dockerfile"] == "deploy/Dockerfile"
    assert Path(standalone["build"]["context"]) == REPO_ROOT
    assert "/data" in _volume_targets(standalone)
    env = standalone["environment"]
    assert env["CARGOHOLD_TLS__ACME__DOMAINS"] == f"[{EXAMPLE_DOMAIN}]"
    assert env["CARGOHOLD_TLS__ACME__EMAIL"] == "ops@example.com"
    assert env["CARGOHOLD_EXTERNAL_URL"] == f"https://{EXAMPLE_DOMAIN}"

    behind = compose_config("docker-compose.traefik.yml", _filled_env(tmp_path))
    service = behind["services"]["cargohold"]
    assert "ports" not in service  # only Traefik reaches it
    labels = service["labels"]
    assert labels["traefik.http.routers.cargohold.rule"] == f"Host(`{EXAMPLE_DOMAIN}`)"
    assert labels["traefik.http.routers.cargohold.tls.certresolver"] == "letsencrypt"
    assert labels["traefik.http.routers.cargohold.entrypoints"] == "websecure"
    assert labels["traefik.docker.network"] == "traefik"
    assert labels["traefik.http.services.cargohold.loadbalancer.server.port"] == "5000"
    assert service["environment"]["CARGOHOLD_LISTEN"] == "0.0.0.0:5000"
    assert service["environment"]["CARGOHOLD_RATE_LIMIT__TRUSTED_PROXIES"] == "[172.18.0.0/16]"
    assert "/data" in _volume_targets(service)
    assert behind["networks"]["traefik"] == {"external": True, "name": "traefik"}


def test_scaleout_compose_shares_bucket_and_redis(tmp_path: Path) -> None:
    resolved = compose_config("docker-compose.scaleout.yml", _filled_env(tmp_path))
    env = resolved["services"]["cargohold"]["environment"]
    # Redis asks for a password, and both URLs carry it: any container on the backend network could
    # otherwise repoint a tag in the index for every client.
    assert env["CARGOHOLD_STORAGE__BACKEND"] == "s3"
    assert env["CARGOHOLD_INDEX__URL"] == "redis://:0123456789abcdef@redis:6379/0"
    assert env["CARGOHOLD_RATE_LIMIT__STORAGE"] == "redis://:0123456789abcdef@redis:6379/1"
    assert resolved["services"]["redis"]["command"][-2:] == ["--requirepass", "0123456789abcdef"]
    assert env["CARGOHOLD_RATE_LIMIT__TRUSTED_PROXIES"] == "[172.18.0.0/16]"
    assert env["CARGOHOLD_STORAGE__S3__ENDPOINT_URL"] == "http://minio:9000"
    assert "volumes" not in resolved["services"]["cargohold"]  # each replica its own /data
    assert {"redis", "minio", "minio-bucket"} <= set(resolved["services"])


def test_every_compose_file_runs_cargohold_without_capabilities(tmp_path: Path) -> None:
    """As the image tests run it (tests/deploy, deployrig.HARDENING): no capability, none to gain."""
    for compose in ("docker-compose.yml", "docker-compose.traefik.yml", "docker-compose.scaleout.yml"):
        service = compose_config(compose, _filled_env(tmp_path))["services"]["cargohold"]
        assert service["cap_drop"] == ["ALL"] and service["security_opt"] == ["no-new-privileges:true"], compose


def test_compose_names_the_missing_setting(tmp_path: Path) -> None:
    empty = tmp_path / ".env"
    empty.write_text("ACME_EMAIL=ops@example.com\n")
    with pytest.raises(CommandError, match=r"set REGISTRY_DOMAIN in \.env"):
        compose_config("docker-compose.yml", empty)
    # No default for these: all private ranges let any container on a shared network name its own address
    # (and escape the login and rate limits); a Redis without a password lets it rewrite the index.
    for compose in ("docker-compose.traefik.yml", "docker-compose.scaleout.yml"):
        with pytest.raises(CommandError, match=r"set TRAEFIK_TRUSTED_NETWORKS in \.env"):
            compose_config(compose, _filled_env(tmp_path, TRAEFIK_TRUSTED_NETWORKS=""))
    with pytest.raises(CommandError, match=r"set REDIS_PASSWORD in \.env"):
        compose_config("docker-compose.scaleout.yml", _filled_env(tmp_path, REDIS_PASSWORD=""))


def test_dockerfile_runs_as_a_user_with_data_on_a_volume() -> None:
    d = dockerfile()
    assert d["FROM"] == ["python:3.11-slim"]
    assert d["USER"] == ["cargohold"]
    assert d["VOLUME"] == ["/data"]
    assert "CMD" in d["HEALTHCHECK"][0] and "cargohold.healthcheck" in d["HEALTHCHECK"][0]
    assert "CARGOHOLD_CONFIG=/etc/cargohold/cargohold.yaml" in d["ENV"][0]
    assert "deploy/cargohold.yaml /etc/cargohold/cargohold.yaml" in d["COPY"]
    assert json.loads(d["ENTRYPOINT"][0]) + json.loads(d["CMD"][0]) == ["cargohold", "serve"]


class Container:
    """The image's commands run here, with a compose service's environment plus overrides that stand
    in for what a container would give (the /data volume is a temp dir; ports are free loopback ones)."""

    def __init__(self, workdir: Path, compose_file: str, overrides: Mapping[str, str]) -> None:
        self.workdir = workdir
        self.data = workdir / "data"
        self.data.mkdir(exist_ok=True)
        service = compose_config(compose_file, _filled_env(workdir))["services"]["cargohold"]
        self.env = {
            "PATH": "/usr/bin:/bin",
            "PYTHONPATH": str(REPO_ROOT / "src"),
            "CARGOHOLD_CONFIG": str(DEPLOY / "cargohold.yaml"),  # COPY'd to the ENV path in the image
            **{str(k): str(v) for k, v in service["environment"].items()},
            "CARGOHOLD_DATA_DIR": str(self.data),  # the config's /data
            "CARGOHOLD_AUTH__HTPASSWD": str(self.data / "htpasswd"),  # the config's /data/htpasswd
            **overrides,
        }
        self.log = workdir / "container.log"
        self._proc: subprocess.Popen[bytes] | None = None

    def run(self, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
        """`docker compose run --rm cargohold ARGS`: the ENTRYPOINT with other arguments."""
        argv = exec_form(dockerfile()["ENTRYPOINT"][0]) + list(args)
        return subprocess.run(
            argv, env=self.env, input=stdin, capture_output=True, text=True, timeout=60, cwd=self.workdir, check=False
        )

    def start(self) -> Container:
        """`docker compose up`: ENTRYPOINT + CMD."""
        d = dockerfile()
        argv = exec_form(d["ENTRYPOINT"][0]) + json.loads(d["CMD"][0])
        self._proc = start_process(argv, self.log, env=self.env, cwd=self.workdir)
        return self

    def healthcheck(self, **changes: str) -> int:
        """The HEALTHCHECK command's exit code (0 healthy)."""
        argv = exec_form(dockerfile()["HEALTHCHECK"][0].split(" CMD ", 1)[1])
        env = {**self.env, **changes}
        return subprocess.run(argv, env=env, capture_output=True, timeout=30, cwd=self.workdir, check=False).returncode

    def stop(self) -> None:
        stop_process(self._proc)
        print(tail(self.log))


@pytest.fixture
def container(tmp_path: Path) -> Iterator[Callable[..., Container]]:
    """Factory: container(compose_file, **overrides) -> Container (stopped at teardown)."""
    made: list[Container] = []

    def make(compose_file: str, **overrides: str) -> Container:
        made.append(Container(tmp_path, compose_file, overrides))
        return made[-1]

    yield make
    for c in made:
        c.stop()


def _first_user(c: Container) -> None:
    """The set-up step before the first start: `docker compose run --rm cargohold user add alice`."""
    added = c.run("user", "add", "alice", "--password-stdin", stdin="alice-password\n")
    assert added.returncode == 0, added.stderr
    assert "alice:$2y$" in (c.data / "htpasswd").read_text()


def _https_get(port: int, cafile: Path, headers: dict[str, str]) -> tuple[int, str]:
    """GET /v2/ over HTTPS verified for EXAMPLE_DOMAIN: (status, WWW-Authenticate)."""
    ctx = ssl.create_default_context(cafile=str(cafile))
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        ctx.wrap_socket(raw, server_hostname=EXAMPLE_DOMAIN) as tls,
    ):
        conn = http.client.HTTPConnection(EXAMPLE_DOMAIN, port)
        conn.sock = tls
        conn.request("GET", "/v2/", headers=headers)
        resp = conn.getresponse()
        resp.read()
        return resp.status, resp.getheader("WWW-Authenticate", "")


def test_standalone_container_command_gets_a_certificate(
    container: Callable[..., Container], pebble: Callable[..., Pebble], tmp_path: Path
) -> None:
    https_port, http_port = free_port(), free_port()
    ca = pebble(http_port)  # stands in for Let's Encrypt, validating on what would be port 80
    c = container(
        "docker-compose.yml",
        CARGOHOLD_LISTEN=f"127.0.0.1:{https_port}",
        CARGOHOLD_HTTP_LISTEN=f"127.0.0.1:{http_port}",
        CARGOHOLD_TLS__ACME__DIRECTORY=ca.directory,
        CARGOHOLD_TLS__ACME__CA_BUNDLE=str(ca.ca_pem),
    )
    _first_user(c)
    c.start()
    root = tmp_path / "root.pem"
    root.write_bytes(ca.root_pem())
    wait_until(
        lambda: peer_certificate(https_port, root, EXAMPLE_DOMAIN) is not None,
        timeout=60,
        interval=0.2,
        what="the container's ACME certificate",
    )
    assert c.healthcheck() == 0
    assert (c.data / "acme" / "cert.pem").exists()
    # Logins: the challenge names the public URL (external_url from REGISTRY_DOMAIN), Basic works.
    status, challenge = _https_get(https_port, root, {})
    assert status == 401 and challenge.startswith(f'Bearer realm="https://{EXAMPLE_DOMAIN}/token"')
    login = {"Authorization": "Basic " + base64.b64encode(b"alice:alice-password").decode()}
    assert _https_get(https_port, root, login)[0] == 200


def test_traefik_container_command_serves_plain_http(container: Callable[..., Container]) -> None:
    port = free_port()
    c = container("docker-compose.traefik.yml", CARGOHOLD_LISTEN=f"127.0.0.1:{port}")
    _first_user(c)
    c.start()
    wait_until(lambda: c.healthcheck() == 0, timeout=30, interval=0.2, what="the HEALTHCHECK to pass")
    assert c.healthcheck(CARGOHOLD_LISTEN=f"127.0.0.1:{free_port()}") == 1  # nothing listens there
    # Traefik ends TLS: the challenge still names https://REGISTRY_DOMAIN (external_url).
    refused = http_request("GET", f"http://127.0.0.1:{port}/v2/")
    assert refused.header("WWW-Authenticate", "").startswith(f'Bearer realm="https://{EXAMPLE_DOMAIN}/token"')
