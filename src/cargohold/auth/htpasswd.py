"""The htpasswd file: bcrypt only, the same file Apache's `htpasswd -B` reads and writes.

The server watches the file and picks up edits within seconds; the CLI edits it atomically
(temp file, fsync, rename), so the server never reads half a file.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import bcrypt

log = logging.getLogger("cargohold.auth")

MAX_PASSWORD_BYTES = 72  # bcrypt ignores everything after; refusing is better than silently truncating
BCRYPT_ROUNDS = 10  # ~70 ms a check: paid once per login, then cached
# Always with fullmatch: `$` also matches before a final newline, which let `user add $'mallory\n'` in.
_BCRYPT = re.compile(r"\$2[aby]\$\d\d\$[./A-Za-z0-9]{53}")
# No colon, white space or control character (C0, DEL, C1), none that cannot be written as UTF-8 (a name
# from bytes that are not UTF-8), and no `#` first: that line would be a comment, a user nobody can be.
_NAME_CHAR = r"[^:\s\x00-\x1f\x7f-\x9f\ud800-\udfff]"
_USER = re.compile(rf"(?!#){_NAME_CHAR}{{1,255}}")


class HtpasswdError(Exception):
    """The file cannot be used as it is; the message names the file and line."""


class PasswordError(ValueError):
    """A password bcrypt cannot take as it is."""


def _hash_kind(hashed: str) -> str:
    if hashed.startswith("$apr1$"):
        return "Apache MD5 ($apr1$)"
    if hashed.startswith("{SHA}"):
        return "SHA-1 ({SHA})"
    if hashed.startswith(("$5$", "$6$")):
        return "SHA-crypt"
    if hashed.startswith("$2"):
        return "malformed bcrypt"
    return "crypt or plain text"


def check_password(password: str) -> bytes:
    """The password as bytes, or PasswordError when bcrypt cannot take it whole."""
    raw = password.encode()
    if not raw:
        raise PasswordError("the password is empty")
    if len(raw) > MAX_PASSWORD_BYTES:
        raise PasswordError(f"the password is longer than {MAX_PASSWORD_BYTES} bytes, the most bcrypt can check")
    return raw


def valid_username(name: str) -> bool:
    """1-255 characters, none of them a colon, white space or a control character (a newline would split the
    file's line, an escape sequence would reach the terminal of `user list`), not starting with `#`."""
    return _USER.fullmatch(name) is not None


def check_username(name: str) -> str:
    if not valid_username(name):
        raise ValueError(
            f"invalid user name {name[:64]!r} (1-255 characters, no ':', spaces or control characters, no '#' first)"
        )
    return name


def hash_password(password: str, rounds: int | None = None) -> str:
    """A `$2y$` bcrypt hash: the prefix Apache writes, so both tools read what the other wrote."""
    hashed = bcrypt.hashpw(check_password(password), bcrypt.gensalt(rounds=rounds or BCRYPT_ROUNDS)).decode()
    return "$2y$" + hashed[4:]


def verify_password(password: bytes, hashed: bytes) -> bool:
    """bcrypt's own constant-time check; blocking (tens of milliseconds), so call it off the loop."""
    return bcrypt.checkpw(password, hashed)


def parse(text: str, source: str) -> tuple[dict[str, bytes], list[str]]:
    """User -> bcrypt hash, and one problem line per entry that cannot be used (naming the line)."""
    users: dict[str, bytes] = {}
    problems: list[str] = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        user, sep, hashed = line.partition(":")
        where = f"{source} line {number}"
        if not sep or not valid_username(user):
            problems.append(f"{where}: not a `user:hash` entry")
        elif not _BCRYPT.fullmatch(hashed):
            problems.append(
                f"{where}: user {user!r}: {_hash_kind(hashed)} hash; only bcrypt is accepted "
                "(set it again with `cargohold user passwd` or `htpasswd -B`)"
            )
        else:
            users[user] = hashed.encode()
    return users, problems


def load(path: Path) -> dict[str, bytes]:
    """Read the file at start. An unusable entry is left out and logged, never fatal: one bad line
    (a hand edit, an Apache MD5 hash) must not keep the mirror from starting for every other user.
    Only a file that cannot be read at all is an error."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise HtpasswdError(f"cannot read htpasswd file {path}: {exc.strerror}") from None
    return usable(text, str(path))


def usable(text: str, source: str) -> dict[str, bytes]:
    """The usable entries of the file's text; each one left out is logged, naming its line."""
    users, problems = parse(text, source)
    for problem in problems:
        log.error("htpasswd entry left out: %s", problem)
    return users


def _signature(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


@dataclass
class Users:
    """The users of a running server; `refresh()` (called every second) rereads a changed file."""

    path: Path
    users: dict[str, bytes]
    _seen: tuple[int, int, int] | None = None

    @classmethod
    def open(cls, path: Path) -> Users:
        seen = _signature(path)
        return cls(path, load(path), seen)

    def hash_of(self, user: str) -> bytes | None:
        return self.users.get(user)

    def __contains__(self, user: str) -> bool:
        return user in self.users

    def refresh(self) -> bool:
        """Reread the file if it changed. Bad entries are left out (and logged), never kept from before."""
        seen = _signature(self.path)
        if seen == self._seen:
            return False
        self._seen = seen
        try:
            text = self.path.read_text() if seen else ""
        except OSError as exc:
            log.error("cannot reread htpasswd file %s: %s; keeping %d users", self.path, exc.strerror, len(self.users))
            return False
        users = usable(text, str(self.path))
        if seen is None:
            log.warning("htpasswd file %s is gone: no user can log in", self.path)
        self.users = users
        log.info("htpasswd file %s reloaded: %d users", self.path, len(users))
        return True


# -- editing (the `cargohold user` commands) ---------------------------------------------------


def _read_lines(path: Path) -> list[str]:
    try:
        return path.read_text().splitlines()
    except FileNotFoundError:
        return []


def _entry_user(line: str) -> str | None:
    stripped = line.strip()
    if not stripped or stripped.startswith("#") or ":" not in stripped:
        return None
    return stripped.partition(":")[0]


def list_users(path: Path) -> list[str]:
    return [u for u in map(_entry_user, _read_lines(path)) if u is not None]


@contextlib.contextmanager
def _editing(path: Path) -> Iterator[None]:
    """One edit of the file at a time (two `user add` at once each read the file and the last rename won,
    losing the other's user): an exclusive flock on its directory (no lock file left beside it), for the read,
    change and write. The file itself cannot carry the lock: each edit replaces it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def set_user(path: Path, user: str, hashed: str) -> bool:
    """Add or replace a user's entry, keeping every other line; True when the user was new."""
    entry = f"{check_username(user)}:{hashed}"
    with _editing(path):
        lines = _read_lines(path)
        found = False
        for i, line in enumerate(lines):
            if _entry_user(line) == user:
                lines[i] = entry
                found = True
        if not found:
            lines.append(entry)
        _write(path, lines)
    return not found


def remove_user(path: Path, user: str) -> bool:
    """Drop a user's entry; False when there was none."""
    with _editing(path):
        lines = _read_lines(path)
        kept = [line for line in lines if _entry_user(line) != user]
        if len(kept) == len(lines):
            return False
        _write(path, kept)
    return True


def _write(path: Path, lines: list[str]) -> None:
    """Temp file in the same directory, fsync, rename: readers see the old or the new file, whole."""
    mode = path.stat().st_mode & 0o777 if path.exists() else 0o640
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write("".join(line + "\n" for line in lines))
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
