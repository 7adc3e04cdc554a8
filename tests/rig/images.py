"""Build test images in Python and push them over the registry HTTP API.

Images are real: gzip (or uncompressed OCI) tar layers, a config whose rootfs.diff_ids are the
sha256 of the uncompressed tars, so `docker pull`, containerd and skopeo accept them. Big layers
live on disk and are streamed, never held in memory.
"""

from __future__ import annotations

import base64
import dataclasses
import gzip
import hashlib
import io
import json
import os
import platform as _platform
import tarfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO
from urllib.parse import quote, urljoin

import aiohttp
from yarl import URL

# Media types ---------------------------------------------------------------------------------
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"

INDEX_TYPES = (OCI_INDEX, DOCKER_MANIFEST_LIST)
#: What a pulling client sends in Accept so the registry hands out every kind above.
ACCEPT_ALL = f"{OCI_INDEX}, {DOCKER_MANIFEST_LIST}, {OCI_MANIFEST}, {DOCKER_MANIFEST}"

_CHUNK = 1 << 20


def sha256_digest(data: bytes) -> str:
    """`sha256:<hex>` of bytes."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


def file_digest(path: Path) -> str:
    """`sha256:<hex>` of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def local_arch() -> str:
    """This machine's architecture in OCI terms (amd64/arm64), so docker can pull the index."""
    m = _platform.machine().lower()
    return {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}.get(m, m)


def other_arch() -> str:
    """The second platform of the multi-platform images: whichever of amd64/arm64 we are not."""
    return "arm64" if local_arch() == "amd64" else "amd64"


@dataclass(frozen=True)
class Blob:
    """A content-addressed blob: a layer or a config; bytes in memory or in a file on disk."""

    digest: str
    size: int
    media_type: str
    data: bytes | None = None
    path: Path | None = None
    diff_id: str | None = None  # layers only: sha256 of the uncompressed tar

    def open(self) -> BinaryIO:
        """A binary file object over the blob's bytes (streams from disk for big blobs)."""
        if self.data is not None:
            return io.BytesIO(self.data)
        assert self.path is not None
        return open(self.path, "rb")

    def read_bytes(self) -> bytes:
        """All bytes; fine for small blobs, avoid for big ones."""
        if self.data is not None:
            return self.data
        assert self.path is not None
        return self.path.read_bytes()

    def descriptor(self) -> dict[str, object]:
        return {"mediaType": self.media_type, "size": self.size, "digest": self.digest}


@dataclass(frozen=True)
class Image:
    """A built image (single manifest or index). `repo`/`tag` are set once it has been pushed."""

    manifest: bytes
    media_type: str
    config: Blob | None = None
    layers: tuple[Blob, ...] = ()
    children: tuple[Image, ...] = ()  # for an index / manifest list
    platform: Mapping[str, str] | None = None
    repo: str | None = None
    tag: str | None = None

    @property
    def digest(self) -> str:
        return sha256_digest(self.manifest)

    @property
    def size(self) -> int:
        return len(self.manifest)

    @property
    def is_index(self) -> bool:
        return self.media_type in INDEX_TYPES

    @property
    def ref(self) -> str:
        """`repo:tag` (or `repo@digest` when untagged)."""
        assert self.repo, "image has not been pushed"
        return f"{self.repo}:{self.tag}" if self.tag else f"{self.repo}@{self.digest}"

    @property
    def blobs(self) -> list[Blob]:
        """Config and layers of this image, and of every child for an index (deduplicated)."""
        seen: dict[str, Blob] = {}
        for img in (self, *self.children):
            for b in ((img.config,) if img.config else ()) + img.layers:
                seen.setdefault(b.digest, b)
        return list(seen.values())

    @property
    def blob_digests(self) -> list[str]:
        return [b.digest for b in self.blobs]

    @property
    def blob_sizes(self) -> dict[str, int]:
        return {b.digest: b.size for b in self.blobs}

    @property
    def total_size(self) -> int:
        return sum(b.size for b in self.blobs)

    def child(self, arch: str) -> Image:
        """The index entry for an architecture."""
        for c in self.children:
            if c.platform and c.platform.get("architecture") == arch:
                return c
        raise KeyError(arch)

    def blob(self, digest: str) -> Blob:
        for b in self.blobs:
            if b.digest == digest:
                return b
        raise KeyError(digest)

    def manifest_json(self) -> dict[str, object]:
        return json.loads(self.manifest)

    def pushed(self, repo: str, tag: str | None) -> Image:
        return dataclasses.replace(
            self, repo=repo, tag=tag, children=tuple(dataclasses.replace(c, repo=repo, tag=None) for c in self.children)
        )


