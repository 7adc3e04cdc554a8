"""A directory tree as data, to show that something left it exactly as it was."""

from __future__ import annotations

import os
from pathlib import Path


def snapshot(root: Path) -> dict[str, tuple[str, int, bytes]]:
    """Every path under root -> kind, mode and content (a link's target); directory mtimes aside."""
    found: dict[str, tuple[str, int, bytes]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath, name)
            mode = path.lstat().st_mode
            if path.is_symlink():
                found[str(path.relative_to(root))] = ("link", mode, os.readlink(path).encode())
            elif path.is_dir():
                found[str(path.relative_to(root))] = ("dir", mode, b"")
            else:
                found[str(path.relative_to(root))] = ("file", mode, path.read_bytes())
    return found
