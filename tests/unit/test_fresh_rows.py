"""Hot index rows kept for a second per process: a tag moved by another process (a worker, the cache CLI)
is seen within that second, and a write through this process is seen at once."""

from __future__ import annotations

import pytest

from cargohold.pull import recent
from cargohold.pull.recent import Fresh


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr(recent, "monotonic", fake)
    return fake


def test_a_row_is_kept_for_its_seconds_only(clock: Clock) -> None:
    rows: Fresh[str, str] = Fresh(seconds=1.0)
    rows.put("tag", "sha256:old")
    clock.now += 0.9
    assert rows.get("tag") == "sha256:old"
    clock.now += 0.1
    assert rows.get("tag") is None  # another process's write is read from the index from here on


def test_a_write_through_this_process_forgets_the_row(clock: Clock) -> None:
    rows: Fresh[str, str] = Fresh(seconds=1.0)
    rows.put("tag", "sha256:old")
    rows.forget("tag")
    assert rows.get("tag") is None
    rows.forget("never kept")  # forgetting what is not kept is fine


def test_rows_are_bounded(clock: Clock) -> None:
    rows: Fresh[int, int] = Fresh(seconds=1.0, limit=3)
    for n in range(5):
        rows.put(n, n)
    assert [rows.get(n) for n in range(5)] == [None, None, 2, 3, 4]
