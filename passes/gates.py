"""Gate insertion: the model at its original width, with one gate per channel group.

Every tensor with a prunable axis is multiplied by its group's gate along that axis right where
it is made, and the ops whose result depends on how many channels there are (norm statistics,
means and variances over channels, recurrent state, attention heads) are replaced by masked
versions (``passes.runtime``). With hard 0/1 gates from a keep set, the gated model computes
exactly what the slim model computes (invariant 1); ``sepfx.learnable_gates.LearnableGates`` turns the same
gates into learnable ones.
"""

from __future__ import annotations

import copy
import operator
from collections.abc import Callable
from typing import Any, cast

import numpy as np
import torch
from numpy.typing import NDArray
from torch import fx, nn

from passes import runtime
from passes.capture import Capture, site_graph
from passes.axes import ChannelAnalysis
from passes.values import AxisKey, Shape, ValuePath, tensor_shapes

GATES = "sepfx_gates"


class GateBank(nn.Module):
    """Holds the flat gate vector over all units (unit 0 is 'always kept') and, per gated axis,
    the index of each of its elements into that vector. ``forward()`` returns the vector."""

    hard_mask: torch.Tensor  # a buffer

    def __init__(self, analysis: ChannelAnalysis) -> None:
        super().__init__()
        self.num_units = analysis.num_units
        device = analysis.example_input.device  # the model's: the gates run beside it
        self.register_buffer("hard_mask", torch.ones(analysis.num_units, device=device))
        self.axis_names: dict[AxisKey, str] = {}

    def index_name(self, key: AxisKey, units: NDArray[Any]) -> str:
        name = self.axis_names.get(key)
        if name is None:
            name = f"axis{len(self.axis_names)}"
            index = torch.as_tensor(units, dtype=torch.long, device=self.hard_mask.device)
            self.register_buffer(name, index)
            self.axis_names[key] = name
        return name

    def set_keep(self, flat_keep: NDArray[Any]) -> None:
        mask = np.asarray(flat_keep, dtype=np.float32)
        self.hard_mask.copy_(torch.as_tensor(mask, device=self.hard_mask.device))

    def forward(self) -> torch.Tensor:
        return self.hard_mask


class GatedGraphBuilder:
    """What a rule's ``gated`` hook sees: the new graph under construction."""

    def __init__(self, analysis: ChannelAnalysis, bank: GateBank) -> None:
        self.analysis = analysis
        self.old = analysis.graph_module
        self.modules: dict[str, nn.Module] = dict(self.old.named_modules(remove_duplicate=False))
        self.graph = fx.Graph()
        self.env: dict[fx.Node, fx.Node] = {}
        self.objects: dict[str, Any] = {GATES: bank}
        self.bank = bank
        self._flat: fx.Node | None = None
        self._masks: dict[AxisKey, fx.Node] = {}
        self._wrappers: dict[str, str] = {}

    # -- for rules -----------------------------------------------------------------------------
    def arg(self, x: Any) -> Any:
        return fx.node.map_arg(x, lambda n: self.env[n])

    def shape(self, x: Any, path: ValuePath = ()) -> Shape | None:
        shapes = tensor_shapes(x, path)
        return None if shapes is None else shapes[0]

    def module(self, target: str) -> nn.Module:
        return self.modules[target]

    def copy(self, node: fx.Node) -> fx.Node:
        new = self.graph.node_copy(node, lambda n: self.env[n])
        if node.op in ("call_module", "get_attr"):
            target = cast(str, node.target)  # a qualified name
            self.objects[target] = operator.attrgetter(target)(self.old)
        return new

    def call_function(
        self, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any] | None = None
    ) -> fx.Node:
        return self.graph.call_function(fn, args, kwargs or {})

    def call_module(
        self, target: str, args: tuple[Any, ...], kwargs: dict[str, Any] | None = None
    ) -> fx.Node:
        return self.graph.call_module(target, args, kwargs or {})

    def get_attr(self, target: str) -> fx.Node:
        self.objects[target] = operator.attrgetter(target)(self.old)
        return self.graph.get_attr(target)

    def add_module(self, module: nn.Module, for_target: str) -> str:
        target = self._wrappers.get(for_target)
        if target is None:
            target = "sepfx_gated_" + for_target.replace(".", "_")
            self.objects[target] = module
            self._wrappers[for_target] = target
        return target

    def mask(self, key: AxisKey | None) -> fx.Node | None:
        """A node computing the 0/1 gate of each element of the axis, or None when no element of
        it can be pruned."""
        if key is None:
            return None
        units = self.analysis.axis_units(key)
        if not units.any():
            return None
        if key not in self._masks:
            if self._flat is None:
                self._flat = self.graph.call_module(GATES, (), {})
            target = f"{GATES}.{self.bank.index_name(key, units)}"
            self.objects[target] = operator.attrgetter(target.split(".", 1)[1])(self.bank)
            index = self.graph.get_attr(target)
            self._masks[key] = self.graph.call_function(operator.getitem, (self._flat, index))
        return self._masks[key]

    def value_mask(self, x: fx.Node, dim: int, path: ValuePath = ()) -> fx.Node | None:
        shape = self.shape(x, path)
        if shape is None:
            return None
        axes = self.analysis.value_axes.get((x.name, path), {})
        return self.mask(axes.get(dim % len(shape)))

    def module_mask(self, qualname: str, name: str) -> fx.Node | None:
        return self.mask(self.analysis.module_axes.get(qualname, {}).get(name))


