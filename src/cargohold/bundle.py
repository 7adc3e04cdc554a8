"""Air-gap bundles: `cargohold export` writes images as an OCI image layout in a tar; `cargohold import`
verifies one and seeds the cache with it (blobs, manifests, links, tags), next to a running server.

The layout is what skopeo's `oci-archive:` transport reads and writes: `oci-layout`, `index.json` whose
entries name their image in `org.opencontainers.image.ref.name` (here `upstream/repository:tag`), and
`blobs/<algorithm>/<hex>` for manifests, configs and layers alike. Export takes content from the cache,
else through the running instance (which fetches and caches it, as `warm` does). Import trusts nothing in
the bundle: every blob is hashed while it streams into the store, and documents are read bounded in size.

Referrers (signatures, attestations, SBOMs whose `subject` is an exported manifest), as the instance's
referrers API lists them (every page, up to `REFERRER_PAGES`), go in as the referrers tag schema: an index
tagged `<alg>-<hex>` listing them, an ordinary `index.json` entry that skopeo reads past and import seeds like
any tag, so the importing instance's referrers API finds them through the tag schema, offline too. A referrer
the instance cannot serve (deleted upstream, a digest algorithm it cannot compute) is left out with a warning:
it is an addition to the image, not part of it.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import aiohttp

from cargohold.bundletar import BundleError as BundleError
from cargohold.bundletar import LayoutTar, Member
from cargohold.cache.backends import Backends, open_backends
from cargohold.cli.cache import base_url, client_session
from cargohold.config import Settings
from cargohold.errors import DigestInvalid, RegistryError
from cargohold.handlers.links import upstream_next
from cargohold.handlers.status import human
from cargohold.oci.digests import Digest, looks_like_digest
from cargohold.oci.imagename import ImageName, parse_image
from cargohold.oci.mediatypes import FULL_ACCEPT, OCI_INDEX, media_type_of
from cargohold.oci.names import check_name, check_tag
from cargohold.oci.refs import Child, references
from cargohold.pull.referrers import referrers_index, tag_schema_tag
from cargohold.pull.tags import record_move

REF_NAME = "org.opencontainers.image.ref.name"
LAYOUT = b'{"imageLayoutVersion":"1.0.0"}'
MAX_DOCUMENT = 4 << 20  # index.json, oci-layout and manifests are read whole, so bounded
MAX_LINKS = 1_000_000  # (repository, digest) rows an import writes: 1,000 images of 200 blobs is 200,000
REFERRER_PAGES = 64  # pages of a subject's referrers export follows (registries page by 100 or more)
CHUNK = 1 << 20

Say = Callable[[str], None]  # where progress lines go (the command line prints them)


class Unserved(BundleError):
    """The instance does not serve a manifest or blob (an error status): a referrer with it is left out."""


# export


@dataclass(frozen=True, slots=True)
class Wanted:
    """An image to export: where it is cached, how the instance's API names it, and the tag or digest."""

    image: ImageName
    path: str
    reference: str

    @property
    def ref_name(self) -> str:
        sep = "@" if looks_like_digest(self.reference) else ":"
        return f"{self.image.upstream}/{self.image.repository}{sep}{self.reference}"


def _wanted(settings: Settings, image: str) -> Wanted:
    path, reference = image, "latest"
    if "@" in image:
        path, reference = image.split("@", 1)
    elif ":" in image.rsplit("/", 1)[-1]:
        path, reference = image.rsplit(":", 1)
    return Wanted(parse_image(settings, path), path, reference)


async def _read_bounded(resp: aiohttp.ClientResponse, what: str) -> bytes:
    body = bytearray()
    async for chunk in resp.content.iter_chunked(CHUNK):
        body += chunk
        if len(body) > MAX_DOCUMENT:
            raise BundleError(f"{what}: larger than {human(MAX_DOCUMENT)}")
    return bytes(body)


