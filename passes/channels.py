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

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import fx
from torch.fx.passes.shape_prop import ShapeProp

from passes.values import CONSTANT, GLUE, AxisKey, _flatten, _summary, probe_input, tensor_shapes
from passes.values import _value_leaf, is_tensor, scalar_values  # noqa: F401  (re-exported)


@dataclass
class Axis:
    key: AxisKey
    size: int
    start: int  # id of its first element
    label: str

    @property
    def elements(self) -> np.ndarray:
        return np.arange(self.start, self.start + self.size)


@dataclass
class ChannelGroup:
    """Units that share one gate: unit ``u`` of the group holds ``positions[axis][u]`` of each
    member axis."""
    index: int
    size: int
    positions: dict[AxisKey, np.ndarray]  # axis -> int array [size, multiplicity]
    members: list[str]
    offset: int = 0  # first flat unit index (flat unit 0 means "always kept")
    macs_share: float = 0.0  # filled by the cost pass
    min_size: int = 1  # fewest units a keep set may keep (an n - 1 divisor spans its channels)

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
    element_unit: np.ndarray  # element id -> flat unit index (0: frozen, kept)
    num_units: int  # flat units including unit 0
    rules: dict[str, Any]  # node name -> rule object (or None: no rule)
    value_axes: dict[tuple, dict[int, AxisKey]]  # (node, path) -> {dim: axis}
    module_axes: dict[str, dict[str, AxisKey]]
    attr_axes: dict[str, dict[int, AxisKey]]
    size_reads: dict[str, Any]  # node -> axis key (int) or {dim: axis key} (shape)
    cost_terms: dict[str, tuple[bool, list[tuple[float, list[AxisKey]]]]]
    example_input: torch.Tensor

    def axis_units(self, key: AxisKey) -> np.ndarray:
        axis = self.axes[key]
        return self.element_unit[axis.start:axis.start + axis.size]

    def keep_vector(self, keep: dict[int, np.ndarray]) -> np.ndarray:
        """Flat bool vector over units from a keep set {group index: unit indices}."""
        flat = np.zeros(self.num_units, dtype=bool)
        flat[0] = True
        for group in self.groups:
            flat[group.offset + np.asarray(keep[group.index], dtype=np.int64)] = True
        return flat

    def kept_indices(self, key: AxisKey, flat_keep: np.ndarray) -> np.ndarray:
        return np.nonzero(flat_keep[self.axis_units(key)])[0]


# -- shapes at two input sizes -------------------------------------------------------------
class _Shapes(ShapeProp):
    """ShapeProp that also records every node's value summary: shapes for tensors, the value
    itself for Python scalars and sizes."""

    def __init__(self, gm, key, keep_inputs=lambda node: False):
        super().__init__(gm)
        self.key = key
        self.keep_inputs = keep_inputs

    def run_node(self, n):
        if self.keep_inputs(n):  # opaque leaves: their inputs, to certify them numerically
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            n.meta["sepfx_leaf_inputs"] = torch.utils._pytree.tree_map(
                lambda v: v.detach().clone() if isinstance(v, torch.Tensor) else v, (args, kwargs))
        result = super().run_node(n)
        n.meta[self.key] = _summary(result)
        return result


def summarise(gm: fx.GraphModule, key: str, args, keep_inputs=lambda node: False) -> None:
    """Run ``gm`` on ``args`` and write each node's value summary into ``node.meta[key]`` (and
    ``tensor_meta``), and the inputs of the nodes ``keep_inputs`` selects."""
    with torch.no_grad():
        _Shapes(gm, key, keep_inputs).propagate(*args)


def propagate_shapes(gm: fx.GraphModule, example_input: torch.Tensor,
                     keep_inputs=lambda node: False) -> None:
    """Write node.meta['tensor_meta'] (reference input) and the reference/probe summaries, and
    the reference inputs of the nodes ``keep_inputs`` selects."""
    with torch.no_grad():
        _Shapes(gm, "sepfx_probe").propagate(probe_input(example_input))
        _Shapes(gm, "sepfx_ref", keep_inputs).propagate(example_input)


