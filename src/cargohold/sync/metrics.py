"""Metrics of what keeps the cache: tag moves found, and each sync entry's progress and last result, read from
the live objects at every scrape (registered on the instance's own registry)."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from cargohold.pull.tags import Tags
from cargohold.sync.schedule import Scheduler


class KeepCollector:
    def __init__(self, scheduler: Scheduler, tags: Tags) -> None:
        self._scheduler = scheduler
        self._tags = tags

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        yield CounterMetricFamily(
            "cargohold_tag_moves",
            "Tags found pointing at a new digest (followed, or refused for immutable tags)",
            value=self._tags.moves,
        )
        states = self._scheduler.states.values()
        if not states:
            return
        running = GaugeMetricFamily(
            "cargohold_sync_running", "1 while a run of the sync entry goes on", labels=["entry"]
        )
        tags = GaugeMetricFamily(
            "cargohold_sync_tags",
            "Tags of the current or last run: total, done, changed (new or moved)",
            labels=["entry", "state"],
        )
        fetched = GaugeMetricFamily(
            "cargohold_sync_fetched_bytes", "Blob bytes the current or last run fetched", labels=["entry"]
        )
        errors = GaugeMetricFamily("cargohold_sync_errors", "Errors in the current or last run", labels=["entry"])
        success = GaugeMetricFamily(
            "cargohold_sync_last_success", "1 if the last finished run had no error", labels=["entry"]
        )
        finished = GaugeMetricFamily(
            "cargohold_sync_last_finished_timestamp_seconds", "When the last run finished", labels=["entry"]
        )
        skipped = CounterMetricFamily(
            "cargohold_sync_skipped_runs", "Runs skipped because the previous one still went on", labels=["entry"]
        )
        for state in states:
            name = [state.name]
            running.add_metric(name, state.running)
            for what, value in (
                ("total", state.tags_total),
                ("done", state.tags_done),
                ("changed", state.tags_changed),
            ):
                tags.add_metric([state.name, what], value)
            fetched.add_metric(name, state.bytes_fetched)
            errors.add_metric(name, len(state.errors))
            skipped.add_metric(name, state.skipped_runs)
            if state.finished is not None:
                success.add_metric(name, bool(state.ok))
                finished.add_metric(name, state.finished)
        yield from (running, tags, fetched, errors, success, finished, skipped)
