"""Fixtures of the reliability suite (helpers are in helpers.py). Tests marked `soak` are the
heavy variants: deselected by default (pyproject addopts), run by `make soak`."""

from __future__ import annotations

import uuid
from collections.abc import Callable

import pytest

from rig import images as I
from rig.hub import Hub


@pytest.fixture
def fresh_image(hub: Hub) -> Callable[..., I.Image]:
    """Push a new image (new digests, so cold everywhere) to its own repo; returns it pushed."""

    def push(*, layers: int = 2, payload: int = 2048, tag: str = "latest") -> I.Image:
        seed = uuid.uuid4().hex[:12]
        return hub.push_image(I.simple_image(seed, layers=layers, payload=payload), f"rel/{seed}", tag)

    return push