# -- union-find over elements ---------------------------------------------------------------
class _UnionFind:
    def __init__(self):
        self.parent: list[int] = []

    def add(self, count: int) -> int:
        start = len(self.parent)
        self.parent.extend(range(start, start + count))
        return start

    def find(self, a: int) -> int:
        parent = self.parent
        root = a
        while parent[root] != root:
            root = parent[root]
        while parent[a] != root:
            parent[a], a = root, parent[a]
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            if ra < rb:
                self.parent[rb] = ra
            else:
                self.parent[ra] = rb


class Builder:
    """State shared by the rules while coupling (see ``NodeContext``)."""

    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.modules = dict(gm.named_modules())
        self.uf = _UnionFind()
        self.axes: dict[AxisKey, Axis] = {}
        self.frozen_axes: dict[AxisKey, str] = {}
        self.value_axes: dict[tuple, dict[int, AxisKey]] = {}
        self.module_axes: dict[str, dict[str, AxisKey]] = {}
        self.attr_axes: dict[str, dict[int, AxisKey]] = {}
        self.size_reads: dict[str, Any] = {}
        self.cost_terms: dict[str, list] = {}
        self.min_kept: dict[AxisKey, int] = {}  # axis -> fewest elements it may keep

    def new_axis(self, key: AxisKey, size: int, label: str) -> Axis:
        axis = self.axes.get(key)
        if axis is None:
            axis = self.axes[key] = Axis(key, int(size), self.uf.add(int(size)), label)
        return axis

    def freeze(self, key: AxisKey, reason: str) -> None:
        self.frozen_axes.setdefault(key, reason)


