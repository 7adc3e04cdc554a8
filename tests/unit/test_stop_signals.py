"""A server that stopped on SIGTERM ignores the next one: a supervisor and a process group often both send
one. Left to the event loop's close, the loop's wakeup pipe was closed before its signal handlers went,
and a signal in between printed a traceback ("Exception ignored ... signal wakeup fd")."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from cargohold.config import Settings
from cargohold.serving import serve_until_stopped
from rig.util import free_port


@pytest.fixture(name="restored_signals")
def restored_signals_fixture() -> Iterator[None]:
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


@pytest.mark.usefixtures("restored_signals")
async def test_a_stopped_server_has_let_go_of_its_signals(tmp_path: Path) -> None:
    settings = Settings.model_validate(
        {
            "data_dir": str(tmp_path),
            "listen": f"127.0.0.1:{free_port()}",
            "upstreams": [{"name": "docker.io", "url": "http://127.0.0.1:9"}],
        }
    )
    serving = asyncio.create_task(serve_until_stopped(settings))
    await asyncio.sleep(0.5)  # listening
    os.kill(os.getpid(), signal.SIGTERM)
    async with asyncio.timeout(30):
        await serving
    assert signal.getsignal(signal.SIGTERM) == signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    assert signal.set_wakeup_fd(-1) == -1  # no descriptor left for a late signal to be written to
    os.kill(os.getpid(), signal.SIGTERM)  # a late second one: ignored
    await asyncio.sleep(0.05)
