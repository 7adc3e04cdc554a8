"""What rate limiting costs: requests/s of warm manifest hits (by tag) with limiting off and on.

Standalone: starts the test rig's Hub with one small image, then cargohold (tests/rig/server.py)
once per setting, warms the manifest, and sends a bounded number of GETs over 32 connections
with aiohttp. The requests come from CLIENTS addresses through a trusted proxy (X-Forwarded-For),
as behind Traefik, so "on" runs the real `medium` preset: every request is counted (a pull by tag:
three moving windows and a connection slot) and none is refused (a 429 stops the bench).
Prints per setting the best requests/s and the server's CPU time per request (less disturbed
by other work on the machine), each also as a ratio to "off". The settings take turns.

    .venv/bin/python bench/ratelimit_cost.py [--requests 10000] [--rounds 5] [--redis]
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from cargohold.config import load_settings
from cargohold.identity import Identity
from cargohold.oci.mediatypes import FULL_ACCEPT
from cargohold.ratelimit.limiter import Kind, RateLimiter
from cargohold.ratelimit.memory import MovingWindowMemory
from rig.hub import Hub
from rig.images import simple_image
from rig.redisd import RedisServer
from rig.server import Cargohold

CONNECTIONS = 32
REPO, TAG = "bench/ratelimit", "latest"
CLIENTS = 1000
PROXY = {"trusted_proxies": ["127.0.0.1/32"]}
ON = {**PROXY, "preset": "medium"}


async def hammer(url: str, total: int) -> float:
    """Requests/s for `total` GETs of `url` over CONNECTIONS connections; all must be 200."""
    connector = aiohttp.TCPConnector(limit=CONNECTIONS)
    async with aiohttp.ClientSession(connector=connector, headers={"Accept": FULL_ACCEPT}) as session:
        left = total

        async def worker() -> None:
            nonlocal left
            while left > 0:
                left -= 1
                client = f"10.0.{left % CLIENTS // 250}.{left % 250 + 1}"
                async with session.get(url, headers={"X-Forwarded-For": client}) as resp:
                    await resp.read()
                    if resp.status != 200:
                        raise RuntimeError(f"{url}: {resp.status} {await resp.text()}")

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(CONNECTIONS)))
        return total / (time.perf_counter() - started)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(servers: dict[str, Cargohold], args: argparse.Namespace) -> dict[str, tuple[float, float]]:
    """Per setting: best requests/s and median server CPU µs per request over `rounds` rounds,
    the settings taking turns so that a busy machine slows all of them alike."""
    rates: dict[str, list[float]] = {name: [] for name in servers}
    costs: dict[str, list[float]] = {name: [] for name in servers}
    for srv in servers.values():
        asyncio.run(hammer(f"{srv.url}/v2/{REPO}/manifests/{TAG}", 200))  # warm: fetched once, then hits
    for _ in range(args.rounds):
        for name, srv in servers.items():
            assert srv.pid is not None
            before = cpu_seconds(srv.pid)
            rates[name].append(asyncio.run(hammer(f"{srv.url}/v2/{REPO}/manifests/{TAG}", args.requests)))
            costs[name].append((cpu_seconds(srv.pid) - before) / args.requests * 1e6)
    return {name: (max(rates[name]), statistics.median(costs[name])) for name in servers}


async def counting_cost(total: int) -> float:
    """µs to count one pull by tag in-process (three windows and a connection slot), the part of
    the cost that the busy-machine noise of an HTTP benchmark hides."""
    config = load_settings(None, environ={}, overrides={"rate_limit": ON}).rate_limit
    limiter = RateLimiter(config, MovingWindowMemory())
    clients = [Identity(ipaddress.ip_address(f"10.0.{i // 250}.{i % 250 + 1}")) for i in range(CLIENTS)]
    started = time.perf_counter()
    for i in range(total):
        who = clients[i % CLIENTS]
        key, items = who.key, limiter.items(who)
        if await limiter.check(key, items, Kind.PULL) is not None:
            raise RuntimeError("the bench budget refused a request")
        await limiter.connections.acquire(key, items.budget.connections)
        limiter.connections.release(key)
    return (time.perf_counter() - started) / total * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--redis", action="store_true", help="also measure with Redis storage (needs redis-server)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="cargohold-bench-"))
    try:
        with Hub(work / "hub") as hub:
            hub.push_image(simple_image("ratelimit-bench"), REPO, TAG)
            settings: dict[str, dict[str, Any]] = {"off": {**PROXY, "preset": "off"}, "on (memory)": ON}
            redis = RedisServer(work / "redis").start() if args.redis else None
            if redis is not None:
                settings["on (redis)"] = {**ON, "storage": redis.url}
            servers = {
                name: Cargohold(work / f"srv{i}", hub.url, overrides={"rate_limit": config, "log_level": "warning"})
                for i, (name, config) in enumerate(settings.items())
            }
            try:
                for srv in servers.values():
                    srv.start()
                results = measure(servers, args)
            finally:
                for srv in servers.values():
                    srv.stop()
                if redis is not None:
                    redis.stop()
        print(
            f"warm manifest hits by tag, {args.requests} requests x {args.rounds} rounds, "
            f"{CONNECTIONS} connections, {CLIENTS} client addresses"
        )
        off_rate, off_cpu = results["off"]
        counting = asyncio.run(counting_cost(args.requests))
        for name, (rate, cpu) in results.items():
            print(
                f"  {name:12} {rate:7.0f} req/s (best, {rate / off_rate:.2f} of off)  "
                f"{cpu:6.0f} µs server CPU per request (median, {cpu / off_cpu:.2f} of off)"
            )
        print(f"  counting one pull in-process: {counting:.1f} µs = {counting / off_cpu:.1%} of off's CPU per request")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
