"""Pinned images: what `cache.pin` globs and `cargohold cache pin` name is never evicted.

A pin is a glob of `upstream/repository[:tag]` (no tag: every tag of the repository). It protects
the manifests its cached tags point at (an index and all its platform manifests), their configs and
layers: the closure of those manifests, read from the store at each eviction.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase

from cargohold.cache.index import Index, TagRow
from cargohold.cache.store import BlobStore
from cargohold.oci.digests import Digest
from cargohold.oci.refs import references


@dataclass(frozen=True, slots=True)
class Pinned:
    """The digests pinned content consists of, and their bytes in the cache."""

    digests: frozenset[str]
    size: int


NOTHING = Pinned(frozenset(), 0)


def pin_matches(pattern: str, row: TagRow) -> bool:
    """`docker.io/library/redis:7.*` matches tag 7.2 of docker.io library/redis; `ghcr.io/org/*` every tag there."""
    name, tag = pattern, "*"
    if ":" in pattern.rsplit("/", 1)[-1]:
        name, tag = pattern.rsplit(":", 1)
    return fnmatchcase(f"{row.upstream}/{row.repository}", name) and fnmatchcase(row.tag, tag)


async def closure(store: BlobStore, roots: Iterable[str]) -> set[str]:
    """Every digest reachable from these manifests (child manifests, configs, layers) that is readable."""
    seen: set[str] = set()
    stack = list(roots)
    while stack:
        digest = stack.pop()
        if digest in seen:
            continue
        seen.add(digest)
        parsed = Digest.parse_or_none(digest)  # an upstream's manifest may name anything
        body = None if parsed is None else await store.load(parsed)
        if body is not None:
            refs = references(body)
            stack += [child.digest for child in refs.manifests]
            seen.update(blob.digest for blob in refs.blobs)
    return seen


async def resolve_pins(index: Index, store: BlobStore, configured: Sequence[str]) -> Pinned:
    """What the configured pins and the index's ad-hoc pins hold in the cache now."""
    patterns = [*configured, *await index.pins()]
    if not patterns:
        return NOTHING
    roots = [row.digest for row in await index.tag_rows() if any(pin_matches(p, row) for p in patterns)]
    if not roots:
        return NOTHING
    reachable = await closure(store, roots)
    sizes = await index.sizes(reachable)
    return Pinned(frozenset(sizes), sum(sizes.values()))
