"""Real registry clients for end-to-end tests: skopeo, podman, a private dockerd, a private containerd.

Each daemon runs as root with every path (data, state, sockets, pidfile) in its own temp dir,
so tests never touch the machine's docker or containerd.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .util import CommandError, Managed, ManagedProcess, RigError, run, start_process, wait_started, wait_until

#: Names a client may fall back to when a Docker Hub mirror fails; /etc/hosts maps them to loopback.
DOCKER_HUB_HOSTS = (
    "registry-1.docker.io",
    "auth.docker.io",
    "index.docker.io",
    "docker.io",
    "registry.docker.io",
    "production.cloudflare.docker.com",
)
#: Where containerd falls back to when every mirror fails: nothing listens on port 9.
DEAD_SERVER = "http://127.0.0.1:9"
_HOSTS_MARK = "# cargohold test rig"


def need_binary(name: str, *candidates: str) -> str:
    """Path of a required binary; raise (never skip) when it is missing, so CI fails loudly."""
    for c in (*candidates, name):
        if os.path.isabs(c) and os.access(c, os.X_OK):
            return c
        found = shutil.which(c)
        if found:
            return found
    raise RigError(f"required binary {name!r} not found on PATH")


def ensure_hosts_entries(
    names: Iterable[str] = DOCKER_HUB_HOSTS, ip: str = "127.0.0.1", hosts_file: str | os.PathLike[str] = "/etc/hosts"
) -> list[str]:
    """Map names to loopback in /etc/hosts (idempotent), so a client's fallback to the real
    registry cannot leave the machine. Returns the names it added."""
    path = Path(hosts_file)
    text = path.read_text()
    mapped: set[str] = set()
    for line in text.splitlines():
        fields = line.split("#", 1)[0].split()
        if len(fields) >= 2 and fields[0] == ip:
            mapped.update(fields[1:])
    missing = [n for n in names if n not in mapped]
    if missing:
        add = "".join(f"{ip} {n} {_HOSTS_MARK}\n" for n in missing)
        with open(path, "a") as f:  # append in place: /etc/hosts may be a bind mount
            if text and not text.endswith("\n"):
                f.write("\n")
            f.write(add)
    return missing


# -- skopeo -----------------------------------------------------------------------------------


@dataclass
class CopyResult:
    """What skopeo wrote: the top manifest, its digest and the blobs/manifests on disk."""

    dest: Path
    fmt: str
    manifest: bytes
    digest: str
    media_type: str | None
    blobs: list[str]  # digests of every file stored (blobs and, for oci:, manifests)

    def manifest_json(self) -> dict[str, object]:
        return json.loads(self.manifest)


def _docker_ref(src: str) -> str:
    return src if "://" in src or src.startswith(("docker:", "oci:", "oci-archive:", "dir:")) else f"docker://{src}"


def skopeo_copy(
    src: str,
    dest_dir: Path,
    *,
    fmt: str = "dir",
    creds: tuple[str, str] | None = None,
    all_platforms: bool = False,
    tls_verify: bool = False,
    timeout: float = 300,
    extra_args: Sequence[str] = (),
) -> CopyResult:
    """`skopeo copy` an image (`host:port/repo:tag` or `docker://...`) into `dir:` or `oci:`.

    With `dir:` manifests are kept as they are, so the digest is comparable to what was pushed;
    `oci:` keeps OCI manifests but converts Docker schema2 ones to OCI. all_platforms copies
    an index with every child (else skopeo picks this platform).
    """
    skopeo = need_binary("skopeo")
    dest_dir = Path(dest_dir)
    dest_dir.parent.mkdir(parents=True, exist_ok=True)
    cmd = [skopeo, "--insecure-policy", "copy", f"--src-tls-verify={'true' if tls_verify else 'false'}"]
    cmd += [f"--src-creds={creds[0]}:{creds[1]}"] if creds else ["--src-no-creds"]
    if all_platforms:
        cmd.append("--all")
    cmd += ["--retry-times", "0", *extra_args]
    if fmt == "dir":
        dest = f"dir:{dest_dir}"
    elif fmt == "oci":
        dest = f"oci:{dest_dir}:rig"
    else:
        raise ValueError(fmt)
    run([*cmd, _docker_ref(src), dest], timeout=timeout, env=_skopeo_env(dest_dir))
    return _read_copy(dest_dir, fmt)


def _skopeo_env(work: Path) -> dict[str, str]:
    """Keep skopeo away from the user's auth files and registries.conf short names."""
    env = dict(os.environ)
    env["REGISTRY_AUTH_FILE"] = str(work.parent / f".{work.name}-auth.json")
    env["XDG_RUNTIME_DIR"] = str(work.parent)
    env.pop("DOCKER_CONFIG", None)
    return env


