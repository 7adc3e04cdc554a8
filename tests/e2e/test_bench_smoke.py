"""`python -m bench.run --quick`: the benchmark still runs end to end (cargohold with logins, Basic and
Bearer, over HTTP and HTTPS), and the outcomes that are not timings hold (one upstream GET per blob in the
herd, no upstream request for warm manifests)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
SYSTEMS = {"nginx-file", "registry+nginx", "cargohold"}

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="the bench's nginx runs workers as root to read the hub's files"),
]


def test_quick_bench_runs_every_scenario_through_every_system(tmp_path: Path) -> None:
    for tool in ("nginx", "ab", "htpasswd", "docker-registry"):
        assert shutil.which(tool) or Path(f"/usr/sbin/{tool}").exists(), (
            f"{tool} is not installed (make test installs it)"
        )
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.run", "--quick", "--json", str(out)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=240,
        stdin=subprocess.DEVNULL,
        check=False,  # the assertion below shows its output
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    medians = report["medians"]

    for metric in ("warm1", "warm8"):
        assert set(medians[metric]) >= SYSTEMS, metric
        assert all(v > 0 for v in medians[metric].values()), metric
    assert "cargohold x2" in medians["warm8"]  # eight clients on every core too
    manifest_rows = {"nginx-file", "registry+nginx", "cargohold (basic)", "cargohold (bearer)"}
    manifest_rows |= {"cargohold x2 (basic)", "cargohold x2 (bearer)"}  # the same with `workers: 2`
    assert set(medians["manifest_rps"]) == manifest_rows
    assert all(v > 0 for v in medians["manifest_rps"].values())
    assert set(medians["cold"]) == {"upstream", "nginx-relay", "registry+nginx", "cargohold"}
    assert medians["herd_gets"]["cargohold"] == medians["herd_gets"]["ideal"] == 22  # config + 21 layers
    assert medians["herd_gets"]["cargohold x2"] == 22  # one per blob per machine, whichever worker a client reaches
    assert medians["herd_failed"]["cargohold"] == medians["herd_failed"]["cargohold x2"] == 0
    assert medians["manifest_upstream"]["cargohold (basic)"] == medians["manifest_upstream"]["cargohold (bearer)"] == 0
    assert medians["manifest_upstream"]["registry+nginx"] > 0  # the replaced stack asks upstream every time
    assert 0 < medians["rss_herd"]["cargohold"] < 150

    # HTTPS: nginx `ssl` against cargohold's own TLS (workers 1 and 2), clients verifying the bench's CA
    for metric, rows in (("tls1", set()), ("tls8", {"cargohold tls x2"})):
        assert set(medians[metric]) == {"nginx-tls", "cargohold tls"} | rows, metric
        assert all(v > 0 for v in medians[metric].values()), metric
    tls_rows = {"nginx-tls", "cargohold tls (basic)", "cargohold tls (bearer)"}
    tls_rows |= {"cargohold tls x2 (basic)", "cargohold tls x2 (bearer)"}
    assert set(medians["manifest_tls_rps"]) == tls_rows
    assert all(v > 0 for v in medians["manifest_tls_rps"].values())
    assert set(medians["manifest_tls_upstream"].values()) == {0}
    assert "cargohold" in proc.stdout and "target" in proc.stdout  # the table was printed
    for machine_fact in ("cpu", "cores", "ram", "kernel", "python", "aiohttp"):
        assert report["machine"][machine_fact]
