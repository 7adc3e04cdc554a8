"""A strict reader of the tars bundles are: ustar headers, PAX `x` records, regular files and directories.

Not `tarfile`: it reads a GNU long name (`L`/`K`) or a PAX header (`x`/`g`) whole into memory before its caller
can refuse it, and keeps every member it has read (a 2 MB .tar.gz declaring a 2 GiB long name took 4.28 GB).
Here a header is 512 bytes, a PAX header at most `MAX_PAX`, anything else a refusal; only the members an OCI
layout has (`oci-layout`, `index.json`, `blobs/<algorithm>/<hex>`) are remembered, by offset and size. Members
are then read where they lie (`os.pread`), in any order and never twice by decompressing again: a bundle is a
plain tar on disk, as `cargohold export` and skopeo's `oci-archive:` write it; a compressed one is refused.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass

BLOCK = 512
MAX_PAX = 64 << 10  # the PAX records of one member (Go and Python write a few short ones)
MAX_HEADERS = 100_000  # a bundle of 1,000 images of 50 layers has 50,000; each kept one costs ~300 bytes
REREAD = 256 << 20  # what an import may read beyond its bundle twice over: manifests named by many tags
CHUNK = 1 << 20
LAYOUT_NAME = re.compile(r"oci-layout|index\.json|blobs/[a-z0-9]{1,32}/[a-f0-9]{32,128}")
COMPRESSED = {b"\x1f\x8b": "gzip", b"BZh": "bzip2", b"\xfd7zXZ\x00": "xz", b"\x28\xb5\x2f\xfd": "zstd"}
REGULAR, DIRECTORY, PAX = (b"0", b"\x00"), b"5", b"x"
REFUSED_TYPES = {
    b"L": "a GNU long name",
    b"K": "a GNU long link name",
    b"g": "a PAX global header",
    b"1": "a hard link",
    b"2": "a symbolic link",
}


class BundleError(Exception):
    """A bundle that cannot be written or is not acceptable; the message says which image and why."""


@dataclass(frozen=True, slots=True)
class Member:
    offset: int
    size: int


def _number(field: bytes, what: str) -> int:
    """An octal field (NUL or space padded) or GNU base-256 (high bit set, for sizes over 8 GiB)."""
    if field[:1] == b"\x80":
        return int.from_bytes(field[1:], "big")
    text = field.split(b"\x00", 1)[0].strip(b" ")
    if not re.fullmatch(rb"[0-7]{0,12}", text):
        raise BundleError(f"{what}: not a number in a tar header")
    return int(text or b"0", 8)


def _pax(data: bytes, at: int) -> dict[str, str]:
    """The `path` and `size` of PAX records (`<length> <key>=<value>\\n`); other keys (times, owners) are dropped."""
    records: dict[str, str] = {}
    pos = 0
    while pos < len(data):
        space = data.find(b" ", pos, pos + 8)
        digits = data[pos:space] if space > pos else b""
        length = int(digits) if digits.isdigit() else 0
        key, eq, value = data[space + 1 : pos + length].partition(b"=")
        if length <= len(digits) + 1 or pos + length > len(data) or not eq or not value.endswith(b"\n"):
            raise BundleError(f"malformed PAX header at byte {at}")
        if key in (b"path", b"size"):
            records[key.decode()] = value[:-1].decode("utf-8", "replace")
        pos += length
    if not re.fullmatch(r"[0-9]{1,20}", records.get("size", "0")):
        raise BundleError(f"PAX header at byte {at}: a size that is no number")
    return records


def _name(header: bytes) -> str:
    name = header[:100].split(b"\x00", 1)[0]
    prefix = header[345:500].split(b"\x00", 1)[0] if header[257:263] == b"ustar\x00" else b""
    return (prefix + b"/" + name if prefix else name).decode("utf-8", "replace")


class LayoutTar:
    """The layout members of a bundle tar, found in one pass over its headers; their bytes read on demand."""

    def __init__(self, fd: int, label: str) -> None:
        self._fd, self._label = fd, label
        self.members: dict[str, Member] = {}
        start = os.pread(fd, 8, 0)
        for magic, kind in COMPRESSED.items():
            if start.startswith(magic):
                raise BundleError(
                    f"{label} is compressed ({kind}): decompress it first; import reads the plain tar that "
                    "export and skopeo's oci-archive: write"
                )
        size = os.fstat(fd).st_size
        self._left = 2 * size + REREAD  # an index.json naming the same content over and over reads it once too often
        self._scan(size)

    def _scan(self, end: int) -> None:
        at, pax = 0, dict[str, str]()
        for _ in range(MAX_HEADERS):
            header = os.pread(self._fd, BLOCK, at)
            if not header or header == bytes(BLOCK):
                return  # the end blocks (or the end of the file at a header's place)
            if len(header) < BLOCK or header[257:262] != b"ustar":
                raise BundleError(f"{self._label}: not a tar (no ustar header at byte {at})")
            if _number(header[148:156], f"byte {at}") != sum(header[:148]) + 256 + sum(header[156:]):
                raise BundleError(f"{self._label}: bad header checksum at byte {at}")
            kind, name = header[156:157], pax.get("path") or _name(header)
            size = int(pax["size"]) if "size" in pax else _number(header[124:136], name)
            data, pax = at + BLOCK, {}
            if data + size > end:
                raise BundleError(f"{self._label}: truncated ({name} ends past the end of the file)")
            if kind == PAX:
                if size > MAX_PAX:
                    raise BundleError(f"{self._label}: a PAX header of {size} bytes at byte {at} (at most {MAX_PAX})")
                pax = _pax(os.pread(self._fd, size, data), at)
            elif kind in REGULAR:
                self._keep(name.removeprefix("./"), Member(data, size))
            elif kind != DIRECTORY:
                what = REFUSED_TYPES.get(kind, f"an entry of type {kind!r}")
                raise BundleError(f"{self._label}: {name[:200]!r} is {what}; a bundle holds regular files only")
            at = data + (size + BLOCK - 1) // BLOCK * BLOCK
        raise BundleError(f"{self._label}: more than {MAX_HEADERS} tar entries: not a bundle")

    def _keep(self, name: str, member: Member) -> None:
        if not LAYOUT_NAME.fullmatch(name):
            return  # not part of an OCI layout: never read
        if name in self.members:
            raise BundleError(f"{self._label}: {name} is in the tar twice")
        self.members[name] = member

    def _spend(self, size: int) -> None:
        self._left -= size
        if self._left < 0:
            raise BundleError(
                f"{self._label}: its index names the same content so often that reading it takes "
                "more than twice the bundle's size: not a bundle"
            )

    def read(self, member: Member) -> bytes:
        self._spend(member.size)
        return os.pread(self._fd, member.size, member.offset)

    def chunks(self, member: Member) -> Iterator[bytes]:
        """The member's bytes, exactly its size (the scan checked the file holds them)."""
        self._spend(member.size)
        at, end = member.offset, member.offset + member.size
        while at < end:
            chunk = os.pread(self._fd, min(CHUNK, end - at), at)
            if not chunk:
                raise BundleError(f"{self._label}: the file got shorter while it was read")
            at += len(chunk)
            yield chunk
