"""One run of a sync entry: which tags it holds, each revalidated with a HEAD and fetched only when it is new or
moved, then the manifests and blobs of the platforms asked for that the cache lacks, through the normal
single-flight cache (a client pulling the same image at the same time joins the same downloads).
"""

from __future__ import annotations

import asyncio
import heapq
import json
import logging
import re
from collections.abc import Awaitable, Callable, Iterable
from fnmatch import fnmatchcase

from cargohold.config import Settings, SyncEntry
from cargohold.errors import RegistryError, UpstreamError
from cargohold.oci.digests import Digest
from cargohold.oci.names import valid_tag
from cargohold.oci.refs import Child, references
from cargohold.proxy import PullThrough, remote_of
from cargohold.sync.entries import Wanted, wanted_images
from cargohold.sync.state import EntryState
from cargohold.upstream.repository import Remote
from cargohold.upstream.routing import Target

log = logging.getLogger("cargohold.sync")

PARALLEL = 4  # tags synced at once, and blobs downloaded at once, per run
PAGE = 1000  # tags asked per page of the upstream's tag list
MAX_PAGES = 100
MAX_TAGS = 100_000  # tags kept of one repository's list: an upstream ignoring `n` sends 1.3M in one 16 MiB page
_GLOB = re.compile(r"[*?\[]")
_DIGITS = re.compile(r"([0-9]+)")
_VERSION = re.compile(r"v?[0-9]")

Progress = Callable[[EntryState, str], Awaitable[None]]


class SyncFailed(Exception):
    """A tag could not be synced completely (a blob did not land in the cache)."""


def version_key(tag: str) -> tuple[int, tuple[tuple[int, int, str], ...]]:
    """Orders `1.9` before `1.10` (runs of ASCII digits compare as numbers, before letters), and tags that are no
    version (`latest`, `alpine`) before every version: the N newest tags are versions. Never raises: digits are
    compared by length then text, not through int() (`²` is no ASCII digit; int() refuses 4,300 digits)."""
    tag = tag[:128]
    runs = _DIGITS.split(tag)  # text, digits, text, digits, ...: the odd ones are digits
    parts = tuple(_number(p) if i % 2 else (1, 0, p) for i, p in enumerate(runs) if p)
    return (1 if _VERSION.match(tag) else 0), parts


def _number(digits: str) -> tuple[int, int, str]:
    """A run of digits as it compares as a number: shorter first (leading zeros aside), then by its text."""
    significant = digits.lstrip("0")
    return 0, len(significant), significant


def newest(tags: list[str], count: int) -> list[str]:
    """The `count` newest of `tags` in version order, oldest first (a heap: no sort of the whole list)."""
    return heapq.nlargest(count, tags, key=version_key)[::-1]


def platform_wanted(platform: str | None, wanted: list[str]) -> bool:
    """No platforms asked for: every child. Else `linux/arm64` takes `linux/arm64/v8` too."""
    if not wanted:
        return True
    return platform is not None and any(platform == p or platform.startswith(p + "/") for p in wanted)


async def list_tags(remote: Remote) -> list[str]:
    """Every tag of the repository upstream, page after page: only names of the tag grammar, each once, at most
    MAX_TAGS of them (the rest is left out, with a warning). A page that brings no new tag ends the list (an
    upstream that ignores `last` would send its first page again and again). Pages are read off the event loop:
    one can hold a million names."""
    tags: dict[str, None] = {}  # a dict: the upstream's order, each tag once
    last = None
    for _ in range(MAX_PAGES):
        page = await remote.list_tags(str(PAGE), last)
        names = await asyncio.to_thread(_new_names, page.body, tags)
        if not names:
            return list(tags)
        tags.update(dict.fromkeys(names))
        if not page.link and len(tags) <= MAX_TAGS:
            return list(tags)
        if len(tags) >= MAX_TAGS:
            _left_out(remote, f"more than {MAX_TAGS:,} tags")
            return list(tags)[:MAX_TAGS]
        last = names[-1]
    _left_out(remote, f"more than {MAX_PAGES} pages of tags")
    return list(tags)


def _new_names(body: bytes, seen: dict[str, None]) -> list[str]:
    """The valid tags of a page not in `seen`, each once, at most MAX_TAGS (runs in a thread)."""
    listed = json.loads(body).get("tags")  # a JSON object (the remote checks): its tags are the upstream's
    found: dict[str, None] = {}
    for name in listed if isinstance(listed, list) else ():
        if isinstance(name, str) and name not in seen and valid_tag(name):
            found[name] = None
            if len(found) >= MAX_TAGS:
                break
    return list(found)


