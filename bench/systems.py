"""The systems under test, each started on loopback in its own work dir.

- `Upstream`: the rig's hub itself (a pull straight from it is the reference for cold pulls).
- `NginxFile`: nginx serving the blob and manifest files statically with sendfile: the practical limit.
- `ReplacedStack`: what cargohold replaces: nginx (limit_req/limit_conn set far above the load)
  in front of Debian's docker-registry in proxy mode with htpasswd (bcrypt) auth.
- `CargoholdSystem`: cargohold itself (tests/rig/server.py).
- Over HTTPS (`ServerTls`, a certificate for 127.0.0.1 from a throw-away CA): `NginxFile` with
  `listen ... ssl` and `CargoholdSystem` with its own `tls` settings.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import subprocess
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import yaml

from bench.load import Auth, connect, tls_context
from bench.report import CARGOHOLD
from rig.certs import TestCA
from rig.hub import Hub
from rig.server import Cargohold
from rig.util import free_port, http_request, run, start_process, stop_process, tail, wait_until

USER, PASSWORD = "bench", "benchpass"
NGINX = "/usr/sbin/nginx"
# What cargohold's server context allows (src/cargohold/tls/context.py), so both sides negotiate alike.
TLS_PROTOCOLS = "TLSv1.2 TLSv1.3"
TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:DHE+CHACHA20"


@dataclass(frozen=True)
class ServerTls:
    """A server certificate and key for 127.0.0.1, and the root that signed it (`cafile`, which the
    bench's clients trust: they verify the chain as real clients do)."""

    cert: Path
    key: Path
    cafile: Path

    @classmethod
    def create(cls, directory: Path) -> ServerTls:
        directory.mkdir(parents=True, exist_ok=True)
        ca = TestCA.create("cargohold bench root")
        tls = cls(directory / "cert.pem", directory / "key.pem", ca.write_root(directory / "root.pem"))
        ca.issue(tls.cert, tls.key, ["localhost"], ["127.0.0.1"])
        return tls


class System(Protocol):
    """What a scenario needs from a system under test."""

    name: str
    url: str
    auth: Auth  # how the pulls of the scenarios authenticate
    auths: list[Auth]  # every way scenario 5 measures (one row each)
    cafile: str | None  # the root the clients trust when `url` is HTTPS

    def wipe(self) -> None:
        """Forget everything cached (a restart with an empty cache)."""

    def pids(self) -> list[int]:
        """The processes whose memory counts as this system's."""

    def stop(self) -> None: ...


def process_tree(root: int) -> list[int]:
    """root and all its descendants (nginx's workers, for instance)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def reset_peak_rss(pids: list[int]) -> None:
    """Start a new high-water mark (VmHWM) for each process (Linux: clear_refs 5)."""
    for pid in pids:
        with contextlib.suppress(OSError):
            Path(f"/proc/{pid}/clear_refs").write_text("5")


def _status_kib(pid: int, field: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def peak_rss_mib(pids: list[int]) -> float:
    """Sum of the processes' RSS high-water marks since the last reset, MiB."""
    return sum(_status_kib(pid, "VmHWM") for pid in pids) / 1024


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time the processes have used so far."""
    ticks = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def rss_mib(pids: list[int]) -> float:
    return sum(_status_kib(pid, "VmRSS") for pid in pids) / 1024


def write_htpasswd(path: Path) -> Path:
    """The bench user in an htpasswd file, bcrypt as Apache's `htpasswd -B` writes it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(run(["htpasswd", "-Bbn", USER, PASSWORD]).stdout.strip() + "\n")
    return path


class Nginx:
    """One nginx master (workers: one per core) with every path in its own work dir."""

    def __init__(
        self, workdir: Path, server_block: str, *, access_log: bool, http_block: str = "", tls: ServerTls | None = None
    ) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.server_block = server_block
        self.http_block = http_block
        self.access_log = access_log
        self.tls = tls
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    def _listen(self) -> str:
        if self.tls is None:
            return f"    listen 127.0.0.1:{self.port};"
        return f"""    listen 127.0.0.1:{self.port} ssl;
    ssl_certificate {self.tls.cert};
    ssl_certificate_key {self.tls.key};
    ssl_protocols {TLS_PROTOCOLS};
    ssl_ciphers {TLS12_CIPHERS};
    ssl_prefer_server_ciphers on;"""

    def config(self) -> str:
        w = self.workdir
        temps = "\n".join(
            f"  {kind}_temp_path {w}/tmp-{kind};" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
        )
        log = f"access_log {w}/access.log;" if self.access_log else "access_log off;"
        user = "user root;" if os.geteuid() == 0 else ""
        return f"""{user}
worker_processes auto;
pid {w}/nginx.pid;
error_log {w}/error.log warn;
events {{ worker_connections 4096; }}
http {{
  sendfile on;
  tcp_nopush on;
  tcp_nodelay on;
  keepalive_timeout 65;
  keepalive_requests 10000000;
  types {{ }}
  default_type application/octet-stream;
{temps}
  {log}
{self.http_block}
  server {{
{self._listen()}
{self.server_block}
  }}
}}
"""

    def start(self) -> Nginx:
        self.workdir.mkdir(parents=True, exist_ok=True)
        conf = self.workdir / "nginx.conf"
        conf.write_text(self.config())
        cmd = [
            NGINX,
            "-p",
            str(self.workdir),
            "-c",
            str(conf),
            "-e",
            str(self.workdir / "error.log"),
            "-g",
            "daemon off;",
        ]
        self._proc = start_process(cmd, self.workdir / "nginx.out")
        try:
            # Plain HTTP even to an ssl listener: nginx answers it with a 400, which says it is up.
            wait_until(
                lambda: http_request("GET", f"http://127.0.0.1:{self.port}/nginx-ready", timeout=2).status > 0,
                timeout=20,
                what="nginx",
                alive=lambda: (
                    None if self._proc is None or self._proc.poll() is None else tail(self.workdir / "error.log")
                ),
            )
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        stop_process(self._proc)
        self._proc = None

    def pids(self) -> list[int]:
        return process_tree(self._proc.pid) if self._proc else []


class Upstream:
    """The hub: pulling straight from it is what a client does without any mirror."""

    name = "upstream"

    def __init__(self, hub: Hub) -> None:
        self.url = hub.url
        self.auth = Auth("bearer")
        self.auths = [self.auth]
        self.cafile: str | None = None

    def wipe(self) -> None:
        pass

    def pids(self) -> list[int]:
        return []

    def stop(self) -> None:
        pass


class NginxSystem:
    """A system that is one nginx and keeps nothing to wipe between runs."""

    name: str
    url: str
    auth: Auth
    auths: list[Auth]
    cafile: str | None = None
    nginx: Nginx

    def _serve(self, workdir: Path, block: str, auth: Auth, tls: ServerTls | None = None) -> None:
        self.nginx = Nginx(workdir, block, access_log=False, tls=tls).start()
        self.url = self.nginx.url
        self.auth = auth
        self.auths = [auth]
        self.cafile = str(tls.cafile) if tls else None

    def wipe(self) -> None:
        pass

    def pids(self) -> list[int]:
        return self.nginx.pids()

    def stop(self) -> None:
        self.nginx.stop()


class NginxFile(NginxSystem):
    """nginx serving files laid out under www/ by their registry paths: the practical limit.
    With `tls` (`nginx-tls`) over HTTPS: no sendfile then, nginx encrypts in user space like cargohold."""

    def __init__(self, workdir: Path, tls: ServerTls | None = None) -> None:
        self.name = "nginx-tls" if tls else "nginx-file"
        self.www = workdir / "www"
        self.www.mkdir(parents=True, exist_ok=True)
        self._serve(workdir, f"    root {self.www};\n    location /v2/ {{ }}", Auth(), tls)

    def publish(self, path: str, source: Path | bytes) -> None:
        """Serve `source` (a file, linked; or bytes) at `path`."""
        target = self.www / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.unlink(missing_ok=True)
        if isinstance(source, bytes):
            target.write_bytes(source)
        else:
            target.symlink_to(source)


class NginxRelay(NginxSystem):
    """nginx passing every request straight to the upstream: no cache, no auth, no digest check.
    The least work any mirror can add to a pull; its cold-pull ratio is this machine's ceiling."""

    name = "nginx-relay"

    def __init__(self, workdir: Path, upstream_url: str) -> None:
        upstream = upstream_url.split("://", 1)[1]
        block = f"    location / {{ proxy_pass http://{upstream}; proxy_http_version 1.1; proxy_set_header Host $http_host; }}"
        self._serve(workdir, block, Auth("bearer"))  # the upstream's own token dance, relayed


class ReplacedStack:
    """nginx (rate limits set far above the load) -> docker-registry proxy with htpasswd auth."""

    name = "registry+nginx"

    def __init__(self, workdir: Path, upstream_url: str) -> None:
        self.workdir = workdir
        self.upstream_url = upstream_url
        self.registry_port = free_port()
        self.auth = Auth("basic", USER, PASSWORD)
        self.auths = [self.auth]
        self.cafile: str | None = None
        self._registry: subprocess.Popen[bytes] | None = None
        write_htpasswd(workdir / "htpasswd")
        self._start_registry()
        # The reverse-proxy recipe of the registry's docs, plus the rate limits this stack exists for.
        block = """    client_max_body_size 0;
    chunked_transfer_encoding on;
    location /v2/ {
      limit_req zone=perip burst=1000000 nodelay;
      limit_conn conns 60000;
      proxy_pass http://registry;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Host $http_host;
      proxy_set_header X-Real-IP $remote_addr;
      proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
      proxy_set_header X-Forwarded-Proto $scheme;
      proxy_read_timeout 900;
    }"""
        limits = f"""  limit_req_zone $binary_remote_addr zone=perip:10m rate=1000000r/s;
  limit_conn_zone $binary_remote_addr zone=conns:10m;
  upstream registry {{ server 127.0.0.1:{self.registry_port}; keepalive 64; }}"""
        try:
            self.nginx = Nginx(workdir / "nginx", block, access_log=True, http_block=limits).start()
        except BaseException:
            stop_process(self._registry)
            raise
        self.url = self.nginx.url

    @property
    def storage(self) -> Path:
        return self.workdir / "storage"

    def _start_registry(self) -> None:
        config = {
            "version": 0.1,
            "log": {"level": "info", "formatter": "text"},
            "storage": {"filesystem": {"rootdirectory": str(self.storage)}, "delete": {"enabled": True}},
            "http": {"addr": f"127.0.0.1:{self.registry_port}", "secret": secrets.token_hex(16)},
            "auth": {"htpasswd": {"realm": "bench", "path": str(self.workdir / "htpasswd")}},
            "proxy": {"remoteurl": self.upstream_url},
        }
        path = self.workdir / "registry.yml"
        path.write_text(yaml.safe_dump(config))
        log = self.workdir / "registry.log"
        self._registry = proc = start_process(["docker-registry", "serve", str(path)], log)
        try:
            wait_until(
                lambda: http_request("GET", f"http://127.0.0.1:{self.registry_port}/v2/", timeout=2).status == 401,
                timeout=20,
                what="docker-registry (proxy)",
                alive=lambda: None if proc.poll() is None else tail(log),
            )
        except BaseException:
            stop_process(proc)
            raise

    def wipe(self) -> None:
        stop_process(self._registry)
        shutil.rmtree(self.storage, ignore_errors=True)
        self._start_registry()

    def pids(self) -> list[int]:
        registry = process_tree(self._registry.pid) if self._registry else []
        return registry + self.nginx.pids()

    def stop(self) -> None:
        self.nginx.stop()
        stop_process(self._registry)
        self._registry = None


class CargoholdSystem:
    """cargohold with default settings (tag_ttl 10m) and logins, like the replaced stack: the bench
    user in an htpasswd file, no anonymous pulls. Pulls send Basic; scenario 5 measures Basic and
    a Bearer token from cargohold's /token. With `workers` > 1 it is the same under the supervisor;
    with `tls` it serves HTTPS with that certificate (its `tls: {cert, key}` settings)."""

    def __init__(self, workdir: Path, upstream_url: str, workers: int = 1, tls: ServerTls | None = None) -> None:
        self.name = CARGOHOLD + (" tls" if tls else "") + (f" x{workers}" if workers > 1 else "")
        self.tls = tls
        auth = {"htpasswd": str(write_htpasswd(workdir / "htpasswd")), "anonymous": False}
        # Limits off: the bench measures serving against nginx with none (its 32-connection manifest
        # run would be 429s under a preset); their cost is measured apart by bench/ratelimit_cost.py.
        overrides: dict[str, object] = {"auth": auth, "rate_limit": {"preset": "off"}, "workers": workers}
        if tls:
            overrides["tls"] = {"cert": str(tls.cert), "key": str(tls.key)}
        self.server = Cargohold(workdir, upstream_url, overrides=overrides, upstream={"tag_ttl": "10m"})
        self.url = self.server.url.replace("http://", "https://", 1) if tls else self.server.url
        self.cafile = str(tls.cafile) if tls else None
        try:
            self._start()
        except BaseException:
            self.server.stop()
            raise
        self.auth = Auth("basic", USER, PASSWORD)
        self.auths = [self.auth, Auth("bearer", USER, PASSWORD)]

    def _start(self) -> None:
        """Start and wait until /health answers 200: over HTTPS, which the rig's plain-HTTP check cannot see."""
        if self.tls is None:
            self.server.start()
            return
        self.server.start(wait=False)
        log = self.server.log_path
        wait_until(
            lambda: _https_status(f"{self.url}/health", self.cafile) == 200,
            timeout=30,
            interval=0.1,
            what=f"cargohold /health on {self.url}",
            alive=lambda: None if self.server.running else tail(log),
        )

    def wipe(self) -> None:
        self.server.stop()
        shutil.rmtree(self.server.data_dir, ignore_errors=True)
        self._start()

    def pids(self) -> list[int]:
        return process_tree(self.server.pid) if self.server.pid else []

    def stop(self) -> None:
        self.server.stop()


def _https_status(url: str, cafile: str | None) -> int:
    """The status of a GET of url, verifying the server against cafile."""
    conn = connect(url, tls_context(cafile), timeout=2)
    try:
        conn.request("GET", urllib.parse.urlsplit(url).path)
        resp = conn.getresponse()
        resp.read()
        return resp.status
    finally:
        conn.close()
