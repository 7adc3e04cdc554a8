"""Manifest media types and Accept negotiation."""

from __future__ import annotations

import json
from collections.abc import Iterable

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_SCHEMA1_SIGNED = "application/vnd.docker.distribution.manifest.v1+prettyjws"
DOCKER_SCHEMA1 = "application/vnd.docker.distribution.manifest.v1+json"

# What we ask upstream for when the client takes everything: the tag cache holds these answers.
MODERN = (OCI_INDEX, OCI_MANIFEST, DOCKER_LIST, DOCKER_MANIFEST)
KNOWN = frozenset(MODERN + (DOCKER_SCHEMA1_SIGNED, DOCKER_SCHEMA1))
FULL_ACCEPT = ", ".join(MODERN)


def parse_accept(values: Iterable[str]) -> frozenset[str]:
    """Media types from one or many Accept headers (docker sends one header per type)."""
    types = set()
    for value in values:
        for item in value.split(","):
            media = item.split(";", 1)[0].strip().lower()
            if media:
                types.add(media)
    return frozenset(types)


def takes_everything(accept: frozenset[str]) -> bool:
    """No Accept, a wildcard, or all modern types: the client can take whatever the tag points at."""
    return not accept or "*/*" in accept or "application/*" in accept or accept.issuperset(MODERN)


def accepts(accept: frozenset[str], media_type: str) -> bool:
    return takes_everything(accept) or media_type in accept


def media_type_of(content_type: str | None, body: bytes) -> str:
    """The manifest's media type: the upstream's Content-Type if it names one, else the document's own.

    Raises ValueError when the body is not a JSON object, so garbage is never cached.
    """
    document = json.loads(body)
    if not isinstance(document, dict):
        raise ValueError("a manifest is a JSON object")
    declared = (content_type or "").split(";", 1)[0].strip().lower()
    if declared in KNOWN:
        return declared
    field = document.get("mediaType")
    if isinstance(field, str) and field:
        return field
    if document.get("schemaVersion") == 1:
        return DOCKER_SCHEMA1_SIGNED if "signatures" in document else DOCKER_SCHEMA1
    return OCI_INDEX if "manifests" in document else OCI_MANIFEST

