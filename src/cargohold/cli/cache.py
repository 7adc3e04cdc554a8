"""`cargohold cache stats|ls|prune|rm|pin|unpin|history` on an instance's cache (data_dir, or bucket + Redis),
`cargohold warm IMAGE...`, and the air-gap bundles' `cargohold export|import` (see bundle.py).

The cache commands open the index (SQLite in WAL mode) next to a running server safely: rows are
deleted before files, and the server fetches again whatever disappears under it.
`warm` goes through the running instance's HTTP API, so the server's cache fills as for a pull. Its manifest
requests say they are a prefetch: when an upstream's pull quota is at its reserve the server defers them
(429, reason quota_reserve) and warm says so and exits with 75 (EX_TEMPFAIL: try again later).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tarfile
import time
from pathlib import Path

import aiohttp

from cargohold.cache.backends import open_backends
from cargohold.cache.evict import evict
from cargohold.cache.pins import Pinned, closure, resolve_pins
from cargohold.config import Settings, parse_duration, parse_size, split_host_port
from cargohold.handlers.status import human
from cargohold.oci.digests import Digest
from cargohold.oci.imagename import ImageName, parse_image
from cargohold.oci.mediatypes import FULL_ACCEPT
from cargohold.oci.refs import Child, references
from cargohold.sync.entries import sync_pins

WARM_PARALLEL = 4
# EX_TEMPFAIL: an image was deferred (the upstream's pull quota is at its reserve); try again later.
DEFERRED = 75
PREFETCH = {"Cargohold-Purpose": "prefetch"}


def config_option() -> argparse.ArgumentParser:
    """The parent parser of every command that reads the config: `--config FILE` (or CARGOHOLD_CONFIG)."""
    config = argparse.ArgumentParser(add_help=False)
    config.add_argument("--config", default=os.environ.get("CARGOHOLD_CONFIG"), help="YAML config file")
    return config


def add_commands(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    config = config_option()
    cache = commands.add_parser("cache", help="inspect and trim the cache (safe next to a running server)")
    sub = cache.add_subparsers(dest="cache_command", required=True)
    stats = sub.add_parser("stats", parents=[config], help="size, entries, hit ratio")
    stats.add_argument("--json", action="store_true", help="machine-readable figures")
    sub.add_parser("ls", parents=[config], help="cached images and tags with size and last pull")
    prune = sub.add_parser("prune", parents=[config], help="evict least-recently-used content now")
    prune.add_argument(
        "--max-size", type=parse_size, help="evict until the cache fits, e.g. 10GiB (default cache.max_size)"
    )
    prune.add_argument(
        "--older-than", type=parse_duration, help="evict content unused this long, e.g. 30d (default cache.max_age)"
    )
    rm = sub.add_parser("rm", parents=[config], help="remove an image (all its tags) or one tag")
    rm.add_argument("image", help="IMAGE[:TAG], e.g. alpine, library/alpine:3.20, ghcr.io/org/app:1")
    for verb, what in (("pin", "keep an image (all tags) or tags from eviction"), ("unpin", "undo a `cache pin`")):
        pin = sub.add_parser(verb, parents=[config], help=what)
        pin.add_argument("image", help="IMAGE[:TAG] with globs, e.g. alpine, library/redis:7.*, ghcr.io/org/*")
    history = sub.add_parser("history", parents=[config], help="when the tags of an image moved to a new digest")
    history.add_argument("image", help="IMAGE[:TAG], e.g. alpine, library/alpine:3.20")
    history.add_argument("--limit", type=int, default=100, help="newest moves shown (default 100)")
    accept = sub.add_parser("accept", parents=[config], help="follow the move of an immutable tag (immutable_tags)")
    accept.add_argument("image", help="IMAGE:TAG, e.g. library/postgres:16")
    warm = commands.add_parser("warm", parents=[config], help="prefetch images through the running instance")
    warm.add_argument("images", nargs="+", metavar="IMAGE", help="IMAGE[:TAG|@DIGEST]")
    warm.add_argument("--platform", help="only this platform of multi-platform images, e.g. linux/amd64")
    warm.add_argument("--url", help="the instance's URL (default: http:// + listen)")
    warm.add_argument("--user", help="USER:PASSWORD when the instance requires auth")
    export = commands.add_parser("export", parents=[config], help="write images to an OCI layout tar (air gap)")
    export.add_argument("images", nargs="+", metavar="IMAGE", help="IMAGE[:TAG|@DIGEST]")
    export.add_argument("-o", "--output", required=True, type=Path, help="the bundle to write, e.g. bundle.tar")
    export.add_argument("--platform", action="append", help="only this platform of multi-platform images (repeatable)")
    export.add_argument("--url", help="the instance's URL, for content not cached (default: http:// + listen)")
    export.add_argument("--user", help="USER:PASSWORD when the instance requires auth")
    load = commands.add_parser("import", parents=[config], help="verify a bundle and seed the cache with it")
    load.add_argument("bundle", type=Path, help="an OCI layout tar (cargohold export, skopeo oci-archive:)")


def run(args: argparse.Namespace, settings: Settings) -> int:
    if args.command == "warm":
        return asyncio.run(warm(settings, args.images, args.platform, args.url, args.user))
    if args.command in ("export", "import"):
        return _bundle(args, settings)
    if not settings.index.redis and not (settings.data_dir / "index.sqlite").exists():
        print(f"cargohold: no cache in {settings.data_dir}", file=sys.stderr)
        return 1
    commands = {
        "stats": stats,
        "ls": ls,
        "prune": prune,
        "rm": rm,
        "pin": pin,
        "unpin": pin,
        "history": history,
        "accept": accept,
    }
    command = commands[args.cache_command]
    return asyncio.run(command(settings, args))


def _bundle(args: argparse.Namespace, settings: Settings) -> int:
    """Imported here: bundle.py builds on this module (image names, the instance's URL and session)."""
    from cargohold import bundle
    from cargohold.errors import RegistryError

    try:
        if args.command == "export":
            output = args.output.absolute()
            asyncio.run(bundle.export(settings, args.images, output, args.platform, args.url, args.user, print))
        elif asyncio.run(bundle.import_bundle(settings, args.bundle, print)):
            print("cargohold: import: immutable tags refused (above); the rest is imported", file=sys.stderr)
            return 1
    except (bundle.BundleError, RegistryError, OSError, tarfile.TarError, aiohttp.ClientError, TimeoutError) as exc:
        print(f"cargohold: {args.command} failed: {exc or type(exc).__name__}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, asyncio.CancelledError):  # SIGINT, SIGTERM: what was half-written is removed
        print(f"cargohold: {args.command} interrupted", file=sys.stderr)
        return 130
    return 0


async def stats(settings: Settings, args: argparse.Namespace) -> int:
    async with open_backends(settings) as backends:
        usage, counts = await backends.index.usage(), await backends.index.counters()
        pinned = await resolve_pins(backends.index, backends.store, sync_pins(settings))
    cap = settings.cache.max_size
    pins_over_cap = cap is not None and pinned.size > cap
    hits, misses, stale = (int(counts.get(k, 0)) for k in ("hit", "miss", "stale"))
    from_cache, from_upstream = int(counts.get("bytes_cache", 0)), int(counts.get("bytes_upstream", 0))
    ratio = (hits + stale) / (hits + misses + stale) if hits + misses + stale else None
    figures = {
        "data_dir": str(settings.data_dir),
        "size": usage.size,
        "max_size": cap,
        "pinned_size": pinned.size,
        "pinned_entries": len(pinned.digests),
        "pins_over_cap": pins_over_cap,
        "blobs": usage.blobs,
        "manifests": usage.manifests,
        "tags": usage.tags,
        "hits": hits,
        "misses": misses,
        "stale": stale,
        "hit_ratio": ratio,
        "bytes_from_cache": from_cache,
        "bytes_from_upstream": from_upstream,
    }
    if args.json:
        print(json.dumps(figures, indent=2))
        return 0
    of_cap = f" of {human(cap)}" if cap else " (no cap)"
    s3 = settings.storage.s3 if settings.storage.backend == "s3" else None
    print(f"cache:      {f's3://{s3.bucket}/{s3.prefix}' if s3 else settings.data_dir}")
    print(f"size:       {human(usage.size)}{of_cap}")
    over = " - MORE THAN THE CAP: only pinned content is kept" if pins_over_cap else ""
    print(f"pinned:     {human(pinned.size)} in {len(pinned.digests)} entries{over}")
    print(f"entries:    {usage.blobs} blobs, {usage.manifests} manifests, {usage.tags} tags")
    print(f"hit ratio:  {f'{ratio:.1%}' if ratio is not None else '-'} ({hits} hits, {misses} misses, {stale} stale)")
    print(f"served:     {human(from_cache)} from cache, {human(from_upstream)} fetched upstream")
    return 0


def _when(when: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(when))


async def ls(settings: Settings, args: argparse.Namespace) -> int:
    async with open_backends(settings) as backends:
        rows = await backends.index.tag_rows()
        sizes = {entry.digest: entry.size for entry in await backends.index.stored()}
        print(f"{'IMAGE':50} {'DIGEST':19} {'CACHED':>10} {'PULLS':>6}  LAST PULL")
        for row in rows:
            cached = sum(sizes.get(d, 0) for d in await closure(backends.store, [row.digest]))
            name = f"{row.upstream}/{row.repository}:{row.tag}"
            print(f"{name:50} {row.digest[:19]:19} {human(cached):>10} {row.pulls:>6}  {_when(row.last_access)}")
    return 0


async def prune(settings: Settings, args: argparse.Namespace) -> int:
    max_size = args.max_size if args.max_size is not None else settings.cache.max_size
    max_age = args.older_than if args.older_than is not None else settings.cache.max_age
    if max_size is None and max_age is None:
        print("cargohold: give --max-size and/or --older-than (or set cache.max_size / cache.max_age)", file=sys.stderr)
        return 2
    async with open_backends(settings) as backends:
        index, store = backends.index, backends.store

        async def pins() -> Pinned:
            return await resolve_pins(index, store, sync_pins(settings))

        removed = await evict(
            index,
            store,
            max_size=max_size,
            unused_since=time.time() - max_age if max_age is not None else None,
            pins=pins,
        )
        usage = await backends.index.usage()
    print(f"removed {len(removed)} entries, {human(sum(e.size for e in removed))} freed; cache is {human(usage.size)}")
    return 0


async def rm(settings: Settings, args: argparse.Namespace) -> int:
    wanted = parse_image(settings, args.image)
    async with open_backends(settings) as backends:
        index, store = backends.index, backends.store
        rows = await index.tag_rows()
        chosen = [
            r
            for r in rows
            if (r.upstream, r.repository) == (wanted.upstream, wanted.repository) and wanted.tag in (None, r.tag)
        ]
        if not chosen:
            print(f"cargohold: {args.image} is not in the cache", file=sys.stderr)
            return 1
        for row in chosen:
            await index.drop_tag(row.upstream, row.repository, row.tag)
        kept = await closure(store, [r.digest for r in rows if r not in chosen])
        doomed = await closure(store, [r.digest for r in chosen]) - kept
        stored = {entry.digest: entry for entry in await index.stored()}
        freed = 0
        for digest in doomed & stored.keys():
            await index.forget(stored[digest].table, digest)
            await store.delete(Digest.parse(digest))
            freed += stored[digest].size
    print(f"removed {len(chosen)} tag(s) of {wanted.upstream}/{wanted.repository}, {human(freed)} freed")
    return 0


def _pattern(wanted: ImageName) -> str:
    """The pin (or history) key of a parsed image: `upstream/repository[:tag]`."""
    return f"{wanted.upstream}/{wanted.repository}" + (f":{wanted.tag}" if wanted.tag else "")


async def pin(settings: Settings, args: argparse.Namespace) -> int:
    """Pins are kept in the index: the running server's next eviction honours them."""
    pattern = _pattern(parse_image(settings, args.image))
    async with open_backends(settings) as backends:
        if args.cache_command == "pin":
            changed = await backends.index.add_pin(pattern)
            print(f"pinned {pattern}" if changed else f"{pattern} was pinned already")
            return 0
        if await backends.index.remove_pin(pattern):
            print(f"unpinned {pattern}")
            return 0
    configured = " (it is in cache.pin: edit the config)" if pattern in settings.cache.pin else ""
    print(f"cargohold: {pattern} is not pinned with `cache pin`{configured}", file=sys.stderr)
    return 1


async def history(settings: Settings, args: argparse.Namespace) -> int:
    wanted = parse_image(settings, args.image)
    async with open_backends(settings) as backends:
        moves = await backends.index.tag_moves(wanted.upstream, wanted.repository, wanted.tag, limit=args.limit)
    if not moves:
        print(f"no tag of {_pattern(wanted)} has moved")
        return 0
    print(f"{'MOVED':16}  {'TAG':40} {'FROM':19} -> TO")
    for move in moves:
        name = f"{move.upstream}/{move.repository}:{move.tag}"
        print(f"{_when(move.moved_at):16}  {name:40} {move.old_digest[:19]:19} -> {move.new_digest[:19]}")
    return 0


async def accept(settings: Settings, args: argparse.Namespace) -> int:
    """The tag is forgotten, so the next pull takes the digest upstream has now (and keeps it, if immutable)."""
    wanted = parse_image(settings, args.image)
    if wanted.tag is None:
        print("cargohold: accept takes IMAGE:TAG", file=sys.stderr)
        return 2
    key = (wanted.upstream, wanted.repository, wanted.tag)
    async with open_backends(settings) as backends:
        entry = await backends.index.get_tag(*key)
        moves = await backends.index.tag_moves(*key, limit=1)
        if entry is None or not moves or moves[0].old_digest != entry.digest:
            print(f"cargohold: {_pattern(wanted)} has no move to accept", file=sys.stderr)
            return 1
        await backends.index.drop_tag(*key)
    print(f"accepted: {_pattern(wanted)} follows upstream ({moves[0].new_digest} when last checked) at its next pull")
    return 0


# warm


def client_session(user: str | None) -> aiohttp.ClientSession:
    """A session for the instance's HTTP API (`USER:PASSWORD` when it requires auth); reads bounded in time."""
    auth = aiohttp.BasicAuth(*user.split(":", 1)) if user else None
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=300)
    return aiohttp.ClientSession(auth=auth, timeout=timeout, auto_decompress=False)


def base_url(settings: Settings, url: str | None) -> str:
    if url:
        return url.rstrip("/")
    host, port = split_host_port(settings.listen)
    host = "127.0.0.1" if host in ("0.0.0.0", "") else "[::1]" if host == "::" else host
    return f"http://{f'[{host}]' if ':' in host and not host.startswith('[') else host}:{port}"


class Progress:
    """One line per image that redraws on a terminal; whole lines per blob otherwise."""

    def __init__(self, name: str, total: int, blobs: int) -> None:
        self.name, self.total, self.blobs = name, total, blobs
        self.done = self.finished = 0
        self.tty = sys.stderr.isatty()

    def advance(self, nbytes: int) -> None:
        self.done += nbytes
        if self.tty:
            self._draw("\r")

    def blob_done(self, digest: str) -> None:
        self.finished += 1
        if not self.tty:
            print(f"{self.name}: {digest[:19]} done ({self.finished}/{self.blobs})", file=sys.stderr)

    def _draw(self, end: str) -> None:
        share = self.done / self.total if self.total else 1.0
        bar = "#" * int(30 * min(share, 1.0))
        print(
            f"\r{self.name} [{bar:30}] {human(self.done)}/{human(self.total)} {self.finished}/{self.blobs} blobs",
            end=end,
            file=sys.stderr,
            flush=True,
        )

    def close(self) -> None:
        if self.tty:
            self._draw("\n")


class Deferred(Exception):
    """The server deferred a prefetch: the upstream's pull quota is at the reserve kept for waiting clients."""


def _deferred(status: int, body: bytes) -> str | None:
    """The server's message when it deferred the request (429, reason quota_reserve), else None."""
    if status != 429:
        return None
    try:
        error = json.loads(body)["errors"][0]
        return str(error["message"]) if error["detail"]["reason"] == "quota_reserve" else None
    except (ValueError, KeyError, IndexError, TypeError):
        return None


async def _manifest(session: aiohttp.ClientSession, base: str, name: str, reference: str) -> bytes:
    headers = {"Accept": FULL_ACCEPT, **PREFETCH}
    async with session.get(f"{base}/v2/{name}/manifests/{reference}", headers=headers) as resp:
        deferred = _deferred(resp.status, await resp.content.read(64 * 1024) if resp.status == 429 else b"")
        if deferred is not None:
            raise Deferred(deferred)
        if resp.status != 200:
            raise RuntimeError(f"manifest {name}:{reference}: HTTP {resp.status} {(await resp.text())[:200]}")
        return await resp.read()


async def _blob(session: aiohttp.ClientSession, base: str, name: str, blob: Child, progress: Progress) -> None:
    async with session.get(f"{base}/v2/{name}/blobs/{blob.digest}") as resp:
        if resp.status != 200:
            raise RuntimeError(f"blob {blob.digest}: HTTP {resp.status}")
        async for chunk in resp.content.iter_chunked(1 << 20):
            progress.advance(len(chunk))
    progress.blob_done(blob.digest)


async def _warm_one(session: aiohttp.ClientSession, base: str, image: str, platform: str | None) -> None:
    name, reference = image, "latest"
    if "@" in image:
        name, reference = image.split("@", 1)
    elif ":" in image.rsplit("/", 1)[-1]:
        name, reference = image.rsplit(":", 1)
    top = references(await _manifest(session, base, name, reference))
    blobs: dict[str, Child] = {b.digest: b for b in top.blobs}
    children = [
        child
        for child in top.manifests
        if platform is None or child.platform == platform or (child.platform or "").startswith(platform + "/")
    ]
    if top.manifests and not children:  # an index without that platform: nothing would be warmed
        offered = ", ".join(sorted({c.platform or "?" for c in top.manifests}))
        raise RuntimeError(f"no {platform} platform (it has {offered})")
    for child in children:
        blobs.update((b.digest, b) for b in references(await _manifest(session, base, name, child.digest)).blobs)
    progress = Progress(image, sum(b.size for b in blobs.values()), len(blobs))
    gate = asyncio.Semaphore(WARM_PARALLEL)

    async def fetch(blob: Child) -> None:
        async with gate:
            await _blob(session, base, name, blob, progress)

    try:
        await asyncio.gather(*(fetch(b) for b in blobs.values()))
    finally:
        progress.close()
    print(f"{image}: warm ({len(blobs)} blobs, {human(progress.done)})")


async def warm(settings: Settings, images: list[str], platform: str | None, url: str | None, user: str | None) -> int:
    base = base_url(settings, url)
    failed = deferred = 0
    async with client_session(user) as session:
        for image in images:
            try:
                await _warm_one(session, base, image, platform)
            except Deferred as exc:
                deferred += 1
                print(f"cargohold: {image} deferred, upstream pull quota at its reserve: {exc}", file=sys.stderr)
            except (TimeoutError, aiohttp.ClientError, RuntimeError) as exc:
                failed += 1
                print(f"cargohold: warming {image} failed: {exc or type(exc).__name__}", file=sys.stderr)
    return 1 if failed else DEFERRED if deferred else 0
