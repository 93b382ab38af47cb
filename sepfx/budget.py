"""Final keep sets: from keep probabilities to a keep set that meets the MAC budget.

Within a group the units with the highest keep probability are kept; how many each group keeps
is adjusted greedily: while over budget, drop the units that cost the least probability per MAC
saved; then restore the units that bring the most probability per MAC while the budget still
holds. Kept counts are multiples of ``multiple`` in groups large enough for it to matter
(SIMD/tensor-core friendly widths), and at least ``min_per_group`` and the group's own
``min_size`` (a variance with an n - 1 divisor over its channels needs two).
"""

from __future__ import annotations

import numpy as np

from passes.cost import CostModel
from sepfx.errors import InputError


def _multiples(cost: CostModel, multiple: int) -> list[int]:
    # groups of fewer than 4 multiples would lose too much resolution to rounding
    return [multiple if g.size >= 4 * multiple else 1 for g in cost.analysis.groups]


def _flat(cost: CostModel, order, counts) -> np.ndarray:
    flat = np.zeros(cost.analysis.num_units)
    flat[0] = 1.0
    for g, k in zip(cost.analysis.groups, counts):
        flat[g.offset + order[g.index][:k]] = 1.0
    return flat


def floor_counts(cost: CostModel, min_per_group: int = 1, multiple: int = 8) -> list[int]:
    return [
        min(g.size, max(min_per_group, m, g.min_size))
        for g, m in zip(cost.analysis.groups, _multiples(cost, multiple))
    ]


def check_reachable(
    cost: CostModel, budget: float, min_per_group: int = 1, multiple: int = 8
) -> None:
    """Raise InputError when even every group at its minimum width costs more than ``budget``."""
    counts = floor_counts(cost, min_per_group, multiple)
    order = {g.index: np.arange(g.size) for g in cost.analysis.groups}
    floor = cost.macs(_flat(cost, order, counts)) / cost.dense_macs
    if floor > budget:
        raise InputError(
            f"budget {budget:g} is below what this model can reach: with every group at its "
            f"minimum width it still costs {floor:.3f} of its dense MACs (its frozen, "
            f"unprunable part included); use a budget >= {np.ceil(floor * 100) / 100:.2f}"
        )


def project(
    cost: CostModel,
    probability: np.ndarray,
    budget: float,
    *,
    initial: np.ndarray | None = None,
    min_per_group: int = 1,
    multiple: int = 8,
) -> dict[int, np.ndarray]:
    """A keep set with MACs <= budget * dense MACs, as close to it as the granularity allows.

    ``probability``: flat keep probability per unit (the ranking); ``initial``: flat bool keep
    to start from (default: every group keeps the same fraction, the largest that fits)."""
    groups = cost.analysis.groups
    limit = budget * cost.dense_macs
    steps = _multiples(cost, multiple)
    order = {g.index: np.argsort(-probability[g.units], kind="stable") for g in groups}
    check_reachable(cost, budget, min_per_group, multiple)
    low = floor_counts(cost, min_per_group, multiple)

    def snap(k, g, step):
        if k >= g.size:
            return g.size
        return int(min(g.size, max(low[g.index], int(np.ceil(k / step)) * step)))

    if initial is None:
        lo, hi = 0.0, 1.0
        for _ in range(30):  # the largest uniform fraction that fits
            mid = (lo + hi) / 2
            counts = [snap(max(1, round(mid * g.size)), g, s) for g, s in zip(groups, steps)]
            lo, hi = (mid, hi) if cost.macs(_flat(cost, order, counts)) <= limit else (lo, mid)
        counts = [snap(max(1, round(lo * g.size)), g, s) for g, s in zip(groups, steps)]
    else:
        counts = [snap(int(initial[g.units].sum()), g, s) for g, s in zip(groups, steps)]
    prob_sorted = {g.index: probability[g.offset + order[g.index]] for g in groups}
    macs = cost.macs(_flat(cost, order, counts))

    def moved(g, k, new):  # probability mass between k and new kept units of group g
        a, b = sorted((k, new))
        return float(prob_sorted[g.index][a:b].sum()) + 1e-9

    while macs > limit:  # drop the cheapest probability per MAC saved
        best = None
        for g, s in zip(groups, steps):
            k = counts[g.index]
            new = k - s if k < g.size or g.size % s == 0 else (g.size // s) * s
            if new < low[g.index]:
                continue
            trial = counts.copy()
            trial[g.index] = new
            trial_macs = cost.macs(_flat(cost, order, trial))
            saved = macs - trial_macs
            if saved <= 0:
                continue
            score = moved(g, k, new) / saved
            if best is None or score < best[0]:
                best = (score, trial, trial_macs)
        if best is None:
            break
        _, counts, macs = best
    while True:  # restore the most probability per MAC while the budget holds
        best = None
        for g, s in zip(groups, steps):
            k = counts[g.index]
            if k >= g.size:
                continue
            new = min(g.size, k + s)
            trial = counts.copy()
            trial[g.index] = new
            trial_macs = cost.macs(_flat(cost, order, trial))
            if trial_macs > limit:
                continue
            score = moved(g, k, new) / max(trial_macs - macs, 1e-9)
            if best is None or score > best[0]:
                best = (score, trial, trial_macs)
        if best is None:
            break
        _, counts, macs = best
    if macs < limit - 0.02 * cost.dense_macs:
        counts, macs = _swap_towards(cost, order, counts, macs, limit, steps, low)
    return {g.index: np.sort(order[g.index][: counts[g.index]]) for g in groups}


def _swap_towards(cost, order, counts, macs, limit, steps, low, rounds: int = 200):
    """When no single restore fits, move units between groups (one group gives ``step`` units,
    another takes ``step``) while that brings the MACs closer to the limit without passing it."""
    groups = cost.analysis.groups
    for _ in range(rounds):
        best = None
        for a, sa in zip(groups, steps):
            if counts[a.index] - sa < low[a.index]:
                continue
            for b, sb in zip(groups, steps):
                if b.index == a.index or counts[b.index] >= b.size:
                    continue
                trial = counts.copy()
                trial[a.index] -= sa
                trial[b.index] = min(b.size, trial[b.index] + sb)
                trial_macs = cost.macs(_flat(cost, order, trial))
                if macs < trial_macs <= limit and (best is None or trial_macs > best[1]):
                    best = (trial, trial_macs)
        if best is None:
            break
        counts, macs = best
        if macs >= limit - 0.02 * cost.dense_macs:
            break
    return counts, macs