class Source:
    """Content for a bundle: the cache first, else the running instance (which fetches and caches it)."""

    def __init__(self, backends: Backends, session: aiohttp.ClientSession, base: str, spool: Path) -> None:
        self._index, self._store = backends.index, backends.store
        self._session, self._base, self._spool = session, base, spool

    async def manifest(self, want: Wanted, reference: str) -> tuple[Digest, str, bytes]:
        """(digest, media type, body) of a manifest by tag or digest; a cached tag is used whatever its age."""
        if looks_like_digest(reference):
            digest: Digest | None = Digest.parse(reference)
        else:
            tag = await self._index.get_tag(want.image.upstream, want.image.repository, reference)
            digest = Digest.parse(tag.digest) if tag is not None else None
        if digest is not None:
            body = await self._store.load(digest)
            if body is not None and Digest.of(body, digest.algorithm) == digest:
                known = await self._index.get_manifest(str(digest))
                return digest, known.media_type if known else media_type_of(None, body), body
        what = f"{want.path}:{reference}" if digest is None else f"{want.path}@{reference}"
        url = f"{self._base}/v2/{want.path}/manifests/{reference}"
        async with self._session.get(url, headers={"Accept": FULL_ACCEPT}) as resp:
            if resp.status != 200:
                raise Unserved(f"manifest {what}: HTTP {resp.status} {(await resp.text())[:200]}")
            body = await _read_bounded(resp, f"manifest {what}")
            content_type = resp.headers.get("Content-Type")
        got = Digest.of(body, digest.algorithm if digest is not None else "sha256")
        if looks_like_digest(reference) and got != digest:
            raise BundleError(f"manifest {what}: the instance answered content of digest {got}")
        try:
            return got, media_type_of(content_type, body), body
        except ValueError:
            raise BundleError(f"manifest {what}: not a JSON document") from None

    async def referrers(self, want: Wanted, subject: Digest) -> tuple[list[dict[str, Any]], bool] | None:
        """The referrers the instance lists for `subject`, each once, following its next-page Links (its own
        path, their page query) up to `REFERRER_PAGES` pages, and whether that was all; None when it cannot say."""
        url, what = f"{self._base}/v2/{want.path}/referrers/{subject}", f"referrers of {want.path}@{subject}"
        found: dict[str, dict[str, Any]] = {}
        query: list[tuple[str, str]] | None = []
        for _ in range(REFERRER_PAGES):
            async with self._session.get(url, params=query) as resp:
                if resp.status != 200:
                    return None
                body = await _read_bounded(resp, what)
                query = upstream_next(resp.headers.get("Link"))
            listed = _json_object(body, what).get("manifests")
            if not isinstance(listed, list):
                return None
            for d in listed:
                if isinstance(d, dict) and looks_like_digest(str(d.get("digest"))):
                    found.setdefault(d["digest"], d)
            if query is None:
                return list(found.values()), True
        return list(found.values()), False

    async def blob(self, want: Wanted, digest: Digest, size: int) -> IO[bytes]:
        """An open file with the blob's bytes (verified while they go into the tar)."""
        where = await self._store.locate(digest)
        if isinstance(where, Path):
            try:
                return where.open("rb")  # open before reading: an eviction meanwhile cannot cut it short
            except FileNotFoundError:
                where = None
        with tempfile.TemporaryFile(dir=self._spool) as out:
            chunks = await where.chunks(0, where.size) if where is not None else None
            if chunks is not None:
                async for chunk in chunks:
                    out.write(chunk)
            else:
                async with self._session.get(f"{self._base}/v2/{want.path}/blobs/{digest}") as resp:
                    if resp.status != 200:
                        raise Unserved(f"blob {digest} of {want.path}: HTTP {resp.status}")
                    async for chunk in resp.content.iter_chunked(CHUNK):
                        out.write(chunk)
                        if size and out.tell() > size:
                            raise BundleError(f"blob {digest} of {want.path}: more than its {size} bytes")
            out.seek(0)
            return os.fdopen(os.dup(out.fileno()), "rb")


class _Verifying:
    """Hashes what `tarfile` copies out of a file, so only the bytes the digest names end up in a bundle."""

    def __init__(self, source: IO[bytes], digest: Digest) -> None:
        self._source, self._digest, self._hasher = source, digest, digest.hasher()

    def read(self, size: int = -1) -> bytes:
        chunk = self._source.read(size)
        self._hasher.update(chunk)
        return chunk

    def check(self) -> None:
        if self._source.read(1) or self._hasher.hexdigest() != self._digest.hex:
            raise BundleError(f"blob {self._digest}: its content does not match its digest")


