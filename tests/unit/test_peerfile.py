"""What a worker opens when it follows another worker's download (`cache/peerfile.py`): only the
published temp file under the store's temp directory, and only while it is that download's file."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from unittest import mock

import pytest
from lockholder import hold_in_child, kill

from cargohold.cache.filelocks import FileLocks
from cargohold.cache.peerfile import Publication
from cargohold.cache.store import FsBlobStore


def _publish(where: Path, file: Path, **fields: object) -> None:
    body = {"temp": str(file), "inode": file.stat().st_ino, "size": 10, "pid": os.getpid(), "source": None}
    where.write_text(json.dumps(body | fields))


def test_a_publication_names_a_temp_file_of_the_store_and_nothing_else(tmp_path: Path) -> None:
    store = FsBlobStore(tmp_path / "data")
    fd, temp = store.new_temp()
    os.close(fd)
    where = tmp_path / "lock.json"
    _publish(where, temp)
    found = Publication.load(where, store.tmp)
    assert found is not None and found.temp == temp
    opened = found.open()
    assert opened is not None
    opened.close()
    outside = tmp_path / "secret"
    outside.write_bytes(b"not a blob")
    _publish(where, outside)
    assert Publication.load(where, store.tmp) is None
    _publish(where, temp, temp=f"{store.tmp}/../secret")
    assert Publication.load(where, store.tmp) is None
    for bad in ({"pid": 0}, {"size": -1}, {"inode": "1"}):
        _publish(where, temp, **bad)
        assert Publication.load(where, store.tmp) is None
    where.write_text("{")
    assert Publication.load(where, store.tmp) is None


def test_a_published_name_that_is_no_longer_that_download_is_not_opened(tmp_path: Path) -> None:
    """A symlink, another file under the name, or a file larger than the blob: not followed."""
    store = FsBlobStore(tmp_path / "data")
    fd, temp = store.new_temp()
    os.close(fd)
    published = Publication(temp, temp.stat().st_ino, 10, os.getpid(), None)
    link = store.tmp / "dl-link"
    link.symlink_to(temp)
    assert Publication(link, temp.stat().st_ino, 10, os.getpid(), None).open() is None
    temp.write_bytes(b"x" * 11)
    assert published.open() is None
    temp.write_bytes(b"")
    held = os.open(temp, os.O_RDONLY)  # its inode cannot be reused while open
    try:
        other = store.tmp / "dl-other"
        other.write_bytes(b"")
        os.replace(other, temp)
        assert published.open() is None
    finally:
        os.close(held)


def _stage_and_stop(store: FsBlobStore, lock: Path) -> Callable[[], None]:
    """What a holder of `lock` killed between writing its publication and the rename did: the write."""

    def stage() -> None:
        fd, temp = store.new_temp()
        with mock.patch.object(os, "replace"):  # the rename that a kill at this point never gets to
            Publication(temp, os.fstat(fd).st_ino, 10, os.getpid(), None).save(lock.with_name(f"{lock.name}.json"))

    return stage


def test_a_half_written_publication_of_a_killed_holder_is_removed_when_a_worker_starts(tmp_path: Path) -> None:
    """Two holders staged their publications; one was killed before its rename. A worker that starts (its
    `FileLocks`) removes the dead one's staging file, never the live one's (it may be about to rename it)."""
    store = FsBlobStore(tmp_path / "data")
    locks = tmp_path / "locks"
    locks.mkdir()
    dead = hold_in_child(str(locks / "sha256-aa"), _stage_and_stop(store, locks / "sha256-aa"))
    kill(dead)
    live = hold_in_child(str(locks / "sha256-bb"), _stage_and_stop(store, locks / "sha256-bb"))
    try:
        staged = sorted(p.name for p in locks.glob("*.json.*"))
        assert staged == [f"sha256-aa.json.{dead}", f"sha256-bb.json.{live}"]
        FileLocks(locks, 60.0)
        assert sorted(p.name for p in locks.glob("*.json.*")) == [f"sha256-bb.json.{live}"]
    finally:
        kill(live)


def test_a_publication_that_cannot_be_moved_into_place_leaves_nothing_staged(tmp_path: Path) -> None:
    """Nobody would remove a live process's staging file: the holder removes its own when saving fails."""
    store = FsBlobStore(tmp_path / "data")
    fd, temp = store.new_temp()
    os.close(fd)
    where = tmp_path / "lock.json"
    where.mkdir()
    (where / "in the way").write_bytes(b"")
    with pytest.raises(OSError):
        Publication(temp, temp.stat().st_ino, 10, os.getpid(), None).save(where)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "lock.json"]


def test_a_leftover_that_cannot_be_removed_does_not_stop_a_worker(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Removing what killed workers left is tidying: a file that will not go is logged and left."""
    locks = tmp_path / "locks"
    stuck = locks / "sha256-cc.json.999999999"  # no process has that pid
    stuck.mkdir(parents=True)
    (stuck / "in the way").write_bytes(b"")  # a directory: unlink fails
    with caplog.at_level(logging.WARNING, "cargohold.peers"):
        FileLocks(locks, 60.0)
    assert stuck.exists()
    assert f"cannot remove {stuck}" in caplog.text
