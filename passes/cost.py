"""MACs of a GraphModule as a function of the channels each group keeps, and the activation
elements its nodes write (what channel-linear work such as norms, activations, depthwise
convolutions and residual adds costs, which MACs do not see).

Each node's dense MACs come from ``torch.utils.flop_counter.FlopCounterMode`` (FLOPs / 2) while
the graph runs on the reference input; nodes whose rule gives a closed form (LSTM/GRU, which
the counter does not see inside, and attention) use it instead. A rule's cost terms say how
the node's MACs scale with the kept fraction of each axis, so the model gives both the MACs of a
keep set and, for gate learning, the expected MACs of keep probabilities (differentiable). A
node's output elements scale with the kept fractions of the output's channel axes.

A latency is a cost of the same form: ``fit_latency`` fits, to slim / dense times measured on
a runtime (``sepfx.latency`` measures them), a constant plus nonnegative weights on the MACs
and the written elements of matrix products and of channel-linear work. The fitted cost is
what budget projection and gate learning take in place of the MACs under a latency budget.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import fx
from torch.utils.flop_counter import FlopCounterMode

from passes.axes import ChannelAnalysis
from passes.values import AxisKey


COUNTED_MACS = "sepfx_counted_macs"  # node.meta key, while counting: the node's MACs
COUNTED_ELEMENTS = "sepfx_counted_elements"  # node.meta key, while counting: output elements


_RNN_FUNCTIONS = (torch.lstm, torch.gru, torch.rnn_tanh, torch.rnn_relu)


def _functional_rnn_macs(args: tuple[Any, ...]) -> float:
    """MACs of ``torch.lstm``/``gru``/``rnn_*`` called from eager code (an nn.LSTM given a
    PackedSequence runs as such a call): each input token meets each weight matrix once.
    FlopCounterMode does not see inside these calls."""
    data = args[0]
    weights = next(a for a in args if isinstance(a, (list, tuple)) and any(t.dim() == 2 for t in a))
    tokens = data.numel() // data.shape[-1]  # packed [N, in] or [T, B, in] / [B, T, in]
    return float(tokens * sum(w.numel() for w in weights if w.dim() == 2))


class _MacCounter(fx.Interpreter):
    def run_node(self, n: fx.Node) -> Any:
        with FlopCounterMode(display=False) as counter:
            result = super().run_node(n)
        n.meta[COUNTED_MACS] = counter.get_total_flops() / 2
        if n.op == "call_function" and n.target in _RNN_FUNCTIONS:
            n.meta[COUNTED_MACS] += _functional_rnn_macs(self.fetch_args_kwargs_from_env(n)[0])
        if n.op in ("call_function", "call_method", "call_module") and isinstance(
            result, torch.Tensor
        ):
            n.meta[COUNTED_ELEMENTS] = result.numel()
        return result


@dataclass
class LinearCost:
    """A cost that is ``constant`` plus terms, each a dense amount scaled by the kept fractions
    of its axes: the MACs, the activation elements written, or a latency fitted to timings
    (``fit_latency``). Budget projection and gate learning take any of them."""

    constant: float
    terms: list[tuple[float, list[AxisKey]]]
    analysis: ChannelAnalysis
    _units: dict[AxisKey, torch.Tensor] = field(default_factory=dict, repr=False)
    _plan: Any = field(default=None, repr=False)  # value()'s arrays, built on first use

    @property
    def dense(self) -> float:
        return self.constant + sum(count for count, _ in self.terms)

    def expected(self, flat_keep_probability: torch.Tensor) -> torch.Tensor:
        """The cost when unit u is kept with probability p[u] (p[0] = 1): differentiable."""
        flat = flat_keep_probability
        fractions: dict[AxisKey, torch.Tensor] = {}
        total = torch.as_tensor(self.constant, dtype=flat.dtype, device=flat.device)
        for count, axes in self.terms:
            term = torch.as_tensor(count, dtype=flat.dtype, device=flat.device)
            for key in axes:
                if key not in fractions:
                    if key not in self._units:
                        self._units[key] = torch.as_tensor(self.analysis.axis_units(key))
                    fractions[key] = flat[self._units[key].to(flat.device)].mean()
                term = term * fractions[key]
            total = total + term
        return total

    def value(self, flat_keep: np.ndarray) -> float:
        """The cost of a keep vector (numpy; what budget projection calls many times)."""
        if self._plan is None:
            keys = list(dict.fromkeys(key for _, axes in self.terms for key in axes))
            units = [np.asarray(self.analysis.axis_units(key)) for key in keys]
            where = {key: i for i, key in enumerate(keys)}
            width = max((len(axes) for _, axes in self.terms), default=0)
            # each term's axes as indices into the fractions, padded with a fraction of 1
            index = np.full((len(self.terms), width), len(keys), dtype=np.int64)
            for t, (_, axes) in enumerate(self.terms):
                index[t, : len(axes)] = [where[key] for key in axes]
            counts = np.asarray([count for count, _ in self.terms], dtype=np.float64)
            self._plan = (units, index, counts)
        units, index, counts = self._plan
        flat = np.asarray(flat_keep, dtype=np.float64)
        fractions = np.ones(len(units) + 1)
        for i, u in enumerate(units):
            fractions[i] = flat[u].mean()
        return float(self.constant + np.sum(counts * np.prod(fractions[index], axis=1)))

    def shares(self) -> list[float]:
        """Per group (by index): the fraction of the dense cost that goes when it goes."""
        dense = max(self.dense, 1e-30)
        out = []
        for group in self.analysis.groups:
            flat = np.ones(self.analysis.num_units)
            flat[group.units] = 0.0
            out.append((self.dense - self.value(flat)) / dense)
        return out


# A node doing at least this many MACs per output element is a matrix product (1x1 and dense
# convolutions, linear layers, attention, recurrent layers); below it, channel-linear work
# (depthwise convolutions) whose time follows the elements it writes more than its MACs.
MATRIX_MACS_PER_ELEMENT = 16.0
# The cost features a latency is fitted on (``latency_features``).
LATENCY_FEATURES = ("matrix MACs", "channel-linear MACs", "matrix outputs", "other outputs")


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
    # per entry of ``terms`` / ``element_terms``: whether its node is a matrix product
    matrix_terms: list[bool] = field(default_factory=list)
    matrix_element_terms: list[bool] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.mac_cost = LinearCost(self.constant_macs, self.terms, self.analysis)
        self.element_cost = LinearCost(0.0, self.element_terms, self.analysis)

    def expected_macs(self, flat_keep_probability: torch.Tensor) -> torch.Tensor:
        """MACs when unit u is kept with probability p[u] (p[0] = 1): differentiable."""
        return self.mac_cost.expected(flat_keep_probability)

    def macs(self, flat_keep: np.ndarray) -> float:
        return self.mac_cost.value(flat_keep)

    def elements(self, flat_keep: np.ndarray) -> float:
        """Activation elements the graph's calls write with keep vector ``flat_keep``."""
        return self.element_cost.value(flat_keep)

    def floor_macs(self) -> float:
        """MACs with every group at one unit: no keep set can go below (about) this."""
        flat = np.zeros(self.analysis.num_units)
        flat[0] = 1.0
        for group in self.analysis.groups:
            flat[group.units.start] = 1.0
        return self.macs(flat)

    def latency_features(self) -> list[LinearCost]:
        """The costs a latency is fitted on, one per ``LATENCY_FEATURES`` entry, each scaled
        to 1 on the dense model (empty ones are zero): the MACs of matrix products, the MACs
        of channel-linear work, and the activation elements written by each. The MACs that
        scale with no prunable axis belong to no feature: a fitted constant covers them."""
        parts: list[list[tuple[float, list[AxisKey]]]] = [[], [], [], []]
        for (count, axes), matrix in zip(self.terms, self.matrix_terms):
            parts[0 if matrix else 1].append((count, axes))
        for (count, axes), matrix in zip(self.element_terms, self.matrix_element_terms):
            parts[2 if matrix else 3].append((count, axes))
        features = []
        for terms in parts:
            total = sum(count for count, _ in terms)
            scaled = [(count / total, axes) for count, axes in terms] if total > 0 else []
            features.append(LinearCost(0.0, scaled, self.analysis))
        return features