class NodeContext:
    """What a rule sees of one node while coupling. Every static axis of the node's tensor inputs
    and outputs must be touched (linked, frozen, or declared harmless) by the rule; the ones it
    leaves untouched are frozen afterwards."""

    def __init__(self, builder: Builder, node: fx.Node):
        self.b = builder
        self.node = node
        self.touched: set[AxisKey] = set()

    # -- looking ----------------------------------------------------------------------------
    @property
    def module(self) -> torch.nn.Module:
        return self.b.modules[self.node.target]

    def shape(self, x: Any = None, path: tuple = ()) -> tuple | None:
        x = self.node if x is None else x
        shapes = tensor_shapes(x, path) if isinstance(x, fx.Node) else None
        return None if shapes is None else shapes[0]

    def axis(self, x: Any = None, dim: int = 0, path: tuple = ()) -> Axis | None:
        """The axis of tensor ``x`` (default: this node's output) at ``dim``; None when that dim
        is dynamic (varies with batch/length), of size 1, or ``x`` is not a tensor."""
        x = self.node if x is None else x
        shapes = tensor_shapes(x, path) if isinstance(x, fx.Node) else None
        if shapes is None:
            return None
        ref, probe = shapes
        dim = dim % len(ref)
        if len(ref) != len(probe) or ref[dim] != probe[dim] or ref[dim] <= 1:
            return None
        key = ("value", x.name, path, dim)
        self.b.value_axes.setdefault((x.name, path), {})[dim] = key
        return self.b.new_axis(key, ref[dim], f"{x.name}{_path_str(path)} dim {dim}")

    def axes(self, x: Any = None, path: tuple = ()) -> list[Axis | None]:
        shape = self.shape(x, path)
        return [] if shape is None else [self.axis(x, d, path) for d in range(len(shape))]

    def is_dynamic(self, x: Any, dim: int, path: tuple = ()) -> bool:
        shapes = tensor_shapes(x, path)
        return shapes is not None and shapes[0][dim] != shapes[1][dim]

    def module_axis(self, name: str, size: int, qualname: str | None = None) -> Axis | None:
        """A parameter axis of the called module (None if of size 1: nothing to prune)."""
        if size <= 1:
            return None
        qualname = self.node.target if qualname is None else qualname
        key = ("module", qualname, name)
        self.b.module_axes.setdefault(qualname, {})[name] = key
        return self.b.new_axis(key, size, f"{qualname} {name}")

    def attr_axis(self, target: str, dim: int, size: int) -> Axis | None:
        if size <= 1:
            return None
        key = ("attr", target, dim)
        self.b.attr_axes.setdefault(target, {})[dim] = key
        return self.b.new_axis(key, size, f"{target} dim {dim}")

    # -- coupling ---------------------------------------------------------------------------
    def touch(self, *axes: Axis | None) -> None:
        self.touched.update(a.key for a in axes if a is not None)

    def same(self, a: Axis | None, b: Axis | None) -> None:
        """Index i of ``a`` is index i of ``b``."""
        if a is None or b is None:
            for axis in (a, b):  # one side dynamic or broadcast: the other cannot be pruned
                if axis is not None:
                    self.freeze(axis, "meets a dynamic or broadcast axis")
            return
        self.touch(a, b)
        if a.size != b.size:
            self.freeze(a, f"size {a.size} meets size {b.size}")
            self.freeze(b, f"size {b.size} meets size {a.size}")
            return
        for i in range(a.size):
            self.b.uf.union(a.start + i, b.start + i)

    def link(self, a: Axis, index_a, b: Axis, index_b) -> None:
        """Element index_a[k] of ``a`` lives and dies with element index_b[k] of ``b``."""
        self.touch(a, b)
        for i, j in zip(np.asarray(index_a).ravel(), np.asarray(index_b).ravel()):
            self.b.uf.union(a.start + int(i), b.start + int(j))

    def unite(self, a: Axis, indices) -> None:
        """The given elements of ``a`` form one unit."""
        self.touch(a)
        indices = [int(i) for i in np.asarray(indices).ravel()]
        for i in indices[1:]:
            self.b.uf.union(a.start + indices[0], a.start + i)

    def freeze(self, a: Axis | None, reason: str) -> None:
        if a is not None:
            self.touch(a)
            self.b.freeze(a.key, f"{self.where()}: {reason}")

    def freeze_all(self, reason: str) -> None:
        for x in self.tensor_inputs() + [self.node]:
            for path in self.tensor_paths(x):
                for axis in self.axes(x, path):
                    self.freeze(axis, reason)
        for x in self.size_inputs():
            for key in _read_keys(self.b.size_reads[x.name]):
                self.touched.add(key)
                self.b.freeze(key, f"{self.where()}: {reason}")

    def cost(self, *terms: tuple[float, list[Axis | None]], absolute: bool = False) -> None:
        """This node's MACs are sum(weight * prod(kept fraction of each axis)), the weights
        being fractions of its counted MACs, or MACs themselves if ``absolute`` (closed forms
        for ops the counter cannot see into)."""
        self.b.cost_terms[self.node.name] = (absolute, [
            (float(w), [a.key for a in axes if a is not None]) for w, axes in terms])

    def require_min_kept(self, a: Axis | None, count: int) -> None:
        """At least ``count`` elements of ``a`` must be kept (a statistic with an ``n - k``
        divisor over it is NaN with ``k`` or fewer)."""
        if a is not None and count > 1:
            self.b.min_kept[a.key] = max(self.b.min_kept.get(a.key, 1), int(count))

    def read_size(self, value) -> None:
        """Record that this node's (int or shape) value carries sizes of the given axes."""
        self.b.size_reads[self.node.name] = value

    def size_read(self, x: Any):
        return self.b.size_reads.get(x.name) if isinstance(x, fx.Node) else None

    # -- helpers ----------------------------------------------------------------------------
    def where(self) -> str:
        node = self.node
        target = node.target if isinstance(node.target, str) else getattr(
            node.target, "__name__", str(node.target))
        return f"node {node.name} ({node.op} {target})"

    def tensor_inputs(self) -> list[fx.Node]:
        found: list[fx.Node] = []
        fx.node.map_arg((self.node.args, self.node.kwargs), lambda n: found.append(n))
        return [n for n in dict.fromkeys(found) if any(True for _ in self.tensor_paths(n))]

    def size_inputs(self) -> list[fx.Node]:
        found: list[fx.Node] = []
        fx.node.map_arg((self.node.args, self.node.kwargs), lambda n: found.append(n))
        return [n for n in dict.fromkeys(found) if n.name in self.b.size_reads]

    @staticmethod
    def tensor_paths(x: fx.Node) -> list[tuple]:
        summary = x.meta.get("sepfx_ref")
        if summary is None:
            return []
        return [p for p, leaf in _flatten(summary) if leaf[0] == "tensor"]


