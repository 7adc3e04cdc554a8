"""The status page at `/`, rendered by a real browser (headless Chromium): its content and a screenshot."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from PIL import Image as Picture

from cacheops import pull
from rig.hub import Hub
from rig.images import Image
from rig.server import Cargohold

WIDTH, HEIGHT = 1200, 1000


def _chromium(tmp_path: Path, *args: str) -> str:
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    if binary is None:
        pytest.fail("chromium is not installed (make test installs the Debian package)")
    cmd = [binary, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={tmp_path / 'profile'}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True).stdout


def test_status_page_in_a_browser(
    cargohold: Callable[..., Cargohold], hub: Hub, hub_images: dict[str, Image], tmp_path: Path
) -> None:
    hub.pull_limit = 100
    srv = cargohold(cache={"max_size": "10MiB"})
    for _ in range(2):
        pull(srv, hub_images["multi"].ref, tmp_path)
    pull(srv, hub_images["oci"].ref, tmp_path)
    srv.restart()  # counters and pulls are written to the index; the page reads them from there

    pull(srv, hub_images["layers21"].ref, tmp_path)  # an upstream state (with pulls left) for this run
    dom = _chromium(tmp_path, "--dump-dom", f"{srv.url}/")
    assert "<title>cargohold status</title>" in dom
    assert "docker.io/library/alpine-test:latest" in dom and "docker.io/acme/tool:1.0" in dom
    for chart in ("usage-chart", "outcome-chart", "images-chart"):
        assert f'id="{chart}"' in dom
    assert "of 10.0 MiB" in dom  # size against the cap
    assert '<tr class="upstream ok"><td>docker.io</td>' in dom
    assert f"<td>{100 - hub.pulls()} of 100</td>" in dom  # Docker Hub pulls left (the rig counts GETs answered 200)

    shot = tmp_path / "status.png"
    _chromium(tmp_path, "--hide-scrollbars", f"--window-size={WIDTH},{HEIGHT}", f"--screenshot={shot}", f"{srv.url}/")
    with Picture.open(shot) as picture:
        assert picture.size == (WIDTH, HEIGHT)
        pixels = picture.convert("RGB")
        colours = pixels.getcolors(maxcolors=1 << 20) or []
        inked = sum(count for count, rgb in colours if rgb != (255, 255, 255))
    assert len(colours) > 20, "text, bars and charts draw in many colours"
    assert inked > WIDTH * HEIGHT * 0.02, "a blank page is not a status page"
    blue = sum(count for count, (r, g, b) in colours if b > 150 and r < 100)
    assert blue > 500, "the charts' bars are drawn"
