"""Fixtures of `make test-deploy`: a dockerd whose data root is kept between runs (the base image is built
once per machine, by its tag), the image built from deploy/Dockerfile, and the registry's public name."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from deployrig import DOMAIN, build_base_image, build_image, cache_dir

from rig.clients import Dockerd, ensure_hosts_entries

IMAGE = "cargohold:deploy-test"


@pytest.fixture(scope="session")
def deploy_dockerd(tmp_path_factory: pytest.TempPathFactory, hosts_entries: list[str]) -> Iterator[Dockerd]:
    """The rig's dockerd (no bridge: containers use --network host), with a data root that persists."""
    if os.geteuid() != 0:
        pytest.skip("building and running the image needs root (dockerd)")
    ensure_hosts_entries([DOMAIN])  # clients reach the registry by its public name, on loopback
    with Dockerd(cache_dir() / "dockerd") as d:
        build_base_image(d, tmp_path_factory.mktemp("base"))
        yield d
        d.docker("image", "prune", "-f", check=False)  # earlier builds of the cargohold image


@pytest.fixture(scope="session")
def image(deploy_dockerd: Dockerd) -> str:
    """deploy/Dockerfile built from this checkout."""
    build_image(deploy_dockerd, IMAGE)
    return IMAGE
