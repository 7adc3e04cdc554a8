"""What a manifest refers to: child manifests (of an index) and blobs (config and layers)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

# Past any real blob (and past what the index's integer columns hold).
MAX_SIZE = 1 << 63


@dataclass(frozen=True, slots=True)
class Child:
    digest: str
    size: int
    platform: str | None = None  # "os/arch[/variant]" for an index's children


@dataclass(frozen=True, slots=True)
class Refs:
    manifests: list[Child] = field(default_factory=list)
    blobs: list[Child] = field(default_factory=list)


def _platform(descriptor: dict) -> str | None:  # type: ignore[type-arg]
    platform = descriptor.get("platform")
    if not isinstance(platform, dict):
        return None
    parts = [platform.get("os", ""), platform.get("architecture", "")]
    if platform.get("variant"):
        parts.append(platform["variant"])
    return "/".join(str(p) for p in parts)


def _size(descriptor: dict) -> int:  # type: ignore[type-arg]
    """A descriptor's size when it is a count of bytes, else 0 (unknown): the manifest is the upstream's."""
    size = descriptor.get("size")
    return size if isinstance(size, int) and not isinstance(size, bool) and 0 <= size < MAX_SIZE else 0


def _descriptors(found: object, digest: str = "digest") -> list[dict]:  # type: ignore[type-arg]
    """The descriptors in `found` that name a digest (under `digest`); none when it is not a list."""
    if not isinstance(found, list):
        return []
    return [d for d in found if isinstance(d, dict) and isinstance(d.get(digest), str)]


def references(body: bytes) -> Refs:
    """The descriptors in an OCI/Docker manifest or index (schema 1 layers too); empty for anything else.
    Only what is well formed counts: a stored manifest was checked for its kind, not every field."""
    try:
        document = json.loads(body)
    except (ValueError, RecursionError):
        return Refs()
    if not isinstance(document, dict):
        return Refs()
    children = [Child(d["digest"], _size(d), _platform(d)) for d in _descriptors(document.get("manifests"))]
    descriptors = _descriptors([document.get("config")]) + _descriptors(document.get("layers"))
    blobs = [Child(d["digest"], _size(d)) for d in descriptors]
    blobs += [Child(d["blobSum"], 0) for d in _descriptors(document.get("fsLayers"), "blobSum")]
    return Refs(children, blobs)
