"""`loop`: uvloop where it measurably helps (serving HTTPS), asyncio's loop otherwise, and a clear refusal
when uvloop is asked for and missing."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from cargohold import eventloop
from cargohold.config import load_settings
from cargohold.eventloop import LoopUnavailable, loop_factory, loop_name


def _settings(tmp_path: Path, **overrides: Any) -> Any:
    return load_settings(overrides={"data_dir": str(tmp_path), **overrides})


def _with_tls(tmp_path: Path, **overrides: Any) -> Any:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    return _settings(tmp_path, tls={"cert": str(cert), "key": str(key)}, **overrides)


def test_auto_is_uvloop_for_https_and_asyncio_for_plain_http(tmp_path: Path) -> None:
    assert loop_name(_settings(tmp_path)) == "asyncio" and loop_factory(_settings(tmp_path)) is None
    https = _with_tls(tmp_path)
    assert loop_name(https) == "uvloop"
    factory = loop_factory(https)
    assert factory is not None
    loop = factory()
    try:
        assert not isinstance(loop, asyncio.BaseEventLoop)  # uvloop's, not asyncio's
    finally:
        loop.close()


def test_the_setting_chooses(tmp_path: Path) -> None:
    assert loop_name(_with_tls(tmp_path, loop="asyncio")) == "asyncio"
    assert loop_name(_settings(tmp_path, loop="uvloop")) == "uvloop"


def test_without_uvloop_auto_falls_back_and_an_explicit_choice_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(eventloop, "_uvloop", lambda: None)
    assert loop_name(_with_tls(tmp_path)) == "asyncio" and loop_factory(_with_tls(tmp_path)) is None
    with pytest.raises(LoopUnavailable, match="pip install uvloop"):
        loop_factory(_settings(tmp_path, loop="uvloop"))
