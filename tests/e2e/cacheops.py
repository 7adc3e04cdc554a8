"""Helpers for the cache-operations tests: the CLI as a subprocess, metrics as numbers, stored files."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from rig.clients import skopeo_copy
from rig.server import REPO_ROOT, Cargohold
from rig.util import http_request, wait_until


def cli(srv: Cargohold, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """`python -m cargohold ARGS --config <the server's config>`."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT / "src")}
    res = subprocess.run(
        [sys.executable, "-m", "cargohold", *args, "--config", str(srv.config_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        cwd=REPO_ROOT,
        check=False,  # checked below, with the output in the message
    )
    if check and res.returncode != 0:
        raise AssertionError(f"cargohold {' '.join(args)} exited {res.returncode}:\n{res.stdout}\n{res.stderr}")
    return res


def pull(srv: Cargohold, ref: str, work: Path, **kwargs: object) -> None:
    """skopeo copy from cargohold into a fresh directory."""
    skopeo_copy(f"{srv.netloc}/{ref}", work / uuid.uuid4().hex, **kwargs)  # type: ignore[arg-type]


def metrics(url: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of a /metrics page, keyed by (name, labels)."""
    res = http_request("GET", f"{url}/metrics")
    assert res.status == 200, res.body
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(res.body.decode())
        for s in family.samples
    }


def sample(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    """The sum of the samples of `name` whose labels include `labels` (0 when none)."""
    return sum(v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= ls)


def settled(srv: Cargohold) -> None:
    """Wait until no download is in flight: a client has its whole blob as soon as the digest checks
    out, and the fsync and rename into the store follow (bounded wait)."""
    if srv.running:
        wait_until(
            lambda: sample(metrics(srv.url), "cargohold_downloads_in_flight") == 0,
            timeout=60,
            what="downloads to be committed to the store",
        )


def stored(srv: Cargohold) -> set[str]:
    """Digests of the files in the server's blob store, once every download is committed."""
    settled(srv)
    root = srv.data_dir / "blobs"
    return {f"{p.parent.parent.name}:{p.name}" for p in root.glob("*/*/*")} if root.exists() else set()