# Building -------------------------------------------------------------------------------------


def _tar_bytes(files: Mapping[str, bytes], *, mode: int = 0o644) -> bytes:
    """A deterministic tar (fixed mtimes, sorted, parent dirs first) of the given files."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        dirs: set[str] = set()
        for name in sorted(files):
            parts = name.strip("/").split("/")
            for i in range(1, len(parts)):
                d = "/".join(parts[:i])
                if d not in dirs:
                    dirs.add(d)
                    ti = tarfile.TarInfo(d)
                    ti.type = tarfile.DIRTYPE
                    ti.mode = 0o755
                    ti.mtime = 1_700_000_000
                    tar.addfile(ti)
            data = files[name]
            ti = tarfile.TarInfo(name.strip("/"))
            ti.size = len(data)
            ti.mode = 0o755 if name.startswith(("bin/", "usr/bin/")) else mode
            ti.mtime = 1_700_000_000
            tar.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


def make_layer(files: Mapping[str, bytes], *, oci: bool = False, compress: bool = True) -> Blob:
    """A layer blob from files: gzip tar by default, or an uncompressed OCI tar."""
    raw = _tar_bytes(files)
    diff_id = sha256_digest(raw)
    if compress:
        data = gzip.compress(raw, compresslevel=6, mtime=0)
        mt = OCI_LAYER_GZIP if oci else DOCKER_LAYER_GZIP
    else:
        if not oci:
            raise ValueError("uncompressed layers are only built for OCI manifests")
        data, mt = raw, OCI_LAYER_TAR
    return Blob(sha256_digest(data), len(data), mt, data=data, diff_id=diff_id)


def seeded_layer(seed: str, index: int, *, oci: bool = False, payload: int = 2048) -> Blob:
    """A small layer whose content depends on (seed, index), so different images share no layers."""
    body = hashlib.sha256(f"{seed}/{index}".encode()).digest()
    filler = (body * (payload // len(body) + 1))[:payload]
    files = {
        f"rig/{seed}/layer-{index:02d}.txt": f"cargohold test layer {index} of {seed}\n".encode(),
        f"rig/{seed}/data-{index:02d}.bin": filler,
    }
    if index == 0:
        files["etc/rig-release"] = f"NAME=rig\nIMAGE={seed}\n".encode()
        files["bin/rig-hello"] = f"#!/bin/sh\necho hello from {seed}\n".encode()
    return make_layer(files, oci=oci)


def big_layer(path: Path, size: int) -> Blob:
    """An uncompressed OCI tar layer holding `size` random bytes, built once and cached on disk.

    Uncompressed random data is the fastest way to get a 100+ MiB layer; a sidecar JSON keeps
    the digest so a second call in the same session does not hash it again.
    """
    meta = path.with_suffix(path.suffix + ".json")
    if path.exists() and meta.exists():
        m = json.loads(meta.read_text())
        if m.get("payload") == size and path.stat().st_size == m["size"]:
            return Blob(m["digest"], m["size"], OCI_LAYER_TAR, path=path, diff_id=m["digest"])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    h = hashlib.sha256()

    class _HashingWriter(io.RawIOBase):
        def __init__(self, f: BinaryIO) -> None:
            self.f = f
            self.pos = 0

        def writable(self) -> bool:
            return True

        def tell(self) -> int:
            return self.pos

        def write(self, b) -> int:  # type: ignore[no-untyped-def,override]
            h.update(b)
            self.pos += len(b)
            return self.f.write(b)

    class _Urandom(io.RawIOBase):
        def readable(self) -> bool:
            return True

        def readinto(self, b) -> int:  # type: ignore[no-untyped-def,override]
            data = os.urandom(len(b))
            b[: len(data)] = data
            return len(data)

    with (
        open(tmp, "wb") as f,
        tarfile.open(fileobj=_HashingWriter(f), mode="w", format=tarfile.PAX_FORMAT) as tar,  # type: ignore[arg-type]
    ):
        ti = tarfile.TarInfo("rig/big/random.bin")
        ti.size = size
        ti.mtime = 1_700_000_000
        tar.addfile(ti, io.BufferedReader(_Urandom(), buffer_size=_CHUNK))
    os.replace(tmp, path)
    digest = "sha256:" + h.hexdigest()
    total = path.stat().st_size
    meta.write_text(json.dumps({"digest": digest, "size": total, "payload": size}))
    return Blob(digest, total, OCI_LAYER_TAR, path=path, diff_id=digest)


def make_config(layers: Sequence[Blob], *, oci: bool, arch: str, os_name: str = "linux", label: str = "") -> Blob:
    """A valid image config: architecture/os, rootfs.diff_ids, history, a harmless Cmd."""
    cfg: dict[str, object] = {
        "created": "2024-01-01T00:00:00Z",
        "architecture": arch,
        "os": os_name,
        "config": {
            "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
            "Cmd": ["/bin/rig-hello"],
            "Labels": {"org.cargohold.rig": label},
        },
        "rootfs": {"type": "layers", "diff_ids": [layer.diff_id for layer in layers]},
        "history": [{"created": "2024-01-01T00:00:00Z", "created_by": f"rig layer {i}"} for i in range(len(layers))],
    }
    if arch == "arm64":
        cfg["variant"] = "v8"
    data = json.dumps(cfg, sort_keys=True, separators=(",", ":")).encode()
    return Blob(sha256_digest(data), len(data), OCI_CONFIG if oci else DOCKER_CONFIG, data=data)


def _dump(obj: object) -> bytes:
    return json.dumps(obj, indent=3).encode()


def make_image(layers: Sequence[Blob], *, oci: bool = False, arch: str | None = None, label: str = "") -> Image:
    """A single-platform image (Docker schema2 or OCI manifest) from layers."""
    arch = arch or local_arch()
    config = make_config(layers, oci=oci, arch=arch, label=label)
    mt = OCI_MANIFEST if oci else DOCKER_MANIFEST
    manifest = _dump(
        {
            "schemaVersion": 2,
            "mediaType": mt,
            "config": config.descriptor(),
            "layers": [layer.descriptor() for layer in layers],
        }
    )
    plat = {"architecture": arch, "os": "linux"}
    if arch == "arm64":
        plat["variant"] = "v8"
    return Image(manifest, mt, config=config, layers=tuple(layers), platform=plat)


def make_index(children: Sequence[Image], *, oci: bool = True) -> Image:
    """An OCI index (oci=True) or a Docker manifest list over single-platform images."""
    mt = OCI_INDEX if oci else DOCKER_MANIFEST_LIST
    entries = []
    for c in children:
        assert c.platform is not None
        entries.append({"mediaType": c.media_type, "size": c.size, "digest": c.digest, "platform": dict(c.platform)})
    return Image(_dump({"schemaVersion": 2, "mediaType": mt, "manifests": entries}), mt, children=tuple(children))


def simple_image(
    seed: str, *, layers: int = 2, oci: bool = False, arch: str | None = None, payload: int = 2048
) -> Image:
    """An image of `layers` small seeded layers; a new seed gives entirely new digests."""
    return make_image(
        [seeded_layer(seed, i, oci=oci, payload=payload) for i in range(layers)], oci=oci, arch=arch, label=seed
    )


def multi_platform(seed: str, *, oci: bool = True) -> Image:
    """An index (or manifest list) over linux/<this arch> and the other of amd64/arm64."""
    kids = [simple_image(f"{seed}-{arch}", layers=2, oci=oci, arch=arch) for arch in (local_arch(), other_arch())]
    return make_index(kids, oci=oci)


def big_image(cache_dir: Path, size: int, *, seed: str = "big") -> Image:
    """An OCI image with one huge uncompressed layer (cached on disk) and a small gzip layer."""
    big = big_layer(cache_dir / f"big-layer-{size}.tar", size)
    return make_image([seeded_layer(seed, 0, oci=True), big], oci=True, label=seed)


@dataclass(frozen=True)
class Spec:
    """Where a standard test image is pushed."""

    key: str
    repo: str
    tag: str
    image: Image


def standard_images(cache_dir: Path, *, big_size: int | None = None) -> list[Spec]:
    """The session's standard images: key -> repo:tag (see README of the rig in conftest)."""
    if big_size is None:
        big_size = int(os.environ.get("RIG_BIG_LAYER_MIB", "128")) << 20
    return [
        Spec("multi", "library/alpine-test", "latest", simple_image("multi", layers=3)),
        Spec("oci", "acme/tool", "1.0", simple_image("oci", layers=2, oci=True)),
        Spec("big", "acme/big", "latest", big_image(cache_dir, big_size)),
        Spec("index", "acme/multiarch", "latest", multi_platform("index", oci=True)),
        Spec("manifestlist", "library/multiarch-test", "latest", multi_platform("mlist", oci=False)),
        Spec("layers21", "acme/layers21", "latest", simple_image("layers21", layers=21, payload=512)),
        Spec("private", "acme/private", "latest", simple_image("private", layers=2)),
    ]


