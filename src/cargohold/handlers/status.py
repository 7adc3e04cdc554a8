"""`/ready` for orchestrators and `/` for people: a server-rendered status page with inline SVG charts."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from html import escape

from aiohttp import web

from cargohold import __version__
from cargohold.cache.index import TagMove, TagRow
from cargohold.errors import StorageUnavailable
from cargohold.identity import IDENTITY
from cargohold.keys import AUTH, METRICS, PROXY, SETTINGS, SYNC
from cargohold.metrics import UpstreamState
from cargohold.oci.digests import Digest
from cargohold.sync.state import EntryState
from cargohold.upstream.quota import QuotaFigures

log = logging.getLogger("cargohold.status")

TOP_IMAGES = 10
RECENT_MOVES = 10
# Looked up by /ready and never stored: the store (a bucket) has to answer, "not there" is an answer.
PROBE = Digest.of(b"cargohold /ready probe", "sha256")


def _probe_storage(request: web.Request) -> None:
    """Write, fsync and remove a small file where downloads are written."""
    store = request.app[PROXY].store
    fd, temp = store.new_temp()
    try:
        os.write(fd, b"ready")
        os.fsync(fd)
    finally:
        os.close(fd)
        store.discard(temp)


async def ready(request: web.Request) -> web.Response:
    """Ready when the local spool is writable, the store (a bucket, with S3) answers and the index is
    readable; upstream state is reported, never failing it."""
    checks: dict[str, str] = {}
    try:
        await asyncio.get_running_loop().run_in_executor(None, _probe_storage, request)
        checks["storage"] = "ok"
    except OSError as exc:
        checks["storage"] = f"not writable: {exc.strerror or exc}"
    try:
        await request.app[PROXY].store.locate(PROBE)
        checks["store"] = "ok"
    except StorageUnavailable as exc:
        checks["store"] = f"not answering: {exc.message}"
    try:
        await request.app[PROXY].index.usage()
        checks["index"] = "ok"
    except Exception as exc:  # noqa: BLE001 - any index failure means not ready
        checks["index"] = f"not readable: {exc}"
    ok = all(value == "ok" for value in checks.values())
    body: dict[str, object] = {"status": "ready" if ok else "not ready"}
    if _shows_all(request):
        offline = _offline(request)
        if offline:
            body["offline"] = sorted(offline)  # serving only what is cached: ready all the same
        body["checks"] = checks
        states = request.app[METRICS].upstreams.items()
        body["upstreams"] = {name: "offline" if name in offline else state.state for name, state in states}
    elif not ok:
        log.warning("not ready: %s", ", ".join(f"{name} {value}" for name, value in checks.items() if value != "ok"))
    return web.json_response(body, status=200 if ok else 503)


def _offline(request: web.Request) -> set[str]:
    """The upstreams never contacted (`offline`)."""
    return {u.name for u in request.app[SETTINGS].upstreams if u.offline}


def _shows_all(request: web.Request) -> bool:
    """Whether this client may see everything: `status.public`, or an open mirror (no `auth`), where
    everyone may pull everything anyway. /ready never asks for a login, so it is the same for all."""
    return request.app[SETTINGS].status.public or request.app.get(AUTH) is None


async def _visible_rows(request: web.Request) -> list[TagRow] | None:
    """The most pulled tags this client may pull; None (aggregates only) for anonymous clients of a
    mirror with logins, unless `status.public`."""
    auth = None if _shows_all(request) else request.app[AUTH]
    who = request[IDENTITY]
    if auth is not None and who.user is None:
        return None
    rows = await request.app[PROXY].index.tag_rows()
    if auth is not None:
        rows = [row for row in rows if auth.acl.allows(who, row.upstream, row.repository)]
    return sorted(rows, key=lambda r: (-r.pulls, -r.last_access))[:TOP_IMAGES]


async def _visible_moves(request: web.Request) -> list[TagMove] | None:
    """The newest tag moves of images this client may pull; None for anonymous clients of a mirror with logins."""
    auth = None if _shows_all(request) else request.app[AUTH]
    who = request[IDENTITY]
    if auth is not None and who.user is None:
        return None
    moves = await request.app[PROXY].index.tag_moves(limit=RECENT_MOVES * 10)
    if auth is not None:
        moves = [move for move in moves if auth.acl.allows(who, move.upstream, move.repository)]
    return moves[:RECENT_MOVES]


def _moves_table(moves: list[TagMove] | None) -> str:
    if moves is None:
        return "<p>Log in to see the tag moves of the images you may pull.</p>"
    if not moves:
        return "<p>No tag has moved.</p>"
    rows = "".join(
        f'<tr class="move"><td>{escape(f"{m.upstream}/{m.repository}:{m.tag}")}</td>'
        f"<td><code>{escape(m.old_digest[:19])}</code> &rarr; <code>{escape(m.new_digest[:19])}</code></td>"
        f"<td>{_ago(m.moved_at)}</td></tr>"
        for m in moves
    )
    return f'<table id="tag-moves"><tr><th>tag</th><th>digest</th><th>moved</th></tr>{rows}</table>'


def _sync_table(states: list[EntryState], details: bool) -> str:
    """Each sync entry's run; its errors (which name images) only with `details`."""
    rows = []
    for state in states:
        if state.running:
            now = f"running: {state.tags_done}/{state.tags_total} tags"
        else:
            now = "never run" if state.finished is None else f"{'ok' if state.ok else 'failed'}, {_ago(state.finished)}"
        error = escape(state.errors[0]) if details and state.errors else "-"
        rows.append(
            f'<tr class="sync"><td>{escape(state.name)}</td><td>{now}</td><td>{state.tags_changed} new or moved, '
            f"{human(state.bytes_fetched)} fetched</td><td>{error}</td></tr>"
        )
    head = "<tr><th>entry</th><th>state</th><th>last run</th><th>first error</th></tr>"
    return f'<h2>Sync</h2><table id="sync">{head}{"".join(rows)}</table>' if rows else ""