class LayoutWriter:
    """An OCI image layout written into a tar: blobs once each, `index.json` at the end."""

    def __init__(self, tar: tarfile.TarFile) -> None:
        self._tar = tar
        self._written: set[Digest] = set()
        self.manifests: list[dict[str, Any]] = []
        self.size = 0
        self._member("oci-layout", len(LAYOUT), _Bytes(LAYOUT))
        for folder in ("blobs", "blobs/sha256"):
            info = tarfile.TarInfo(folder)
            info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, int(time.time())
            tar.addfile(info)

    def _member(self, name: str, size: int, source: _Verifying | _Bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mode, info.mtime = size, 0o644, int(time.time())
        self._tar.addfile(info, source)
        self.size += size

    def has(self, digest: Digest) -> bool:
        return digest in self._written

    def add_blob(self, digest: Digest, source: IO[bytes]) -> None:
        with source:
            verifying = _Verifying(source, digest)
            self._member(f"blobs/{digest.algorithm}/{digest.hex}", os.fstat(source.fileno()).st_size, verifying)
            verifying.check()
        self._written.add(digest)

    def add_document(self, digest: Digest, body: bytes) -> None:
        if digest not in self._written:
            self._member(f"blobs/{digest.algorithm}/{digest.hex}", len(body), _Bytes(body))
            self._written.add(digest)

    def add_entry(self, ref_name: str, media_type: str, digest: Digest, body: bytes) -> None:
        """An entry of `index.json`: a manifest (already added) by the name skopeo and import read."""
        annotations = {REF_NAME: ref_name}
        self.manifests.append(
            {"mediaType": media_type, "digest": str(digest), "size": len(body), "annotations": annotations}
        )

    def finish(self) -> None:
        body = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": self.manifests}).encode()
        self._member("index.json", len(body), _Bytes(body))


class _Bytes:
    def __init__(self, data: bytes) -> None:
        self._data, self._at = data, 0

    def read(self, size: int = -1) -> bytes:
        end = len(self._data) if size < 0 else self._at + size
        chunk, self._at = self._data[self._at : end], min(end, len(self._data))
        return chunk


def _chosen(children: list[Child], platforms: list[str] | None, image: str) -> list[Child]:
    """The platform manifests asked for (all without `--platform`); a platform the image lacks is an error."""
    if not platforms:
        return children

    def matches(child: Child, platform: str) -> bool:
        return child.platform == platform or (child.platform or "").startswith(platform + "/")

    for platform in platforms:
        if not any(matches(child, platform) for child in children):
            offered = ", ".join(sorted({c.platform or "?" for c in children}))
            raise BundleError(f"{image}: no {platform} platform (it has {offered})")
    return [child for child in children if any(matches(child, p) for p in platforms)]


async def _export_one(
    source: Source, writer: LayoutWriter, want: Wanted, platforms: list[str] | None, image: str, say: Say
) -> None:
    digest, media_type, body = await source.manifest(want, want.reference)
    refs = references(body)
    documents: list[tuple[Digest, bytes]] = []
    blobs = list(refs.blobs)
    for child in _chosen(refs.manifests, platforms, image):
        child_digest, _, child_body = await source.manifest(want, child.digest)
        documents.append((child_digest, child_body))
        blobs += references(child_body).blobs
    await _add_blobs(source, writer, want, blobs)
    for document in (*documents, (digest, body)):
        writer.add_document(*document)
    writer.add_entry(want.ref_name, media_type, digest, body)
    signed = 0
    for subject, _ in ((digest, body), *documents):
        signed += await _export_referrers(source, writer, want, subject, say)
    counts = f"{len(documents)} platform(s), {len(blobs)} blobs, {signed} referrer(s)"
    say(f"{image}: exported as {want.ref_name} ({counts})")


async def _add_blobs(source: Source, writer: LayoutWriter, want: Wanted, blobs: list[Child]) -> None:
    for blob in blobs:
        blob_digest = Digest.parse(blob.digest)
        if not writer.has(blob_digest):
            writer.add_blob(blob_digest, await source.blob(want, blob_digest, blob.size))


async def _export_referrers(source: Source, writer: LayoutWriter, want: Wanted, subject: Digest, say: Say) -> int:
    """The referrers of `subject` with their blobs, and the tag schema's index listing them; how many."""
    answer = await source.referrers(want, subject)
    if answer is None:
        say(f"{want.path}@{subject}: the instance could not list its referrers; exported without them")
        return 0
    listed, complete = answer
    if not complete:
        say(f"{want.path}@{subject}: more than {REFERRER_PAGES} pages of referrers; exported the first {len(listed)}")
    carried = []
    for descriptor in listed:
        try:  # each blob is fetched whole before it is written; blobs written before a failing one stay,
            # named by nothing import reads. Content that does not match its digest still fails the export.
            referrer, _, referrer_body = await source.manifest(want, descriptor["digest"])
            await _add_blobs(source, writer, want, references(referrer_body).blobs)
        except (Unserved, DigestInvalid) as exc:
            say(f"{want.path}@{subject}: referrer {descriptor['digest']} left out: {exc}")
            continue
        writer.add_document(referrer, referrer_body)
        carried.append(descriptor)
    if not carried:
        return 0
    index = referrers_index(carried)
    index_digest = Digest.of(index)
    writer.add_document(index_digest, index)
    ref_name = f"{want.image.upstream}/{want.image.repository}:{tag_schema_tag(subject)}"
    writer.add_entry(ref_name, OCI_INDEX, index_digest, index)
    return len(carried)


async def export(
    settings: Settings,
    images: list[str],
    output: Path,
    platforms: list[str] | None,
    url: str | None,
    user: str | None,
    say: Say,
) -> None:
    """Write the bundle (`output`: an absolute path) under a temp name and rename it at the end: a failed
    export leaves no bundle."""
    partial = output.with_name(output.name + ".part")
    async with open_backends(settings) as backends, client_session(user) as session:
        with tempfile.TemporaryDirectory(dir=output.parent, prefix=".export-") as spool:
            source = Source(backends, session, base_url(settings, url), Path(spool))
            try:
                with tarfile.open(partial, "w", format=tarfile.PAX_FORMAT) as tar:
                    writer = LayoutWriter(tar)
                    for image in images:
                        await _export_one(source, writer, _wanted(settings, image), platforms, image, say)
                    writer.finish()
                partial.replace(output)
            finally:
                partial.unlink(missing_ok=True)
    say(f"wrote {output} ({len(images)} image(s), {human(writer.size)})")


# import


class Layout:
    """The members of an OCI layout tar by name; documents read bounded, blobs streamed."""

    def __init__(self, tar: LayoutTar) -> None:
        self._tar = tar

    @staticmethod
    def blob_name(digest: Digest) -> str:
        return f"blobs/{digest.algorithm}/{digest.hex}"

    def has(self, digest: Digest) -> bool:
        return self.blob_name(digest) in self._tar.members

    def member(self, name: str) -> Member:
        member = self._tar.members.get(name)
        if member is None:
            raise BundleError(f"{name} is missing from the bundle")
        return member

    def document(self, name: str, digest: Digest | None = None) -> bytes:
        """A JSON file of the layout (a manifest when `digest` is given: verified against it)."""
        member = self.member(name)
        if member.size > MAX_DOCUMENT:
            raise BundleError(f"{name}: larger than {human(MAX_DOCUMENT)}")
        body = self._tar.read(member)
        if digest is not None and Digest.of(body, digest.algorithm) != digest:
            raise BundleError(f"{name}: its content does not match its digest")
        return body

    def chunks(self, member: Member) -> Iterator[bytes]:
        return self._tar.chunks(member)


def _json_object(body: bytes, what: str) -> dict[str, Any]:
    try:
        document = json.loads(body)
    except (ValueError, RecursionError):
        document = None
    if not isinstance(document, dict):
        raise BundleError(f"{what} is not a JSON object")
    return document


class Seeder:
    """Puts a bundle's images into the cache: content first, links, then the tag, so nothing half-seeded is served.

    Each blob's size in the tar is checked against its descriptor and `max_blob_size` before a byte of it is
    written; it goes into the store's temp directory (removed on any failure, SIGINT and SIGTERM included, and
    by the server's start after a kill -9) and is committed only when its digest matches. A tag already pointing
    elsewhere is moved and the move recorded, as a pull records it; an immutable tag is never moved (`refused`).
    """

    def __init__(self, settings: Settings, backends: Backends, layout: Layout) -> None:
        self._settings = settings
        self._upstreams = {u.name: u for u in settings.upstreams}
        self._index, self._store = backends.index, backends.store
        self._layout = layout
        self._seeded: set[Digest] = set()  # content this import has put, each once however often it is named
        self._links = 0
        self.blobs = self.bytes = 0
        self.moved: list[str] = []
        self.refused: list[str] = []

    def _target(self, ref_name: str) -> tuple[ImageName, str | None]:
        """`docker.io/acme/tool:1.0` -> (the image, its tag); `...@sha256:...` has no tag; no tag means latest."""
        name, tag = ref_name, None
        if "@" in ref_name:
            name = ref_name.split("@", 1)[0]
        image = parse_image(self._settings, name)
        if image.upstream not in self._upstreams:
            raise BundleError(f"{ref_name}: no upstream {image.upstream!r} in the config")
        try:
            check_name(image.repository)
            tag = None if "@" in ref_name else check_tag(image.tag or "latest")
        except RegistryError as exc:
            raise BundleError(f"{ref_name}: {exc}") from None
        return image, tag

    async def _blob(self, digest: Digest, size: int) -> None:
        """Stream a blob into the store, hashing as it goes; it is committed only if digest and size match.
        `size` 0 is a descriptor without one (schema 1): the digest and `max_blob_size` still bound it."""
        if digest in self._seeded:
            return
        cached = await self._store.locate(digest)
        if cached is not None:  # verified when it was stored; the index learns its real size
            size = cached.stat().st_size if isinstance(cached, Path) else cached.size
        else:
            member = self._layout.member(Layout.blob_name(digest))
            if size and member.size != size:
                raise BundleError(f"blob {digest}: {member.size} bytes in the bundle, its descriptor says {size}")
            if member.size > self._settings.max_blob_size:
                limit = human(self._settings.max_blob_size)
                raise BundleError(f"blob {digest}: {human(member.size)}, more than max_blob_size ({limit})")
            size = await self._stored(digest, member)
            self.blobs, self.bytes = self.blobs + 1, self.bytes + size
        await self._index.put_blob(str(digest), size)
        self._seeded.add(digest)

    async def _stored(self, digest: Digest, member: Member) -> int:
        fd, temp = self._store.new_temp()
        try:
            hasher = digest.hasher()
            with os.fdopen(fd, "wb") as out:
                for chunk in self._layout.chunks(member):
                    hasher.update(chunk)
                    out.write(chunk)
                    await asyncio.sleep(0)  # where SIGINT and SIGTERM (a cancellation) come in
                out.flush()
                os.fsync(out.fileno())
            if hasher.hexdigest() != digest.hex:
                raise BundleError(f"blob {digest}: its content does not match its descriptor")
            return await asyncio.to_thread(self._store.commit, temp, digest)
        except BaseException:
            self._store.discard(temp)
            raise

    async def _manifest(self, digest: Digest, media_type: str | None) -> None:
        if digest in self._seeded:
            return
        body = self._layout.document(Layout.blob_name(digest), digest)
        try:
            media_type = media_type_of(media_type, body)  # validated like an upstream's manifest
        except ValueError as exc:
            raise BundleError(f"manifest {digest}: not a manifest ({exc})") from None
        await self._store.save(digest, body)
        await self._index.put_manifest(str(digest), media_type, len(body))
        self._seeded.add(digest)

    async def image(self, descriptor: dict[str, Any]) -> str:
        """Seed one entry of index.json; returns what it became, for the summary."""
        annotations = descriptor.get("annotations")
        ref_name = annotations.get(REF_NAME) if isinstance(annotations, dict) else None
        if not isinstance(ref_name, str) or not isinstance(descriptor.get("digest"), str):
            raise BundleError(f"index.json entry without a digest and an {REF_NAME} annotation: {descriptor}")
        image, tag = self._target(ref_name)
        top = Digest.parse(descriptor["digest"])
        refs = references(self._layout.document(Layout.blob_name(top), top))
        present = [child for child in refs.manifests if self._layout.has(Digest.parse(child.digest))]
        if refs.manifests and not present:
            raise BundleError(f"{ref_name}: the bundle holds none of its platforms")
        linked = [top]
        for child in present:
            child_digest = Digest.parse(child.digest)
            for blob in references(self._layout.document(Layout.blob_name(child_digest), child_digest)).blobs:
                await self._blob(Digest.parse(blob.digest), blob.size)
                linked.append(Digest.parse(blob.digest))
            await self._manifest(child_digest, None)
            linked.append(child_digest)
        for blob in refs.blobs:
            await self._blob(Digest.parse(blob.digest), blob.size)
            linked.append(Digest.parse(blob.digest))
        media_type = descriptor.get("mediaType")
        await self._manifest(top, media_type if isinstance(media_type, str) else None)
        await self._link(image, list(dict.fromkeys(linked)))
        where = f"{image.upstream}/{image.repository}"
        if tag is None:
            return f"imported {where}@{top}"
        return await self._tag(image, tag, str(top))

    async def _link(self, image: ImageName, digests: list[Digest]) -> None:
        """Link the image's content to its repository; bounded, as an index.json naming one image in many
        repositories asks for repositories times content rows."""
        self._links += len(digests)
        if self._links > MAX_LINKS:
            raise BundleError(f"index.json links more than {MAX_LINKS} (repository, digest) pairs: split the bundle")
        for digest in digests:
            await self._index.put_link(image.upstream, image.repository, str(digest))

    async def _tag(self, image: ImageName, tag: str, digest: str) -> str:
        """Point the tag at `digest`: a move is recorded (`cache history`), an immutable tag keeps its digest."""
        key, name = (image.upstream, image.repository, tag), f"{image.upstream}/{image.repository}:{tag}"
        old = await self._index.get_tag(*key)
        if old is not None and old.digest != digest:
            immutable = self._upstreams[image.upstream].immutable(image.repository, tag)
            await record_move(self._index, key, old.digest, digest, once=immutable)
            if immutable:
                self.refused.append(name)
                return f"refused {name}: an immutable tag, it stays at {old.digest} (the bundle has {digest})"
            self.moved.append(name)
        stored = await self._index.get_manifest(digest)
        assert stored is not None  # just put
        await self._index.put_tag(*key, digest, stored.media_type)
        moved = f" (moved from {old.digest})" if old is not None and old.digest != digest else ""
        return f"imported {name}{moved}"


async def import_bundle(settings: Settings, bundle: Path, say: Say) -> int:
    """Seed the cache with a bundle; how many of its tags were refused (immutable tags that would move)."""
    loop, task = asyncio.get_running_loop(), asyncio.current_task()
    assert task is not None
    loop.add_signal_handler(signal.SIGTERM, task.cancel)  # the temp file of a blob is removed as on Ctrl-C
    try:
        return await _import(settings, bundle, say)
    finally:
        loop.remove_signal_handler(signal.SIGTERM)


async def _import(settings: Settings, bundle: Path, say: Say) -> int:
    fd = os.open(bundle, os.O_RDONLY)
    try:
        layout = Layout(LayoutTar(fd, str(bundle)))
        version = _json_object(layout.document("oci-layout"), "oci-layout").get("imageLayoutVersion")
        if not isinstance(version, str) or not version.startswith("1."):
            raise BundleError(f"oci-layout: unsupported imageLayoutVersion {version!r}")
        entries = _json_object(layout.document("index.json"), "index.json").get("manifests")
        if not isinstance(entries, list) or not entries:
            raise BundleError("index.json names no image")
        async with open_backends(settings) as backends:
            seeder = Seeder(settings, backends, layout)
            for entry in entries:
                if not isinstance(entry, dict):
                    raise BundleError(f"index.json: not a descriptor: {entry!r}")
                say(await seeder.image(entry))
    finally:
        os.close(fd)
    say(f"{len(entries)} image(s) from {bundle}: {seeder.blobs} new blobs, {human(seeder.bytes)}")
    if seeder.moved:
        say(f"{len(seeder.moved)} tag(s) moved (see cargohold cache history): {', '.join(seeder.moved)}")
    if seeder.refused:
        say(f"{len(seeder.refused)} immutable tag(s) refused, kept as they were: {', '.join(seeder.refused)}")
    return len(seeder.refused)
