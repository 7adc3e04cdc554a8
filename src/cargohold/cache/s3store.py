"""Blobs and manifests in an S3-compatible bucket, shared by every replica.

Downloads still spool to a local temp file (clients follow it while it grows); `commit` uploads
the verified file (multipart, one part in memory at a time) and only then removes it. Hits are
streamed from the bucket in chunks with the client's Range passed through, or answered with a
redirect to a presigned URL. aiobotocore does the requests on the event loop; `commit`, which the
download calls from a worker thread, reads the file there and hands each part to the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import AsyncIterator, Coroutine
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

import aiohttp
from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from aiohttp.abc import AbstractResolver, ResolveResult
from botocore.exceptions import BotoCoreError, ClientError

from cargohold.cache.store import Spool
from cargohold.config import S3Config
from cargohold.errors import DigestInvalid, StorageUnavailable
from cargohold.oci.digests import Digest

log = logging.getLogger("cargohold.s3")

# Bodies of at most this size go up in one PUT; bigger ones in parts of this size (S3's minimum is 5 MiB).
PART_SIZE = 8 << 20
CHUNK = 1 << 20
PRESIGN_TTL = 600
MISSING = frozenset({"404", "NoSuchKey", "NotFound"})
T = TypeVar("T")


def is_missing(exc: ClientError) -> bool:
    return str(exc.response.get("Error", {}).get("Code")) in MISSING


@dataclass(frozen=True, slots=True)
class S3Object:
    """A blob in the bucket, as found by a HEAD: what the blob handler serves a hit from."""

    store: S3BlobStore
    digest: Digest
    size: int

    async def chunks(self, start: int, end: int) -> AsyncIterator[bytes] | None:
        return await self.store.stream(self.digest, start, end)

    async def redirect_url(self) -> str | None:
        return await self.store.presigned(self.digest) if self.store.config.redirect else None


class S3BlobStore(Spool):
    """Content at `<prefix>blobs/<algorithm>/<first two hex>/<hex>` in one bucket; temp files in data_dir/tmp."""

    def __init__(self, config: S3Config, root: Path, client: Any, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(root)
        self.config = config
        self._client = client
        self._loop = loop

    def key(self, digest: Digest) -> str:
        return f"{self.config.prefix}blobs/{digest.algorithm}/{digest.hex[:2]}/{digest.hex}"

    def _bucket(self, digest: Digest) -> dict[str, str]:
        return {"Bucket": self.config.bucket, "Key": self.key(digest)}

    # written by downloads (worker thread) and the proxy (manifests)

    def commit(self, temp: Path, digest: Digest) -> int:
        """Upload a verified temp file, then remove it; returns its size.

        Runs on the download's worker thread: this thread reads the file, the event loop sends each
        part (so the upload never needs another worker thread, which might all be waiting here)."""
        size = temp.stat().st_size
        with open(temp, "rb") as source:
            if size <= PART_SIZE:
                self._on_loop(self._client.put_object(**self._bucket(digest), Body=source.read()))
            else:
                self._multipart(source, digest)
        log.debug("uploaded %s (%d bytes) to s3://%s/%s", digest, size, self.config.bucket, self.key(digest))
        self.discard(temp)
        return size

    def _on_loop(self, call: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(call, self._loop).result()

    def _multipart(self, source: BinaryIO, digest: Digest) -> None:
        """One part read from the file at a time; an upload that fails is aborted (no orphaned parts)."""
        upload = self._on_loop(self._client.create_multipart_upload(**self._bucket(digest)))
        ids = {**self._bucket(digest), "UploadId": upload["UploadId"]}
        parts: list[dict[str, Any]] = []
        try:
            while part := source.read(PART_SIZE):
                number = len(parts) + 1
                answer = self._on_loop(self._client.upload_part(**ids, PartNumber=number, Body=part))
                parts.append({"ETag": answer["ETag"], "PartNumber": number})
            self._on_loop(self._client.complete_multipart_upload(**ids, MultipartUpload={"Parts": parts}))
        except BaseException:
            with contextlib.suppress(Exception):
                self._on_loop(self._client.abort_multipart_upload(**ids))
            raise

    async def save(self, digest: Digest, data: bytes) -> None:
        await self._call("put_object", digest, Body=data)

    # read

    async def _call(self, operation: str, digest: Digest, **params: Any) -> Any:
        """One request about one object: None if it does not exist, StorageUnavailable if the bucket fails."""
        try:
            return await getattr(self._client, operation)(**self._bucket(digest), **params)
        except ClientError as exc:
            if is_missing(exc):
                return None
            failure: Exception = exc
        except (BotoCoreError, aiohttp.ClientError, TimeoutError) as exc:
            failure = exc
        log.error("s3 %s of %s failed: %s", operation, digest, failure)
        raise StorageUnavailable("the cache's storage failed", {"operation": operation, "digest": str(digest)})

    async def locate(self, digest: Digest) -> S3Object | None:
        head = await self._call("head_object", digest)
        return None if head is None else S3Object(self, digest, int(head["ContentLength"]))

    async def load(self, digest: Digest) -> bytes | None:
        """A whole (small) object: manifests."""
        answer = await self._call("get_object", digest)
        if answer is None:
            return None
        async with answer["Body"] as body:
            return bytes(await body.read())

    async def stream(self, digest: Digest, start: int, end: int) -> AsyncIterator[bytes] | None:
        """Bytes `[start, end)` of an object in chunks (None if it is gone); the GET is open when this returns."""
        span = {"Range": f"bytes={start}-{end - 1}"} if end > start else {}  # an empty blob has no range
        answer = await self._call("get_object", digest, **span)
        return None if answer is None else _chunks(answer["Body"])

    async def presigned(self, digest: Digest) -> str:
        return str(
            await self._client.generate_presigned_url("get_object", Params=self._bucket(digest), ExpiresIn=PRESIGN_TTL)
        )

    # eviction and repair

    async def delete(self, digest: Digest) -> int:
        """Delete an object (its index row must be gone first); returns the bytes freed."""
        found = await self.locate(digest)
        if found is None:
            return 0
        await self._call("delete_object", digest)
        return found.size

    async def entries(self) -> AsyncIterator[tuple[Digest, int]]:
        """Every object under `<prefix>blobs/` as (digest, size); keys that are not digests are skipped."""
        root = f"{self.config.prefix}blobs/"
        pages = self._client.get_paginator("list_objects_v2").paginate(Bucket=self.config.bucket, Prefix=root)
        async for page in pages:
            for item in page.get("Contents", []):
                algorithm, _, rest = item["Key"][len(root) :].partition("/")
                try:
                    yield Digest.parse(f"{algorithm}:{rest.rpartition('/')[2]}"), int(item["Size"])
                except DigestInvalid:
                    continue


async def _chunks(body: Any) -> AsyncIterator[bytes]:
    async with body:
        while chunk := await body.read(CHUNK):
            yield bytes(chunk)


class OwnThreadResolver(AbstractResolver):
    """Name look-ups for the bucket's endpoint on a thread of their own: the default worker threads
    may all be busy in `commit`, waiting for uploads that would wait for a look-up."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="s3-dns")

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        infos = await asyncio.get_running_loop().run_in_executor(
            self._pool, lambda: socket.getaddrinfo(host, port, family, socket.SOCK_STREAM)
        )
        return [
            ResolveResult(
                hostname=host,
                host=str(address[0]),
                port=int(address[1]),
                family=kind,
                proto=proto,
                flags=socket.AI_NUMERICHOST,
            )
            for kind, _, proto, _, address in infos
            if kind in (socket.AF_INET, socket.AF_INET6)
        ]

    async def close(self) -> None:
        self._pool.shutdown(wait=False)


@contextlib.asynccontextmanager
async def open_s3_store(config: S3Config, root: Path) -> AsyncIterator[S3BlobStore]:
    """The bucket's client for as long as the store is used; the bucket must exist (it is checked)."""
    secret = config.secret_access_key.get_secret_value() if config.secret_access_key else None
    resolver = OwnThreadResolver()
    client_config = AioConfig(
        s3={"addressing_style": "path" if config.endpoint_url else "auto"},
        retries={"max_attempts": 3, "mode": "standard"},
        connect_timeout=10,
        read_timeout=60,
        max_pool_connections=64,
        connector_args={"resolver": resolver},
    )
    session = get_session()
    async with session.create_client(
        "s3",
        endpoint_url=config.endpoint_url,
        region_name=config.region
        or os.environ.get("AWS_REGION")
        or os.environ.get("AWS_DEFAULT_REGION")
        or "us-east-1",
        aws_access_key_id=config.access_key_id,
        aws_secret_access_key=secret,
        config=client_config,
    ) as client:
        try:
            await client.head_bucket(Bucket=config.bucket)
            yield S3BlobStore(config, root, client, asyncio.get_running_loop())
        finally:
            await resolver.close()