def _read_keys(read) -> list[AxisKey]:
    if read is None:
        return []
    if isinstance(read, dict):
        return [k for k in read.values() if k is not None]
    return [read]


def _path_str(path: tuple) -> str:
    return "".join(f"[{i}]" for i in path)


# -- the pass -------------------------------------------------------------------------------
def analyze_channels(gm: fx.GraphModule, example_input: torch.Tensor, *,
                     summarised: bool = False) -> ChannelAnalysis:
    """Find the channel groups of ``gm`` (not modified, apart from shape metadata in
    ``node.meta``). ``summarised``: the nodes' value summaries are already there (a captured
    analysis graph, ``passes.capture``), so shapes are not propagated again."""
    from passes import rules as op_rules

    modules = dict(gm.named_modules())
    if not summarised:
        propagate_shapes(gm, example_input, lambda n: n.op == "call_module"
                         and op_rules.lookup(n, modules) is op_rules.OPAQUE_LEAF)
    builder = Builder(gm)
    rule_of: dict[str, Any] = {}
    for node in gm.graph.nodes:
        ctx = NodeContext(builder, node)
        rule = op_rules.lookup(node, builder.modules)
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
            ctx.freeze_all(f"no rule for {op_rules.describe_op(node, builder.modules)}")
            continue
        if node.meta.get(GLUE) and (node.op == "get_attr" and node.target.startswith(CONSTANT)
                                    or node.op != "get_attr" and hasattr(rule, "gated")
                                    and not getattr(rule, "handles_eager_code", False)):
            # eager glue runs unchanged in the gated model: nothing there can count only the
            # kept channels, and a tensor it makes from Python values cannot be sliced
            ctx.freeze_all("a constant tensor made in eager code" if node.op == "get_attr" else
                           "a statistic over channels computed in eager code")
            continue
        rule.couple(ctx)
        _freeze_untouched(ctx, rule)
    return _finish(gm, builder, rule_of, example_input)


def _freeze_untouched(ctx: NodeContext, rule) -> None:
    name = type(rule).__name__
    for x in ctx.tensor_inputs() + [ctx.node]:
        for path in ctx.tensor_paths(x):
            for dim, axis in enumerate(ctx.axes(x, path)):
                if axis is not None and axis.key not in ctx.touched:
                    ctx.freeze(axis, f"{name} does not say how it maps dim {dim} of {x.name}")
    for x in ctx.size_inputs():
        for key in _read_keys(ctx.b.size_reads[x.name]):
            if key not in ctx.touched:
                ctx.touched.add(key)
                ctx.b.freeze(key, f"{ctx.where()}: the size of this axis is used as a number "
                                  f"({name} cannot adjust it)")


