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

It runs as root in directories others may write to, so it trusts nothing found there: no symlink below
`--root` is followed (a link where a directory or file should be is left alone), temporary files are
new files of random names, and a state file it did not write (not JSON, another shape, a path outside
its directory) counts as empty with one warning line, never as a reason to touch anything.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import posixpath
import re
import secrets
import signal
import stat
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
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


def node_parts(path: str) -> tuple[str, ...]:
    """An absolute node path's components; ValueError for a relative one or one with `..` (never resolved)."""
    if not path.startswith("/") or "\0" in path or ".." in path.split("/"):
        raise ValueError(f"{path!r} is not an absolute path without '..'")
    return tuple(p for p in posixpath.normpath(path).split("/") if p)


def _node(parts: Sequence[str]) -> str:
    return "/" + "/".join(parts)


def _read_regular(dir_fd: int, name: str, limit: int) -> bytes | None:
    """Up to `limit` bytes of `name` if it is a regular file; None for anything else: a link is not
    followed, and a FIFO or device is never opened (opening one can block, or do something)."""
    if not stat.S_ISREG(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode):
        return None
    fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
    with os.fdopen(fd, "rb") as f:
        return f.read(limit) if stat.S_ISREG(os.fstat(fd).st_mode) else None  # swapped meanwhile


def _ours(dir_fd: int, name: str) -> bool:
    """A regular file whose first line is MARK."""
    try:
        head = _read_regular(dir_fd, name, len(MARK) + 1)
    except OSError:
        return False
    return head is not None and head.rstrip(b"\r\n") == MARK.encode()


def _present(dir_fd: int, name: str) -> bool:
    try:
        os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True


def _write_atomically(dir_fd: int, name: str, text: str) -> None:
    """A new file of a random name (O_EXCL: never an existing path, nor through a link), renamed over `name`."""
    tmp = f".{name}.{secrets.token_hex(8)}.cargohold-tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644, dir_fd=dir_fd)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fchmod(fd, 0o644)  # whatever the umask
            os.fsync(fd)
        os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        with suppress(FileNotFoundError):
            os.unlink(tmp, dir_fd=dir_fd)
        raise
    os.fsync(dir_fd)


class ForeignState(ValueError):
    """A state file this agent did not write: ignored, as if there were none."""


