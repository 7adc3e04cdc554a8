"""Single-flight across the worker processes of one machine (`workers: N`): one upstream GET per blob.

The worker about to download a blob takes an exclusive `fcntl.flock` on `<data_dir>/locks/<digest>`
and holds it until the download has ended, committed or not; the others wait for it as they would
for another replica (`Peers.claim`) and then serve the file it landed. The kernel drops the locks of
a process that dies, so a killed worker never keeps the others waiting; `index.peer_wait` bounds the
wait for a wedged one. The holder removes the lock file before it lets go; a waiter that locked a
file removed meanwhile sees another inode at the path and tries again.

While it downloads, the holder publishes its temp file next to the lock (`<lock>.json`, see
`cache/peerfile.py`), so that the other workers' clients follow the download as it lands instead of
waiting for its end. Only the holder writes it; it removes it before it lets go of the lock, and a new
holder removes one that a dead holder left; a worker that starts removes the half-written ones (staging
files) of holders killed while writing them.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
from pathlib import Path

from cargohold.cache.download import Download
from cargohold.cache.peerfile import Publication, remove_dead_staging, source_of
from cargohold.cache.peers import Lease, Peers
from cargohold.cache.store import BlobStore, Spool
from cargohold.errors import StorageUnavailable
from cargohold.oci.digests import Digest

log = logging.getLogger("cargohold.peers")

# A flock lives as long as its holder: nothing to renew, only how often `Lease` looks in.
LEASE = 60.0


class FileLocks(Peers):
    """Download locks as files under `directory`, one per digest being fetched."""

    # A look at a local lock is a few syscalls: look often, so that a waiter finds the holder's publication
    # (and follows its download) soon after the upstream answered.
    poll_max = 0.1

    def __init__(self, directory: Path, wait: float) -> None:
        super().__init__(wait, LEASE)
        directory.mkdir(parents=True, exist_ok=True, mode=0o750)
        remove_dead_staging(directory)
        self._dir = directory
        self._held: dict[str, int] = {}  # token -> the locked descriptor

    def key(self, digest: Digest) -> str:
        return str(self._dir / f"{digest.algorithm}-{digest.hex}")

    async def take(self, key: str, token: str) -> bool:
        try:
            fd = os.open(key, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640)
        except OSError as exc:
            log.error("download lock %s: %s", key, exc)
            raise StorageUnavailable("the cache's storage failed", {"operation": "lock"}) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if os.fstat(fd).st_ino != os.stat(key).st_ino:  # its holder removed it before we got it
                raise BlockingIOError
        except OSError:  # held by another worker (BlockingIOError), or gone (FileNotFoundError)
            os.close(fd)
            return False
        self._held[token] = fd
        _remove(_publication(key))  # a dead holder's: it names a download that will not end
        return True

    async def publish(self, lease: Lease, download: Download) -> None:
        """Tell the other workers where `download` writes, while it writes to a temp file of known size."""
        temp, size = download.temp, download.size
        if temp is None or size is None or download.verified or download.spill_from is not None:
            return
        try:
            inode = os.stat(temp).st_ino
            Publication(temp, inode, size, os.getpid(), source_of(download.source)).save(_publication(lease.key))
        except OSError as exc:  # the others wait for the download's end instead
            log.warning("could not publish the download of %s: %s", download.digest, exc)

    async def published(self, digest: Digest, store: BlobStore) -> Publication | None:
        if not isinstance(store, Spool):
            return None
        return Publication.load(_publication(self.key(digest)), store.tmp)

    async def renew(self, lease: Lease) -> bool:
        return lease.token in self._held

    async def release(self, lease: Lease) -> None:
        fd = self._held.pop(lease.token, None)
        if fd is None:
            return
        _remove(_publication(lease.key))
        _remove(Path(lease.key))
        os.close(fd)


def _publication(key: str) -> Path:
    return Path(f"{key}.json")


def _remove(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
