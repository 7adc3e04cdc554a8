"""Image names as clients write them (`alpine`, `ghcr.io/org/app:1`), resolved to an upstream and repository
from the configuration alone: for the commands and the sync lists, which name images without a request."""

from __future__ import annotations

from dataclasses import dataclass

from cargohold.config import DOCKER_HUB, Settings
from cargohold.upstream.routing import _is_registry_host


@dataclass(frozen=True, slots=True)
class ImageName:
    upstream: str
    repository: str
    tag: str | None


def parse_image(settings: Settings, image: str) -> ImageName:
    """`alpine` -> docker.io library/alpine; `ghcr.io/org/app:1` -> ghcr.io org/app tag 1."""
    name, tag = image, None
    if ":" in image.rsplit("/", 1)[-1]:
        name, tag = image.rsplit(":", 1)
    upstream = settings.default.name
    first, _, rest = name.partition("/")
    if rest and _is_registry_host(first):
        upstream, name = first, rest
    if upstream == DOCKER_HUB and "/" not in name:
        name = "library/" + name
    return ImageName(upstream, name, tag)