@dataclass
class ConfigDir:
    """One runtime's config directory on the node, and what this agent created in it.

    Everything below `root` is reached one component at a time from a directory fd, never following a
    symlink: a link (or a file) where a directory should be is left alone, whatever it points to.
    """

    root: Path  # the node's / as mounted here (the operator's path: followed)
    path: str  # as the node sees it, e.g. /etc/containerd/certs.d
    created_dirs: list[str] = field(default_factory=list)  # node paths, outermost first
    files: list[str] = field(default_factory=list)
    log: list[str] = field(default_factory=list)
    parts: tuple[str, ...] = field(init=False)
    has_state: bool = field(default=False, init=False)  # a state file of ours is there

    def __post_init__(self) -> None:
        try:
            self.parts = node_parts(self.path)
        except ValueError as exc:
            raise SetupError(f"config directory {exc}") from None

    def _note(self, line: str) -> None:
        if line not in self.log:
            self.log.append(line)

    @contextmanager
    def _opened(self, parts: tuple[str, ...], *, create: bool) -> Iterator[int | None]:
        """The directory at node path `parts` as an fd; None where a component is missing (and not to be
        created here), or is a symlink or no directory (logged)."""
        fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            for depth in range(1, len(parts) + 1):
                child = self._child(fd, parts[:depth], create=create)
                if child is None:
                    yield None
                    return
                os.close(fd)
                fd = child
            yield fd
        finally:
            os.close(fd)

    def _child(self, parent: int, parts: tuple[str, ...], *, create: bool) -> int | None:
        try:
            return os.open(parts[-1], os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent)
        except FileNotFoundError:
            if not create:
                return None
        except OSError as exc:
            if exc.errno not in (errno.ENOTDIR, errno.ELOOP):
                raise
            self._note(f"left alone (a symlink or not a directory; not followed): {_node(parts)}")
            return None
        with suppress(FileExistsError):  # made by someone else meanwhile: theirs
            os.mkdir(parts[-1], 0o755, dir_fd=parent)
            self.created_dirs.append(_node(parts))
        return self._child(parent, parts, create=False)

    def load(self) -> ConfigDir:
        """Read what an earlier run created; a missing state file is nothing, a foreign one too (logged)."""
        try:
            with self._opened(self.parts, create=False) as fd:
                raw = None if fd is None else _read_state(fd)
            if raw is None:
                return self
            try:
                state = json.loads(raw)
            except (ValueError, RecursionError) as exc:
                raise ForeignState("not JSON, or nested too deep") from exc
            self.created_dirs, self.files = self._checked(state)
            self.has_state = True
        except ValueError as exc:  # one line, never a traceback: a pod that crash-loops on it fixes nothing
            self._note(f"ignored, as if empty ({exc}): {_node(self.parts)}/{STATE_FILE}")
        return self

    def _checked(self, state: object) -> tuple[list[str], list[str]]:
        """The state's paths, each genuinely in this directory (files) or on its way or in it (directories)."""
        if not isinstance(state, dict) or set(state) != {"created_dirs", "files"}:
            raise ForeignState("not the state's keys")
        lists = [state["created_dirs"], state["files"]]
        if not all(isinstance(v, list) and all(isinstance(p, str) for p in v) for v in lists):
            raise ForeignState("not lists of paths")
        n = len(self.parts)
        try:
            dirs, files = ([node_parts(p) for p in paths] for paths in lists)
        except ValueError:
            raise ForeignState("a path that is relative or has '..'") from None
        if not all(d and (d[:n] == self.parts or self.parts[: len(d)] == d) for d in dirs):
            raise ForeignState("a directory neither on the way to this one nor in it")
        if not all(len(f) > n and f[:n] == self.parts for f in files):
            raise ForeignState("a file not in this directory")
        return [_node(d) for d in dirs], [_node(f) for f in files]

    def write(self, relative: str, text: str) -> str | None:
        """Write `relative` under this directory unless a file that is not ours is there; its node path."""
        parts = (*self.parts, *relative.split("/"))
        node_path = _node(parts)
        with self._opened(parts[:-1], create=True) as fd:
            if fd is None:
                return None
            if _present(fd, parts[-1]) and not _ours(fd, parts[-1]):
                self._note(f"left alone (not written by cargohold): {node_path}")
                return None
            if node_path not in self.files:
                self.files.append(node_path)
                self.save()  # first: what this run creates is never forgotten, even if it fails half-way
            _write_atomically(fd, parts[-1], text)
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
            parts = node_parts(node_path)
            with self._opened(parts[:-1], create=False) as fd:
                if fd is not None and _ours(fd, parts[-1]):
                    os.unlink(parts[-1], dir_fd=fd)
                    self.log.append(f"removed {node_path}")
                elif fd is not None and _present(fd, parts[-1]):
                    self._note(f"left alone (edited since): {node_path}")
            self.files.remove(node_path)
        if not self.files and self.has_state:
            with self._opened(self.parts, create=False) as fd, suppress(FileNotFoundError):
                if fd is not None:
                    os.unlink(STATE_FILE, dir_fd=fd)
            self.has_state = False
        for d in reversed(list(self.created_dirs)):
            parts = node_parts(d)
            with self._opened(parts[:-1], create=False) as fd:
                if fd is None:
                    continue
                try:
                    os.rmdir(parts[-1], dir_fd=fd)  # never follows a link: ENOTDIR
                except FileNotFoundError:
                    pass
                except OSError:
                    continue  # not empty (someone else's files, or ours still in use), or no directory
            self.created_dirs.remove(d)

    def save(self) -> None:
        if self.files:
            state = {"created_dirs": self.created_dirs, "files": self.files}
            with self._opened(self.parts, create=False) as fd:
                if fd is not None:
                    _write_atomically(fd, STATE_FILE, json.dumps(state, indent=1) + "\n")
                    self.has_state = True


def _read_state(dir_fd: int) -> bytes | None:
    """The state file's bytes; None where there is none, ForeignState where it is no file of ours."""
    try:
        raw = _read_regular(dir_fd, STATE_FILE, MAX_STATE_BYTES + 1)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ForeignState("unreadable") from exc
    if raw is None:
        raise ForeignState("not a regular file")
    if len(raw) > MAX_STATE_BYTES:
        raise ForeignState("too large")
    return raw


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