def fit_latency(
    features: list[LinearCost], samples: list[tuple[np.ndarray, float]]
) -> tuple[LinearCost, np.ndarray]:
    """The latency, as a fraction of the dense model's, that best fits measured ``samples``
    (flat keep vector, measured slim / dense time): ``c0 + sum_k c_k * feature_k`` with every
    c >= 0 (least squares over every subset of free coefficients; there are few), the dense
    model weighted to exactly 1. Returns the fitted cost and the coefficients (c0 first)."""
    analysis = features[0].analysis
    rows = [[1.0] + [f.value(flat) for f in features] for flat, _ in samples]
    targets = [ratio for _, ratio in samples]
    dense = np.ones(analysis.num_units)
    rows.append([1.0] + [f.value(dense) for f in features])
    targets.append(1.0)
    a, b = np.asarray(rows), np.asarray(targets)
    weights = np.ones(len(b))
    weights[-1] = 10.0 * max(1, len(samples))  # the dense model is 1 by definition
    a, b = a * weights[:, None], b * weights
    used = [0] + [k + 1 for k, f in enumerate(features) if f.terms]
    best: tuple[float, np.ndarray] | None = None
    for size in range(1, len(used) + 1):
        for subset in itertools.combinations(used, size):
            solution, *_ = np.linalg.lstsq(a[:, subset], b, rcond=None)
            if (solution < 0).any():
                continue
            full = np.zeros(a.shape[1])
            full[list(subset)] = solution
            error = float(np.sum((a @ full - b) ** 2))
            if best is None or error < best[0] - 1e-15:
                best = (error, full)
    assert best is not None  # a constant alone is always feasible (its solution is > 0)
    coefficients = best[1]
    terms = [
        (float(c) * count, axes)
        for c, feature in zip(coefficients[1:], features)
        for count, axes in feature.terms
        if c > 0
    ]
    return LinearCost(float(coefficients[0]), terms, analysis), coefficients


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
    matrix_terms: list[bool] = []
    matrix_element_terms: list[bool] = []
    for node in gm.graph.nodes:
        counted = node.meta.pop(COUNTED_MACS, 0.0)
        elements = float(node.meta.pop(COUNTED_ELEMENTS, 0))
        if node.name not in analysis.cost_terms:
            node_macs[node.name] = counted
            constant += counted
        else:
            absolute, node_terms = analysis.cost_terms[node.name]
            scaled = [(w if absolute else w * counted, axes) for w, axes in node_terms]
            node_macs[node.name] = sum(w for w, _ in scaled)
            terms += [(w, axes) for w, axes in scaled if axes]
            constant += sum(w for w, axes in scaled if not axes)
        matrix = node_macs[node.name] >= MATRIX_MACS_PER_ELEMENT * max(elements, 1.0)
        matrix_terms += [matrix] * (len(terms) - len(matrix_terms))
        if elements:
            axes = list(analysis.value_axes.get((node.name, ()), {}).values())
            element_terms.append((elements, axes))
            matrix_element_terms.append(matrix)
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
        matrix_terms,
        matrix_element_terms,
    )
    model.shares = model.mac_cost.shares()  # the MACs that go when a group goes
    return model
