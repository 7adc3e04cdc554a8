"""deploy/: base images cannot be downloaded here, so the image is not built. What is checked instead:
the compose files resolve with `.env.example` (docker-compose config), the Dockerfile's shape, and the
container's own command, config file and environment run outside a container (ports, data volume and
Let's Encrypt replaced by free loopback ports, a temp dir and pebble), with its HEALTHCHECK command."""

from __future__ import annotations

import json
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
from rig.util import CommandError, free_port, run, start_process, stop_process, tail, wait_until

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


def test_compose_files_resolve_with_the_example_env() -> None:
    standalone = compose_config("docker-compose.yml")["services"]["cargohold"]
    assert _ports(standalone) == {("80", "8080"), ("443", "8443")}
    assert standalone["build"]["dockerfile"] == "deploy/Dockerfile"
    assert Path(standalone["build"]["context"]) == REPO_ROOT
    assert "/data" in _volume_targets(standalone)
    env = standalone["environment"]
    assert env["CARGOHOLD_TLS__ACME__DOMAINS"] == f"[{EXAMPLE_DOMAIN}]"
    assert env["CARGOHOLD_TLS__ACME__EMAIL"] == "ops@example.com"
    assert env["CARGOHOLD_EXTERNAL_URL"] == f"https://{EXAMPLE_DOMAIN}"

    behind = compose_config("docker-compose.traefik.yml")
    service = behind["services"]["cargohold"]
    assert "ports" not in service  # only Traefik reaches it
    labels = service["labels"]
    assert labels["traefik.http.routers.cargohold.rule"] == f"Host(`{EXAMPLE_DOMAIN}`)"
    assert labels["traefik.http.routers.cargohold.tls.certresolver"] == "letsencrypt"
    assert labels["traefik.http.routers.cargohold.entrypoints"] == "websecure"
    assert labels["traefik.docker.network"] == "traefik"
    assert labels["traefik.http.services.cargohold.loadbalancer.server.port"] == "5000"
    assert service["environment"]["CARGOHOLD_LISTEN"] == "0.0.0.0:5000"
    assert "/data" in _volume_targets(service)
    assert behind["networks"]["traefik"] == {"external": True, "name": "traefik"}


def test_compose_names_the_missing_setting(tmp_path: Path) -> None:
    empty = tmp_path / ".env"
    empty.write_text("ACME_EMAIL=ops@example.com\n")
    with pytest.raises(CommandError, match="set REGISTRY_DOMAIN in .env"):
        compose_config("docker-compose.yml", empty)


def test_dockerfile_runs_as_a_user_with_data_on_a_volume() -> None:
    d = dockerfile()
    assert d["FROM"] == ["python:3.11-slim"]
    assert d["USER"] == ["cargohold"]
    assert d["VOLUME"] == ["/data"]
    assert "CMD" in d["HEALTHCHECK"][0] and "cargohold.healthcheck" in d["HEALTHCHECK"][0]
    assert "CARGOHOLD_CONFIG=/etc/cargohold/cargohold.yaml" in d["ENV"][0]
    assert "deploy/cargohold.yaml /etc/cargohold/cargohold.yaml" in d["COPY"]
    assert json.loads(d["ENTRYPOINT"][0]) + json.loads(d["CMD"][0]) == ["cargohold", "serve"]


def _healthcheck(env: Mapping[str, str]) -> int:
    command = dockerfile()["HEALTHCHECK"][0].split(" CMD ", 1)[1]
    argv = exec_form(command)
    return subprocess.run(argv, env=dict(env), capture_output=True, timeout=30, cwd=REPO_ROOT).returncode


@pytest.fixture
def container(tmp_path: Path) -> Iterator[Callable[[dict[str, str]], dict[str, str]]]:
    """Run the image's ENTRYPOINT + CMD here with a compose service's environment plus overrides;
    returns the environment it runs with (the HEALTHCHECK needs the same)."""
    procs: list[subprocess.Popen[bytes]] = []
    log = tmp_path / "container.log"

    def start(environment: dict[str, str]) -> dict[str, str]:
        d = dockerfile()
        env = {
            "PATH": "/usr/bin:/bin",
            "PYTHONPATH": str(REPO_ROOT / "src"),
            "CARGOHOLD_CONFIG": str(DEPLOY / "cargohold.yaml"),  # COPY'd to the ENV path in the image
            "CARGOHOLD_DATA_DIR": str(tmp_path / "data"),  # the /data volume
            **environment,
        }
        argv = exec_form(d["ENTRYPOINT"][0]) + json.loads(d["CMD"][0])
        procs.append(start_process(argv, log, env=env, cwd=tmp_path))
        return env

    yield start
    for p in procs:
        stop_process(p)
    if log.exists():
        print(tail(log))


def test_standalone_container_command_gets_a_certificate(
    container: Callable[[dict[str, str]], dict[str, str]], pebble: Callable[..., Pebble], tmp_path: Path
) -> None:
    environment = {str(k): str(v) for k, v in compose_config("docker-compose.yml")["services"]["cargohold"]["environment"].items()}
    https_port, http_port = free_port(), free_port()
    ca = pebble(http_port)  # stands in for Let's Encrypt, validating on what would be port 80
    env = container(
        {
            **environment,
            "CARGOHOLD_LISTEN": f"127.0.0.1:{https_port}",
            "CARGOHOLD_HTTP_LISTEN": f"127.0.0.1:{http_port}",
            "CARGOHOLD_TLS__ACME__DIRECTORY": ca.directory,
            "CARGOHOLD_TLS__ACME__CA_BUNDLE": str(ca.ca_pem),
        }
    )
    root = tmp_path / "root.pem"
    root.write_bytes(ca.root_pem())
    wait_until(
        lambda: peer_certificate(https_port, root, EXAMPLE_DOMAIN) is not None,
        timeout=60,
        interval=0.2,
        what="the container's ACME certificate",
    )
    assert _healthcheck(env) == 0
    assert (tmp_path / "data" / "acme" / "cert.pem").exists()


def test_traefik_container_command_serves_plain_http(container: Callable[[dict[str, str]], dict[str, str]]) -> None:
    environment = compose_config("docker-compose.traefik.yml")["services"]["cargohold"]["environment"]
    port = free_port()
    env = container({**{str(k): str(v) for k, v in environment.items()}, "CARGOHOLD_LISTEN": f"127.0.0.1:{port}"})
    wait_until(lambda: _healthcheck(env) == 0, timeout=30, interval=0.2, what="the HEALTHCHECK to pass")
    stopped = {**env, "CARGOHOLD_LISTEN": f"127.0.0.1:{free_port()}"}
    assert _healthcheck(stopped) == 1  # nothing listens there: unhealthy
