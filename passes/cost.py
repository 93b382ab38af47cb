"""MACs of a GraphModule as a function of the channels each group keeps, and the activation
elements its nodes write (what channel-linear work such as norms, activations, depthwise
convolutions and residual adds costs, which MACs do not see).

Each node's dense MACs come from ``torch.utils.flop_counter.FlopCounterMode`` (FLOPs / 2) while
the graph runs on the reference input; nodes whose rule gives a closed form (LSTM/GRU, which
the counter does not see inside, and attention) use it instead. A rule's cost terms say how
the node's MACs scale with the kept fraction of each axis, so the model gives both the MACs of a
keep set and, for gate learning, the expected MACs of keep probabilities (differentiable). A
node's output elements scale with the kept fractions of the output's channel axes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import fx
from torch.utils.flop_counter import FlopCounterMode

from passes.axes import ChannelAnalysis
from passes.values import AxisKey


COUNTED_MACS = "sepfx_counted_macs"  # node.meta key, while counting: the node's MACs
COUNTED_ELEMENTS = "sepfx_counted_elements"  # node.meta key, while counting: output elements


class _MacCounter(fx.Interpreter):
    def run_node(self, n: fx.Node) -> Any:
        with FlopCounterMode(display=False) as counter:
            result = super().run_node(n)
        n.meta[COUNTED_MACS] = counter.get_total_flops() / 2
        if n.op in ("call_function", "call_method", "call_module") and isinstance(
            result, torch.Tensor
        ):
            n.meta[COUNTED_ELEMENTS] = result.numel()
        return result


@dataclass
class CostModel:
    dense_macs: float
    constant_macs: float  # MACs of nodes that scale with no prunable axis
    terms: list[tuple[float, list[AxisKey]]]  # (dense MACs, axes whose kept fractions scale it)
    node_macs: dict[str, float]
    analysis: ChannelAnalysis
    reference_shape: tuple[int, ...]
    shares: list[float]  # per group (by index): the fraction of dense MACs scaling with it
    # output elements of the graph's tensor-valued calls: (dense count, axes scaling it)
    element_terms: list[tuple[float, list[AxisKey]]]

    def _fractions(self, flat: torch.Tensor) -> dict[AxisKey, torch.Tensor]:
        fractions = {}
        for _, axes in self.terms + self.element_terms:
            for key in axes:
                if key not in fractions:
                    units = torch.as_tensor(self.analysis.axis_units(key), device=flat.device)
                    fractions[key] = flat[units].mean()
        return fractions

    def _scaled_sum(
        self, terms: list[tuple[float, list[AxisKey]]], flat: torch.Tensor, constant: float = 0.0
    ) -> torch.Tensor:
        """``constant`` plus each term's dense count times the kept fractions of its axes."""
        fractions = self._fractions(flat)
        total = torch.as_tensor(constant, dtype=flat.dtype, device=flat.device)
        for count, axes in terms:
            term = torch.as_tensor(count, dtype=flat.dtype, device=flat.device)
            for key in axes:
                term = term * fractions[key]
            total = total + term
        return total

    def expected_macs(self, flat_keep_probability: torch.Tensor) -> torch.Tensor:
        """MACs when unit u is kept with probability p[u] (p[0] = 1): differentiable."""
        return self._scaled_sum(self.terms, flat_keep_probability, self.constant_macs)

    def macs(self, flat_keep: np.ndarray) -> float:
        # counting is bookkeeping: on the CPU in float64, whatever the model's device
        flat = torch.as_tensor(np.asarray(flat_keep, dtype=np.float64), device="cpu")
        return float(self.expected_macs(flat))

    def elements(self, flat_keep: np.ndarray) -> float:
        """Activation elements the graph's calls write with keep vector ``flat_keep``."""
        flat = torch.as_tensor(np.asarray(flat_keep, dtype=np.float64), device="cpu")
        return float(self._scaled_sum(self.element_terms, flat))

    def floor_macs(self) -> float:
        """MACs with every group at one unit: no keep set can go below (about) this."""
        flat = np.zeros(self.analysis.num_units)
        flat[0] = 1.0
        for group in self.analysis.groups:
            flat[group.units.start] = 1.0
        return self.macs(flat)


def cost_model(analysis: ChannelAnalysis) -> CostModel:
    """The cost model of ``analysis``: each node's MACs counted on its reference input, and the
    groups' MAC shares. Requires the analysis' graph to run on its example input; modifies
    nothing (the counts are written into ``node.meta`` and removed again)."""
    gm = analysis.graph_module
    with torch.no_grad():
        _MacCounter(gm).run(analysis.example_input)
    constant = 0.0
    terms: list[tuple[float, list[AxisKey]]] = []
    node_macs: dict[str, float] = {}
    element_terms: list[tuple[float, list[AxisKey]]] = []
    for node in gm.graph.nodes:
        if COUNTED_ELEMENTS in node.meta:
            axes = list(analysis.value_axes.get((node.name, ()), {}).values())
            element_terms.append((float(node.meta.pop(COUNTED_ELEMENTS)), axes))
        counted = node.meta.pop(COUNTED_MACS, 0.0)
        if node.name not in analysis.cost_terms:
            node_macs[node.name] = counted
            constant += counted
            continue
        absolute, node_terms = analysis.cost_terms[node.name]
        scaled = [(w if absolute else w * counted, axes) for w, axes in node_terms]
        node_macs[node.name] = sum(w for w, _ in scaled)
        terms += [(w, axes) for w, axes in scaled if axes]
        constant += sum(w for w, axes in scaled if not axes)
    dense = constant + sum(w for w, _ in terms)
    model = CostModel(
        dense,
        constant,
        terms,
        node_macs,
        analysis,
        tuple(analysis.example_input.shape),
        [],
        element_terms,
    )
    for group in analysis.groups:  # the MACs that go when the group goes
        flat = np.ones(analysis.num_units)
        flat[group.units] = 0.0
        model.shares.append((dense - model.macs(flat)) / max(dense, 1.0))
    return model