def _read_copy(dest: Path, fmt: str) -> CopyResult:
    if fmt == "dir":
        manifest = (dest / "manifest.json").read_bytes()
        blobs = sorted("sha256:" + p.name.split(".")[0] for p in dest.iterdir() if len(p.name.split(".")[0]) == 64)
    else:
        index = json.loads((dest / "index.json").read_text())
        top = index["manifests"][0]
        manifest = (dest / "blobs" / "sha256" / top["digest"][7:]).read_bytes()
        blobs = sorted("sha256:" + p.name for p in (dest / "blobs" / "sha256").iterdir())
    mt = json.loads(manifest).get("mediaType")
    return CopyResult(dest, fmt, manifest, "sha256:" + hashlib.sha256(manifest).hexdigest(), mt, blobs)


def skopeo_inspect(
    src: str, *, raw: bool = True, creds: tuple[str, str] | None = None, tls_verify: bool = False, timeout: float = 60
) -> bytes:
    """`skopeo inspect [--raw]` of a remote image: the manifest bytes as served (raw) or skopeo's JSON."""
    skopeo = need_binary("skopeo")
    cmd = [skopeo, "inspect", f"--tls-verify={'true' if tls_verify else 'false'}"]
    cmd += [f"--creds={creds[0]}:{creds[1]}"] if creds else ["--no-creds"]
    if raw:
        cmd.append("--raw")
    env = dict(os.environ)
    env["REGISTRY_AUTH_FILE"] = "/dev/null/none.json"
    proc = subprocess.run(
        [*cmd, _docker_ref(src)], capture_output=True, timeout=timeout, env=env, stdin=subprocess.DEVNULL, check=False
    )
    if proc.returncode != 0:
        raise CommandError(
            cmd, proc.returncode, proc.stdout.decode(errors="replace"), proc.stderr.decode(errors="replace")
        )
    return proc.stdout


# -- podman -----------------------------------------------------------------------------------


