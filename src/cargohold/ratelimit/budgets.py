"""Which budgets apply to whom: presets, then the top-level overrides, then groups, then the user.

Budgets are plain numbers here; `limiter.py` turns them into `limits` items. A value of 0 means
unlimited, which is why "the most generous" treats 0 as the largest value.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace

from cargohold.config import BudgetOverrides, RateLimitConfig


@dataclass(frozen=True, slots=True)
class Budget:
    """What one identity may do. Blob requests have their own, larger bucket so that the layers of
    a pull never use up the requests budget; pulls are manifest requests by tag."""

    requests_per_second: int
    burst: int
    blobs_per_second: int
    blob_burst: int
    connections: int
    pulls_per_minute: int
    pulls_per_hour: int

    @property
    def unlimited(self) -> bool:
        return not any(getattr(self, f.name) for f in fields(self))


PRESETS: dict[str, Budget] = {
    "off": Budget(0, 0, 0, 0, 0, 0, 0),
    "personal": Budget(10, 20, 50, 200, 10, 60, 1000),
    "team": Budget(20, 50, 100, 500, 20, 120, 3000),
    "medium": Budget(50, 100, 250, 1000, 50, 300, 10000),
}


def apply(base: Budget, overrides: BudgetOverrides) -> Budget:
    """`base` (or the named preset) with every budget that `overrides` sets replaced."""
    if overrides.preset is not None:
        base = PRESETS[overrides.preset]
    changed = {f.name: getattr(overrides, f.name) for f in fields(Budget) if getattr(overrides, f.name) is not None}
    return replace(base, **changed) if changed else base


def _generous(value: int) -> float:
    return math.inf if value == 0 else value


def most_generous(budgets: list[Budget]) -> Budget:
    """Field by field the largest budget (0, unlimited, beats everything): a member of several
    groups gets the best each of them offers."""
    return Budget(**{f.name: max((getattr(b, f.name) for b in budgets), key=_generous) for f in fields(Budget)})


def budget_for(config: RateLimitConfig, user: str | None, groups: frozenset[str]) -> Budget:
    """The budget of an identity: a user's own overrides win over its groups', which win over the default."""
    budget = apply(PRESETS[config.preset], config)
    in_groups = [apply(budget, config.groups[g]) for g in sorted(groups) if g in config.groups]
    if in_groups:
        budget = most_generous(in_groups)
    if user is not None and user in config.users:
        budget = apply(budget, config.users[user])
    return budget
