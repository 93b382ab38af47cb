"""The compile report: what was found, what was frozen and why, what it costs."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class GroupRow:
    index: int
    size: int
    kept: int
    macs_share: float
    members: list[str]
    time_share: float | None = None  # under a latency budget: its fitted share of dense time


@dataclass
class FrozenRow:
    axis: str
    reason: str
    parameters: list[str]


@dataclass
class LatencyRow:
    """Under a latency budget: what was asked, predicted and measured on the target."""

    target: str
    requested: float  # slim / dense time asked for
    measured: float  # slim / dense time measured (medians, side by side)
    predicted: float  # by the latency fitted to the table, before it was measured
    dense_ms: float
    slim_ms: float
    measurements: int  # keep sets this compile timed (0: every time came from the cache)
    table_size: int  # keep sets in the table the latency was fitted to
    cache: str | None  # the table's file


@dataclass
class Report:
    model: str
    reference_input: tuple  # shape of the input MACs are counted on
    sample_rate: int | None
    groups: list[GroupRow]
    frozen: list[FrozenRow]
    shells: dict[str, str]  # module path ("" = the model) -> why it runs eagerly
    assumptions: list[str]
    dense_macs: float
    macs: float
    dense_params: int
    params: int
    prunable_macs_share: float  # fraction of dense MACs that scale with some group's channels
    budget: float | None = None
    notes: list[str] = field(default_factory=list)
    latency: LatencyRow | None = None

    @property
    def macs_ratio(self) -> float:
        return self.macs / self.dense_macs if self.dense_macs else 1.0

    def to_dict(self) -> dict:
        out = asdict(self)
        out["macs_ratio"] = self.macs_ratio
        return out

    def __str__(self) -> str:
        seconds = ""
        if self.sample_rate:
            seconds = (
                f" ({self.reference_input[-1] / self.sample_rate:g} s at {self.sample_rate} Hz)"
            )
        lines = [
            f"sepfx report: {self.model}",
            f"  MACs on input {list(self.reference_input)}{seconds}: "
            f"{_si(self.dense_macs)} -> {_si(self.macs)} ({100 * self.macs_ratio:.1f}% of dense"
            + (f", budget {100 * self.budget:.0f}%)" if self.budget is not None else ")"),
            *self._latency_lines(),
            f"  params: {_si(self.dense_params)} -> {_si(self.params)} "
            f"({100 * self.params / max(self.dense_params, 1):.1f}%)",
            f"  prunable: {100 * self.prunable_macs_share:.1f}% of dense MACs scale with a channel group",
            f"  channel groups ({len(self.groups)}), by MAC share:",
        ]
        for g in sorted(self.groups, key=lambda g: -g.macs_share):
            members = ", ".join(g.members[:3]) + (
                f" +{len(g.members) - 3}" if len(g.members) > 3 else ""
            )
            time = "" if g.time_share is None else f" time {100 * g.time_share:5.1f}%"
            lines.append(
                f"    #{g.index:<3} keep {g.kept:>4}/{g.size:<4} MACs {100 * g.macs_share:5.1f}%"
                f"{time}  {members}"
            )
        with_params = [f for f in self.frozen if f.parameters]
        lines.append(
            f"  frozen: {len(with_params)} axes holding parameters kept whole "
            f"({len(self.frozen) - len(with_params)} more are time/position axes)"
        )
        for f in with_params:
            lines.append(f"    {f.axis}: {f.reason}")
            lines.append(f"      keeps whole: {', '.join(f.parameters)}")
        if self.shells:
            lines.append(
                "  eager shells (their Python forward runs as written; what it does to "
                "channels was read from recorded runs):"
            )
            lines += [f"    {name or '(the model)'}: {why}" for name, why in self.shells.items()]
        if self.assumptions:
            lines.append("  assumptions (values fixed from the example input):")
            lines += [f"    {a}" for a in self.assumptions]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)

    def _latency_lines(self) -> list[str]:
        if self.latency is None:
            return []
        t = self.latency
        source = (
            f"{t.measurements} keep sets timed here"
            if t.measurements
            else "every time from the cached table"
        )
        return [
            f"  latency on {t.target}: {t.dense_ms:.2f} ms -> {t.slim_ms:.2f} ms, measured "
            f"{100 * t.measured:.1f}% of dense (asked {100 * t.requested:.0f}%, predicted "
            f"{100 * t.predicted:.1f}%; fitted to {t.table_size} timed keep sets, {source})"
        ]


def _si(x: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.2f}{unit}"
    return f"{x:.0f}"
