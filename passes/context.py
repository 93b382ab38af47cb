"""What an op rule sees while the channel analysis couples axes (``NodeContext`` over the
shared ``CouplingState``): the node's input and output axes, the called module's parameter
axes, and the operations that link, unite or freeze their elements."""

from __future__ import annotations

from typing import Any, cast

import numpy as np
import torch
from numpy.typing import ArrayLike
from torch import fx

from passes.axes import Axis, CostTerms
from passes.values import (
    REF,
    AxisKey,
    Shape,
    SizeRead,
    ValuePath,
    _flatten,
    attr_axis_key,
    module_axis_key,
    tensor_shapes,
    value_axis_key,
)


# -- union-find over elements ---------------------------------------------------------------
class _UnionFind:
    def __init__(self) -> None:
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


class CouplingState:
    """State shared by the rules while coupling (see ``NodeContext``)."""

    def __init__(self, gm: fx.GraphModule, frozen: dict[AxisKey, str] | None = None) -> None:
        self.gm = gm
        self.frozen_on_creation = dict(frozen or {})  # axes to freeze once a rule makes them
        self.modules: dict[str, torch.nn.Module] = dict(gm.named_modules(remove_duplicate=False))
        self.union_find = _UnionFind()
        self.axes: dict[AxisKey, Axis] = {}
        self.frozen_axes: dict[AxisKey, str] = {}
        self.value_axes: dict[tuple[str, ValuePath], dict[int, AxisKey]] = {}
        self.module_axes: dict[str, dict[str, AxisKey]] = {}
        self.attr_axes: dict[str, dict[int, AxisKey]] = {}
        self.size_reads: dict[str, SizeRead] = {}
        self.cost_terms: dict[str, CostTerms] = {}
        self.min_kept: dict[AxisKey, int] = {}  # axis -> fewest elements it may keep

    def new_axis(self, key: AxisKey, size: int, label: str) -> Axis:
        axis = self.axes.get(key)
        if axis is None:
            axis = self.axes[key] = Axis(key, int(size), self.union_find.add(int(size)), label)
            if key in self.frozen_on_creation:
                self.freeze(key, self.frozen_on_creation[key])
        return axis

    def freeze(self, key: AxisKey, reason: str) -> None:
        self.frozen_axes.setdefault(key, reason)


