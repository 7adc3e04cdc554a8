"""Debian's pebble (a real ACME CA for tests) with pebble-challtestsrv as its DNS server.

challtestsrv answers every name with 127.0.0.1, so pebble's HTTP-01 validation really connects
to cargohold's plain-HTTP listener (`http_port`). Pebble's own HTTPS (the ACME directory) uses a
certificate from a TestCA: give cargohold `ca_pem` as `tls.acme.ca_bundle`. The certificates it
issues chain to a root created at start, served at the management listener's `/roots/0`.
"""

from __future__ import annotations

import json
import os
import ssl
import subprocess
import urllib.request
from pathlib import Path

from .certs import TestCA
from .clients import need_binary
from .util import Managed, free_port, start_process, stop_process, tail, wait_started


class Pebble(Managed):
    """One pebble + challtestsrv pair; `validity` (seconds) shortens issued certificates for renewal tests.

    The listener certificate and `ca_pem` exist from construction, so a test can point a client at a
    pebble that is not started yet (a CA that is down)."""

    def __init__(self, workdir: Path, *, http_port: int, validity: int | None = None) -> None:
        self.workdir = Path(workdir)
        self.http_port = http_port
        self.validity = validity
        self.port = free_port()
        self.management_port = free_port()
        self.dns_port = free_port()
        self.ca_pem = self.workdir / "pebble-listener-ca.pem"
        self.log_path = self.workdir / "pebble.log"
        self.dns_log_path = self.workdir / "challtestsrv.log"
        self._procs: list[subprocess.Popen[bytes]] = []
        self.workdir.mkdir(parents=True, exist_ok=True)
        ca = TestCA.create("pebble listener test root")
        ca.write_root(self.ca_pem)
        self._listener = (self.workdir / "listener.pem", self.workdir / "listener.key")
        ca.issue(*self._listener, ["localhost", "pebble"], ["127.0.0.1"])

    @property
    def directory(self) -> str:
        return f"https://127.0.0.1:{self.port}/dir"

    def _ssl(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca_pem))

    def _get(self, url: str) -> bytes:
        with urllib.request.urlopen(url, context=self._ssl(), timeout=10) as resp:
            return resp.read()

    def root_pem(self) -> bytes:
        """The root that signs what pebble issues (new for every pebble process)."""
        return self._get(f"https://127.0.0.1:{self.management_port}/roots/0")

    def start(self, timeout: float = 30) -> Pebble:
        cert, key = self._listener
        config: dict[str, object] = {
            "listenAddress": f"127.0.0.1:{self.port}",
            "managementListenAddress": f"127.0.0.1:{self.management_port}",
            "certificate": str(cert),
            "privateKey": str(key),
            "httpPort": self.http_port,
            "tlsPort": free_port(),
            "ocspResponderURL": "",
            "externalAccountBindingRequired": False,
        }
        if self.validity is not None:
            config["certificateValidityPeriod"] = self.validity
        config_path = self.workdir / "pebble-config.json"
        config_path.write_text(json.dumps({"pebble": config}, indent=2))
        self._procs.append(
            start_process(
                [
                    need_binary("pebble-challtestsrv"),
                    "-defaultIPv4", "127.0.0.1", "-defaultIPv6", "",
                    "-dns01", f"127.0.0.1:{self.dns_port}",
                    "-http01", "", "-https01", "", "-tlsalpn01", "",
                    "-management", f"127.0.0.1:{free_port()}",
                ],
                self.dns_log_path,
            )
        )  # fmt: skip
        env = dict(os.environ, PEBBLE_VA_NOSLEEP="1", PEBBLE_WFE_NONCEREJECT="0")
        self._procs.append(
            start_process(
                [need_binary("pebble"), "-config", config_path, "-dnsserver", f"127.0.0.1:{self.dns_port}"],
                self.log_path,
                env=env,
            )
        )
        wait_started(
            lambda: b"newOrder" in self._get(self.directory),
            stop=self.stop,
            timeout=timeout,
            interval=0.1,
            what="pebble's ACME directory",
            alive=self._dead,
        )
        return self

    def _dead(self) -> str | None:
        for p, log in zip(self._procs, (self.dns_log_path, self.log_path), strict=False):
            if p.poll() is not None:
                return f"{p.args[0]} exited {p.returncode}: {tail(log)}"
        return None

    def stop(self) -> None:
        for p in reversed(self._procs):
            stop_process(p, timeout=5)
        self._procs.clear()

    def log_text(self) -> str:
        return tail(self.log_path, 8000)
