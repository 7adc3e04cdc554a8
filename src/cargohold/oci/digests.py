"""Content digests: parsing (strictly, so a digest never escapes into a path) and hashing."""

from __future__ import annotations

import functools
import hashlib
import re
from dataclasses import dataclass

from cargohold.errors import DigestInvalid

_ALGORITHMS = {"sha256": 64, "sha512": 128}
_SHAPE = re.compile(r"[a-z0-9]+(?:[.+_-][a-z0-9]+)*:[a-zA-Z0-9=_-]+")  # fullmatch: no final newline
_HEX = re.compile(r"[a-f0-9]+")


@dataclass(frozen=True, slots=True)
class Digest:
    """A verified-shape `algorithm:hex` digest of an algorithm we can compute."""

    algorithm: str
    hex: str

    def __str__(self) -> str:
        return f"{self.algorithm}:{self.hex}"

    def hasher(self) -> hashlib._Hash:
        return hashlib.new(self.algorithm)

    @classmethod
    def parse(cls, text: str) -> Digest:
        return _parse(text)

    @classmethod
    def parse_or_none(cls, text: str | None) -> Digest | None:
        """For digests an upstream claims: a bad one is the upstream's fault, not the client's."""
        try:
            return cls.parse(text) if text else None
        except DigestInvalid:
            return None

    @classmethod
    def of(cls, data: bytes, algorithm: str = "sha256") -> Digest:
        return cls(algorithm, hashlib.new(algorithm, data).hexdigest())


def looks_like_digest(reference: str) -> bool:
    """A manifest reference with a colon is a digest (tags cannot contain one)."""
    return ":" in reference


@functools.lru_cache(maxsize=4096)  # a warm hit parses the digests of its tag and blobs again and again
def _parse(text: str) -> Digest:
    if len(text) > 256 or not _SHAPE.fullmatch(text):
        raise DigestInvalid("invalid digest", {"digest": text[:256]})
    algorithm, _, hexpart = text.partition(":")
    if algorithm not in _ALGORITHMS:
        raise DigestInvalid(f"unsupported digest algorithm {algorithm!r}", {"digest": text})
    if len(hexpart) != _ALGORITHMS[algorithm] or not _HEX.fullmatch(hexpart):
        raise DigestInvalid(f"invalid {algorithm} digest", {"digest": text})
    return Digest(algorithm, hexpart)
