"""What rate limiting costs: requests/s of warm manifest hits (by tag) with limiting off and on.

Standalone: starts the test rig's Hub with one small image, then cargohold (tests/rig/server.py)
once per setting, warms the manifest, and sends a bounded number of GETs over 32 connections
with aiohttp. "on" counts every request against budgets too large to refuse any, so what is
measured is the cost of counting (three moving windows per pull plus a connection slot), not of
429s. Prints requests/s per setting and the ratio to "off".

    .venv/bin/python bench/ratelimit_cost.py [--requests 20000] [--rounds 3] [--redis]
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from rig.hub import Hub  # noqa: E402
from rig.images import simple_image  # noqa: E402
from rig.redisd import RedisServer  # noqa: E402
from rig.server import Cargohold  # noqa: E402

from cargohold.mediatypes import FULL_ACCEPT  # noqa: E402

CONNECTIONS = 32
REPO, TAG = "bench/ratelimit", "latest"
# Budgets no bench run can exhaust: limiting does all its counting and never refuses.
NEVER_REFUSE = {
    "preset": "off",
    "requests_per_second": 1_000_000,
    "burst": 1_000_000,
    "connections": 1_000,
    "pulls_per_minute": 10_000_000,
    "pulls_per_hour": 100_000_000,
}


async def hammer(url: str, total: int) -> float:
    """Requests/s for `total` GETs of `url` over CONNECTIONS connections; all must be 200."""
    connector = aiohttp.TCPConnector(limit=CONNECTIONS)
    async with aiohttp.ClientSession(connector=connector, headers={"Accept": FULL_ACCEPT}) as session:
        left = total

        async def worker() -> None:
            nonlocal left
            while left > 0:
                left -= 1
                async with session.get(url) as resp:
                    await resp.read()
                    if resp.status != 200:
                        raise RuntimeError(f"{url}: {resp.status} {await resp.text()}")

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(CONNECTIONS)))
        return total / (time.perf_counter() - started)


def measure(workdir: Path, hub: Hub, rate_limit: dict[str, Any], args: argparse.Namespace) -> float:
    """Best of `rounds` runs against a fresh cargohold with this rate_limit section."""
    srv = Cargohold(workdir, hub.url, overrides={"rate_limit": rate_limit, "log_level": "warning"})
    srv.start()
    try:
        url = f"{srv.url}/v2/{REPO}/manifests/{TAG}"
        asyncio.run(hammer(url, 200))  # warm: fetched once, then hits
        return max(asyncio.run(hammer(url, args.requests)) for _ in range(args.rounds))
    finally:
        srv.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--redis", action="store_true", help="also measure with Redis storage (needs redis-server)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="cargohold-bench-"))
    try:
        with Hub(work / "hub") as hub:
            hub.push_image(simple_image("ratelimit-bench"), REPO, TAG)
            settings: dict[str, dict[str, Any]] = {"off": {"preset": "off"}, "on (memory)": NEVER_REFUSE}
            redis = RedisServer(work / "redis").start() if args.redis else None
            if redis is not None:
                settings["on (redis)"] = {**NEVER_REFUSE, "storage": redis.url}
            try:
                results = {
                    name: measure(work / name.replace(" ", "_"), hub, config, args)
                    for name, config in settings.items()
                }
            finally:
                if redis is not None:
                    redis.stop()
        print(f"warm manifest hits by tag, {args.requests} requests x {args.rounds} rounds, {CONNECTIONS} connections")
        for name, rps in results.items():
            print(f"  {name:12} {rps:8.0f} req/s  {rps / results['off']:.3f} of off")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
