"""Small process and network helpers shared by the rig modules."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self


class RigError(RuntimeError):
    """Something in the rig itself failed (a server did not start, a command failed)."""


class CommandError(RigError):
    """A client command exited non-zero; carries its output so failures are readable."""

    def __init__(self, cmd: Sequence[str], returncode: int, stdout: str, stderr: str) -> None:
        self.cmd = list(cmd)
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr
        super().__init__(
            f"command failed ({returncode}): {' '.join(self.cmd)}\n"
            f"--- stdout ---\n{stdout[-4000:]}\n--- stderr ---\n{stderr[-4000:]}"
        )


def free_port(host: str = "127.0.0.1") -> int:
    """Ask the kernel for a free TCP port (racy by nature, but good enough on a private loopback)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def run(
    cmd: Sequence[str | os.PathLike[str]],
    *,
    timeout: float = 300,
    env: Mapping[str, str] | None = None,
    check: bool = True,
    cwd: str | os.PathLike[str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a command with a timeout; raise CommandError with its output when it fails."""
    args = [os.fspath(c) for c in cmd]
    try:
        proc = subprocess.run(
            args,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=dict(env) if env is not None else None,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            check=False,  # `check` below raises CommandError, with the output
        )
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        err = exc.stderr.decode() if isinstance(exc.stderr, bytes) else (exc.stderr or "")
        raise CommandError(args, -1, out, err + f"\n(timed out after {timeout}s)") from None
    if check and proc.returncode != 0:
        raise CommandError(args, proc.returncode, proc.stdout, proc.stderr)
    return proc


def start_process(
    cmd: Sequence[str | os.PathLike[str]],
    log_path: Path,
    *,
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
) -> subprocess.Popen[bytes]:
    """Start a daemon in its own process group (so stop can kill its children too), output to a log."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            [os.fspath(c) for c in cmd],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=dict(env) if env is not None else None,
            cwd=cwd,
        )


def stop_process(proc: subprocess.Popen[bytes] | None, *, timeout: float = 10.0, sig: int = signal.SIGTERM) -> None:
    """Signal a process group, wait (bounded), then SIGKILL the group; also reaps the leader."""
    if proc is None:
        return
    try:
        pgid = os.getpgid(proc.pid)
    except ProcessLookupError:
        pgid = None
    if proc.poll() is None:
        _signal_group(proc, pgid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=timeout)
    # Children of the group may outlive the leader (e.g. dockerd's containerd): kill them all.
    _signal_group(proc, pgid, signal.SIGKILL)
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired as exc:  # pragma: no cover - only on a wedged kernel
        raise RigError(f"process {proc.pid} did not die after SIGKILL") from exc


def _signal_group(proc: subprocess.Popen[bytes], pgid: int | None, sig: int) -> None:
    try:
        if pgid is not None and pgid == proc.pid:
            os.killpg(pgid, sig)
        elif proc.poll() is None:
            proc.send_signal(sig)
    except ProcessLookupError:
        pass


class Managed:
    """The rig's servers: `with Server(...) as s:` starts it and stops it however the block ends."""

    def start(self) -> Self:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class ManagedProcess(Managed):
    """A rig server that is one subprocess: how to tell it died (`wait_until`'s `alive`) and how to stop it."""

    name = "process"  # what messages call it
    stop_timeout = 10.0  # SIGTERM, then SIGKILL after this many seconds
    log_path: Path
    _proc: subprocess.Popen[bytes] | None = None

    def _dead(self) -> str | None:
        p = self._proc
        if p is None or p.poll() is None:
            return None
        return f"{self.name} exited with {p.returncode}; log:\n{tail(self.log_path)}"

    def stop(self) -> None:
        stop_process(self._proc, timeout=self.stop_timeout)
        self._proc = None


def wait_started(
    ready: Callable[[], bool],
    *,
    stop: Callable[[], None],
    timeout: float,
    interval: float,
    what: str,
    alive: Callable[[], str | None],
) -> None:
    """Wait until a server just launched is ready; stop it (and re-raise) if it never gets there."""
    try:
        wait_until(ready, timeout=timeout, interval=interval, what=what, alive=alive)
    except BaseException:
        stop()
        raise


def wait_until(
    predicate: Callable[[], bool],
    *,
    timeout: float,
    interval: float = 0.05,
    what: str = "condition",
    alive: Callable[[], str | None] | None = None,
) -> None:
    """Poll predicate until true or timeout; `alive` returns an error text when the thing we wait for died."""
    deadline = time.monotonic() + timeout
    while True:
        if alive is not None:
            dead = alive()
            if dead:
                raise RigError(f"while waiting for {what}: {dead}")
        try:
            if predicate():
                return
        except Exception:  # noqa: BLE001 - any failure just means "not yet"
            pass
        if time.monotonic() >= deadline:
            raise RigError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def tail(path: Path, limit: int = 6000) -> str:
    """Last `limit` characters of a log file (for error messages)."""
    try:
        data = path.read_bytes()
    except OSError:
        return ""
    return data[-limit:].decode(errors="replace")


@dataclass
class HttpResult:
    """A plain HTTP answer; redirects are not followed so tests can look at them."""

    status: int
    headers: dict[str, str]
    body: bytes
    header_list: list[tuple[str, str]] = field(default_factory=list)

    def json(self) -> object:
        import json

        return json.loads(self.body)

    def header(self, name: str, default: str | None = None) -> str | None:
        for k, v in self.header_list:
            if k.lower() == name.lower():
                return v
        return default


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):  # type: ignore[no-untyped-def]
        return None


_OPENER = urllib.request.build_opener(_NoRedirect, urllib.request.ProxyHandler({}))


def http_request(
    method: str,
    url: str,
    *,
    headers: Mapping[str, str] | None = None,
    body: bytes | None = None,
    timeout: float = 30,
) -> HttpResult:
    """Synchronous HTTP request without redirects, proxies or raising on 4xx/5xx."""
    req = urllib.request.Request(url, data=body, method=method, headers=dict(headers or {}))
    try:
        with _OPENER.open(req, timeout=timeout) as resp:
            data = resp.read()
            status = resp.status
            hlist = list(resp.headers.items())
    except urllib.error.HTTPError as err:
        data = err.read() if method != "HEAD" else b""
        status = err.code
        hlist = list(err.headers.items())
    return HttpResult(status, {k.lower(): v for k, v in hlist}, data, hlist)