# Pushing --------------------------------------------------------------------------------------


class PushError(RuntimeError):
    """The registry refused part of a push."""


async def _expect(resp: aiohttp.ClientResponse, *statuses: int) -> None:
    if resp.status not in statuses:
        body = await resp.text()
        raise PushError(f"{resp.method} {resp.url} -> {resp.status} (wanted {statuses}): {body[:500]}")


def _with_query(location: str, base_url: str, **params: str) -> URL:
    """Append params to an upload Location without re-encoding its opaque _state."""
    loc = urljoin(base_url + "/", location)
    extra = "&".join(f"{k}={quote(v, safe='')}" for k, v in params.items())
    if extra:
        loc += ("&" if "?" in loc else "?") + extra
    return URL(loc, encoded=True)


async def push_blob(
    session: aiohttp.ClientSession,
    base_url: str,
    repo: str,
    blob: Blob,
    *,
    headers: Mapping[str, str],
    chunk_size: int | None = None,
) -> bool:
    """Upload a blob unless the registry has it. POST + PUT (monolithic) or POST + PATCH* + PUT.

    Returns True when bytes were uploaded. File-backed blobs are streamed from disk.
    """
    async with session.head(f"{base_url}/v2/{repo}/blobs/{blob.digest}", headers=headers) as r:
        if r.status == 200:
            return False
    async with session.post(f"{base_url}/v2/{repo}/blobs/uploads/", headers=headers) as r:
        await _expect(r, 202)
        location = r.headers["Location"]
    if chunk_size is None:
        with blob.open() as f:
            h = {**headers, "Content-Type": "application/octet-stream", "Content-Length": str(blob.size)}
            async with session.put(_with_query(location, base_url, digest=blob.digest), data=f, headers=h) as r:
                await _expect(r, 201)
        return True
    offset = 0
    with blob.open() as f:
        while offset < blob.size:
            chunk = f.read(min(chunk_size, blob.size - offset))
            h = {
                **headers,
                "Content-Type": "application/octet-stream",
                "Content-Range": f"{offset}-{offset + len(chunk) - 1}",
                "Content-Length": str(len(chunk)),
            }
            async with session.patch(_with_query(location, base_url), data=chunk, headers=h) as r:
                await _expect(r, 202)
                location = r.headers["Location"]
            offset += len(chunk)
    async with session.put(_with_query(location, base_url, digest=blob.digest), headers=headers) as r:
        await _expect(r, 201)
    return True