def human(size: float) -> str:
    """1536 -> "1.5 KiB"."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(size) < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def _ago(when: float | None) -> str:
    if when is None:
        return "never"
    seconds = max(0, time.time() - when)
    for unit, length in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= length:
            return f"{seconds / length:.0f}{unit} ago"
    return f"{seconds:.0f}s ago"


def _usage_chart(size: int, cap: int | None) -> str:
    """A horizontal bar: cache size against the cap."""
    share = min(size / cap, 1.0) if cap else 0.0
    colour = "#c0392b" if share > 0.95 else "#2e86c1"
    label = f"{human(size)} of {human(cap)} ({share:.0%})" if cap else f"{human(size)} (no cap)"
    return (
        f'<svg class="chart" id="usage-chart" viewBox="0 0 400 40" width="400" height="40" role="img" aria-label="{escape(label)}">'
        f'<rect x="0" y="5" width="400" height="20" fill="#e5e8e8"/>'
        f'<rect x="0" y="5" width="{400 * share:.1f}" height="20" fill="{colour}"/>'
        f'<text x="0" y="38" font-size="11">{escape(label)}</text></svg>'
    )


def _outcome_chart(counts: dict[str, float]) -> str:
    """Vertical bars of cache hits, misses and stale answers since the cache was created."""
    bars = [("hit", "#27ae60"), ("miss", "#e67e22"), ("stale", "#8e44ad")]
    top = max([counts.get(name, 0) for name, _ in bars] + [1])
    parts = []
    for i, (name, colour) in enumerate(bars):
        value = counts.get(name, 0)
        height = 100 * value / top
        x = 20 + i * 90
        parts.append(
            f'<rect x="{x}" y="{110 - height:.1f}" width="60" height="{height:.1f}" fill="{colour}"/>'
            f'<text x="{x + 30}" y="125" font-size="11" text-anchor="middle">{name} {value:.0f}</text>'
        )
    return f'<svg class="chart" id="outcome-chart" viewBox="0 0 300 130" width="300" height="130" role="img" aria-label="cache outcomes">{"".join(parts)}</svg>'


def _images_chart(rows: list[TagRow] | None) -> str:
    """Horizontal bars of the most pulled images (those the client may pull)."""
    if rows is None:
        return "<p>Log in to see the images you may pull.</p>"
    if not rows:
        return "<p>No images pulled yet.</p>"
    top = max(row.pulls for row in rows) or 1
    parts = []
    for i, row in enumerate(rows):
        y = i * 22
        width = 200 * row.pulls / top
        name = escape(f"{row.upstream}/{row.repository}:{row.tag}")
        parts.append(
            f'<text x="0" y="{y + 14}" font-size="11">{name}</text>'
            f'<rect x="300" y="{y + 3}" width="{max(width, 1):.1f}" height="14" fill="#2e86c1"/>'
            f'<text x="{305 + width:.1f}" y="{y + 14}" font-size="11">{row.pulls} · {_ago(row.last_access)}</text>'
        )
    height = 22 * len(rows)
    return f'<svg class="chart" id="images-chart" viewBox="0 0 600 {height}" width="600" height="{height}" role="img" aria-label="top images">{"".join(parts)}</svg>'


def _in(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    for unit, length in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= length:
            return f"in {seconds / length:.0f}{unit}"
    return f"in {seconds:.0f}s"


def _quota_cells(quota: QuotaFigures | None) -> str:
    """Pulls cargohold spent in the upstream's window, and when the quota resets as far as known."""
    if quota is None:
        return "<td>-</td><td>-</td>"
    window = f"{quota.window / 3600:.0f}h" if quota.window >= 3600 else f"{quota.window:.0f}s"
    spent = f"{quota.spent} in {window}" + (" (paused)" if quota.paused_for > 0 else "")
    return f'<td class="spent">{spent}</td><td class="resets">{_in(quota.resets_in)}</td>'