def insert_gates(
    analysis: ChannelAnalysis,
    flat_keep: NDArray[Any] | None = None,
    bank: GateBank | None = None,
    graph: fx.Graph | None = None,
) -> fx.GraphModule:
    """A new GraphModule at the original width whose channels are gated by ``bank`` (default:
    a ``GateBank`` with hard gates from ``flat_keep``, all kept if None). Shares the parameters
    of ``analysis.graph_module``; modifies nothing.

    ``graph``: gate this graph instead of the analysis graph: a part of it as one call site saw
    it (``passes.capture.site_graph``), whose inputs are gated too (they may carry pruned
    channels made by the eager code around the part)."""
    bank = GateBank(analysis) if bank is None else bank
    g = GatedGraphBuilder(analysis, bank)
    gate_inputs = graph is not None
    for node in (analysis.graph_module.graph if graph is None else graph).nodes:
        rule: Any = analysis.rules.get(node.name)
        new = None
        if node.op not in ("placeholder", "output") and hasattr(rule, "gated"):
            new = rule.gated(g, node)
        if new is None:
            new = g.copy(node)
        if node.op != "output" and (gate_inputs or node.op != "placeholder"):
            new = _gate_outputs(g, node, new)
        g.env[node] = new
    gm = fx.GraphModule(
        g.objects, g.graph, class_name="Gated" + type(analysis.graph_module).__name__
    )
    gm.graph.lint()
    gm.recompile()
    if flat_keep is not None:
        bank.set_keep(flat_keep)
    return gm


def _gate_outputs(builder: GatedGraphBuilder, node: fx.Node, new: fx.Node) -> fx.Node:
    shape = builder.shape(node)
    if shape is None:
        return new
    for dim in range(len(shape)):
        mask = builder.value_mask(node, dim)
        if mask is not None:
            new = builder.call_function(runtime.apply_gate, (new, mask, dim))
    return new


def gated_model(
    capture: Capture,
    analysis: ChannelAnalysis,
    flat_keep: NDArray[Any] | None = None,
    bank: GateBank | None = None,
) -> nn.Module:
    """The captured model at its original width, gated by ``bank`` (see ``insert_gates``): the
    gated graph itself when the whole model traced; else a copy of the model (sharing its
    weights) whose graph and leaf parts are replaced by gated ones and whose eager shells run
    as written. Modifies nothing."""
    bank = GateBank(analysis) if bank is None else bank
    if capture.traced_whole:
        return insert_gates(analysis, flat_keep, bank)
    shared = {id(t): t for t in list(capture.root.parameters()) + list(capture.root.buffers())}
    model = copy.deepcopy(capture.root, memo=shared)
    model.add_module(GATES, bank)  # first, so that its parameters are named sepfx_gates.*
    for path, part in capture.parts.items():
        gm = insert_gates(analysis, None, bank, site_graph(capture, part))
        call = runtime.PartCall(gm, part.placeholders, part.defaults)
        # dressed as the module it replaces: eager code may check its class
        model.set_submodule(path, runtime.dressed(model.get_submodule(path), call))
    if flat_keep is not None:
        bank.set_keep(flat_keep)
    return model
