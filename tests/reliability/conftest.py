"""Fixtures of the reliability suite (helpers are in helpers.py). Tests marked `soak` are the
heavy variants: deselected by default (pyproject addopts), run by `make soak`."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable

import pytest

from rig import images as I
from rig.hub import Hub


@pytest.fixture
def fresh_image(hub: Hub) -> Callable[..., I.Image]:
    """Push a new image (new digests, so cold everywhere) to its own repo; returns it pushed."""

    def push(*, layers: int = 2, random_bytes: int = 0, tag: str = "latest") -> I.Image:
        """random_bytes: add a layer of that many incompressible bytes (a blob worth streaming)."""
        seed = uuid.uuid4().hex[:12]
        blobs = [I.seeded_layer(seed, i) for i in range(layers)]
        if random_bytes:
            blobs.append(I.make_layer({f"rig/{seed}/random.bin": os.urandom(random_bytes)}))
        return hub.push_image(I.make_image(blobs, label=seed), f"rel/{seed}", tag)

    return push
