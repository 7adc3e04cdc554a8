"""What a manifest refers to: child manifests (of an index) and blobs (config and layers)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field


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


def references(body: bytes) -> Refs:
    """The descriptors in an OCI/Docker manifest or index (schema 1 layers too); empty for anything else."""
    try:
        document = json.loads(body)
    except ValueError:
        return Refs()
    if not isinstance(document, dict):
        return Refs()
    children = [
        Child(d["digest"], int(d.get("size", 0)), _platform(d))
        for d in document.get("manifests") or []
        if isinstance(d, dict) and isinstance(d.get("digest"), str)
    ]
    descriptors = [document.get("config"), *(document.get("layers") or [])]
    blobs = [
        Child(d["digest"], int(d.get("size", 0)))
        for d in descriptors
        if isinstance(d, dict) and isinstance(d.get("digest"), str)
    ]
    blobs += [Child(d["blobSum"], 0) for d in document.get("fsLayers") or [] if isinstance(d, dict) and "blobSum" in d]
    return Refs(children, blobs)
