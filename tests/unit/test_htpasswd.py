"""The htpasswd file: bcrypt only, compatible with Apache's htpasswd both ways, reloaded on change."""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
from pathlib import Path

import pytest

from cargohold.auth import htpasswd
from cargohold.auth.htpasswd import HtpasswdError, PasswordError, Users

APACHE = shutil.which("htpasswd")
needs_apache = pytest.mark.skipif(APACHE is None, reason="Apache's htpasswd (apache2-utils) is not installed")


def _apache(*args: str) -> subprocess.CompletedProcess[str]:
    assert APACHE is not None
    return subprocess.run([APACHE, *args], capture_output=True, text=True, check=False)


@needs_apache
def test_reads_a_file_written_by_apache(tmp_path: Path) -> None:
    path = tmp_path / "htpasswd"
    assert _apache("-cbB", "-C", "5", str(path), "alice", "s3cret").returncode == 0
    assert _apache("-bB", str(path), "bob", "hunter2").returncode == 0
    users = htpasswd.load(path)
    assert sorted(users) == ["alice", "bob"]
    assert users["alice"].startswith(b"$2y$05$")
    assert htpasswd.verify_password(b"s3cret", users["alice"])
    assert not htpasswd.verify_password(b"s3cret", users["bob"])
    assert htpasswd.verify_password(b"hunter2", users["bob"])


@needs_apache
def test_apache_verifies_what_we_write(tmp_path: Path) -> None:
    path = tmp_path / "htpasswd"
    htpasswd.set_user(path, "carol", htpasswd.hash_password("pa:ss word", rounds=5))
    assert path.read_text().startswith("carol:$2y$05$")
    assert _apache("-vb", str(path), "carol", "pa:ss word").returncode == 0
    assert _apache("-vb", str(path), "carol", "wrong").returncode != 0


def test_2b_and_2y_both_verify(tmp_path: Path) -> None:
    hashed = htpasswd.hash_password("pw", rounds=4)
    as_2b = "$2b$" + hashed[4:]
    path = tmp_path / "htpasswd"
    path.write_text(f"y:{hashed}\nb:{as_2b}\n# a comment\n\n")
    users = htpasswd.load(path)
    assert all(htpasswd.verify_password(b"pw", users[u]) for u in ("y", "b"))


@pytest.mark.parametrize(
    ("line", "kind"),
    [
        ("dave:$apr1$Xu3Rq7mD$rI0rG5K2N6gU1q3a9r0Yb/", "Apache MD5"),
        ("dave:{SHA}W6ph5Mm5Pz8GgiULbPgzG37mj9g=", "SHA-1"),
        ("dave:rqXexS6ZhobKA", "crypt or plain text"),
        ("dave:$2y$05$short", "malformed bcrypt"),
        ("just-a-name", "not a `user:hash` entry"),
    ],
)
def test_other_hash_kinds_are_left_out_naming_the_line(
    tmp_path: Path, line: str, kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    """One bad line is logged and skipped: it must not keep the mirror from starting (issue 21.13)."""
    path = tmp_path / "htpasswd"
    path.write_text(f"ok:{htpasswd.hash_password('pw', rounds=4)}\n\n{line}\n")
    assert list(htpasswd.load(path)) == ["ok"]
    assert f"{path} line 3" in caplog.text and kind in caplog.text


@pytest.mark.parametrize(
    "name",
    # A comment line (a user nobody can be), escapes for the terminal of `user list`, C1 controls, and a name
    # from bytes that are not UTF-8 (a traceback when written) were accepted too.
    ["mallory\n", "mallory\r", " mallory", "a:b", "", "x" * 256, "#alice", "\x1b[31mred", "a\x85b", "caf\udce9"],
)
def test_user_names_that_would_break_the_file_are_refused(name: str) -> None:
    """Issue 21.13: `re.match` with `$` let a name end in a newline, which split the entry in two."""
    with pytest.raises(ValueError, match="invalid user name"):
        htpasswd.check_username(name)
    assert not htpasswd.valid_username(name)


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(HtpasswdError, match="cannot read htpasswd file"):
        htpasswd.load(tmp_path / "nope")


def test_passwords_bcrypt_cannot_take_whole_are_refused() -> None:
    with pytest.raises(PasswordError, match="longer than 72 bytes"):
        htpasswd.hash_password("é" * 37)  # 74 bytes in UTF-8
    with pytest.raises(PasswordError, match="empty"):
        htpasswd.check_password("")
    assert htpasswd.check_password("x" * 72) == b"x" * 72


def test_edits_keep_other_lines_and_permissions(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "htpasswd"
    assert htpasswd.set_user(path, "alice", htpasswd.hash_password("a", rounds=4))
    assert (path.stat().st_mode & 0o777) == 0o640
    os.chmod(path, 0o600)
    with path.open("a") as f:
        f.write("# keep me\n")
    assert htpasswd.set_user(path, "bob", htpasswd.hash_password("b", rounds=4))
    assert not htpasswd.set_user(path, "alice", htpasswd.hash_password("a2", rounds=4))
    assert htpasswd.list_users(path) == ["alice", "bob"]
    assert "# keep me" in path.read_text()
    assert htpasswd.verify_password(b"a2", htpasswd.load(path)["alice"])
    assert htpasswd.remove_user(path, "alice") and not htpasswd.remove_user(path, "alice")
    assert htpasswd.list_users(path) == ["bob"]
    assert (path.stat().st_mode & 0o777) == 0o600
    assert [p.name for p in path.parent.iterdir()] == ["htpasswd"]  # no temp files left
    with pytest.raises(ValueError, match="invalid user name"):
        htpasswd.set_user(path, "a:b", "x")


def test_users_reload_on_change_and_drop_bad_entries(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "htpasswd"
    htpasswd.set_user(path, "alice", htpasswd.hash_password("a", rounds=4))
    users = Users.open(path)
    assert "alice" in users and not users.refresh()
    htpasswd.set_user(path, "bob", htpasswd.hash_password("b", rounds=4))
    htpasswd.remove_user(path, "alice")
    assert users.refresh()
    assert "alice" not in users and "bob" in users
    with path.open("a") as f:  # a bad entry after start: left out and logged, the rest applies
        f.write("eve:$apr1$x$y\n")
    assert users.refresh()
    assert "eve" not in users and "bob" in users
    assert "line 2" in caplog.text and "eve" in caplog.text
    path.unlink()
    assert users.refresh() and not users.users


def test_edits_at_the_same_time_all_land(tmp_path: Path) -> None:
    """Two `user add` at once each read the file, and the last rename won: 16 at once left 9-13 users."""
    path = tmp_path / "htpasswd"
    hashed = htpasswd.hash_password("pw", rounds=4)
    names = [f"u{i}" for i in range(16)]
    start = threading.Barrier(len(names))

    def add(name: str) -> None:
        start.wait()
        htpasswd.set_user(path, name, hashed)

    threads = [threading.Thread(target=add, args=(name,)) for name in names]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(htpasswd.list_users(path)) == sorted(names)
