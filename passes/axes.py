"""The core data of the channel analysis: axes, their keys, channel groups, frozen axes, and
the analysis they make (``passes.channels`` builds it; every later pass reads it).

A keep set ``{group index: unit indices}`` becomes a flat keep vector over *units*: unit 0
stands for every frozen (always kept) element, and group ``g`` owns units
``g.offset .. g.offset + g.size - 1``; ``ChannelAnalysis`` holds that arithmetic.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray
from torch import fx

from passes.values import AxisKey, SizeRead, ValuePath


# a node's MACs: (absolute, [(weight, [axes whose kept fractions multiply it])])
CostTerms = tuple[bool, list[tuple[float, list[AxisKey]]]]


@dataclass
class Axis:
    key: AxisKey
    size: int
    start: int  # id of its first element
    label: str

    @property
    def elements(self) -> NDArray[np.int_]:
        return np.arange(self.start, self.start + self.size)


@dataclass
class ChannelGroup:
    """Units that share one gate: unit ``u`` of the group holds ``positions[axis][u]`` of each
    member axis."""

    index: int
    size: int
    positions: dict[AxisKey, NDArray[Any]]  # axis -> int array [size, multiplicity]
    members: list[str]
    offset: int = 0  # first flat unit index (flat unit 0 means "always kept")
    min_size: int = 1  # fewest units a keep set may keep (an n - 1 divisor spans its channels)

    @property
    def units(self) -> slice:
        """Its units in a flat keep vector."""
        return slice(self.offset, self.offset + self.size)

    def describe(self) -> str:
        head = ", ".join(self.members[:4]) + (" ..." if len(self.members) > 4 else "")
        return f"group {self.index} ({self.size} units): {head}"


@dataclass
class Frozen:
    label: str
    reason: str
    parameters: list[str] = field(default_factory=list)  # parameter axes kept whole by it


@dataclass
class ChannelAnalysis:
    graph_module: fx.GraphModule
    axes: dict[AxisKey, Axis]
    groups: list[ChannelGroup]
    frozen: list[Frozen]
    element_unit: NDArray[Any]  # element id -> flat unit index (0: frozen, kept)
    num_units: int  # flat units including unit 0
    rules: dict[str, Any]  # node name -> rule object (or None: no rule)
    value_axes: dict[tuple[str, ValuePath], dict[int, AxisKey]]  # (node, path) -> {dim: axis}
    module_axes: dict[str, dict[str, AxisKey]]
    attr_axes: dict[str, dict[int, AxisKey]]
    size_reads: dict[str, SizeRead]  # node -> axis key (int) or {dim: axis key} (shape)
    cost_terms: dict[str, CostTerms]
    example_input: torch.Tensor

    def axis_units(self, key: AxisKey) -> NDArray[Any]:
        axis = self.axes[key]
        return self.element_unit[axis.start : axis.start + axis.size]

    def keep_vector(self, keep: dict[int, NDArray[Any]]) -> NDArray[np.bool_]:
        """Flat bool vector over units from a keep set {group index: unit indices}."""
        flat = np.zeros(self.num_units, dtype=bool)
        flat[0] = True
        for group in self.groups:
            flat[group.offset + np.asarray(keep[group.index], dtype=np.int64)] = True
        return flat

    def kept_indices(self, key: AxisKey, flat_keep: NDArray[Any]) -> NDArray[np.intp]:
        return np.nonzero(flat_keep[self.axis_units(key)])[0]
