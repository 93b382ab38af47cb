"""Final keep sets: from keep probabilities to a keep set that meets the MAC budget.

Within a group the units with the highest keep probability are kept; how many each group keeps
is adjusted greedily: while over budget, drop the units that cost the least probability per MAC
saved; then restore the units that bring the most probability per MAC while the budget still
holds. Kept counts are multiples of ``multiple`` in groups large enough for it to matter
(SIMD/tensor-core friendly widths), and at least ``min_per_group`` and the group's own
``min_size`` (a variance with an n - 1 divisor over its channels needs two).

Where the counts are not learned, the starting widths come from ``allocation``: "uniform" keeps
the same fraction of every group; "latency" spends the MAC budget on the groups whose units
write the fewest activation elements per MAC first, from a floor of half the uniform width. MACs
alone miss the channel-linear work (norms, activations, depthwise convolutions, residual adds):
at equal MACs a narrow wide-hidden layer runs slower than a wide bottleneck, and the latency
allocation keeps the budget while doing less of that work. Given a measure of how much a keep
set changes the output, it leaves the groups the output is most sensitive to no narrower than
the uniform width (``start_counts``).
"""

from __future__ import annotations

import numpy as np

from passes.cost import CostModel, LinearCost
from sepfx.errors import InputError

ALLOCATIONS = ("latency", "uniform")
LATENCY_FLOOR = 0.5  # the latency allocation keeps at least this fraction of the uniform width
# ... unless narrowing a group alone to that floor changes the output by more than this share
# of what the whole uniform keep set changes it (see start_counts)
SENSITIVE_SHARE = 0.1


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
    budget: float | None,
    *,
    initial: np.ndarray | None = None,
    min_per_group: int = 1,
    multiple: int = 8,
    allocation: str = "uniform",
    output_change=None,
    latency: tuple[LinearCost, float] | None = None,
) -> dict[int, np.ndarray]:
    """A keep set with MACs <= budget * dense MACs, as close to it as the granularity allows.

    ``probability``: flat keep probability per unit (the ranking); ``initial``: flat bool keep
    to start from (default: widths from ``allocation`` and ``output_change``, see
    ``start_counts``). ``latency``: (a latency cost, its limit) that must hold too; ``budget``
    may then be None (no MAC budget), and without ``initial`` every group starts whole, the
    greedy cutting where the least probability goes per share of each exceeded limit saved."""
    if budget is None and latency is None:
        raise InputError("project needs a MAC budget, a latency limit or both")
    groups = cost.analysis.groups
    steps = _multiples(cost, multiple)
    limits: list[tuple[LinearCost, float]] = []
    if budget is not None:
        limits.append((cost.mac_cost, budget * cost.dense_macs))
    if latency is not None:
        limits.append(latency)
    order = {g.index: np.argsort(-probability[g.units], kind="stable") for g in groups}
    low = floor_counts(cost, min_per_group, multiple)
    if initial is not None:
        if budget is not None:
            check_reachable(cost, budget, min_per_group, multiple)
        counts = [
            _snap(int(initial[g.units].sum()), g, s, low[g.index]) for g, s in zip(groups, steps)
        ]
    elif latency is not None:
        if budget is not None:
            check_reachable(cost, budget, min_per_group, multiple)
        counts = [g.size for g in groups]
    else:
        assert budget is not None
        counts, low = start_counts(
            cost, budget, allocation, min_per_group, multiple, order, output_change
        )
    prob_sorted = {g.index: probability[g.offset + order[g.index]] for g in groups}
    values = [c.value(_flat(cost, order, counts)) for c, _ in limits]

    def moved(g, k, new):  # probability mass between k and new kept units of group g
        a, b = sorted((k, new))
        return float(prob_sorted[g.index][a:b].sum()) + 1e-9

    while True:  # drop the cheapest probability per share of the exceeded limits saved
        over = [i for i, (v, (_, limit)) in enumerate(zip(values, limits)) if v > limit]
        if not over:
            break
        best = None
        for g, s in zip(groups, steps):
            k = counts[g.index]
            new = k - s if k < g.size or g.size % s == 0 else (g.size // s) * s
            if new < low[g.index]:
                continue
            trial = counts.copy()
            trial[g.index] = new
            trial_flat = _flat(cost, order, trial)
            trial_values = [c.value(trial_flat) for c, _ in limits]
            saved = sum((values[i] - trial_values[i]) / limits[i][1] for i in over)
            if saved <= 0:
                continue
            score = moved(g, k, new) / saved
            if best is None or score < best[0]:
                best = (score, trial, trial_values)
        if best is None:
            break
        _, counts, values = best
    while True:  # restore the most probability per share of the limits while they hold
        best = None
        for g, s in zip(groups, steps):
            k = counts[g.index]
            if k >= g.size:
                continue
            new = min(g.size, k + s)
            trial = counts.copy()
            trial[g.index] = new
            trial_flat = _flat(cost, order, trial)
            trial_values = [c.value(trial_flat) for c, _ in limits]
            if any(v > limit for v, (_, limit) in zip(trial_values, limits)):
                continue
            added = sum((t - v) / limit for t, v, (_, limit) in zip(trial_values, values, limits))
            score = moved(g, k, new) / max(added, 1e-9)
            if best is None or score > best[0]:
                best = (score, trial, trial_values)
        if best is None:
            break
        _, counts, values = best
    if latency is None and values[0] < limits[0][1] - 0.02 * cost.dense_macs:
        counts, _ = _swap_towards(cost, order, counts, values[0], limits[0][1], steps, low)
    return {g.index: np.sort(order[g.index][: counts[g.index]]) for g in groups}


def _snap(k: int, group, step: int, low: int) -> int:
    """``k`` kept units of ``group`` rounded up to its step, at least ``low``."""
    if k >= group.size:
        return group.size
    return int(min(group.size, max(low, int(np.ceil(k / step)) * step)))


def start_counts(
    cost: CostModel,
    budget: float,
    allocation: str = "uniform",
    min_per_group: int = 1,
    multiple: int = 8,
    order: dict | None = None,
    output_change=None,
) -> tuple[list[int], list[int]]:
    """(kept count per group, the fewest each may keep) before ranking refines them: the
    largest uniform fraction that fits the budget, or for "latency" the widths filled from half
    of it by the fewest activation elements per MAC where that writes fewer elements (see the
    module's docstring). ``order``: per group, its units best first (default: index order);
    an axis that spans part of a group makes the MACs depend on which units are kept.

    ``output_change``: a function of a keep set ``{group: units}`` (other groups whole) giving
    how much it changes the model's output (``Analysis.output_change``). Where given, the
    latency allocation keeps at least the uniform width of each group that is sensitive:
    narrowed alone to its floor, it changes the output by more than ``SENSITIVE_SHARE`` of what
    the uniform widths of all groups together do. In separation models these are the encoder
    basis and the residual and skip paths, which the fewest-elements rule would otherwise cut
    first; what the allocation cuts instead are wide hidden layers that barely change the
    output."""
    check_allocation(allocation)
    check_reachable(cost, budget, min_per_group, multiple)
    groups, steps = cost.analysis.groups, _multiples(cost, multiple)
    limit = budget * cost.dense_macs
    low = floor_counts(cost, min_per_group, multiple)
    if order is None:
        order = {g.index: np.arange(g.size) for g in groups}

    def uniform(fraction):
        return [
            _snap(max(1, round(fraction * g.size)), g, s, low[g.index])
            for g, s in zip(groups, steps)
        ]

    lo, hi = 0.0, 1.0
    for _ in range(30):  # the largest uniform fraction that fits
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cost.macs(_flat(cost, order, uniform(mid))) <= limit else (lo, mid)
    counts = uniform(lo)
    if allocation == "latency":  # kept only where it writes fewer elements than uniform
        floors = [
            _snap(max(1, int(np.ceil(LATENCY_FLOOR * k))), g, s, low[g.index])
            for k, g, s in zip(counts, groups, steps)
        ]
        if output_change is not None:
            keep = {g.index: order[g.index][: counts[g.index]] for g in groups}
            whole = output_change(keep)
            for g in groups:
                i = g.index
                if floors[i] < counts[i] and (
                    output_change({i: order[i][: floors[i]]}) > SENSITIVE_SHARE * whole
                ):
                    floors[i] = counts[i]
        filled = _fill_by_elements(cost, order, floors, limit, steps)
        if cost.elements(_flat(cost, order, filled)) < cost.elements(_flat(cost, order, counts)):
            counts, low = filled, floors
    return counts, low


# Kept fractions at which each group's effect on the output is measured (data-free ranking
# across groups under a latency budget; see ``sensitivity_probability``).
SENSITIVITY_LEVELS = (0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875)


def sensitivity_probability(
    cost: CostModel,
    order: dict,
    output_change,
    min_per_group: int = 1,
    multiple: int = 8,
) -> np.ndarray:
    """A flat score per unit that ranks units across groups without data, for ``project``.

    For each group alone, ``output_change`` (how much a keep set changes the model's output)
    is measured at the kept counts of ``SENSITIVITY_LEVELS``, the units kept in ``order`` (best
    first); the lower convex hull of those points, with no change at full width, gives each
    unit by rank the change per unit of dropping it. A unit's score is that change, so the mass
    ``project`` moves when it narrows a group is the output change it causes; a tiny term
    decreasing with rank keeps ``order`` within a group where the changes tie."""
    groups, steps = cost.analysis.groups, _multiples(cost, multiple)
    low = floor_counts(cost, min_per_group, multiple)
    flat = np.zeros(cost.analysis.num_units)
    flat[0] = 1.0
    for g, s in zip(groups, steps):
        counts = {_snap(max(1, round(f * g.size)), g, s, low[g.index]) for f in SENSITIVITY_LEVELS}
        counts.discard(g.size)
        points = [(k, output_change({g.index: order[g.index][:k]})) for k in sorted(counts)]
        hull = _lower_hull(points + [(g.size, 0.0)])
        change = np.zeros(g.size)
        for (ka, da), (kb, db) in zip(hull, hull[1:]):
            change[ka:kb] = max(da - db, 0.0) / (kb - ka)
        change[: hull[0][0]] = change[hull[0][0]] if hull[0][0] < g.size else 0.0
        ranks = np.arange(g.size)
        flat[g.offset + order[g.index]] = change + 1e-12 * (g.size - ranks) / g.size
    return flat


def _lower_hull(points: list[tuple[int, float]]) -> list[tuple[int, float]]:
    """The lower convex hull of points sorted by their first coordinate (monotone chain)."""
    hull: list[tuple[int, float]] = []
    for p in points:
        while len(hull) >= 2:
            (x1, y1), (x2, y2) = hull[-2], hull[-1]
            if (x2 - x1) * (p[1] - y1) - (y2 - y1) * (p[0] - x1) <= 0:
                hull.pop()  # hull[-1] lies on or above the chord from hull[-2] to p
            else:
                break
        hull.append(p)
    return hull


def check_allocation(allocation) -> None:
    if allocation not in ALLOCATIONS:
        raise InputError(f"allocation must be one of {ALLOCATIONS}, got {allocation!r}")


def _fill_by_elements(cost, order, counts, limit, steps) -> list[int]:
    """From ``counts``, widen one group by a step at a time, the one whose step adds the fewest
    activation elements per MAC, while the MACs stay within ``limit``. Ratios equal to three
    digits (alike blocks) go to the group keeping the smallest fraction, so alike blocks widen
    together rather than one after another."""
    groups = cost.analysis.groups
    counts = list(counts)
    flat = _flat(cost, order, counts)
    macs, elements = cost.macs(flat), cost.elements(flat)
    while True:
        best = None
        for g, s in zip(groups, steps):
            if counts[g.index] >= g.size:
                continue
            trial = counts.copy()
            trial[g.index] = min(g.size, trial[g.index] + s)
            trial_flat = _flat(cost, order, trial)
            trial_macs = cost.macs(trial_flat)
            if trial_macs > limit:
                continue
            trial_elements = cost.elements(trial_flat)
            per_mac = (trial_elements - elements) / max(trial_macs - macs, 1e-9)
            key = (float(f"{per_mac:.3g}"), counts[g.index] / g.size)
            if best is None or key < best[0]:
                best = (key, trial, trial_macs, trial_elements)
        if best is None:
            return counts
        _, counts, macs, elements = best


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
