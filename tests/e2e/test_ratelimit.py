"""Rate limiting against the real rig: floods get 429s a client can act on, real pulls do not.

Until users exist, two identities are two client addresses: loopback accepts any 127.x source,
so a client bound to 127.0.0.2 is another address than the one skopeo pulls from (127.0.0.1).
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from cacheops import metrics, sample
from rig.clients import skopeo_copy
from rig.hub import Hub
from rig.images import Image
from rig.redisd import RedisServer
from rig.server import Cargohold

OTHER = "127.0.0.2"


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def error(self) -> dict[str, object]:
        return json.loads(self.body)["errors"][0]


@dataclass
class Flood:
    """What a flood saw: every status, and the first 429 in full."""

    statuses: list[int] = field(default_factory=list)
    refused: Answer | None = None


@asynccontextmanager
async def client_from(source: str) -> AsyncIterator[aiohttp.ClientSession]:
    connector = aiohttp.TCPConnector(local_addr=(source, 0), limit=16)
    async with aiohttp.ClientSession(connector=connector) as session:
        yield session


async def fetch(session: aiohttp.ClientSession, url: str, headers: dict[str, str] | None = None) -> Answer:
    async with session.get(url, headers=headers) as resp:
        return Answer(resp.status, dict(resp.headers), await resp.read())


def get(url: str, source: str = "127.0.0.1", headers: dict[str, str] | None = None) -> Answer:
    async def once() -> Answer:
        async with client_from(source) as session:
            return await fetch(session, url, headers)

    return asyncio.run(once())


async def flood(session: aiohttp.ClientSession, url: str, stop: asyncio.Event, seen: Flood, workers: int = 8) -> None:
    async def worker() -> None:
        while not stop.is_set():
            answer = await fetch(session, url)
            seen.statuses.append(answer.status)
            if answer.status == 429 and seen.refused is None:
                seen.refused = answer

    await asyncio.gather(*(worker() for _ in range(workers)))


def assert_usable_429(answer: Answer, budget: str, window: int) -> int:
    """A 429 in OCI JSON with the headers a client can act on; returns Retry-After."""
    assert answer.status == 429 and answer.headers["Content-Type"].startswith("application/json")
    error = answer.error()
    assert error["code"] == "TOOMANYREQUESTS" and error["detail"]["budget"] == budget
    retry = int(answer.headers["Retry-After"])
    assert 1 <= retry <= window
    assert re.fullmatch(r"\d+;w=\d+", answer.headers["RateLimit-Limit"])
    assert answer.headers["RateLimit-Remaining"].startswith("0;")
    return retry


def limited(cargohold: Callable[..., Cargohold], **rate_limit: object) -> Cargohold:
    return cargohold(rate_limit=rate_limit)


def test_flood_gets_429s_while_another_address_pulls(
    cargohold: Callable[..., Cargohold], hub_images: dict[str, Image], tmp_path: Path
) -> None:
    srv = limited(cargohold, preset="personal")
    im = hub_images["oci"]

    async def scenario() -> tuple[Flood, str]:
        seen, stop = Flood(), asyncio.Event()
        async with client_from(OTHER) as session:
            task = asyncio.create_task(flood(session, f"{srv.url}/v2/", stop, seen))
            while seen.refused is None and not task.done():  # noqa: ASYNC110 - two conditions, one set by a client
                await asyncio.sleep(0.01)
            pulled = await asyncio.to_thread(skopeo_copy, f"{srv.netloc}/{im.ref}", tmp_path / "pull")
            refused_during_pull = seen.statuses.count(429)
            stop.set()
            await task
        assert refused_during_pull > 0
        return seen, pulled.digest

    seen, digest = asyncio.run(scenario())
    assert digest == im.digest
    assert set(seen.statuses) == {200, 429} and seen.refused is not None
    retry = assert_usable_429(seen.refused, "requests", 2)  # personal: 20 per 2 s
    assert "ip:127.0.0.2" in str(seen.refused.error()["message"])
    asyncio.run(asyncio.sleep(retry))
    assert get(f"{srv.url}/v2/", OTHER).status == 200  # waiting as told is enough
    own = [line for line in srv.log_text().splitlines() if "cargohold.access 127.0.0.1 " in line]
    assert own and not any(" 429 " in line for line in own)  # the pulling address was never refused
    assert sample(metrics(srv.url), "cargohold_ratelimit_rejections_total") >= seen.statuses.count(429) > 0


def test_three_concurrent_pulls_of_21_layers_from_one_address_under_personal(
    cargohold: Callable[..., Cargohold], hub: Hub, tmp_path: Path
) -> None:
    """66 blob requests (the requests budget allows 20 at once), and with a slow upstream up to
    18 open at once (skopeo fetches 6 blobs in parallel) for 10 connection slots: they wait."""
    srv = limited(cargohold, preset="personal")
    im = hub.images["layers21"]
    assert len(im.layers) == 21
    hub.inject(method="GET", path_regex=r"/blobs/", delay=0.2)
    with ThreadPoolExecutor(3) as pool:
        # An oci: layout takes blobs in parallel (a dir: one takes them one by one).
        pulls = [pool.submit(skopeo_copy, f"{srv.netloc}/{im.ref}", tmp_path / f"pull{i}", fmt="oci") for i in range(3)]
        copies = [p.result(timeout=300) for p in pulls]
    assert all({layer.digest for layer in im.layers} <= set(c.blobs) for c in copies)
    assert " 429 " not in srv.log_text()


def test_spoofed_forwarded_for_is_ignored_from_untrusted_addresses(cargohold: Callable[..., Cargohold]) -> None:
    srv = limited(cargohold, preset="off", requests_per_second=1, burst=3, trusted_proxies=["127.0.0.1/32"])
    url = f"{srv.url}/v2/"

    async def statuses(source: str, forwarded: list[str]) -> list[Answer]:
        async with client_from(source) as session:
            return [await fetch(session, url, {"X-Forwarded-For": f}) for f in forwarded]

    spoofed = asyncio.run(statuses(OTHER, [f"10.0.0.{i}" for i in range(5)]))
    assert [a.status for a in spoofed] == [200, 200, 200, 429, 429]
    assert "ip:127.0.0.2" in str(spoofed[3].error()["message"])
    # The trusted proxy's X-Forwarded-For is believed: each forwarded client has its own budget...
    forwarded = asyncio.run(statuses("127.0.0.1", [f"10.1.0.{i}" for i in range(8)]))
    assert {a.status for a in forwarded} == {200}
    # ...and one forwarded client is limited by itself.
    same = asyncio.run(statuses("127.0.0.1", ["10.9.9.9"] * 4))
    assert [a.status for a in same] == [200, 200, 200, 429]
    assert "ip:10.9.9.9" in str(same[3].error()["message"])


def test_budgets_by_kind_and_reset_after_the_window(
    cargohold: Callable[..., Cargohold], hub_images: dict[str, Image]
) -> None:
    srv = limited(cargohold, preset="off", requests_per_second=3, burst=6, pulls_per_minute=1)
    im = hub_images["oci"]
    accept = {"Accept": im.media_type}
    by_tag = f"{srv.url}/v2/{im.repo}/manifests/{im.tag}"
    assert get(by_tag, headers=accept).status == 200
    assert_usable_429(get(by_tag, headers=accept), "pulls", 60)
    # A manifest by digest is not a pull; blobs have their own budget (unlimited here).
    assert get(f"{srv.url}/v2/{im.repo}/manifests/{im.digest}", headers=accept).status == 200
    for blob in im.blob_digests * 3:
        assert get(f"{srv.url}/v2/{im.repo}/blobs/{blob}").status == 200
    answers = [get(f"{srv.url}/v2/") for _ in range(7)]
    assert answers[-1].status == 429
    retry = assert_usable_429(answers[-1], "requests", 2)  # 6 per 2 s
    assert all(get(f"{srv.url}/health").status == 200 for _ in range(10))
    asyncio.run(asyncio.sleep(retry))
    assert get(f"{srv.url}/v2/").status == 200


def test_replicas_share_limits_in_redis_and_let_requests_through_when_it_is_down(
    cargohold: Callable[..., Cargohold], tmp_path: Path
) -> None:
    with RedisServer(tmp_path / "redis") as redis:
        common = {"preset": "off", "requests_per_second": 1, "burst": 4, "storage": redis.url}
        replicas = [limited(cargohold, **common) for _ in range(2)]
        urls = [f"{r.url}/v2/" for r in replicas]
        assert [get(u).status for u in urls * 2] == [200] * 4
        for url in urls:
            assert_usable_429(get(url), "requests", 4)
    # Redis is gone: a limiter outage must not stop pulls.
    assert [get(u).status for u in urls] == [200, 200]
    assert "rate-limit storage failing" in replicas[0].log_text()
