"""What a worker opens when it follows another worker's download (`cache/peerfile.py`): only the
published temp file under the store's temp directory, and only while it is that download's file."""

from __future__ import annotations

import json
import os
from pathlib import Path

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