def _finish(gm, builder: Builder, rule_of, example_input) -> ChannelAnalysis:
    uf = builder.uf
    n = len(uf.parent)
    roots = np.fromiter((uf.find(i) for i in range(n)), dtype=np.int64, count=n)
    owner = np.empty(n, dtype=object)
    for axis in builder.axes.values():
        owner[axis.start:axis.start + axis.size] = [axis.key] * axis.size
    frozen_roots = set()
    for key in builder.frozen_axes:
        axis = builder.axes[key]
        frozen_roots.update(roots[axis.start:axis.start + axis.size].tolist())
    # members of each component, per axis
    components: dict[int, dict[AxisKey, list[int]]] = {}
    for axis in builder.axes.values():
        for i in range(axis.size):
            root = int(roots[axis.start + i])
            if root not in frozen_roots:
                components.setdefault(root, {}).setdefault(axis.key, []).append(i)
    # units with the same signature (axes and multiplicities) form a group
    by_signature: dict[tuple, list[int]] = {}
    for root, members in components.items():
        signature = tuple(sorted((k, len(v)) for k, v in members.items()))
        by_signature.setdefault(signature, []).append(root)
    element_unit = np.zeros(n, dtype=np.int64)
    groups: list[ChannelGroup] = []
    offset = 1
    ordered = sorted(by_signature.items(), key=lambda item: min(
        builder.axes[k].start + min(components[item[1][0]][k]) for k, _ in item[0]))
    frozen = _frozen_report(builder, roots)
    for signature, unit_roots in ordered:
        if not any(key[0] in ("module", "attr") for key, _ in signature):
            # pruning it would save nothing and slice no parameter: keep it whole
            label = builder.axes[signature[0][0]].label
            frozen.append(Frozen(label, "its channels touch no parameter"))
            continue
        first_axis = signature[0][0]
        unit_roots.sort(key=lambda r: components[r][first_axis][0])
        positions = {key: np.array([components[r][key] for r in unit_roots], dtype=np.int64)
                     for key, _ in signature}
        for u, r in enumerate(unit_roots):
            for key, idx in components[r].items():
                axis = builder.axes[key]
                element_unit[axis.start + np.asarray(idx)] = offset + u
        groups.append(ChannelGroup(len(groups), len(unit_roots), positions,
                                   _members(builder, positions), offset))
        offset += len(unit_roots)
    _min_sizes(builder, groups, element_unit)
    return ChannelAnalysis(gm, builder.axes, groups, frozen, element_unit, offset, rule_of,
                           builder.value_axes, builder.module_axes, builder.attr_axes,
                           builder.size_reads, builder.cost_terms, example_input)


def _min_sizes(builder: Builder, groups: list[ChannelGroup], element_unit: np.ndarray) -> None:
    """Set each group's ``min_size`` from the axes that must keep some least number of
    elements: the always-kept (frozen) elements of such an axis count towards it, and every
    group on it keeps on its own enough units to make up the rest (safe when several groups
    share it)."""
    for key, count in builder.min_kept.items():
        axis = builder.axes[key]
        units = element_unit[axis.start:axis.start + axis.size]
        missing = count - int((units == 0).sum())
        if missing <= 0:
            continue
        for group in groups:
            if key in group.positions:
                per_unit = group.positions[key].shape[1]
                need = -(-missing // per_unit)
                group.min_size = max(group.min_size, min(group.size, need))


def _members(builder: Builder, positions) -> list[str]:
    names = []
    for key in positions:
        if key[0] in ("module", "attr"):
            names.append(builder.axes[key].label)
    if not names:
        names = [builder.axes[k].label for k in list(positions)[:3]]
    return sorted(dict.fromkeys(names))


def _frozen_report(builder: Builder, roots: np.ndarray) -> list[Frozen]:
    """One entry per frozen axis, with the parameter axes it keeps whole."""
    params_of_root: dict[int, set[str]] = {}
    for axis in builder.axes.values():
        if axis.key[0] in ("module", "attr"):
            for r in set(roots[axis.start:axis.start + axis.size].tolist()):
                params_of_root.setdefault(r, set()).add(axis.label)
    out = []
    for key, reason in builder.frozen_axes.items():
        axis = builder.axes[key]
        params: set[str] = set()
        for r in set(roots[axis.start:axis.start + axis.size].tolist()):
            params |= params_of_root.get(r, set())
        out.append(Frozen(axis.label, reason, sorted(params)))
    return out
