"""`cargohold user add|passwd|remove|list` on the file the config names."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from cargohold.auth import htpasswd
from cargohold.cli import main


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "cargohold.yml"
    path.write_text(f"data_dir: {tmp_path / 'data'}\nauth:\n  htpasswd: {tmp_path / 'users'}\n")
    return path


def _run(monkeypatch: pytest.MonkeyPatch, stdin: str, *args: str) -> int:
    monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    monkeypatch.setattr(htpasswd, "BCRYPT_ROUNDS", 4)
    return main(list(args))


def test_user_lifecycle(
    config: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    c = ["--config", str(config)]
    assert _run(monkeypatch, "first\n", "user", "add", "alice", "--password-stdin", *c) == 0
    assert _run(monkeypatch, "pw", "user", "add", "bob", "--password-stdin", *c) == 0
    users = htpasswd.load(tmp_path / "users")
    assert htpasswd.verify_password(b"first", users["alice"]) and htpasswd.verify_password(b"pw", users["bob"])
    assert _run(monkeypatch, "again", "user", "add", "alice", "--password-stdin", *c) == 1
    assert "already exists" in capsys.readouterr().err
    assert _run(monkeypatch, "second\n", "user", "passwd", "alice", "--password-stdin", *c) == 0
    assert htpasswd.verify_password(b"second", htpasswd.load(tmp_path / "users")["alice"])
    assert _run(monkeypatch, "x" * 73, "user", "passwd", "alice", "--password-stdin", *c) == 1
    assert "longer than 72 bytes" in capsys.readouterr().err
    assert _run(monkeypatch, "", "user", "remove", "bob", *c) == 0
    assert _run(monkeypatch, "", "user", "remove", "bob", *c) == 1
    assert _run(monkeypatch, "pw", "user", "passwd", "bob", "--password-stdin", *c) == 1
    assert _run(monkeypatch, "pw", "user", "add", "bad:name", "--password-stdin", *c) == 1
    capsys.readouterr()
    assert _run(monkeypatch, "", "user", "list", *c) == 0
    assert capsys.readouterr().out == "alice\n"


def test_prompted_password_must_match(
    config: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    answers = iter(["one", "two"])
    monkeypatch.setattr("getpass.getpass", lambda prompt="": next(answers))
    assert _run(monkeypatch, "", "user", "add", "alice", "--config", str(config)) == 1
    assert "do not match" in capsys.readouterr().err


def test_config_without_auth(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    plain = tmp_path / "plain.yml"
    plain.write_text("listen: 127.0.0.1:5000\n")
    assert _run(monkeypatch, "pw", "user", "add", "alice", "--password-stdin", "--config", str(plain)) == 1
    assert "no auth section" in capsys.readouterr().err
