"""The app's task supervisor: what it spawned is cancelled and awaited at shutdown, a failure is logged once,
and no background task outlives the app."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from cargohold.app import build_app
from cargohold.config import Settings
from cargohold.flight import SingleFlight
from cargohold.keys import TASKS
from cargohold.tasks import Closed, Tasks


async def test_close_cancels_and_awaits_what_was_spawned() -> None:
    tasks = Tasks()
    cleaned = asyncio.Event()

    async def forever() -> None:
        try:
            await asyncio.Event().wait()
        finally:
            await asyncio.sleep(0)  # cleanup that itself awaits: close waits for it
            cleaned.set()

    task = tasks.spawn(forever(), "forever")
    await asyncio.sleep(0)
    await tasks.close()
    assert task.cancelled() and cleaned.is_set() and len(tasks) == 0
    never = forever()
    with pytest.raises(Closed):
        tasks.spawn(never, "too late")  # closed: the coroutine is closed too, not left never awaited


async def test_a_failure_nobody_awaits_is_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    async def fail() -> None:
        raise ValueError("broken")

    async with Tasks() as tasks:
        task = tasks.spawn(fail(), "breaks")
        await asyncio.wait([task])
    failures = [r for r in caplog.records if r.name == "cargohold.tasks"]
    assert [r.getMessage() for r in failures] == ["background task breaks failed: ValueError: broken"]
    assert failures[0].levelno == logging.ERROR
    # Retrieved by the supervisor: asyncio's "Task exception was never retrieved" does not follow.
    assert "never retrieved" not in caplog.text


async def test_a_failure_its_callers_await_is_theirs_not_logged(caplog: pytest.LogCaptureFixture) -> None:
    async def fail() -> int:
        raise ValueError("broken")

    async with Tasks() as tasks:
        flight: SingleFlight[int] = SingleFlight(tasks, "flight")
        results = await asyncio.gather(flight.run("k", fail), flight.run("k", fail), return_exceptions=True)
    assert [type(r) for r in results] == [ValueError, ValueError] and flight.joins == 1
    assert not [r for r in caplog.records if r.name == "cargohold.tasks"]


async def test_a_single_flight_whose_callers_left_is_cancelled_at_close() -> None:
    started, stopped = asyncio.Event(), asyncio.Event()

    async def hang() -> int:
        started.set()
        try:
            await asyncio.Event().wait()
        finally:
            stopped.set()
        return 0

    tasks = Tasks()
    flight: SingleFlight[int] = SingleFlight(tasks, "flight")
    caller = asyncio.create_task(flight.run("k", hang))
    await started.wait()
    caller.cancel()  # the client went away: the shared task goes on without it
    await asyncio.gather(caller, return_exceptions=True)
    assert not stopped.is_set() and len(flight) == 1
    await tasks.close()
    assert stopped.is_set() and len(flight) == 0


async def test_no_task_outlives_the_app(tmp_path: Path) -> None:
    """An app with every kind of background task running (index flush, eviction, the htpasswd reload, a
    manifest fetch hanging upstream whose client gave up, a download in flight) leaves none behind."""
    hung = asyncio.Event()

    async def hang(request: web.Request) -> web.StreamResponse:
        if request.method == "GET" and "/blobs/" in request.path:
            response = web.StreamResponse(headers={"Content-Length": "1000"})
            await response.prepare(request)
            await response.write(b"x" * 10)  # a download in flight: the rest never comes
        hung.set()
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    hub_app = web.Application()
    hub_app.router.add_route("*", "/{tail:.*}", hang)
    hub = TestServer(hub_app, host="127.0.0.1")
    await hub.start_server()
    htpasswd = tmp_path / "htpasswd"
    htpasswd.write_text("")
    settings = Settings.model_validate(
        {
            "data_dir": str(tmp_path / "data"),
            "upstreams": [{"name": "docker.io", "url": str(hub.make_url(""))}],
            "cache": {"max_size": "1GB"},  # so eviction runs in the background too
            "auth": {"htpasswd": str(htpasswd), "anonymous": True},
        }
    )
    before = asyncio.all_tasks()
    app = build_app(settings)
    # A short shutdown timeout: the handlers still waiting on the hung upstream are cancelled soon.
    server = TestServer(app, host="127.0.0.1", shutdown_timeout=0.5)
    await server.start_server()
    names = set()
    async with aiohttp.ClientSession() as session:
        for path in ("/v2/library/app/manifests/latest", f"/v2/library/app/blobs/sha256:{'a' * 64}"):
            hung.clear()
            request = asyncio.create_task(session.get(server.make_url(path)))
            await asyncio.wait_for(hung.wait(), 30)
            names |= {t.get_name() for t in asyncio.all_tasks() - before}
            request.cancel()
            await asyncio.gather(request, return_exceptions=True)
    assert len(app[TASKS]) >= 4
    await server.close()
    await hub.close()
    left = [t for t in asyncio.all_tasks() - before if not t.done()]
    assert left == [], left
    assert {"index flush", "eviction", "htpasswd reload"} <= names
    assert any(n.startswith("download sha256:") for n in names), names
    assert not list((tmp_path / "data").glob("**/dl-*"))  # the download's temp file went with it
