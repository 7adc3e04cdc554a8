"""Where the CPU of a cold pull goes: per component, direct and through each mirror.

    .venv/bin/python -m bench.cold_cpu [--pulls 3] [--layer-mib 256]

Starts the rig's hub with the big image, nginx relaying to it (`nginx-relay`), nginx with
`proxy_cache` (writes the layer to disk, no digest check) and cargohold, then pulls the image with
empty caches through each, in turn, `--pulls` times. Prints MB/s and the CPU seconds the hub's
Python front (this process), the hub's other processes, the client process and the mirror used:
on a machine where they share the cores, a mirror's CPU is what it adds to a pull's wall time.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import tempfile
import time
from pathlib import Path

from bench.load import Auth
from bench.scenarios import client_spec, load
from bench.systems import CargoholdSystem, Nginx, NginxRelay, NginxSystem, System, Upstream, cpu_seconds, process_tree
from rig.hub import Hub
from rig.images import big_image


class NginxCache(NginxSystem):
    """nginx `proxy_cache` in front of the upstream: caches on disk, checks no digest."""

    name = "nginx-cache"

    def __init__(self, workdir: Path, upstream_url: str) -> None:
        self.cache = workdir / "cache"
        upstream = upstream_url.split("://", 1)[1]
        block = (
            f"    location / {{ proxy_pass http://{upstream}; proxy_http_version 1.1; proxy_set_header Host $http_host;"
            " proxy_cache c; proxy_cache_valid 200 1h; proxy_cache_key $uri; proxy_ignore_headers Cache-Control Set-Cookie; }"
        )
        self.nginx = Nginx(
            workdir, block, access_log=False, http_block=f"  proxy_cache_path {self.cache} keys_zone=c:10m max_size=2g;"
        )
        self.nginx.start()
        self.url = self.nginx.url
        self.auth = Auth("bearer")
        self.auths = [self.auth]

    def wipe(self) -> None:
        shutil.rmtree(self.cache, ignore_errors=True)
        self.cache.mkdir(parents=True)


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.cold_cpu", description=__doc__)
    parser.add_argument("--pulls", type=int, default=3)
    parser.add_argument("--layer-mib", type=int, default=256)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="cargohold-cold-cpu-"))
    systems: list[System] = []
    try:
        with Hub(work / "hub") as hub:
            big = hub.push_image(
                big_image(work / "images", args.layer_mib << 20, seed="bench-big"), "bench/big", "latest"
            )
            hub_pids = [p for p in process_tree(os.getpid()) if p != os.getpid()]
            systems = [
                NginxRelay(work / "relay", hub.url),
                NginxCache(work / "nginx-cache", hub.url),
                CargoholdSystem(work / "cargohold", hub.url),
            ]
            print(f"{'pull':12} {'MB/s':>6}  CPU s: {'front':>5} {'hub':>5} {'client':>6} {'mirror':>6}")
            for _ in range(args.pulls):
                for system in [Upstream(hub), *systems]:
                    system.wipe()
                    time.sleep(0.5)  # let a restarted mirror settle
                    mirror = system.pids()
                    before = (time.process_time(), cpu_seconds(hub_pids), _children_cpu(), cpu_seconds(mirror))
                    result = load({"op": "pull", "repo": big.repo, "ref": big.tag, **client_spec(system)})
                    after = (time.process_time(), cpu_seconds(hub_pids), _children_cpu(), cpu_seconds(mirror))
                    front, hub_cpu, client, used = (b - a for a, b in zip(before, after, strict=True))
                    mbs = result["bytes"] / result["seconds"] / 1e6
                    print(
                        f"{system.name:12} {mbs:6.0f}         {front:5.2f} {hub_cpu:5.2f} {client:6.2f} {used if mirror else 0:6.2f}",
                        flush=True,
                    )
    finally:
        for system in systems:
            system.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