def _left_out(remote: Remote, why: str) -> None:
    log.warning("sync: %s/%s lists %s: the rest is left out", remote.upstream, remote.repository, why)


async def bounded(items: Iterable[tuple[Target, str]], work: Callable[[Target, str], Awaitable[None]]) -> None:
    """`work` on every item, PARALLEL at a time."""
    queue = list(items)
    queue.reverse()

    async def worker() -> None:
        while queue:
            await work(*queue.pop())

    await asyncio.gather(*(worker() for _ in range(PARALLEL)))


class Syncer:
    """Runs sync entries through one instance's pull-through cache."""

    def __init__(self, settings: Settings, proxy: PullThrough) -> None:
        self._settings = settings
        self._proxy = proxy

    async def run(self, entry: SyncEntry, state: EntryState, progress: Progress) -> None:
        """Sync every tag of the entry; failures are counted in `state`, never raised. An upstream that fails
        (or is paused after failing) is asked nothing more in this run: the next run retries."""
        jobs: list[tuple[Target, str]] = []
        for wanted in wanted_images(self._settings, entry):
            try:
                target = self._proxy.router.resolve(wanted.repository, ns=wanted.upstream)
                if target.upstream.config.offline:
                    raise UpstreamError("the upstream is offline: not synced", {"upstream": target.upstream.name})
                jobs += [(target, tag) for tag in await self._tags(target, wanted, entry)]
            except RegistryError as exc:
                state.fail(f"{wanted.image}: {exc.message}")
        state.tags_total = len(jobs)
        gate = asyncio.Semaphore(PARALLEL)
        halted: set[str] = set()

        async def one(target: Target, tag: str) -> None:
            name = f"{target.upstream.name}/{target.repository}:{tag}"
            line = ""
            if target.upstream.name in halted:
                state.fail(f"{name}: not synced, {target.upstream.name} failed in this run")
            else:
                try:
                    line = await self._sync_tag(target, tag, entry, state, gate)
                except UpstreamError as exc:
                    halted.add(target.upstream.name)
                    state.fail(f"{name}: {exc.message}")
                except (RegistryError, SyncFailed) as exc:
                    state.fail(f"{name}: {exc}")
            state.tags_done += 1
            await progress(state, f"{name}: {line or 'failed'}")

        await bounded(jobs, one)

    async def _tags(self, target: Target, wanted: Wanted, entry: SyncEntry) -> list[str]:
        if wanted.tag is not None and not _GLOB.search(wanted.tag):
            return [wanted.tag]
        if wanted.tag is None and entry.tags == "latest":
            return ["latest"]
        listed = await list_tags(remote_of(target))
        if wanted.tag is not None:
            return [t for t in listed if fnmatchcase(t, wanted.tag)]
        assert isinstance(entry.tags, int)
        return await asyncio.to_thread(newest, listed, entry.tags)  # up to MAX_TAGS keys: off the event loop

    async def _sync_tag(
        self, target: Target, tag: str, entry: SyncEntry, state: EntryState, gate: asyncio.Semaphore
    ) -> str:
        """Revalidate (HEAD) or fetch the tag, then what its platforms lack; a line saying what was done."""
        proxy = self._proxy
        remote = remote_of(target, waited=False)  # a prefetch: deferred when Docker Hub's quota is at its reserve
        manifest = await proxy.tags.refresh(remote, tag)
        changed = manifest.cache == "miss"
        state.tags_changed += changed
        refs = references(manifest.body)
        blobs = {b.digest: b for b in refs.blobs}
        for child in refs.manifests:
            if platform_wanted(child.platform, entry.platforms):
                body = (await proxy.manifests.get(remote, Digest.parse(child.digest))).body
                blobs.update((b.digest, b) for b in references(body).blobs)
        missing = [b for b in blobs.values() if await proxy.store.locate(Digest.parse(b.digest)) is None]
        await asyncio.gather(*(self._blob(target, blob, state, gate) for blob in missing))
        what = "new or moved" if changed else "unchanged"
        return f"{what}, {len(missing)} blob(s) fetched" if missing else what

    async def _blob(self, target: Target, blob: Child, state: EntryState, gate: asyncio.Semaphore) -> None:
        """Fetch a blob into the cache as a pull would, and wait until it is stored (no client reads it)."""
        digest = Digest.parse(blob.digest)
        async with gate:
            source = await self._proxy.blob(target, digest)
            try:
                download = self._proxy.downloads.active(digest)
                if download is not None:
                    await download.wait_finished()
            finally:
                await source.close()
        if await self._proxy.store.locate(digest) is None:
            raise SyncFailed(f"blob {digest} did not reach the cache")
        state.blobs_fetched += 1
        state.bytes_fetched += blob.size
