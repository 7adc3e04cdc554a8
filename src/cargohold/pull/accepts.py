"""Clients that do not take the type a tag points at (a schema2-only client of a manifest list): the index holds
answers to the full Accept only, so such a client gets upstream's answer for its own Accept. A GET by tag is a
counted pull on Docker Hub, so that answer is asked once for concurrent clients and remembered (per process, not
indexed) within `tag_ttl`; the manifest it names is stored by digest like any other.
"""

from __future__ import annotations

import hashlib
import time

from cargohold.flight import SingleFlight
from cargohold.oci.mediatypes import takes_everything
from cargohold.pull.links import Links
from cargohold.pull.manifests import Head, Manifest, Manifests, answerable
from cargohold.pull.recent import Recent
from cargohold.tasks import Tasks
from cargohold.upstream.repository import Descriptor, Remote

# (upstream, repository, tag, hash of the Accept header): a client's Accept is hashed so that a long one
# costs no more memory than a short one.
AcceptKey = tuple[str, str, str, str]


def _accept_key(remote: Remote, tag: str, accept: frozenset[str]) -> tuple[str, AcceptKey]:
    """The Accept header to send for the client's types, and the key its answer is remembered under."""
    header = ", ".join(sorted(accept))
    return header, (remote.upstream, remote.repository, tag, hashlib.sha256(header.encode()).hexdigest())


class OtherAccepts:
    """Upstream's answers to a tag for Accepts other than the full one."""

    def __init__(self, manifests: Manifests, links: Links, tasks: Tasks) -> None:
        self._manifests = manifests
        self._links = links
        self._answers: Recent[AcceptKey, tuple[Descriptor, float]] = Recent()
        self._fetches: SingleFlight[Manifest] = SingleFlight(tasks, "manifest fetch by accept")
        self._heads: SingleFlight[Descriptor | None] = SingleFlight(tasks, "manifest head by accept")

    @property
    def joins(self) -> int:
        return self._fetches.joins

    def remembered(self, remote: Remote, tag: str, accept: frozenset[str]) -> Descriptor | None:
        """Upstream's answer (to a GET or a HEAD) for this Accept, within `tag_ttl`; None for the full one."""
        if takes_everything(accept):
            return None
        return self._known(remote, _accept_key(remote, tag, accept)[1])

    def _known(self, remote: Remote, key: AcceptKey) -> Descriptor | None:
        known = self._answers.get(key)
        return known[0] if known is not None and time.time() - known[1] < remote.tag_ttl else None

    async def get(self, remote: Remote, tag: str, accept: frozenset[str]) -> Manifest:
        """Upstream's answer to a GET with the client's Accept (a counted pull on Docker Hub): asked once for
        concurrent clients, then the manifest it named is served by digest within `tag_ttl`."""
        header, key = _accept_key(remote, tag, accept)
        known = self._known(remote, key)
        if known is not None:
            return await self._manifests.get(remote, known.digest)
        return await self._fetches.run(key, lambda: self._fetch(remote, tag, header, key))

    async def _fetch(self, remote: Remote, tag: str, header: str, key: AcceptKey) -> Manifest:
        descriptor, body = await remote.get_manifest(tag, header)
        manifest = await self._manifests.keep(remote, descriptor, body)
        self._answers.put(key, (descriptor, time.time()))
        return manifest

    async def head(self, remote: Remote, tag: str, accept: frozenset[str]) -> Head | None:
        """Upstream's answer to a HEAD with the client's Accept, asked once for concurrent clients and
        remembered within `tag_ttl`; None when it says too little to answer with."""
        header, key = _accept_key(remote, tag, accept)
        known = self._known(remote, key)
        if known is not None:
            return Head(known, "hit")
        found = await self._heads.run(key, lambda: self._ask(remote, tag, header, key))
        return None if found is None else Head(found, "miss")

    async def _ask(self, remote: Remote, tag: str, header: str, key: AcceptKey) -> Descriptor | None:
        found = await remote.head_manifest(tag, header)
        if found is None or not answerable(found):
            return None
        await self._links.add(remote, str(found.digest))
        self._answers.put(key, (found, time.time()))
        return found
