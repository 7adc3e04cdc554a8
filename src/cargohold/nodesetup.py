"""`cargohold node-setup install|uninstall`: point a node's container runtime at the mirror.

Run on every node (a DaemonSet with the node's /etc mounted under `--root`). It writes, for each
mirrored registry, containerd's `certs.d/<registry>/hosts.toml` and one CRI-O/podman
`registries.conf.d` drop-in. The original registry stays the fallback in both, so pulls keep
working when the mirror is down. containerd sends `?ns=<registry>`, so one mirror address serves
every registry; CRI-O/podman do not, so their mirror location carries the registry as a path prefix
(`mirror:5000/ghcr.io`), which cargohold routes the same way.

Every file it writes starts with MARK, and each config directory gets a state file naming the files
and directories it created: `uninstall` removes exactly those (a file only while it still carries
MARK) and leaves everything else, pre-existing `hosts.toml` files included, as it was.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

MARK = "# Written by cargohold node-setup; `cargohold node-setup uninstall` removes it. Edits are overwritten."
STATE_FILE = ".cargohold-node-setup.json"
CONTAINERD_DIR = "/etc/containerd/certs.d"
CONTAINERS_DIR = "/etc/containers/registries.conf.d"
DROP_IN = "50-cargohold.conf"
#: Where a registry's fallback is when no server is given (containerd's own default for docker.io).
KNOWN_SERVERS = {"docker.io": "https://registry-1.docker.io"}
_REGISTRY = re.compile(r"[a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?(:[0-9]{1,5})?")
_URL_CHARS = re.compile(r"[A-Za-z0-9._~:/\[\]-]+")
MAX_STATE_BYTES = 1 << 20


class SetupError(Exception):
    """A bad argument or a node file in the way; one line for the operator."""


@dataclass(frozen=True)
class Registry:
    """One mirrored registry and the server the runtime falls back to."""

    name: str
    server: str

    @classmethod
    def parse(cls, text: str) -> Registry:
        """`ghcr.io` or `ghcr.io=https://ghcr.io` (the fallback; tests use a dead loopback port)."""
        name, _, server = text.partition("=")
        name = name.strip().lower()
        if not _REGISTRY.fullmatch(name) or ".." in name:
            raise SetupError(f"--registry {text!r}: expected a registry host such as ghcr.io or example.com:5000")
        return cls(name, check_url(server or KNOWN_SERVERS.get(name, f"https://{name}"), f"--registry {name}"))


@dataclass(frozen=True)
class Mirror:
    """The mirror's address as nodes reach it, and how to trust it."""

    url: str
    ca: str | None = None
    skip_verify: bool = False

    @property
    def insecure(self) -> bool:
        """CRI-O's `insecure`: plain HTTP, or TLS without verification."""
        return self.skip_verify or self.url.startswith("http://")


def check_url(url: str, what: str) -> str:
    """An http(s) URL with a host, no query, and nothing that could break out of a TOML string."""
    url = url.strip().rstrip("/")
    if "$(" in url:  # Kubernetes leaves $(NAME) as is when NAME is not in the pod's environment
        raise SetupError(f"{what}: {url!r} names a variable the pod does not have (created before the Service?)")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
        raise SetupError(f"{what}: {url!r} is not an http(s) URL with a host")
    if not _URL_CHARS.fullmatch(url.partition("://")[2]):
        raise SetupError(f"{what}: {url!r} has characters a registry address cannot have")
    return url


def _toml(value: str) -> str:
    return json.dumps(value)  # checked URLs and hosts: a JSON string is a TOML basic string


def hosts_toml(registry: Registry, mirror: Mirror) -> str:
    """containerd's hosts.toml: the mirror first, `server` (the registry itself) when it fails."""
    lines = [MARK, f"server = {_toml(registry.server)}", "", f"[host.{_toml(mirror.url)}]"]
    lines.append('  capabilities = ["pull", "resolve"]')
    if mirror.url.endswith("/v2"):
        lines.append("  override_path = true  # the URL's path is the API root")
    if mirror.ca:
        lines.append(f"  ca = {_toml(mirror.ca)}")
    if mirror.skip_verify:
        lines.append("  skip_verify = true")
    return "\n".join(lines) + "\n"


def _location(url: str) -> str:
    parts = urlsplit(url)
    return parts.netloc + parts.path


