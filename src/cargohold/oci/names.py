"""Repository names and tags, validated by the distribution spec's grammar."""

from __future__ import annotations

import re

from cargohold.errors import ManifestUnknown, NameInvalid

_COMPONENT = r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*"
# Matched whole (fullmatch): `$` would also match before a final newline ("3.21\n" passed as a tag).
_NAME = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")
_TAG = re.compile(r"[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}")
MAX_NAME = 255


def check_name(name: str) -> str:
    if len(name) > MAX_NAME or not _NAME.fullmatch(name):
        raise NameInvalid("invalid repository name", {"name": name[:MAX_NAME]})
    return name


def valid_tag(tag: str) -> bool:
    """Whether `tag` is one by the distribution spec's grammar (up to 128 characters)."""
    return _TAG.fullmatch(tag) is not None


def check_tag(tag: str) -> str:
    """A reference that is no tag (nor a digest, checked before) cannot name a manifest: 404 like the
    registry behind us and as the OCI conformance suite expects, decided here without asking upstream."""
    if not valid_tag(tag):
        raise ManifestUnknown("manifest unknown: not a valid tag or digest", {"tag": tag[:128]})
    return tag