class NodeContext:
    """What a rule sees of one node while coupling. Every static axis of the node's tensor inputs
    and outputs must be touched (linked, frozen, or declared harmless) by the rule; the ones it
    leaves untouched are frozen afterwards."""

    def __init__(self, state: CouplingState, node: fx.Node) -> None:
        self.state = state
        self.node = node
        self.touched: set[AxisKey] = set()

    # -- looking ----------------------------------------------------------------------------
    @property
    def module(self) -> torch.nn.Module:
        return self.state.modules[cast(str, self.node.target)]  # a call_module node's target

    def shape(self, x: Any = None, path: ValuePath = ()) -> Shape | None:
        x = self.node if x is None else x
        shapes = tensor_shapes(x, path) if isinstance(x, fx.Node) else None
        return None if shapes is None else shapes[0]

    def axis(self, x: Any = None, dim: int = 0, path: ValuePath = ()) -> Axis | None:
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
        key = value_axis_key(x.name, path, dim)
        self.state.value_axes.setdefault((x.name, path), {})[dim] = key
        return self.state.new_axis(key, ref[dim], f"{x.name}{_path_str(path)} dim {dim}")

    def axes(self, x: Any = None, path: ValuePath = ()) -> list[Axis | None]:
        shape = self.shape(x, path)
        return [] if shape is None else [self.axis(x, d, path) for d in range(len(shape))]

    def is_dynamic(self, x: Any, dim: int, path: ValuePath = ()) -> bool:
        shapes = tensor_shapes(x, path)
        return shapes is not None and shapes[0][dim] != shapes[1][dim]

    def module_axis(self, name: str, size: int, qualname: str | None = None) -> Axis | None:
        """A parameter axis of the called module (None if of size 1: nothing to prune)."""
        if size <= 1:
            return None
        qualname = cast(str, self.node.target) if qualname is None else qualname
        key = module_axis_key(qualname, name)
        self.state.module_axes.setdefault(qualname, {})[name] = key
        return self.state.new_axis(key, size, f"{qualname} {name}")

    def attr_axis(self, target: str, dim: int, size: int) -> Axis | None:
        if size <= 1:
            return None
        key = attr_axis_key(target, dim)
        self.state.attr_axes.setdefault(target, {})[dim] = key
        return self.state.new_axis(key, size, f"{target} dim {dim}")

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
            self.state.union_find.union(a.start + i, b.start + i)

    def link(self, a: Axis, index_a: ArrayLike, b: Axis, index_b: ArrayLike) -> None:
        """Element index_a[k] of ``a`` lives and dies with element index_b[k] of ``b``."""
        self.touch(a, b)
        for i, j in zip(np.asarray(index_a).ravel(), np.asarray(index_b).ravel()):
            self.state.union_find.union(a.start + int(i), b.start + int(j))

    def unite(self, a: Axis, indices: ArrayLike) -> None:
        """The given elements of ``a`` form one unit."""
        self.touch(a)
        elements = [int(i) for i in np.asarray(indices).ravel()]
        for i in elements[1:]:
            self.state.union_find.union(a.start + elements[0], a.start + i)

    def keep_elements(self, a: Axis, indices: ArrayLike, reason: str) -> None:
        """The given elements of ``a`` are never pruned (the rest of ``a`` may be): they are
        linked to a one-element axis of this node that is frozen with ``reason``."""
        key = value_axis_key(self.node.name, ("kept", a.label), 0)
        pinned = self.state.new_axis(key, 1, f"{self.node.name} (kept from {a.label})")
        self.state.freeze(key, f"{self.where()}: {reason}")
        self.link(a, np.asarray(indices), pinned, np.zeros(len(np.asarray(indices)), int))

    def freeze(self, a: Axis | None, reason: str) -> None:
        if a is not None:
            self.touch(a)
            self.state.freeze(a.key, f"{self.where()}: {reason}")

    def freeze_all(self, reason: str) -> None:
        for x in self.tensor_inputs() + [self.node]:
            for path in self.tensor_paths(x):
                for axis in self.axes(x, path):
                    self.freeze(axis, reason)
        for x in self.size_inputs():
            for key in _read_keys(self.state.size_reads[x.name]):
                self.touched.add(key)
                self.state.freeze(key, f"{self.where()}: {reason}")

    def cost(self, *terms: tuple[float, list[Axis | None]], absolute: bool = False) -> None:
        """This node's MACs are sum(weight * prod(kept fraction of each axis)), the weights
        being fractions of its counted MACs, or MACs themselves if ``absolute`` (closed forms
        for ops the counter cannot see into)."""
        self.state.cost_terms[self.node.name] = (
            absolute,
            [(float(w), [a.key for a in axes if a is not None]) for w, axes in terms],
        )

    def require_min_kept(self, a: Axis | None, count: int) -> None:
        """At least ``count`` elements of ``a`` must be kept (a statistic with an ``n - k``
        divisor over it is NaN with ``k`` or fewer)."""
        if a is not None and count > 1:
            self.state.min_kept[a.key] = max(self.state.min_kept.get(a.key, 1), int(count))

    def read_size(self, value: SizeRead) -> None:
        """Record that this node's (int or shape) value carries sizes of the given axes."""
        self.state.size_reads[self.node.name] = value

    def size_read(self, x: Any) -> SizeRead:
        return self.state.size_reads.get(x.name) if isinstance(x, fx.Node) else None

    # -- helpers ----------------------------------------------------------------------------
    def where(self) -> str:
        node = self.node
        target = (
            node.target
            if isinstance(node.target, str)
            else getattr(node.target, "__name__", str(node.target))
        )
        return f"node {node.name} ({node.op} {target})"

    def tensor_inputs(self) -> list[fx.Node]:
        found: list[fx.Node] = []
        fx.node.map_arg((self.node.args, self.node.kwargs), lambda n: found.append(n))
        return [n for n in dict.fromkeys(found) if any(True for _ in self.tensor_paths(n))]

    def size_inputs(self) -> list[fx.Node]:
        found: list[fx.Node] = []
        fx.node.map_arg((self.node.args, self.node.kwargs), lambda n: found.append(n))
        return [n for n in dict.fromkeys(found) if n.name in self.state.size_reads]

    @staticmethod
    def tensor_paths(x: fx.Node) -> list[ValuePath]:
        summary = x.meta.get(REF)
        if summary is None:
            return []
        return [p for p, leaf in _flatten(summary) if leaf[0] == "tensor"]


def _read_keys(read: SizeRead) -> list[AxisKey]:
    if read is None:
        return []
    if isinstance(read, dict):
        return [k for k in read.values() if k is not None]
    return [read]


def _path_str(path: ValuePath) -> str:
    return "".join(f"[{i}]" for i in path)
