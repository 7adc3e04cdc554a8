"""Another worker process that holds a download lock (`cache/filelocks.py`) until the test kills it."""

from __future__ import annotations

import fcntl
import os
import signal
from collections.abc import Callable


def hold_in_child(lock: str, then: Callable[[], None] = lambda: None) -> int:
    """Fork a process that takes the flock on `lock`, runs `then` and waits to be killed; its pid, once it
    holds the lock and `then` is done. Kill it with `kill`: it cleans nothing up."""
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(ready_r)
        held = os.open(lock, os.O_RDWR | os.O_CREAT)
        fcntl.flock(held, fcntl.LOCK_EX)
        then()
        os.write(ready_w, b"x")
        signal.pause()
        os._exit(0)
    os.close(ready_w)
    try:
        assert os.read(ready_r, 1) == b"x"
    finally:
        os.close(ready_r)
    return pid


def kill(pid: int) -> None:
    """SIGKILL a process of `hold_in_child` and reap it: once this returns, its pid is gone."""
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
