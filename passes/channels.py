"""Coupled-channel analysis: which channel axes of a GraphModule must be pruned together.

Every static axis (an axis whose size does not change with batch or length) of every tensor in
the graph, and every channel axis of a module's or attribute's parameters, is a row of elements,
one per index. Op rules (``passes.rules``) link elements that must live or die together; the
connected components are the prunable units (a channel, a whole head, a whole conv group), and
units touching the same axes with the same multiplicity form a ``ChannelGroup``. An axis a rule
cannot vouch for is frozen, and so is every unit touching it: it is kept whole and reported.

Dynamic axes (batch, time) are told apart from static ones by propagating shapes at two inputs
of different batch and length (``torch.fx.passes.shape_prop``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray
from torch import fx
from torch.fx.passes.shape_prop import ShapeProp

from passes.axes import Axis, ChannelAnalysis, ChannelGroup, Frozen
from passes.context import CouplingState, NodeContext, _read_keys
from passes.errors import InternalError, SepfxError, describe_error
from passes.values import (
    CONSTANT,
    GLUE,
    LEAF_INPUTS,
    PROBE,
    REF,
    AxisKey,
    _summary,
    holds_parameters,
    probe_input,
)


# -- shapes at two input sizes -------------------------------------------------------------
class _Shapes(ShapeProp):
    """ShapeProp that also records every node's value summary: shapes for tensors, the value
    itself for Python scalars and sizes."""

    def __init__(
        self,
        gm: fx.GraphModule,
        key: str,
        keep_inputs: Callable[[fx.Node], bool] = lambda node: False,
    ) -> None:
        super().__init__(gm)
        self.key = key
        self.keep_inputs = keep_inputs

    def run_node(self, n: fx.Node) -> Any:
        if self.keep_inputs(n):  # opaque leaves: their inputs, to certify them numerically
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            n.meta[LEAF_INPUTS] = torch.utils._pytree.tree_map(
                lambda v: v.detach().clone() if isinstance(v, torch.Tensor) else v, (args, kwargs)
            )
        result = super().run_node(n)
        n.meta[self.key] = _summary(result)
        return result


def summarise(
    gm: fx.GraphModule,
    key: str,
    args: Sequence[Any],
    keep_inputs: Callable[[fx.Node], bool] = lambda node: False,
) -> None:
    """Run ``gm`` on ``args`` and write each node's value summary into ``node.meta[key]`` (and
    ``tensor_meta``), and the inputs of the nodes ``keep_inputs`` selects."""
    with torch.no_grad():
        _Shapes(gm, key, keep_inputs).propagate(*args)


def propagate_shapes(
    gm: fx.GraphModule,
    example_input: torch.Tensor,
    keep_inputs: Callable[[fx.Node], bool] = lambda node: False,
) -> None:
    """Write node.meta['tensor_meta'] (reference input) and the reference/probe summaries, and
    the reference inputs of the nodes ``keep_inputs`` selects."""
    with torch.no_grad():
        _Shapes(gm, PROBE).propagate(probe_input(example_input))
        _Shapes(gm, REF, keep_inputs).propagate(example_input)


# -- the pass -------------------------------------------------------------------------------
def analyze_channels(
    gm: fx.GraphModule,
    example_input: torch.Tensor,
    *,
    summarised: bool = False,
    frozen: dict[AxisKey, str] | None = None,
) -> ChannelAnalysis:
    """Find the channel groups of ``gm`` (not modified, apart from shape metadata in
    ``node.meta``). ``summarised``: the nodes' value summaries are already there (a captured
    analysis graph, ``passes.capture``), so shapes are not propagated again. ``frozen``: axes
    to freeze besides those the rules freeze (found unprunable by a check), with the reason."""
    from passes import rules as op_rules

    modules = dict(gm.named_modules(remove_duplicate=False))
    if not summarised:
        propagate_shapes(
            gm,
            example_input,
            lambda n: n.op == "call_module" and op_rules.lookup(n, modules) is op_rules.OPAQUE_LEAF,
        )
    state = CouplingState(gm, frozen)
    rule_of: dict[str, Any] = {}
    for node in gm.graph.nodes:
        ctx = NodeContext(state, node)
        rule = op_rules.lookup(node, state.modules)
        rule_of[node.name] = rule
        if node.op == "placeholder":
            for path in ctx.tensor_paths(node):
                for axis in ctx.axes(node, path):
                    ctx.freeze(axis, "model input")
            continue
        if node.op == "output":
            ctx.freeze_all("model output")
            continue
        if rule is None:
            ctx.freeze_all(f"no rule for {op_rules.describe_op(node, state.modules)}")
            continue
        if node.meta.get(GLUE) and (
            node.op == "get_attr"
            and node.target.startswith(CONSTANT)
            or node.op != "get_attr"
            and hasattr(rule, "gated")
            and not getattr(rule, "handles_eager_code", False)
        ):
            # eager glue runs unchanged in the gated model: nothing there can count only the
            # kept channels, and a tensor it makes from Python values cannot be sliced
            ctx.freeze_all(
                "a constant tensor made in eager code"
                if node.op == "get_attr"
                else "a statistic over channels computed in eager code"
            )
            continue
        try:
            rule.couple(ctx)
        except SepfxError:
            raise
        except Exception as error:
            raise InternalError(
                f"{ctx.where()}: sepfx's {type(rule).__name__} rule failed on it "
                f"({describe_error(error)}); please report it with the model"
            ) from error
        _freeze_untouched(ctx, rule)
    return _finish(gm, state, rule_of, example_input)


def _freeze_untouched(ctx: NodeContext, rule: Any) -> None:
    name = type(rule).__name__
    for x in ctx.tensor_inputs() + [ctx.node]:
        for path in ctx.tensor_paths(x):
            for dim, axis in enumerate(ctx.axes(x, path)):
                if axis is not None and axis.key not in ctx.touched:
                    ctx.freeze(axis, f"{name} does not say how it maps dim {dim} of {x.name}")
    for x in ctx.size_inputs():
        for key in _read_keys(ctx.state.size_reads[x.name]):
            if key not in ctx.touched:
                ctx.touched.add(key)
                ctx.state.freeze(
                    key,
                    f"{ctx.where()}: the size of this axis is used as a number "
                    f"({name} cannot adjust it)",
                )


def _finish(
    gm: fx.GraphModule, state: CouplingState, rule_of: dict[str, Any], example_input: torch.Tensor
) -> ChannelAnalysis:
    union_find = state.union_find
    n = len(union_find.parent)
    roots = np.fromiter((union_find.find(i) for i in range(n)), dtype=np.int64, count=n)
    owner = np.empty(n, dtype=object)
    axis: Axis | None
    for axis in state.axes.values():
        owner[axis.start : axis.start + axis.size] = [axis.key] * axis.size
    frozen_roots = set()
    for key in state.frozen_axes:
        axis = state.axes.get(key)  # None: an axis frozen by the caller that no rule made
        if axis is not None:
            frozen_roots.update(roots[axis.start : axis.start + axis.size].tolist())
    # members of each component, per axis
    components: dict[int, dict[AxisKey, list[int]]] = {}
    for axis in state.axes.values():
        for i in range(axis.size):
            root = int(roots[axis.start + i])
            if root not in frozen_roots:
                components.setdefault(root, {}).setdefault(axis.key, []).append(i)
    # units with the same signature (axes and multiplicities) form a group
    by_signature: dict[tuple[tuple[AxisKey, int], ...], list[int]] = {}
    for root, members in components.items():
        signature = tuple(sorted((k, len(v)) for k, v in members.items()))
        by_signature.setdefault(signature, []).append(root)
    element_unit = np.zeros(n, dtype=np.int64)
    groups: list[ChannelGroup] = []
    offset = 1
    ordered = sorted(
        by_signature.items(),
        key=lambda item: min(
            state.axes[k].start + min(components[item[1][0]][k]) for k, _ in item[0]
        ),
    )
    frozen = _frozen_report(state, roots)
    for signature, unit_roots in ordered:
        if not any(holds_parameters(key) for key, _ in signature):
            # pruning it would save nothing and slice no parameter: keep it whole
            label = state.axes[signature[0][0]].label
            frozen.append(Frozen(label, "its channels touch no parameter"))
            continue
        first_axis = signature[0][0]
        unit_roots.sort(key=lambda r: components[r][first_axis][0])
        positions = {
            key: np.array([components[r][key] for r in unit_roots], dtype=np.int64)
            for key, _ in signature
        }
        for u, r in enumerate(unit_roots):
            for key, idx in components[r].items():
                axis = state.axes[key]
                element_unit[axis.start + np.asarray(idx)] = offset + u
        groups.append(
            ChannelGroup(
                len(groups), len(unit_roots), positions, _members(state, positions), offset
            )
        )
        offset += len(unit_roots)
    _min_sizes(state, groups, element_unit)
    return ChannelAnalysis(
        gm,
        state.axes,
        groups,
        frozen,
        element_unit,
        offset,
        rule_of,
        state.value_axes,
        state.module_axes,
        state.attr_axes,
        state.size_reads,
        state.cost_terms,
        example_input,
    )


def _min_sizes(state: CouplingState, groups: list[ChannelGroup], element_unit: np.ndarray) -> None:
    """Set each group's ``min_size`` from the axes that must keep some least number of
    elements: the always-kept (frozen) elements of such an axis count towards it, and every
    group on it keeps on its own enough units to make up the rest (safe when several groups
    share it)."""
    for key, count in state.min_kept.items():
        axis = state.axes[key]
        units = element_unit[axis.start : axis.start + axis.size]
        missing = count - int((units == 0).sum())
        if missing <= 0:
            continue
        for group in groups:
            if key in group.positions:
                per_unit = group.positions[key].shape[1]
                need = -(-missing // per_unit)
                group.min_size = max(group.min_size, min(group.size, need))


def _members(state: CouplingState, positions: dict[AxisKey, NDArray[Any]]) -> list[str]:
    names = []
    for key in positions:
        if holds_parameters(key):
            names.append(state.axes[key].label)
    if not names:
        names = [state.axes[k].label for k in list(positions)[:3]]
    return sorted(dict.fromkeys(names))


def _frozen_report(state: CouplingState, roots: np.ndarray) -> list[Frozen]:
    """One entry per frozen axis, with the parameter axes it keeps whole."""
    params_of_root: dict[int, set[str]] = {}
    axis: Axis | None
    for axis in state.axes.values():
        if holds_parameters(axis.key):
            for r in set(roots[axis.start : axis.start + axis.size].tolist()):
                params_of_root.setdefault(r, set()).add(axis.label)
    out = []
    for key, reason in state.frozen_axes.items():
        axis = state.axes.get(key)
        if axis is None:
            continue
        params: set[str] = set()
        for r in set(roots[axis.start : axis.start + axis.size].tolist()):
            params |= params_of_root.get(r, set())
        out.append(Frozen(axis.label, reason, sorted(params)))
    return out
