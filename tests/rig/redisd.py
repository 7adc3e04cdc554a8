"""A private redis-server on loopback for tests that share state between cargohold replicas."""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path

from .clients import need_binary
from .util import ManagedProcess, free_port, start_process, wait_until


class RedisServer(ManagedProcess):
    """redis-server on 127.0.0.1 and a free port, without persistence, its files in `workdir`."""

    name = "redis-server"

    def __init__(self, workdir: Path) -> None:
        self.workdir = Path(workdir)
        self.port = free_port()
        self.log_path = self.workdir / "redis.log"
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def ping(self) -> bool:
        with socket.create_connection(("127.0.0.1", self.port), timeout=2) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")

    def start(self, timeout: float = 20) -> RedisServer:
        cmd = [need_binary("redis-server", "/usr/bin/redis-server"), "--bind", "127.0.0.1", "--port", str(self.port)]
        cmd += ["--save", "", "--appendonly", "no", "--dir", str(self.workdir)]
        self._proc = start_process(cmd, self.log_path)
        wait_until(self.ping, timeout=timeout, what="redis-server to answer PING", alive=self._dead)
        return self
