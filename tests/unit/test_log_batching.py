"""Log lines written on the event loop go out together, in whole lines, and access lines taken straight
to the handler read exactly as those logging would make from a record."""

from __future__ import annotations

import asyncio
import io
import json
import logging
from collections.abc import Iterator

import pytest

from cargohold.logs import ACCESS_LOGGER, PIPE_BUF, JsonFormatter, LoopBatched, TextFormatter, direct_access


class Writes(io.StringIO):
    """A stream that remembers each write."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[str] = []

    def write(self, text: str) -> int:
        self.writes.append(text)
        return super().write(text)


FIELDS = {
    "client": "10.0.0.1",
    "user": "alice",
    "method": "GET",
    "path": "/v2/library/alpine/manifests/3",
    "status": 200,
    "bytes": 1234,
    "ms": 1.2,
    "kind": "manifest",
    "cache": "hit",
    "request_id": "abc",
}


@pytest.fixture
def logger() -> Iterator[tuple[logging.Logger, LoopBatched, Writes]]:
    """`setup_logging`'s arrangement on a private logger tree: one LoopBatched on the top logger."""
    stream = Writes()
    handler = LoopBatched(stream, TextFormatter())
    top = logging.getLogger("batching-test")
    top.handlers[:] = [handler]
    top.setLevel(logging.INFO)
    top.propagate = False
    yield top, handler, stream
    top.handlers[:] = []


async def test_lines_of_one_loop_iteration_go_out_in_one_write(
    logger: tuple[logging.Logger, LoopBatched, Writes],
) -> None:
    top, _, stream = logger
    for n in range(20):
        top.info("line %d", n)
    assert stream.writes == []  # nothing yet: the loop's iteration has not ended
    await asyncio.sleep(0)
    assert len(stream.writes) == 1
    assert [line.rsplit(" ", 1)[-1] for line in stream.getvalue().splitlines()] == [str(n) for n in range(20)]


async def test_writes_are_whole_lines_no_longer_than_a_pipe_buffer(
    logger: tuple[logging.Logger, LoopBatched, Writes],
) -> None:
    top, _, stream = logger
    for n in range(200):
        top.info("line %d %s", n, "x" * 100)
    await asyncio.sleep(0)
    assert len(stream.writes) > 1
    for piece in stream.writes:
        assert len(piece) <= PIPE_BUF and piece.endswith("\n")
    assert len(stream.getvalue().splitlines()) == 200


async def test_a_warning_goes_out_at_once_after_what_waited(logger: tuple[logging.Logger, LoopBatched, Writes]) -> None:
    top, _, stream = logger
    top.info("first")
    top.warning("second")
    assert [line.rsplit(" ", 1)[-1] for line in stream.getvalue().splitlines()] == ["first", "second"]


def test_off_the_loop_a_line_goes_out_at_once(logger: tuple[logging.Logger, LoopBatched, Writes]) -> None:
    top, _, stream = logger
    top.info("from a thread or a command")
    assert stream.getvalue().endswith("from a thread or a command\n")


@pytest.mark.parametrize("formatter", [TextFormatter(), JsonFormatter()], ids=["text", "json"])
async def test_a_direct_access_line_is_the_line_of_its_record(formatter: TextFormatter | JsonFormatter) -> None:
    direct, recorded = Writes(), Writes()
    record = logging.LogRecord(ACCESS_LOGGER, logging.INFO, "", 0, "unused", None, None)
    record.fields = FIELDS
    LoopBatched(recorded, formatter).handle(record)
    LoopBatched(direct, formatter).access(FIELDS, record.created)
    await asyncio.sleep(0)
    assert direct.getvalue() == recorded.getvalue() != ""
    if isinstance(formatter, JsonFormatter):
        line = json.loads(direct.getvalue())
        assert line["logger"] == ACCESS_LOGGER and line["request_id"] == "abc" and line["status"] == 200
    else:
        assert (
            " INFO cargohold.access 10.0.0.1 alice GET /v2/library/alpine/manifests/3 200 1234 1.2ms"
            in direct.getvalue()
        )


def test_access_lines_go_direct_only_where_logging_would_send_them_to_that_handler_alone(
    logger: tuple[logging.Logger, LoopBatched, Writes],
) -> None:
    top, handler, _ = logger
    top.handlers[:] = [handler]  # without the log capture pytest adds to every test's loggers
    access = top.getChild("access")
    assert direct_access(access) is handler
    capture = logging.Handler()
    top.addHandler(capture)  # a test's log capture: it must get records
    assert direct_access(access) is None
    top.removeHandler(capture)
    access.addFilter(logging.Filter("nothing"))
    assert direct_access(access) is None
    access.filters.clear()
    handler.setLevel(logging.WARNING)
    assert direct_access(access) is None


def test_a_handler_outlives_the_loops_it_batched_for(logger: tuple[logging.Logger, LoopBatched, Writes]) -> None:
    """The remembered loop is only used while it runs in this thread: a later loop batches its own lines,
    and with none running a line goes out at once."""
    top, _, stream = logger

    async def log_one(text: str) -> None:
        top.info(text)
        await asyncio.sleep(0)

    asyncio.run(log_one("first loop"))
    asyncio.run(log_one("second loop"))
    top.info("no loop")
    assert [line.split(" INFO ")[1] for line in stream.getvalue().splitlines()] == [
        "batching-test first loop",
        "batching-test second loop",
        "batching-test no loop",
    ]
