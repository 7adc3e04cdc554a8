"""The images of sync entries, resolved from the configuration alone (the commands and the evictor need no
running server), and the pins they make."""

from __future__ import annotations

from dataclasses import dataclass

from cargohold.config import Settings, SyncEntry
from cargohold.oci.imagename import parse_image


@dataclass(frozen=True, slots=True)
class Wanted:
    """An image of a sync entry: an exact tag, a glob of tags, or None (the entry's `tags` decides)."""

    image: str
    upstream: str
    repository: str
    tag: str | None


def wanted_images(settings: Settings, entry: SyncEntry) -> list[Wanted]:
    found = []
    for image in entry.images:
        name = parse_image(settings, image)
        found.append(Wanted(image, name.upstream, name.repository, name.tag))
    return found


def sync_pins(settings: Settings) -> list[str]:
    """`cache.pin` and what the sync entries hold: each image's tag or glob (`tags: latest`: latest; the N newest
    tags: every tag of the repository, as which are newest changes upstream)."""
    pins = list(settings.cache.pin)
    for entry in settings.sync:
        for wanted in wanted_images(settings, entry):
            tag = wanted.tag or ("latest" if entry.tags == "latest" else None)
            pins.append(f"{wanted.upstream}/{wanted.repository}" + (f":{tag}" if tag else ""))
    return pins
