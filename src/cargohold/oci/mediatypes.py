"""Manifest media types and Accept negotiation."""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterable
from typing import Any

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_SCHEMA1_SIGNED = "application/vnd.docker.distribution.manifest.v1+prettyjws"
DOCKER_SCHEMA1 = "application/vnd.docker.distribution.manifest.v1+json"

# A media type a manifest may be served as (RFC 6838 names): application/ only, no parameters.
_MANIFEST_TYPE = re.compile(r"application/[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}")
# What we ask upstream for when the client takes everything: the tag cache holds these answers.
MODERN = (OCI_INDEX, OCI_MANIFEST, DOCKER_LIST, DOCKER_MANIFEST)
KNOWN = frozenset((*MODERN, DOCKER_SCHEMA1_SIGNED, DOCKER_SCHEMA1))
FULL_ACCEPT = ", ".join(MODERN)


def parse_accept(values: Iterable[str]) -> frozenset[str]:
    """Media types from one or many Accept headers (docker sends one header per type)."""
    return _parse_accept(tuple(values))


@functools.lru_cache(maxsize=512)  # clients send the same few Accept headers on every request
def _parse_accept(values: tuple[str, ...]) -> frozenset[str]:
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

    Raises ValueError unless the body is a manifest of that type (validate_manifest), so garbage or
    some other service's JSON (a redirect to an internal endpoint) is never served or cached.
    """
    document = _json_object(body)
    declared = (content_type or "").split(";", 1)[0].strip().lower()
    if declared in KNOWN:
        media_type = declared
    elif isinstance(document.get("mediaType"), str) and document["mediaType"]:
        media_type = document["mediaType"]
    elif document.get("schemaVersion") == 1:
        media_type = DOCKER_SCHEMA1_SIGNED if "signatures" in document else DOCKER_SCHEMA1
    else:
        media_type = OCI_INDEX if "manifests" in document else OCI_MANIFEST
    if not _MANIFEST_TYPE.fullmatch(media_type):
        # It becomes the Content-Type of what the mirror serves: `text/html` would be a page on its origin.
        raise ValueError("a manifest's media type is an application/ type")
    validate_manifest(document, media_type)
    return media_type


def validate_manifest(document: dict[str, Any], media_type: str) -> None:
    """Raise ValueError unless `document` has the shape of a `media_type` manifest: an image
    manifest (schema 2 or OCI, artifacts included: any config type), an index or manifest list,
    a schema 1 manifest, or a manifest of another type with a config or a list of descriptors."""
    if media_type in (DOCKER_SCHEMA1, DOCKER_SCHEMA1_SIGNED):
        if document.get("schemaVersion") != 1 or not isinstance(document.get("fsLayers"), list):
            raise ValueError("not a schema 1 manifest")
        return
    if document.get("schemaVersion") != 2:
        raise ValueError("a manifest has schemaVersion 2")
    if media_type in (OCI_INDEX, DOCKER_LIST):
        _descriptors(document.get("manifests"), "manifests")
    elif media_type in (OCI_MANIFEST, DOCKER_MANIFEST):
        _descriptors([document.get("config")], "config")
        _descriptors(document.get("layers", [] if media_type == OCI_MANIFEST else None), "layers")
    elif "config" in document:
        _descriptors([document.get("config")], "config")
    else:
        _descriptors(document.get("manifests", document.get("blobs", document.get("layers"))), "descriptors")


def _descriptors(items: object, field: str) -> None:
    """A list of content descriptors: objects with at least a digest and a size."""
    if not isinstance(items, list):
        raise ValueError(f"a manifest's {field} is a list")
    for item in items:
        size = item.get("size") if isinstance(item, dict) else None
        if not (isinstance(item, dict) and isinstance(item.get("digest"), str) and isinstance(size, int)):
            raise ValueError(f"a manifest's {field} are descriptors (digest, size)")


def _json_object(body: bytes) -> dict[str, Any]:
    try:
        document = json.loads(body)
    except RecursionError:
        raise ValueError("nested too deeply") from None
    if not isinstance(document, dict):
        raise ValueError("a manifest is a JSON object")
    return document
