"""Following another worker's download on this machine (`workers: N`): its temp file, read as it grows.

The worker that holds a blob's download lock (`cache/filelocks.py`) publishes where its download writes:
a small JSON file next to the lock (`<lock>.json`, replaced atomically, removed before the lock is let go)
with the temp file's path and inode, the blob's size and the holder's pid. A worker whose client wants the
same blob opens that file read-only (its descriptor stays valid when the holder renames the file into the
store: same inode) and sends the bytes as they land, polling `fstat` with a backoff.

That the digest checked out travels with the file itself: the holder makes its temp file group-readable
(`VERIFIED_MODE`: mkstemp makes it 0600, the store gives every blob 0640 anyway) before the fsync and rename,
so one `fstat` of the follower's own descriptor says how far the file has grown and whether it is proven,
even after the file was renamed into the store or (a bucket) uploaded and removed. A file unlinked without
the mark was discarded (the download failed, or went on uncached); a holder whose pid is gone died; a file
that does not grow for `peer_wait` is given up. Each of those ends the follow with `DownloadFailed`.

The holder writes its publication to `<lock>.json.<pid>` first and renames it into place: one killed in
between leaves that staging file, which `remove_dead_staging` removes when a worker starts (never one whose
pid lives: it may be about to rename it).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import stat
from collections import Counter
from collections.abc import AsyncGenerator, Hashable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from cargohold.cache.download import VERIFIED_MODE, DownloadFailed

log = logging.getLogger("cargohold.peers")

# How often a follower looks at the file while it does not grow: from POLL_FIRST, doubling up to POLL_MAX.
POLL_FIRST, POLL_MAX = 0.005, 0.1
# A publication is a few hundred bytes: anything larger is not one.
MAX_PUBLICATION = 4096


class Wait:
    """A wait for another worker's download that found it published, counted once in `waits` (the metric
    cargohold_peer_waits) by what served it: `followed` once a follower has a first piece to send (from then
    on it never falls back), else the outcome of the claim its client falls back to (`Peers.claim`)."""

    def __init__(self, waits: Counter[str]) -> None:
        self._waits = waits
        self.counted = False

    def count(self, outcome: str) -> None:
        """Count it as `outcome`, unless it is counted already."""
        if not self.counted:
            self.counted = True
            self._waits[outcome] += 1


@dataclass(frozen=True)
class Publication:
    """What the holder of a download lock tells the other workers about its download; `wait`, not published,
    is the wait of the worker that found it (`Peers.claim`)."""

    temp: Path
    inode: int
    size: int
    pid: int
    source: tuple[str, str] | None  # (upstream, repository) it is fetched from; None: not said
    wait: Wait | None = field(default=None, compare=False, repr=False)

    @classmethod
    def load(cls, where: Path, temps: Path) -> Publication | None:
        """The publication at `where`, if there is one and it names a file directly under `temps` (the
        store's temp directory: nothing else is ever opened); None for anything else."""
        try:
            with open(where, "rb") as file:
                raw = json.loads(file.read(MAX_PUBLICATION + 1)[:MAX_PUBLICATION])
            temp = Path(raw["temp"])
            inode, size, pid, source = raw["inode"], raw["size"], raw["pid"], raw["source"]
        except (OSError, ValueError, TypeError, KeyError):
            return None
        ints = all(type(n) is int and n >= 0 for n in (inode, size)) and type(pid) is int and pid > 0
        if not ints or temp.parent != temps or temp.name in ("", ".", ".."):
            return None
        if source is not None and not (len(source) == 2 and all(isinstance(s, str) for s in source)):
            source = None
        return cls(temp, inode, size, pid, None if source is None else (source[0], source[1]))

    def save(self, where: Path) -> None:
        """Write it next to `where` and move it into place: a reader sees all of it or none. What it staged
        is removed when that fails (a full disk): nobody else would while this process lives."""
        staged = where.with_name(f"{where.name}.{os.getpid()}")
        body = {"temp": str(self.temp), "inode": self.inode, "size": self.size, "pid": self.pid, "source": self.source}
        try:
            staged.write_text(json.dumps(body))
            os.replace(staged, where)
        except OSError:
            staged.unlink(missing_ok=True)
            raise

    def open(self) -> PeerFile | None:
        """The published file, open read-only; None when it is not (or no longer) that download's temp file:
        renamed into the store or removed since, or something else under that name."""
        try:
            fd = os.open(self.temp, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            return None
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_ino != self.inode or st.st_nlink == 0 or st.st_size > self.size:
            os.close(fd)
            return None
        return PeerFile(os.fdopen(fd, "rb", buffering=0), self)


def source_of(found: Hashable) -> tuple[str, str] | None:
    """A download's `source` as a publication carries it."""
    if isinstance(found, tuple) and len(found) == 2 and all(isinstance(s, str) for s in found):
        return found[0], found[1]
    return None


class PeerFile:
    """Another worker's download, open read-only: the bytes readable so far, and whether they are proven."""

    def __init__(self, file: BinaryIO, publication: Publication) -> None:
        self.file = file
        self.size = publication.size
        self._name = publication.temp.name
        self._pid = publication.pid
        self._wait = publication.wait

    async def spans(self, start: int, end: int, patience: float) -> AsyncGenerator[tuple[int, int], None]:
        """`(offset, length)` pieces of `[start, end)` as they land, all but the last byte until the file is
        proven; returns once all of it is sent and proven (even for no bytes at all). DownloadFailed when
        the download ends without proof, its holder dies, or the file does not grow for `patience` seconds.
        The wait that found the download is counted `followed` at the first piece (or the proof of none)."""
        loop = asyncio.get_running_loop()
        position, seen, delay = start, -1, POLL_FIRST
        deadline = loop.time() + patience
        while True:
            st = os.fstat(self.file.fileno())
            proven = stat.S_IMODE(st.st_mode) == VERIFIED_MODE
            if st.st_size > self.size or (not proven and st.st_nlink == 0):
                raise DownloadFailed(f"another worker's download into {self._name} failed")
            readable = min(st.st_size, end if proven else end - 1)
            if position < readable:
                self._followed()
                yield position, readable - position
                position = readable
            elif proven:
                self._followed()
                return
            if st.st_size != seen:  # it grows: look again soon
                seen, delay, deadline = st.st_size, POLL_FIRST, loop.time() + patience
                continue
            if loop.time() >= deadline or not _alive(self._pid):
                raise DownloadFailed(f"another worker's download into {self._name} stopped")
            await asyncio.sleep(delay)
            delay = min(delay * 2, POLL_MAX)

    def _followed(self) -> None:
        if self._wait is not None:
            self._wait.count("followed")

    def close(self) -> None:
        self.file.close()


def remove_dead_staging(directory: Path) -> None:
    """Remove the staging files (`<lock>.json.<pid>`, see `Publication.save`) under `directory` whose
    writer is dead: a holder killed before its rename leaves one that nothing else would ever remove.
    A live process's is left alone."""
    removed = 0
    for path in directory.glob("*.json.*"):
        pid = path.suffix[1:]
        if pid.isascii() and pid.isdigit() and not _alive(int(pid)):
            try:
                path.unlink(missing_ok=True)
            except OSError as exc:  # never a reason not to start: the file is only left behind
                log.warning("cannot remove %s, which a killed worker left: %s", path, exc)
                continue
            removed += 1
    if removed:
        log.info("removed %d publications that killed workers left unfinished", removed)


def _alive(pid: int) -> bool:
    """Whether process `pid` still exists (the lock's holder; same machine, so the same pid namespace)."""
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):  # OverflowError: no pid is that large
        return False
    except PermissionError:
        return True
    return True