class Podman(Managed):
    """Rootful podman with its own storage (vfs), run root, registries.conf and auth file: no daemon.

    Each `pull` with `fresh=True` empties the storage first, so the next pull fetches everything
    again; plain HTTP on loopback needs `--tls-verify=false` (the README says the same to users).
    podman refuses a run root path over 50 characters, so that one is a short temp dir of its own.
    """

    def __init__(self, workdir: Path) -> None:
        self.workdir = Path(workdir)
        self.podman = need_binary("podman")
        self.runroot: Path | None = None

    def start(self) -> Podman:
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "registries.conf").write_text("unqualified-search-registries = []\n")
        (self.workdir / "auth.json").write_text("{}")
        self.runroot = Path(tempfile.mkdtemp(prefix="rig-podman-"))
        return self

    def stop(self) -> None:
        if self.runroot is not None:
            self.run("rmi", "--all", "--force", check=False)  # vfs mounts nothing: files only
            shutil.rmtree(self.runroot, ignore_errors=True)
            self.runroot = None

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["CONTAINERS_REGISTRIES_CONF"] = str(self.workdir / "registries.conf")
        env["REGISTRY_AUTH_FILE"] = str(self.workdir / "auth.json")
        env["TMPDIR"] = str(self.workdir)
        env.pop("DOCKER_CONFIG", None)
        return env

    def run(self, *args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run `podman --root ... --runroot ... --storage-driver vfs args...`."""
        if self.runroot is None:
            raise RigError("podman: start() first")
        cmd = [
            self.podman,
            "--root",
            str(self.workdir / "root"),
            "--runroot",
            str(self.runroot),
            "--storage-driver",
            "vfs",
            "--events-backend",
            "none",
            "--cgroup-manager",
            "cgroupfs",
            *args,
        ]
        return run(cmd, timeout=timeout, env=self._env(), check=check)

    def pull(self, ref: str, *, fresh: bool = True, timeout: float = 300) -> str:
        """Pull `host:port/repo:tag` over plain HTTP; returns the manifest digest podman recorded."""
        if fresh:
            self.run("rmi", "--all", "--force", check=False)
        self.run("pull", "--tls-verify=false", "--quiet", ref, timeout=timeout)
        return self.run("image", "inspect", "--format", "{{.Digest}}", ref).stdout.strip()


# -- dockerd ----------------------------------------------------------------------------------


class Dockerd(ManagedProcess):
    """A private dockerd (vfs, no iptables, no bridge) with its own root, exec-root and socket.

    Registry mirrors and insecure registries live in its daemon.json and can be changed
    without a restart (`reconfigure`, via SIGHUP), so one daemon serves a whole session.
    127.0.0.0/8 is an insecure registry for docker by default, so plain-HTTP hubs work as is.
    """

    name = "dockerd"
    stop_timeout = 20.0

    def __init__(
        self,
        workdir: Path,
        *,
        mirrors: Sequence[str] = (),
        insecure_registries: Sequence[str] = (),
        debug: bool = False,
    ) -> None:
        self.workdir = Path(workdir)
        self.mirrors = list(mirrors)
        self.insecure_registries = list(insecure_registries)
        self.debug = debug
        self.dockerd_bin = need_binary("dockerd", "/usr/sbin/dockerd")
        # The Debian CLI matches the daemon's API version; any newer one negotiates down.
        self.docker_bin = need_binary("docker", "/usr/bin/docker")
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def socket(self) -> Path:
        return self.workdir / "docker.sock"

    @property
    def host(self) -> str:
        """DOCKER_HOST value."""
        return f"unix://{self.socket}"

    @property
    def log_path(self) -> Path:
        return self.workdir / "dockerd.log"

    @property
    def config_path(self) -> Path:
        return self.workdir / "daemon.json"

    def _write_config(self) -> None:
        cfg: dict[str, object] = {
            "registry-mirrors": self.mirrors,
            "insecure-registries": self.insecure_registries,
            "debug": self.debug,
            "features": {"buildkit": False},
            "max-concurrent-downloads": 3,
        }
        tmp = self.config_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(cfg, indent=2))
        os.replace(tmp, self.config_path)

    def start(self, timeout: float = 60) -> Dockerd:
        if os.geteuid() != 0:
            raise RigError("dockerd needs root")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._write_config()
        cmd: list[str | Path] = [
            self.dockerd_bin,
            "--data-root", self.workdir / "data",
            "--exec-root", self.workdir / "exec",
            "--pidfile", self.workdir / "dockerd.pid",
            "-H", self.host,
            "--config-file", self.config_path,
            "--storage-driver=vfs",
            "--iptables=false",
            "--ip6tables=false",
            "--ip-masq=false",
            "--bridge=none",
        ]  # fmt: skip
        env = dict(os.environ)
        env.pop("DOCKER_HOST", None)
        self._proc = start_process(cmd, self.log_path, env=env)
        wait_started(
            lambda: self.docker("version", "--format", "{{.Server.Version}}", timeout=10, check=False).returncode == 0,
            stop=self.stop,
            timeout=timeout,
            interval=0.2,
            what="dockerd",
            alive=self._dead,
        )
        return self

    def env(self) -> dict[str, str]:
        """Environment for the docker CLI: this daemon, a private DOCKER_CONFIG (no creds)."""
        env = dict(os.environ)
        env["DOCKER_HOST"] = self.host
        env["DOCKER_CONFIG"] = str(self.workdir / "cli-config")
        env.pop("DOCKER_CONTEXT", None)
        env.pop("DOCKER_TLS_VERIFY", None)
        return env

    def docker(self, *args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run the docker CLI against this daemon."""
        (self.workdir / "cli-config").mkdir(parents=True, exist_ok=True)
        return run([self.docker_bin, *args], timeout=timeout, env=self.env(), check=check)

    def reconfigure(
        self,
        *,
        mirrors: Sequence[str] | None = None,
        insecure_registries: Sequence[str] | None = None,
        timeout: float = 20,
    ) -> None:
        """Change registry-mirrors / insecure-registries live (daemon.json + SIGHUP), then wait
        until `docker info` shows the new mirrors."""
        if mirrors is not None:
            self.mirrors = list(mirrors)
        if insecure_registries is not None:
            self.insecure_registries = list(insecure_registries)
        self._write_config()
        assert self._proc is not None
        os.kill(self._proc.pid, signal.SIGHUP)
        want = [m.rstrip("/") + "/" for m in self.mirrors]

        def _applied() -> bool:
            out = self.docker("info", "--format", "{{json .RegistryConfig.Mirrors}}", timeout=10).stdout.strip()
            have = json.loads(out) or []
            return [h.rstrip("/") + "/" for h in have] == want

        wait_until(_applied, timeout=timeout, interval=0.1, what="dockerd to reload daemon.json", alive=self._dead)

    def pull(self, ref: str, *, timeout: float = 300) -> str:
        """`docker pull ref`; returns the repo digest (`sha256:...`) docker reports for it."""
        out = self.docker("pull", ref, timeout=timeout).stdout
        for line in out.splitlines():
            if line.startswith("Digest: "):
                return line.split(" ", 1)[1].strip()
        raise RigError(f"no digest in docker pull output:\n{out}")

    def image_ids(self) -> list[str]:
        out = self.docker("images", "-q", "--no-trunc").stdout
        return sorted(set(out.split()))

    def remove_all_images(self) -> None:
        """Forget every image, so the next pull fetches again."""
        ids = self.image_ids()
        if ids:
            self.docker("rmi", "-f", *ids)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


# -- containerd -------------------------------------------------------------------------------


def write_hosts_toml(
    hosts_dir: Path,
    mirror_url: str,
    *,
    registry: str = "docker.io",
    capabilities: Sequence[str] = ("pull", "resolve"),
    server: str = DEAD_SERVER,
    override_path: bool = False,
    headers: Mapping[str, str] | None = None,
) -> Path:
    """Write `hosts_dir/<registry>/hosts.toml` sending pulls of `registry` to `mirror_url`.

    `server` (the fallback when the mirror fails) is a dead loopback port, so nothing leaves
    the machine. containerd appends `/v2/...` to the mirror and adds `?ns=<registry>`.
    """
    d = Path(hosts_dir) / registry
    d.mkdir(parents=True, exist_ok=True)
    lines = [
        f'server = "{server}"',
        "",
        f'[host."{mirror_url}"]',
        "  capabilities = [" + ", ".join(f'"{c}"' for c in capabilities) + "]",
        "  skip_verify = true",
    ]
    if override_path:
        lines.append("  override_path = true")
    if headers:
        lines.append(f'  [host."{mirror_url}".header]')
        lines += [f'    {k} = ["{v}"]' for k, v in headers.items()]
    path = d / "hosts.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


@dataclass
class CtrPull:
    """The result of a containerd pull: what image it registered and what content it holds."""

    namespace: str
    ref: str
    digest: str  # the image's target (manifest or index) digest
    media_type: str
    content: dict[str, int] = field(default_factory=dict)  # digest -> size of fetched content
    output: str = ""


class Containerd(ManagedProcess):
    """A private containerd (no CRI) with its own root, state and socket.

    content_sharing_policy is "isolated", so a blob fetched in one namespace does not satisfy
    a pull in another: use a fresh namespace (the default of `pull`) for a pull that really
    fetches everything.
    """

    _ns_counter = itertools.count(1)

    name = "containerd"
    stop_timeout = 15.0

    def __init__(self, workdir: Path, *, snapshotter: str = "native") -> None:
        self.workdir = Path(workdir)
        self.snapshotter = snapshotter
        self.containerd_bin = need_binary("containerd")
        self.ctr_bin = need_binary("ctr")
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def socket(self) -> Path:
        return self.workdir / "containerd.sock"

    @property
    def log_path(self) -> Path:
        return self.workdir / "containerd.log"

    def _config(self) -> str:
        w = self.workdir
        disabled = [
            "io.containerd.grpc.v1.cri",
            "io.containerd.snapshotter.v1.btrfs",
            "io.containerd.snapshotter.v1.zfs",
            "io.containerd.snapshotter.v1.devmapper",
            "io.containerd.snapshotter.v1.aufs",
            "io.containerd.tracing.processor.v1.otlp",
            "io.containerd.internal.v1.tracing",
        ]
        return "\n".join(
            [
                "version = 2",
                f'root = "{w / "root"}"',
                f'state = "{w / "state"}"',
                "disabled_plugins = [" + ", ".join(f'"{p}"' for p in disabled) + "]",
                "[grpc]",
                f'  address = "{self.socket}"',
                "[ttrpc]",
                f'  address = "{self.socket}.ttrpc"',
                "[debug]",
                '  address = ""',
                "[metrics]",
                '  address = ""',
                '[plugins."io.containerd.internal.v1.opt"]',
                f'  path = "{w / "opt"}"',
                '[plugins."io.containerd.metadata.v1.bolt"]',
                '  content_sharing_policy = "isolated"',
                "",
            ]
        )

    def start(self, timeout: float = 30) -> Containerd:
        if os.geteuid() != 0:
            raise RigError("containerd needs root")
        self.workdir.mkdir(parents=True, exist_ok=True)
        cfg = self.workdir / "config.toml"
        cfg.write_text(self._config())
        self._proc = start_process([self.containerd_bin, "--config", cfg], self.log_path)
        wait_started(
            lambda: self.ctr("version", timeout=10, check=False).returncode == 0,
            stop=self.stop,
            timeout=timeout,
            interval=0.1,
            what="containerd",
            alive=self._dead,
        )
        return self

    def ctr(
        self, *args: str, namespace: str = "default", timeout: float = 300, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """Run `ctr -a SOCK -n NAMESPACE args...`."""
        env = dict(os.environ)
        env.pop("CONTAINERD_ADDRESS", None)
        env.pop("CONTAINERD_NAMESPACE", None)
        return run(
            [self.ctr_bin, "-a", str(self.socket), "-n", namespace, *args], timeout=timeout, env=env, check=check
        )

    @classmethod
    def fresh_namespace(cls, prefix: str = "rig") -> str:
        return f"{prefix}-{os.getpid()}-{next(cls._ns_counter)}"

    def pull(
        self,
        ref: str,
        *,
        hosts_dir: Path | None = None,
        namespace: str | None = None,
        platform: str | None = None,
        all_platforms: bool = False,
        unpack: bool = True,
        user: tuple[str, str] | None = None,
        plain_http: bool = False,
        timeout: float = 300,
    ) -> CtrPull:
        """Pull `ref` (e.g. `docker.io/library/alpine-test:latest`) through the mirrors in
        hosts_dir. unpack=True uses `ctr images pull` with the native snapshotter (works here);
        unpack=False uses `ctr content fetch` (download and register content only)."""
        ns = namespace or self.fresh_namespace()
        args: list[str] = []
        if hosts_dir is not None:
            args += ["--hosts-dir", str(hosts_dir)]
        if plain_http:
            args.append("--plain-http")
        if user:
            args += ["--user", f"{user[0]}:{user[1]}"]
        if platform:
            args += ["--platform", platform]
        if all_platforms:
            args.append("--all-platforms")
        if unpack:
            out = self.ctr(
                "images", "pull", "--snapshotter", self.snapshotter, *args, ref, namespace=ns, timeout=timeout
            )
        else:
            out = self.ctr("content", "fetch", *args, ref, namespace=ns, timeout=timeout)
        img = self.image(ref, namespace=ns)
        return CtrPull(ns, ref, img["digest"], img["type"], self.content(namespace=ns), out.stdout + out.stderr)

    def images(self, *, namespace: str = "default") -> list[dict[str, str]]:
        """`ctr images ls` as dicts (ref, type, digest, size, platforms)."""
        out = self.ctr("images", "ls", namespace=namespace).stdout.splitlines()
        rows = []
        for line in out[1:]:
            f = line.split()
            if len(f) >= 3:
                rows.append({"ref": f[0], "type": f[1], "digest": f[2], "rest": " ".join(f[3:])})
        return rows

    def image(self, ref: str, *, namespace: str = "default") -> dict[str, str]:
        for row in self.images(namespace=namespace):
            if row["ref"] == ref:
                return row
        raise RigError(f"containerd has no image {ref} in namespace {namespace}")

    def content(self, *, namespace: str = "default") -> dict[str, int]:
        """digest -> exact size of every committed blob in a namespace (sizes from the store on disk)."""
        out = self.ctr("content", "ls", "-q", namespace=namespace).stdout.split()
        blobs = self.workdir / "root" / "io.containerd.content.v1.content" / "blobs"
        res: dict[str, int] = {}
        for digest in out:
            if ":" in digest:
                algo, _, hexd = digest.partition(":")
                p = blobs / algo / hexd
                res[digest] = p.stat().st_size if p.exists() else -1
        return res

    def remove_namespace(self, namespace: str) -> None:
        """Delete a namespace's images and content (so the next pull fetches again)."""
        for row in self.images(namespace=namespace):
            self.ctr("images", "rm", "--sync", row["ref"], namespace=namespace, check=False)
        digests = list(self.content(namespace=namespace))
        if digests:
            self.ctr("content", "rm", *digests, namespace=namespace, check=False)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


__all__ = [
    "DEAD_SERVER",
    "DOCKER_HUB_HOSTS",
    "Containerd",
    "CopyResult",
    "CtrPull",
    "Dockerd",
    "Podman",
    "ensure_hosts_entries",
    "need_binary",
    "skopeo_copy",
    "skopeo_inspect",
    "write_hosts_toml",
]
