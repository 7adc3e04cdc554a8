"""Run cargohold itself as a subprocess (`python -m cargohold serve --config FILE`).

Used by the `cargohold` pytest fixture and by benchmark scripts. The contract: the server
reads the YAML config, listens on `listen`, and answers `GET /health` with 200 when ready.
"""

from __future__ import annotations

import copy
import os
import signal
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from .util import ManagedProcess, RigError, free_port, http_request, start_process, stop_process, tail, wait_until

REPO_ROOT = Path(__file__).resolve().parents[2]
CRASH_MARKS = ("Traceback (most recent call last)", "Unhandled exception", "Error handling request")


def deep_merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """Merge `over` into a copy of `base`: dicts merge recursively, anything else replaces;
    a value of None deletes the key."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        if v is None:
            out.pop(k, None)
        elif isinstance(v, Mapping) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


class Cargohold(ManagedProcess):
    """One cargohold server process with its own port, data dir, config file and log.

    Args:
        workdir: a temp dir; holds config.yml, data/ and cargohold.log.
        upstream_url: the hub's front URL (upstreams[0].url).
        overrides: merged into the whole config dict (deep_merge, None deletes).
        upstream: merged into upstreams[0] (e.g. {"tag_ttl": "0s", "username": ...}).
        env: extra environment variables (e.g. CARGOHOLD_* settings).
    """

    name = "cargohold"

    def __init__(
        self,
        workdir: Path,
        upstream_url: str,
        *,
        overrides: Mapping[str, Any] | None = None,
        upstream: Mapping[str, Any] | None = None,
        env: Mapping[str, str] | None = None,
        host: str = "127.0.0.1",
        port: int | None = None,
        python: str = sys.executable,
    ) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.host = host
        self.port = port or free_port(host)
        self.data_dir = self.workdir / "data"
        self.config_path = self.workdir / "config.yml"
        self.log_path = self.workdir / "cargohold.log"
        self.python = python
        self.extra_env = dict(env or {})
        up = deep_merge({"name": "docker.io", "url": upstream_url, "tag_ttl": "10m"}, upstream or {})
        base: dict[str, Any] = {
            "listen": f"{host}:{self.port}",
            "data_dir": str(self.data_dir),
            "upstreams": [up],
            # Nothing else: tests run what ships (rate limiting on, default timeouts) and change only
            # what they are about, saying why.
        }
        self.config: dict[str, Any] = deep_merge(base, overrides or {})
        self._proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def netloc(self) -> str:
        """`host:port`, for image references like `{netloc}/library/alpine-test:latest`."""
        return f"{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def write_config(self) -> None:
        self.config_path.write_text(yaml.safe_dump(self.config, sort_keys=False))

    def command(self) -> list[str]:
        return [self.python, "-m", "cargohold", "serve", "--config", str(self.config_path)]

    def _env(self) -> dict[str, str]:
        # cargohold honours HTTP(S)_PROXY/NO_PROXY: only a test's own `env` may set them.
        env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
        src = REPO_ROOT / "src"
        if (src / "cargohold").is_dir():  # works with or without an editable install
            env["PYTHONPATH"] = os.pathsep.join(p for p in (str(src), env.get("PYTHONPATH", "")) if p)
        env["PYTHONUNBUFFERED"] = "1"
        env.update(self.extra_env)
        return env

    def start(self, *, wait: bool = True, timeout: float = 20) -> Cargohold:
        """Write the config and start the server; with wait, block until /health is 200."""
        if self.running:
            raise RigError("cargohold is already running")
        self.write_config()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as f:
            f.write(f"\n===== start #{self.starts + 1}: {' '.join(self.command())}\n".encode())
        self._proc = start_process(self.command(), self.log_path, env=self._env(), cwd=REPO_ROOT)
        self.starts += 1
        if wait:
            self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 20) -> None:
        """Poll GET /health until 200 (bounded); fail with the log tail if the process dies."""

        try:
            wait_until(
                lambda: http_request("GET", f"{self.url}/health", timeout=2).status == 200,
                timeout=timeout,
                interval=0.05,
                what=f"cargohold /health on {self.url}",
                alive=self._dead,
            )
        except RigError as exc:
            raise RigError(f"{exc}\n--- cargohold log ---\n{tail(self.log_path)}") from None

    def stop(self, timeout: float = 15) -> int | None:
        """SIGTERM (graceful), SIGKILL after timeout; returns the exit code."""
        p = self._proc
        stop_process(p, timeout=timeout)
        self._proc = None
        return p.returncode if p else None

    def kill(self) -> int | None:
        """SIGKILL at once (crash tests): no cleanup runs in the server."""
        p = self._proc
        stop_process(p, timeout=0, sig=signal.SIGKILL)
        self._proc = None
        return p.returncode if p else None

    def restart(self, *, wait: bool = True, timeout: float = 20, graceful: bool = True) -> Cargohold:
        """Stop (or kill) and start again on the same port, data dir and config."""
        if graceful:
            self.stop()
        else:
            self.kill()
        return self.start(wait=wait, timeout=timeout)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def crashes(self) -> list[str]:
        """Log lines that show an error escaped the server's handling (a traceback, aiohttp's
        "Unhandled exception"): never acceptable, whatever a test provoked."""
        return [line for line in self.log_text().splitlines() if any(m in line for m in CRASH_MARKS)]


__all__ = ["Cargohold", "deep_merge"]
