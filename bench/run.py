"""`python -m bench.run [--runs N] [--quick] [--json FILE]`: every scenario through every system, one table.

Starts the rig's hub, pushes the bench images, starts nginx serving files, the replaced stack
and cargohold (and, for the HTTPS scenarios, nginx `ssl` and cargohold `tls`), runs the scenarios `--runs` times (systems side by side within each run) and
prints medians with ratios and the issue's targets. Everything listens on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

from bench.report import CARGOHOLD, REPLACED, Results
from bench.scenarios import CARGOHOLD_2, HTTPS_SCENARIOS, METRICS, SCENARIOS, Bench, Options
from bench.systems import CargoholdSystem, NginxFile, NginxRelay, ReplacedStack, ServerTls, System, Upstream
from rig.hub import Hub
from rig.images import Image, big_image, make_image, make_layer, simple_image

QUICK = Options(
    runs=1, layer_mib=2, herd_layer_kib=4, herd_clients=20, warm_reads=1, warm_clients=8, manifest_seconds=1
)


def machine() -> dict[str, str]:
    """The facts a figure needs next to it."""
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    mem_kib = int(Path("/proc/meminfo").read_text().split()[1])
    return {
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "ram": f"{mem_kib / 1024 / 1024:.1f} GiB",
        "kernel": platform.release(),
        "python": platform.python_version(),
        "aiohttp": aiohttp.__version__,
    }


def _herd_image(seed: str, layers: int, size: int) -> Image:
    """An image of `layers` layers of random bytes, so no two herd images share a blob."""
    return make_image([make_layer({f"bench/{seed}/{i}.bin": os.urandom(size)}) for i in range(layers)], label=seed)


def _push_images(hub: Hub, opts: Options, cache: Path) -> tuple[Image, Image, dict[tuple[int, str], Image]]:
    big = hub.push_image(big_image(cache, opts.layer_mib << 20, seed="bench-big"), "bench/big", "latest")
    warm = hub.push_image(simple_image("bench-warm", layers=2), "bench/warm", "latest")
    herds = {}
    for run in range(opts.runs):
        for name in (REPLACED, CARGOHOLD, CARGOHOLD_2):
            seed = f"herd-{run}-{name.replace('+', '-').replace(' ', '-')}"
            image = _herd_image(seed, opts.herd_layers, opts.herd_layer_kib << 10)
            herds[(run, name)] = hub.push_image(image, f"bench/{seed}", "latest")
    return big, warm, herds


def _files(workdir: Path, hub: Hub, big: Image, warm: Image, tls: ServerTls | None = None) -> NginxFile:
    """nginx serving the big layer and the warm manifest as files, at their registry paths."""
    files = NginxFile(workdir, tls)
    files.publish(f"/v2/{big.repo}/blobs/{big.layers[-1].digest}", hub.blob_path(big.layers[-1].digest))
    files.publish(f"/v2/{warm.repo}/manifests/{warm.tag}", warm.manifest)
    return files


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__)
    p.add_argument("--quick", action="store_true", help="tiny sizes, one run: a smoke test of the bench itself")
    p.add_argument("--runs", type=int, help="runs per scenario; the median is reported (default 3)")
    p.add_argument("--layer-mib", type=int, help="size of the big layer (default 256)")
    p.add_argument("--manifest-seconds", type=int, help="length of each manifest load (default 5)")
    p.add_argument("--only", action="append", choices=list(SCENARIOS), help="run only these scenarios")
    p.add_argument("--json", type=Path, help="also write samples, medians and targets here")
    p.add_argument("--keep", action="store_true", help="keep the work dir (logs of every system)")
    return p


def options_from(args: argparse.Namespace) -> Options:
    opts = QUICK if args.quick else Options()
    for name in ("runs", "layer_mib", "manifest_seconds"):
        if getattr(args, name) is not None:
            setattr(opts, name, getattr(args, name))
    if opts.runs < 1:
        raise SystemExit("--runs must be at least 1")
    return opts


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    opts = options_from(args)
    facts = machine()
    print("machine: " + ", ".join(f"{k} {v}" for k, v in facts.items()), flush=True)
    workdir = Path(tempfile.mkdtemp(prefix="cargohold-bench-"))
    results = Results(METRICS)
    started = time.monotonic()
    systems: list[System] = []
    try:
        with Hub(workdir / "hub") as hub:
            print(f"pushing images (big layer {opts.layer_mib} MiB) ...", flush=True)
            big, warm, herds = _push_images(hub, opts, workdir / "images")
            systems.append(_files(workdir / "nginx-file", hub, big, warm))
            systems.append(NginxRelay(workdir / "nginx-relay", hub.url))
            systems.append(ReplacedStack(workdir / "replaced", hub.url))
            systems.append(CargoholdSystem(workdir / "cargohold", hub.url))
            systems.append(CargoholdSystem(workdir / "cargohold-2", hub.url, workers=2))
            names = [name for name in SCENARIOS if not args.only or name in args.only]
            if HTTPS_SCENARIOS.intersection(names):
                tls = ServerTls.create(workdir / "tls")
                systems.append(_files(workdir / "nginx-tls", hub, big, warm, tls))
                systems.append(CargoholdSystem(workdir / "cargohold-tls", hub.url, tls=tls))
                systems.append(CargoholdSystem(workdir / "cargohold-tls-2", hub.url, workers=2, tls=tls))
            bench = Bench(hub, {s.name: s for s in [Upstream(hub), *systems]}, opts, big, warm, herds, results)
            chosen = [SCENARIOS[name] for name in names]
            for run in range(opts.runs):
                for scenario in chosen:
                    scenario(bench, run)
    finally:
        for system in reversed(systems):
            system.stop()
        if args.keep:
            print(f"work dir kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    print(f"\nmedians of {opts.runs} run(s), {time.monotonic() - started:.0f} s in all; ratios are of medians\n")
    print(results.table())
    if args.json:
        args.json.write_text(json.dumps({"machine": facts, "options": opts.__dict__, **results.as_json()}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
