"""Warm manifest hits by tag with `workers: 1` and `workers: 2`, the settings taking turns in one run.

Standalone: starts the test rig's Hub with one small image, then one cargohold per setting (anonymous
pulls, as in docs/ratelimit.md's cost bench), warms the tag, and runs `ab -k -c 32` against each in
turn for `rounds` rounds, so that a busy machine slows all of them alike. Prints per setting the best
req/s, the p99 of that round and the server CPU per request (all processes of the setting), and the
ratio of req/s to `workers: 1`. "workers 2, limits on" is `workers: 2` with the shipped rate limiting
(`preset: team`, memory storage; every client here is one address, so its budgets are raised out of
the way: the bench measures the cost of counting, not refusals). The others run with limits off.

With `--uvloop` (uvloop installed) "workers 1, uvloop" runs the same server on uvloop's event loop,
to see whether it is worth a setting. With `--against DIR` (another checkout of cargohold, e.g. a
`git worktree` of the commit before a change) "workers 1/2, DIR" run that checkout's `src/`: an A/B of a
code change in one run.

    .venv/bin/python -m bench.workers_scaling [--seconds 5] [--rounds 3] [--uvloop] [--against DIR]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
from pathlib import Path
from typing import Any

from bench.scenarios import ab
from bench.systems import cpu_seconds, process_tree
from rig.hub import Hub
from rig.images import ACCEPT_ALL, simple_image
from rig.server import Cargohold

UVLOOP = "import sys, uvloop; uvloop.install(); from cargohold.cli import main; sys.exit(main(sys.argv[1:]))"


class OnUvloop(Cargohold):
    """The same server, its event loop uvloop's."""

    def command(self) -> list[str]:
        return [self.python, "-c", UVLOOP, "serve", "--config", str(self.config_path)]


class FromSource(Cargohold):
    """The same server run from another checkout's `src/` (set `source` before starting it)."""

    source = Path()

    def command(self) -> list[str]:
        code = f"import sys; sys.path.insert(0, {str(self.source / 'src')!r}); {FROM_CLI}"
        return [self.python, "-c", code, "serve", "--config", str(self.config_path)]


FROM_CLI = "from cargohold.cli import main; sys.exit(main(sys.argv[1:]))"
REPO, TAG = "bench/scaling", "latest"
CONNECTIONS = 32
BIG = 1_000_000_000  # counted, never reached (0 would mean not counted at all)
UNLIMITED = dict.fromkeys(("requests_per_second", "burst", "connections", "pulls_per_minute", "pulls_per_hour"), BIG)
OFF = {"preset": "off"}  # the rig runs the shipped defaults (limits on); these settings measure serving alone
SETTINGS: dict[str, dict[str, Any]] = {
    "workers 1": {"workers": 1, "rate_limit": OFF},
    "workers 2": {"workers": 2, "rate_limit": OFF},
    "workers 2, limits on": {"workers": 2, "rate_limit": {"preset": "team", **UNLIMITED}},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--uvloop", action="store_true", help="also workers 1 on uvloop")
    parser.add_argument("--against", type=Path, help="also workers 1 and 2 run from this checkout's src/")
    args = parser.parse_args()
    settings = {**SETTINGS, **({"workers 1, uvloop": {"workers": 1, "rate_limit": OFF}} if args.uvloop else {})}
    if args.against:
        FromSource.source = args.against.resolve()
        for workers in (1, 2):
            settings[f"workers {workers}, {args.against.name}"] = {"workers": workers, "rate_limit": OFF}
    work = Path(tempfile.mkdtemp(prefix="cargohold-bench-"))
    runs: dict[str, list[tuple[float, float, float]]] = {name: [] for name in settings}
    try:
        with Hub(work / "hub") as hub:
            hub.push_image(simple_image("scaling-bench"), REPO, TAG)
            servers = {
                name: _kind(name, args.against)(work / f"srv{i}", hub.url, overrides=over)
                for i, (name, over) in enumerate(settings.items())
            }
            try:
                for srv in servers.values():
                    srv.start()
                    ab(f"{srv.url}/v2/{REPO}/manifests/{TAG}", seconds=1, connections=1, headers={}, basic=None)
                for _ in range(args.rounds):
                    for name, srv in servers.items():
                        assert srv.pid is not None
                        pids = process_tree(srv.pid)
                        before = cpu_seconds(pids)
                        url = f"{srv.url}/v2/{REPO}/manifests/{TAG}"
                        result = ab(
                            url,
                            seconds=args.seconds,
                            connections=CONNECTIONS,
                            headers={"Accept": ACCEPT_ALL},
                            basic=None,
                        )
                        used = cpu_seconds(pids) - before
                        runs[name].append((result.rps, result.p99_ms, used / (result.rps * args.seconds) * 1e6))
                        print(f"  {name:22} {result.rps:8,.0f} req/s  p99 {result.p99_ms:.0f} ms", flush=True)
            finally:
                for srv in servers.values():
                    srv.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    base = max(r[0] for r in runs["workers 1"])
    print(f"\nwarm manifest by tag, ab -k -c {CONNECTIONS}, {args.seconds} s x {args.rounds} rounds (best round)")
    for name, rounds in runs.items():
        rps, p99, _ = max(rounds)
        cpu = statistics.median(r[2] for r in rounds)
        print(
            f"  {name:22} {rps:8,.0f} req/s ({rps / base:.2f}x workers 1)  p99 {p99:.0f} ms  {cpu:5.0f} µs CPU/request"
        )


def _kind(setting: str, against: Path | None) -> type[Cargohold]:
    if "uvloop" in setting:
        return OnUvloop
    return FromSource if against is not None and setting.endswith(f", {against.name}") else Cargohold


if __name__ == "__main__":
    main()
