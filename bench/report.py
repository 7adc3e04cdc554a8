"""Samples per (metric, system), their medians, ratios and targets, as one table (and JSON)."""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass, field

CARGOHOLD = "cargohold"
REPLACED = "registry+nginx"


@dataclass(frozen=True)
class Target:
    """What cargohold's median must reach, given the reference system's median; judged for the rows
    whose system starts with `systems` (every cargohold unless a target is about one setting)."""

    text: str
    check: Callable[[float, float | None], bool]
    systems: str = CARGOHOLD


@dataclass(frozen=True)
class Metric:
    key: str
    title: str
    unit: str
    reference: str | None = None  # ratios are taken against this system's median
    target: Target | None = None
    digits: int = 0


@dataclass
class Results:
    """Every sample, in the order scenarios produced them."""

    metrics: list[Metric]
    samples: dict[str, dict[str, list[float]]] = field(default_factory=dict)

    def add(self, key: str, system: str, value: float) -> None:
        self.samples.setdefault(key, {}).setdefault(system, []).append(value)

    def median(self, key: str, system: str) -> float | None:
        values = self.samples.get(key, {}).get(system)
        return statistics.median(values) if values else None

    def verdicts(self) -> list[tuple[Metric, str, float, float | None, bool]]:
        """(metric, cargohold system, its median, reference median, target met) per target."""
        out = []
        for m in self.metrics:
            if m.target is None:
                continue
            for system in self.samples.get(m.key, {}):
                if system.startswith(m.target.systems):
                    value = self.median(m.key, system)
                    ref = self.median(m.key, m.reference) if m.reference else None
                    assert value is not None
                    out.append((m, system, value, ref, m.target.check(value, ref)))
        return out

    def rows(self) -> list[list[str]]:
        rows = [["scenario", "system", "median", "runs", "vs reference", "vs replaced", "target"]]
        for m in self.metrics:
            per_system = self.samples.get(m.key, {})
            first = True
            for system, values in per_system.items():
                value = statistics.median(values)
                ref = self.median(m.key, m.reference) if m.reference else None
                replaced = self.median(m.key, REPLACED)
                vs_ref = f"{value / ref:.2f}x {m.reference}" if ref and system != m.reference else ""
                vs_replaced = f"{value / replaced:.2f}x" if replaced and system.startswith(CARGOHOLD) else ""
                verdict = ""
                if m.target is not None and system.startswith(m.target.systems):
                    verdict = ("ok " if m.target.check(value, ref) else "MISS ") + m.target.text
                rows.append(
                    [
                        f"{m.title} ({m.unit})" if first else "",
                        system,
                        _fmt(value, m.digits),
                        " ".join(_fmt(v, m.digits) for v in values),
                        vs_ref,
                        vs_replaced,
                        verdict,
                    ]
                )
                first = False
        return rows

    def table(self) -> str:
        rows = self.rows()
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = []
        for n, row in enumerate(rows):
            lines.append("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
            if n == 0:
                lines.append("  ".join("-" * w for w in widths))
        return "\n".join(lines)

    def as_json(self) -> dict[str, object]:
        return {
            "samples": self.samples,
            "medians": {k: {s: statistics.median(v) for s, v in per.items()} for k, per in self.samples.items()},
            "targets": [
                {"metric": m.key, "system": s, "value": v, "reference": r, "target": m.target.text, "met": ok}
                for m, s, v, r, ok in self.verdicts()
                if m.target is not None
            ],
        }


def _fmt(value: float, digits: int) -> str:
    return f"{value:,.{digits}f}"