def _upstream_rows(
    states: dict[str, UpstreamState],
    urls: dict[str, str] | None,
    quotas: dict[str, QuotaFigures],
    offline: set[str],
) -> str:
    """One row per upstream; its URL and last error (which may name internal hosts) only when `urls`."""
    rows = []
    for name, state in states.items():
        pulls = (
            "-"
            if state.ratelimit_remaining is None
            else f"{state.ratelimit_remaining}" + (f" of {state.ratelimit_limit}" if state.ratelimit_limit else "")
        )
        error = (f"{state.error} {_ago(state.last_error)}" if state.last_error else "-") if urls is not None else "-"
        url = urls.get(name, "") if urls is not None else "-"
        shown = "offline" if name in offline else state.state
        rows.append(
            f'<tr class="upstream {state.state}"><td>{escape(name)}</td><td>{escape(url)}</td>'
            f"<td>{shown}</td><td>{_ago(state.last_ok)}</td><td>{escape(error)}</td><td>{pulls}</td>"
            f"{_quota_cells(quotas.get(name))}</tr>"
        )
    return "".join(rows)


STYLE = """
body{font-family:system-ui,sans-serif;margin:2em;color:#1b2631;max-width:60em}
h1{font-size:1.4em}h2{font-size:1.1em;margin-top:1.6em}
table{border-collapse:collapse}td,th{padding:.25em .8em;border-bottom:1px solid #d5d8dc;text-align:left}
.figures{display:flex;gap:2em}.figure b{display:block;font-size:1.5em}
tr.failing td{color:#c0392b}tr.ok td:nth-child(3){color:#27ae60}
"""


def _machine(workers: int) -> str:
    """With `workers`, what the page covers: the index is the machine's, upstream states this worker's."""
    if workers == 1:
        return ""
    return (
        f' <span id="workers">{workers} worker processes share this cache and its figures;'
        f" upstream states as seen by worker pid {os.getpid()}.</span>"
    )


async def status_page(request: web.Request) -> web.Response:
    """Cache size against the cap, hit ratio, bytes saved, top images and each upstream's state.

    Behind logins a user sees only the images their rules let them pull, and no upstream URLs or
    errors; an anonymous client only the aggregates (unless `status.public`)."""
    settings = request.app[SETTINGS]
    metrics = request.app[METRICS]
    index = request.app[PROXY].index
    await metrics.refresh()
    usage = metrics.usage
    counts = await index.counters()
    answered = sum(counts.get(k, 0) for k in ("hit", "miss", "stale"))
    ratio = f"{(counts.get('hit', 0) + counts.get('stale', 0)) / answered:.0%}" if answered else "-"
    top = await _visible_rows(request)
    urls = {u.name: u.url for u in settings.upstreams} if _shows_all(request) else None
    offline = _offline(request)
    banner = f'<p id="offline"><b>Offline</b>: {escape(", ".join(sorted(offline)))} never contacted; only cached content is served.</p>'
    moves = await _visible_moves(request)
    sync = _sync_table(list(request.app[SYNC].states.values()), _shows_all(request)) if top is not None else ""
    quotas = {u.name: u.quota.figures() for u in request.app[PROXY].router.upstreams}
    html = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>cargohold status</title><style>{STYLE}</style></head>
<body>
<h1>cargohold {escape(__version__)}</h1>
<p>Up {_ago(metrics.started).removesuffix(" ago")}. Figures below count since the cache was created.{_machine(settings.worker_count)}</p>
{banner if offline else ""}
<div class="figures">
<div class="figure" id="size"><b>{human(usage.size)}</b>cache size{f" of {human(settings.cache.max_size)}" if settings.cache.max_size else ""}</div>
<div class="figure" id="hit-ratio"><b>{ratio}</b>hit ratio</div>
<div class="figure" id="saved"><b>{human(counts.get("bytes_cache", 0))}</b>served from cache (saved)</div>
<div class="figure" id="fetched"><b>{human(counts.get("bytes_upstream", 0))}</b>fetched upstream</div>
<div class="figure" id="entries"><b>{usage.blobs + usage.manifests}</b>entries ({usage.tags} tags)</div>
</div>
<h2>Cache size</h2>{_usage_chart(usage.size, settings.cache.max_size)}
<h2>Cache answers</h2>{_outcome_chart(counts)}
<h2>Top images</h2>{_images_chart(top)}
<h2>Upstreams</h2>
<table id="upstreams"><tr><th>name</th><th>url</th><th>state</th><th>last success</th><th>last error</th><th>pulls left</th><th>pulls spent</th><th>quota resets</th></tr>
{_upstream_rows(metrics.upstreams, urls, quotas, offline)}</table>
<h2>Recent tag moves</h2>{_moves_table(moves)}
{sync}
</body></html>
"""
    return web.Response(text=html, content_type="text/html")