def registries_conf(registries: Iterable[Registry], mirror: Mirror) -> str:
    """The CRI-O/podman drop-in: one `[[registry]]` per registry, the mirror as its `[[registry.mirror]]`."""
    lines = [MARK]
    for reg in registries:
        lines += ["", "[[registry]]", f"prefix = {_toml(reg.name)}", f"location = {_toml(_location(reg.server))}"]
        if reg.server.startswith("http://"):
            lines.append("insecure = true")
        root = _location(mirror.url).removesuffix("/v2")  # containerd's override_path; CRI-O adds /v2 itself
        lines += ["", "[[registry.mirror]]", f"location = {_toml(root + '/' + reg.name)}"]
        lines.append('pull-from-mirror = "all"')
        if mirror.insecure:
            lines.append("insecure = true")
    return "\n".join(lines) + "\n"


def _ours(path: Path) -> bool:
    """A regular file (not a link) whose first line is MARK."""
    if path.is_symlink() or not path.is_file():
        return False
    with path.open("rb") as f:
        return f.read(len(MARK) + 1).rstrip(b"\r\n") == MARK.encode()


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.cargohold-tmp")
    with tmp.open("w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


@dataclass
class ConfigDir:
    """One runtime's config directory on the node, and what this agent created in it."""

    root: Path  # the node's / as mounted here
    path: str  # as the node sees it, e.g. /etc/containerd/certs.d
    created_dirs: list[str] = field(default_factory=list)  # node paths, outermost first
    files: list[str] = field(default_factory=list)
    log: list[str] = field(default_factory=list)

    def local(self, node_path: str) -> Path:
        return self.root / node_path.lstrip("/")

    @property
    def state_path(self) -> Path:
        return self.local(self.path) / STATE_FILE

    def load(self) -> ConfigDir:
        """Read what an earlier run created (a missing or foreign state file: nothing)."""
        path = self.state_path
        if not path.is_file() or path.is_symlink() or path.stat().st_size > MAX_STATE_BYTES:
            return self
        state = json.loads(path.read_text())
        if isinstance(state, dict):
            base = self.path.rstrip("/")
            related = [d for d in state.get("created_dirs", []) if isinstance(d, str) and d.startswith("/")]
            # only this directory, its ancestors and what is below it: never anything else on the node
            self.created_dirs = [d for d in related if base.startswith(d) or d.startswith(base + "/")]
            self.files = [f for f in state.get("files", []) if isinstance(f, str) and f.startswith(base + "/")]
        return self

    def _ensure_dir(self, node_dir: str) -> None:
        missing = []
        current = node_dir.rstrip("/")
        while current and not self.local(current).exists():
            missing.append(current)
            current = current.rsplit("/", 1)[0]
        for d in reversed(missing):
            self.local(d).mkdir(mode=0o755)
            self.created_dirs.append(d)

    def write(self, relative: str, text: str) -> str | None:
        """Write `relative` under this directory unless a file that is not ours is there; its node path."""
        node_path = f"{self.path.rstrip('/')}/{relative}"
        target = self.local(node_path)
        if target.is_symlink() or (target.exists() and not _ours(target)):
            self.log.append(f"left alone (not written by cargohold): {node_path}")
            return None
        self._ensure_dir(node_path.rsplit("/", 1)[0])
        if node_path not in self.files:
            self.files.append(node_path)
            self.save()  # first: what this run creates is never forgotten, even if it fails half-way
        _write_atomically(target, text)
        self.log.append(f"wrote {node_path}")
        return node_path

    def sync(self, wanted: Mapping[str, str]) -> list[str]:
        """Write `wanted` (relative path -> text), remove our other files, record what is ours; the log."""
        kept = [p for relative, text in wanted.items() if (p := self.write(relative, text)) is not None]
        self.remove(keep=kept)
        self.save()
        return self.log

    def remove(self, keep: Sequence[str] = ()) -> None:
        """Remove our files not in `keep`, then the directories we created that are left empty."""
        for node_path in [f for f in self.files if f not in keep]:
            target = self.local(node_path)
            if _ours(target):
                target.unlink()
                self.log.append(f"removed {node_path}")
            elif target.exists():
                self.log.append(f"left alone (edited since): {node_path}")
            self.files.remove(node_path)
        if not self.files:
            self.state_path.unlink(missing_ok=True)
        for d in reversed(list(self.created_dirs)):
            try:
                self.local(d).rmdir()
            except FileNotFoundError:
                pass
            except OSError:
                continue  # not empty: someone else's files, or ours still in use
            self.created_dirs.remove(d)

    def save(self) -> None:
        if self.files:
            state = {"created_dirs": self.created_dirs, "files": self.files}
            _write_atomically(self.state_path, json.dumps(state, indent=1) + "\n")


def install(
    root: Path, registries: Sequence[Registry], mirror: Mirror, *, containerd: str | None, containers: str | None
) -> list[str]:
    """Write every file (idempotent; files of registries no longer listed go); returns what it did."""
    log: list[str] = []
    if containerd:
        hosts = {f"{r.name}/hosts.toml": hosts_toml(r, mirror) for r in registries}
        log += ConfigDir(root, containerd).load().sync(hosts)
    if containers:
        served = [r for r in registries if ":" not in r.name]  # a host:port cannot be a path component
        log += [
            f"skipped for CRI-O/podman (a port cannot be in a mirror's path): {r.name}"
            for r in registries
            if r not in served
        ]
        log += ConfigDir(root, containers).load().sync({DROP_IN: registries_conf(served, mirror)} if served else {})
    return log


def uninstall(root: Path, *, containerd: str | None, containers: str | None) -> list[str]:
    """Remove what `install` wrote and the directories it created; nothing else."""
    log: list[str] = []
    for path in (containerd, containers):
        if path:
            cdir = ConfigDir(root, path).load()
            cdir.remove()
            log += cdir.log
    return log


def add_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register `node-setup install|uninstall` on the main parser."""
    node = commands.add_parser("node-setup", help="point this node's containerd / CRI-O at the mirror")
    modes = node.add_subparsers(dest="node_command", required=True)
    inst = modes.add_parser("install", help="write hosts.toml files and the registries.conf.d drop-in")
    inst.add_argument("--mirror", required=True, help="the mirror's URL as nodes reach it, e.g. http://10.96.0.50:5000")
    inst.add_argument(
        "--registry",
        action="append",
        required=True,
        metavar="NAME[=SERVER]",
        help="a mirrored registry (repeat); SERVER is its fallback URL (default https://NAME)",
    )
    inst.add_argument("--ca", help="CA file on the node to verify the mirror with (containerd `ca`)")
    inst.add_argument("--skip-verify", action="store_true", help="do not verify the mirror's certificate")
    inst.add_argument("--wait", action="store_true", help="then wait for SIGTERM and uninstall (a DaemonSet pod)")
    uninst = modes.add_parser("uninstall", help="remove what install wrote")
    for p in (inst, uninst):
        p.add_argument("--root", default="/", help="where the node's / is mounted (default /)")
        p.add_argument("--containerd-dir", default=CONTAINERD_DIR, help="containerd's config_path; '' to skip")
        p.add_argument("--containers-dir", default=CONTAINERS_DIR, help="CRI-O/podman registries.conf.d; '' to skip")


_END = {signal.SIGTERM, signal.SIGINT}  # a pod's end; as PID 1 there are no default handlers


def run(args: argparse.Namespace) -> int:
    """Carry out `node-setup`; 2 for bad arguments, 1 for a node file in the way or unreadable."""
    root = Path(args.root)
    waiting = args.node_command == "install" and args.wait
    if waiting:  # held from the start: a SIGTERM during install must still lead to the uninstall
        signal.pthread_sigmask(signal.SIG_BLOCK, _END)
    dirs = {"containerd": args.containerd_dir or None, "containers": args.containers_dir or None}
    try:
        if args.node_command == "uninstall":
            log = uninstall(root, **dirs)
        else:
            if args.ca is not None and not args.ca.startswith("/"):
                raise SetupError(f"--ca {args.ca!r}: expected an absolute path on the node")
            mirror = Mirror(check_url(args.mirror, "--mirror"), args.ca, args.skip_verify)
            registries = list({r.name: r for r in map(Registry.parse, args.registry)}.values())
            log = install(root, registries, mirror, **dirs)
    except SetupError as exc:
        print(f"cargohold node-setup: {exc}", file=sys.stderr)
        return 2
    except (OSError, ValueError) as exc:
        print(f"cargohold node-setup: {exc}", file=sys.stderr)
        return 1
    print("\n".join(log) or "nothing to do", flush=True)
    if waiting:
        signal.sigwait(_END)
        print("\n".join(uninstall(root, **dirs)) or "nothing to remove", flush=True)
    return 0
