"""Pushing images, tags and seed sets to the hub, and deleting manifests."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from rig import images as imgs
from rig.util import RigError


class Pushing:
    """Pushing content (a part of `Hub`)."""

    def push_token(self, repo: str) -> str:
        return self.mint_token([("repository", repo, ["pull", "push", "delete"])], subject="rig")

    async def _push_on_loop(
        self, image: imgs.Image, repo: str, tag: str | None, chunk_size: int | None = None
    ) -> imgs.Image:
        assert self._session is not None
        headers = {"Authorization": f"Bearer {self.push_token(repo)}"}
        return await imgs.push_image(
            self._session, self.registry_url, repo, tag, image, headers=headers, chunk_size=chunk_size
        )

    def push_image(
        self, image: imgs.Image, repo: str, tag: str | None = "latest", *, chunk_size: int | None = None
    ) -> imgs.Image:
        """Push an image straight to the registry (not counted); returns it with repo/tag set.

        chunk_size: use chunked PATCH uploads of that many bytes instead of one PUT.
        """
        return self.run(self._push_on_loop(image, repo, tag, chunk_size))

    async def apush_image(
        self, image: imgs.Image, repo: str, tag: str | None = "latest", *, chunk_size: int | None = None
    ) -> imgs.Image:
        """push_image for async tests (runs on the hub loop, awaited from yours)."""
        return await self.arun(self._push_on_loop(image, repo, tag, chunk_size))

    def push_tag(self, repo: str, tag: str, manifest: imgs.Image | bytes, media_type: str | None = None) -> str:
        """Point `repo:tag` at a manifest whose blobs/children already exist in repo (retagging)."""
        if isinstance(manifest, imgs.Image):
            data, mt = manifest.manifest, manifest.media_type
        else:
            data = manifest
            mt = media_type or json.loads(manifest).get("mediaType") or imgs.OCI_MANIFEST
        assert mt is not None

        async def _go() -> str:
            assert self._session is not None
            headers = {"Authorization": f"Bearer {self.push_token(repo)}"}
            return await imgs.push_manifest(self._session, self.registry_url, repo, tag, data, mt, headers=headers)

        return self.run(_go())

    def delete_manifest(self, repo: str, digest: str) -> None:
        """Delete a manifest (and so every tag pointing at it) from the registry."""

        async def _go() -> None:
            assert self._session is not None
            headers = {"Authorization": f"Bearer {self.push_token(repo)}"}
            async with self._session.delete(f"{self.registry_url}/v2/{repo}/manifests/{digest}", headers=headers) as r:
                if r.status != 202:
                    raise RigError(f"delete {repo}@{digest}: {r.status} {await r.text()}")

        self.run(_go())

    def seed(self, cache_dir: Path, *, big_size: int | None = None) -> dict[str, imgs.Image]:
        """Build and push the standard test images (see images.standard_images) into self.images."""
        specs = imgs.standard_images(Path(cache_dir), big_size=big_size)

        async def _go() -> list[imgs.Image]:
            return list(await asyncio.gather(*(self._push_on_loop(s.image, s.repo, s.tag) for s in specs)))

        for spec, pushed in zip(specs, self.run(_go()), strict=True):
            self.images[spec.key] = pushed
        return self.images