async def push_manifest(
    session: aiohttp.ClientSession,
    base_url: str,
    repo: str,
    reference: str,
    manifest: bytes,
    media_type: str,
    *,
    headers: Mapping[str, str],
) -> str:
    """PUT a manifest under a tag or digest; returns the digest the registry computed."""
    h = {**headers, "Content-Type": media_type}
    async with session.put(f"{base_url}/v2/{repo}/manifests/{reference}", data=manifest, headers=h) as r:
        await _expect(r, 201)
        got = r.headers.get("Docker-Content-Digest", "")
    want = sha256_digest(manifest)
    if got and got != want:
        raise PushError(f"registry says {got} for manifest {want}")
    return want


async def push_image(
    session: aiohttp.ClientSession,
    base_url: str,
    repo: str,
    tag: str | None,
    image: Image,
    *,
    headers: Mapping[str, str],
    chunk_size: int | None = None,
) -> Image:
    """Push blobs, child manifests (by digest) and the manifest (by tag, else digest)."""
    for child in image.children:
        await push_image(session, base_url, repo, None, child, headers=headers, chunk_size=chunk_size)
    for blob in ((image.config,) if image.config else ()) + image.layers:
        await push_blob(session, base_url, repo, blob, headers=headers, chunk_size=chunk_size)
    await push_manifest(session, base_url, repo, tag or image.digest, image.manifest, image.media_type, headers=headers)
    return image.pushed(repo, tag)


