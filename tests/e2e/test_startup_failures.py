"""A start that fails says why in one line and exits non-zero, for every way start-up can fail.

Before the fix, a failure inside the app's start-up (a missing users file) left the cleanup contexts
already entered to the event loop's finalizer, which logged three `generator didn't stop after athrow()`
tracebacks before the one-line error; an unusable data_dir ended in a bare traceback.
"""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from rig.util import free_port


def start(tmp_path: Path, **config: object) -> subprocess.CompletedProcess[str]:
    """`cargohold serve` with a minimal config plus `config`; returns once it has exited."""
    base: dict[str, object] = {
        "listen": f"127.0.0.1:{free_port()}",
        "data_dir": str(tmp_path / "data"),
        "upstreams": [{"name": "docker.io", "url": "http://127.0.0.1:9"}],
    }
    path = tmp_path / "cargohold.yaml"
    path.write_text(yaml.safe_dump({**base, **config}))
    return subprocess.run(
        [sys.executable, "-m", "cargohold", "serve", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
        check=False,
    )


def one_line_failure(proc: subprocess.CompletedProcess[str]) -> str:
    """The failed start's only output line (stdout and stderr together)."""
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    assert proc.returncode != 0, lines
    assert len(lines) == 1, "\n".join(lines)
    return lines[0]


def test_config_error(tmp_path: Path) -> None:
    line = one_line_failure(start(tmp_path, listen="nowhere"))
    assert line.startswith("cargohold: config error:") and "listen" in line


def test_missing_users_file(tmp_path: Path) -> None:
    """The documented first-run mistake: the container started before `user add`."""
    missing = tmp_path / "htpasswd"
    line = one_line_failure(start(tmp_path, auth={"htpasswd": str(missing)}))
    assert "config error: auth.htpasswd: cannot read htpasswd file" in line and str(missing) in line


def test_port_in_use(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = f"127.0.0.1:{taken.getsockname()[1]}"
        line = one_line_failure(start(tmp_path, listen=address))
    assert f"cannot start: cannot listen on {address}" in line and "address already in use" in line


@pytest.mark.parametrize("blocked", ["data_dir is a file", "data_dir under a file"])
def test_unusable_data_dir(tmp_path: Path, blocked: str) -> None:
    """Tests run as root, for whom no mode bit makes a directory unreadable: a path that cannot be a
    directory fails the same way (the container test covers a volume owned by another uid)."""
    afile = tmp_path / "afile"
    afile.write_text("")
    data_dir = afile if blocked == "data_dir is a file" else afile / "data"
    line = one_line_failure(start(tmp_path, data_dir=str(data_dir)))
    assert "cannot start: cannot open" in line and str(afile) in line


def test_unusable_data_dir_with_acme(tmp_path: Path) -> None:
    """With ACME the placeholder certificate is the first thing written to data_dir."""
    afile = tmp_path / "afile"
    afile.write_text("")
    acme = {"domains": ["registry.example.com"], "email": "ops@example.com", "directory": "https://127.0.0.1:9/dir"}
    http = f"127.0.0.1:{free_port()}"
    line = one_line_failure(start(tmp_path, data_dir=str(afile / "data"), http_listen=http, tls={"acme": acme}))
    assert "cannot start: tls.acme: cannot write" in line and str(afile) in line


def test_bad_certificate(tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.write_text("-----BEGIN CERTIFICATE-----\nnot one\n-----END CERTIFICATE-----\n")
    key.write_text("")
    line = one_line_failure(start(tmp_path, tls={"cert": str(cert), "key": str(key)}))
    assert "cannot start: tls.cert/tls.key: cannot load" in line
