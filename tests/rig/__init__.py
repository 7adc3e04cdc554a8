"""Integration test rig for cargohold: a Docker Hub-like upstream, test images and real clients.

Nothing in this package imports pytest, so benchmark scripts can use it too.
"""

from .hub import Fault, Hub, Recorded
from .images import Blob, Image

__all__ = ["Blob", "Fault", "Hub", "Image", "Recorded"]
