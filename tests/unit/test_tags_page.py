"""tags/list pages cut by cargohold when the upstream ignores `n` and `last` (distribution 2.x does)."""

from __future__ import annotations

import json

from cargohold.handlers.tags import page

BODY = json.dumps({"name": "acme/tool", "tags": ["test3", "1.0", "test1", "test0", "test2"]}).encode()


def _tags(cut: tuple[bytes, str | None] | None) -> list[str]:
    assert cut is not None
    return list(json.loads(cut[0])["tags"])


def test_nothing_asked_nothing_cut() -> None:
    assert page(BODY, None, None) is None


def test_n_cuts_in_lexical_order_and_names_the_next_page() -> None:
    cut = page(BODY, "2", None)
    assert _tags(cut) == ["1.0", "test0"] and cut is not None and cut[1] == "n=2&last=test0"


def test_last_starts_after_it_and_the_last_page_has_no_next() -> None:
    cut = page(BODY, "2", "test1")
    assert _tags(cut) == ["test2", "test3"] and cut is not None and cut[1] is None
    assert _tags(page(BODY, None, "test2")) == ["test3"]


def test_an_already_paged_list_is_left_as_it_is() -> None:
    paged = json.dumps({"name": "acme/tool", "tags": ["test0", "test1"]}).encode()
    assert _tags(page(paged, "2", None)) == ["test0", "test1"]


def test_a_body_without_a_tag_list_is_passed_on() -> None:
    assert page(json.dumps({"name": "x", "tags": None}).encode(), "2", None) is None