async def fetch_token(
    session: aiohttp.ClientSession,
    base_url: str,
    repo: str,
    *,
    actions: str = "pull,push",
    creds: tuple[str, str] | None = None,
) -> str | None:
    """The client side of the token dance: ping /v2/, follow the Bearer realm, return the token."""
    async with session.get(f"{base_url}/v2/") as r:
        if r.status == 200:
            return None
        challenge = r.headers.get("WWW-Authenticate", "")
    params = _parse_challenge(challenge)
    query = {"service": params.get("service", ""), "scope": f"repository:{repo}:{actions}"}
    headers = {}
    if creds:
        headers["Authorization"] = "Basic " + base64.b64encode(f"{creds[0]}:{creds[1]}".encode()).decode()
    async with session.get(params["realm"], params=query, headers=headers) as r:
        await _expect(r, 200)
        body = await r.json()
    return str(body.get("token") or body["access_token"])


def _parse_challenge(value: str) -> dict[str, str]:
    """Parse `Bearer realm="...",service="...",scope="..."`."""
    _, _, rest = value.partition(" ")
    out: dict[str, str] = {}
    key, buf, in_q, i = "", "", False, 0
    while i < len(rest):
        ch = rest[i]
        if in_q:
            if ch == '"':
                in_q = False
            else:
                buf += ch
        elif ch == '"':
            in_q = True
        elif ch == "=" and not key:
            key, buf = buf.strip(), ""
        elif ch == ",":
            if key:
                out[key.lower()] = buf
            key, buf = "", ""
        else:
            buf += ch
        i += 1
    if key:
        out[key.lower()] = buf
    return out


parse_challenge = _parse_challenge

__all__ = [
    "ACCEPT_ALL",
    "DOCKER_CONFIG",
    "DOCKER_LAYER_GZIP",
    "DOCKER_MANIFEST",
    "DOCKER_MANIFEST_LIST",
    "OCI_CONFIG",
    "OCI_INDEX",
    "OCI_LAYER_GZIP",
    "OCI_LAYER_TAR",
    "OCI_MANIFEST",
    "Blob",
    "Image",
    "PushError",
    "Spec",
    "big_image",
    "big_layer",
    "fetch_token",
    "file_digest",
    "local_arch",
    "make_config",
    "make_image",
    "make_index",
    "make_layer",
    "multi_platform",
    "other_arch",
    "parse_challenge",
    "push_blob",
    "push_image",
    "push_manifest",
    "seeded_layer",
    "sha256_digest",
    "simple_image",
    "standard_images",
]
