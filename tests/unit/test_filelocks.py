"""The download locks of the workers of one machine (`cache/filelocks.py`): one holder per digest, a dead
holder lets go, the lock files do not pile up. Two `FileLocks` on one directory stand for two workers
(flock locks belong to open files, so they exclude each other within one process too)."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

from lockholder import hold_in_child

from cargohold.cache.filelocks import FileLocks
from cargohold.cache.peers import Lease
from cargohold.cache.store import FsBlobStore
from cargohold.oci.digests import Digest

DIGEST = Digest.of(b"a layer", "sha256")


async def test_one_worker_downloads_and_the_other_gets_the_landed_file(tmp_path: Path) -> None:
    store = FsBlobStore(tmp_path)
    a, b = FileLocks(tmp_path / "locks", wait=5), FileLocks(tmp_path / "locks", wait=0.2)
    lease = await a.claim(DIGEST, store)
    assert isinstance(lease, Lease)
    assert await b.claim(DIGEST, store) is None  # waited its peer_wait out: it would fetch too
    assert b.waits["timed_out"] == 1
    fd, temp = store.new_temp()
    os.write(fd, b"a layer")
    os.close(fd)
    store.commit(temp, DIGEST)
    await lease.release()
    found = await b.claim(DIGEST, store)
    assert isinstance(found, Path) and found.read_bytes() == b"a layer"
    assert list((tmp_path / "locks").iterdir()) == []


async def test_a_killed_holder_lets_the_other_take_over_at_once(tmp_path: Path) -> None:
    store = FsBlobStore(tmp_path)
    locks = FileLocks(tmp_path / "locks", wait=30)
    pid = hold_in_child(locks.key(DIGEST))
    claim = asyncio.create_task(locks.claim(DIGEST, store))
    await asyncio.sleep(0.3)
    assert not claim.done()  # waiting for the holder
    os.kill(pid, signal.SIGKILL)
    await asyncio.to_thread(os.waitpid, pid, 0)
    lease = await asyncio.wait_for(claim, 10)  # far below peer_wait: the kernel let go of the dead one's lock
    assert isinstance(lease, Lease)  # nothing landed: this worker downloads
    assert locks.waits["took_over"] == 1
    await lease.release()
