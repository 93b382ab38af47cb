"""The slim rewrite: a new GraphModule with the pruned channels removed.

Every dependent parameter and buffer is sliced (never re-initialised), module attributes
(``in_channels``, ``num_groups``, ``hidden_size``, ...) follow, and literal sizes in the graph
(``view`` sizes, ``split`` sizes, slice bounds) are fixed by the op rules. The input
GraphModule is not modified.
"""

from __future__ import annotations

import copy
import operator
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray
from torch import fx, nn

from passes import runtime
from passes.capture import Capture, site_graph
from passes.axes import ChannelAnalysis
from passes.context import NodeContext
from passes.values import AxisKey, Shape, ValuePath, tensor_shapes
from passes.values import CONSTANT, seeded_noise
from passes.errors import KeepSetError, SlimError


def check_keep(analysis: ChannelAnalysis, keep: dict[int, Any]) -> dict[int, NDArray[np.int64]]:
    """Validate a keep set {group index: unit indices}; return it as sorted int arrays."""
    if not isinstance(keep, dict):
        raise KeepSetError(
            f"a keep set is a dict {{group index: indices}}, got {type(keep).__name__}"
        )
    out: dict[int, NDArray[np.int64]] = {}
    known = {g.index for g in analysis.groups}
    extra = set(keep) - known
    if extra:
        raise KeepSetError(
            f"keep set names unknown groups {sorted(extra)}; the groups are "
            f"0..{len(analysis.groups) - 1}"
        )
    for group in analysis.groups:
        if group.index not in keep:
            raise KeepSetError(f"keep set has no entry for {group.describe()}")
        idx = np.asarray(keep[group.index])
        if idx.ndim != 1 or (idx.size and not np.issubdtype(idx.dtype, np.integer)):
            raise KeepSetError(
                f"keep[{group.index}] must be a 1-D list of integer indices ({group.describe()})"
            )
        if idx.size == 0:
            raise KeepSetError(
                f"keep[{group.index}] is empty: every group keeps at least one "
                f"unit ({group.describe()})"
            )
        if idx.min() < 0 or idx.max() >= group.size:
            raise KeepSetError(
                f"keep[{group.index}] has index {int(idx.max()) if idx.max() >= group.size else int(idx.min())} "
                f"out of range 0..{group.size - 1} ({group.describe()})"
            )
        if len(np.unique(idx)) != len(idx):
            raise KeepSetError(f"keep[{group.index}] repeats an index ({group.describe()})")
        if idx.size < getattr(group, "min_size", 1):
            raise KeepSetError(
                f"keep[{group.index}] keeps {idx.size} unit(s) but {group.describe()} needs at "
                f"least {group.min_size}: a variance or standard deviation with an n - 1 "
                f"divisor spans its channels and is NaN with fewer; keep at least "
                f"{group.min_size} of its units"
            )
        out[group.index] = np.sort(idx.astype(np.int64))
    return out


class Pruning:
    """What a rule's ``slim_module``/``rewrite`` sees: kept indices of every axis."""

    def __init__(self, analysis: ChannelAnalysis, flat_keep: NDArray[Any]) -> None:
        self.analysis = analysis
        self.flat_keep = flat_keep
        self.original: dict[str, fx.Node] = {n.name: n for n in analysis.graph_module.graph.nodes}

    def _kept(self, key: AxisKey | None) -> NDArray[np.intp] | None:
        return None if key is None else self.analysis.kept_indices(key, self.flat_keep)

    def kept_module(self, qualname: str, name: str) -> NDArray[np.intp] | None:
        return self._kept(self.analysis.module_axes.get(qualname, {}).get(name))

    def kept_value(self, x: fx.Node, dim: int, path: ValuePath = ()) -> NDArray[np.intp] | None:
        shape = self.shape(x, path)
        axes = self.analysis.value_axes.get((x.name, path), {})
        return self._kept(axes.get(dim % len(shape))) if shape else None

    def shape(self, x: fx.Node, path: ValuePath = ()) -> Shape | None:
        if x.name not in self.original:  # a part's placeholder holding a Python value
            return None
        shapes = tensor_shapes(self.original[x.name], path)
        return None if shapes is None else shapes[0]

    def tensor_paths(self, x: fx.Node) -> list[ValuePath]:
        if x.name not in self.original:  # a part's placeholder holding a Python value
            return []
        return NodeContext.tensor_paths(self.original[x.name])


def slim(analysis: ChannelAnalysis, keep: dict[int, Any]) -> fx.GraphModule:
    """The slim GraphModule for ``keep`` ({group index: indices of units to keep})."""
    keep = check_keep(analysis, keep)
    flat_keep = analysis.keep_vector(keep)
    pruning = Pruning(analysis, flat_keep)
    gm = copy.deepcopy(analysis.graph_module)
    _slice_parameters(gm, analysis, pruning)
    for node in gm.graph.nodes:
        rule: Any = analysis.rules.get(node.name)
        if hasattr(rule, "rewrite"):
            rule.rewrite(node, pruning)
    gm.graph.lint()
    gm.recompile()
    _check_shapes(gm, analysis, pruning)
    return gm


def _slice_parameters(model: nn.Module, analysis: ChannelAnalysis, pruning: Pruning) -> None:
    """Slice, in ``model`` (a copy), every module and attribute with a pruned channel axis."""
    modules = dict(model.named_modules(remove_duplicate=False))
    rule_by_target = {
        n.target: analysis.rules[n.name]
        for n in analysis.graph_module.graph.nodes
        if n.op == "call_module"
    }
    for qualname in analysis.module_axes:
        rule = rule_by_target.get(qualname)
        if rule is None or not hasattr(rule, "slim_module"):
            continue
        new = rule.slim_module(modules[qualname], pruning, qualname)
        if new is not None and new is not modules[qualname]:
            model.set_submodule(qualname, new)
    for target, dims in analysis.attr_axes.items():
        if not target.startswith(CONSTANT):  # constants of eager code are frozen
            _slice_attr(model, target, {d: pruning._kept(key) for d, key in dims.items()})


def slim_model(capture: Capture, analysis: ChannelAnalysis, keep: dict[int, Any]) -> nn.Module:
    """The slim model for ``keep``: the slim GraphModule when the whole model traced; else a
    copy of the model with every pruned parameter sliced, its graph parts rewritten (literal
    sizes fixed by the op rules) and its eager shells running their forward unchanged."""
    if capture.traced_whole:
        return slim(analysis, keep)
    keep = check_keep(analysis, keep)
    pruning = Pruning(analysis, analysis.keep_vector(keep))
    model = copy.deepcopy(capture.root)
    _slice_parameters(model, analysis, pruning)
    for path, part in capture.parts.items():
        if part.leaf:  # the sliced layer itself, called by its shell
            continue
        graph = site_graph(capture, part)
        for node in graph.nodes:
            # the part's placeholders carry the names of the analysis values they receive:
            # the rules of those values are not theirs
            rule: Any = analysis.rules.get(node.name) if node.op != "placeholder" else None
            if hasattr(rule, "rewrite"):
                rule.rewrite(node, pruning)
        objects = {
            n.target: operator.attrgetter(n.target)(model)
            for n in graph.nodes
            if n.op in ("call_module", "get_attr")
        }
        gm = fx.GraphModule(objects, graph, class_name=type(part.graph_module).__name__)
        call = runtime.PartCall(gm, part.placeholders, part.defaults)
        # dressed as the module it replaces: eager code may check its class
        model.set_submodule(path, runtime.dressed(model.get_submodule(path), call))
    return model


def _slice_attr(gm: nn.Module, target: str, kept_by_dim: dict[int, NDArray[Any] | None]) -> None:
    owner_name, _, name = target.rpartition(".")
    owner = gm.get_submodule(owner_name) if owner_name else gm
    value = getattr(owner, name)
    out = value.detach()
    changed = False
    for d, kept in kept_by_dim.items():
        if kept is not None and len(kept) != out.shape[d]:
            out = out.index_select(d, torch.as_tensor(kept, dtype=torch.long, device=out.device))
            changed = True
    if not changed:
        return
    if isinstance(value, nn.Parameter):
        owner._parameters[name] = nn.Parameter(out.clone(), requires_grad=value.requires_grad)
    elif name in owner._buffers:
        owner._buffers[name] = out.clone()
    else:
        setattr(owner, name, out.clone())


def _check_input(example: torch.Tensor) -> torch.Tensor:
    """A second check input: one more in the batch and an odd length, a multiple of no stride
    (a slim graph can hold at one batch size only, e.g. a ``view`` of a strided tensor)."""
    shape = list(example.shape)
    shape[0] += 1
    shape[-1] += shape[-1] // 4 + 37
    shape[-1] += 1 - shape[-1] % 2
    return seeded_noise(shape, 4321, example)


def _check_shapes(gm: fx.GraphModule, analysis: ChannelAnalysis, pruning: Pruning) -> None:
    """Run the slim model (in eval mode: nothing it holds changes) at a second input and at the
    example input (whose shapes stay in ``node.meta``) and check every tensor's static axes have
    the kept sizes."""
    from torch.fx.passes.shape_prop import ShapeProp

    example = analysis.example_input
    modes = {m: m.training for m in gm.modules()}
    gm.eval()
    try:
        for x in (_check_input(example), example):
            try:
                with torch.no_grad():
                    ShapeProp(gm).propagate(x)
            except Exception as error:
                raise SlimError(
                    f"the slim model does not run at input {list(x.shape)}: "
                    f"{type(error).__name__}: {error}"
                ) from error
            for node in gm.graph.nodes:
                meta = node.meta.get("tensor_meta")
                if node.op == "output" or not hasattr(meta, "shape"):
                    continue
                for dim, key in analysis.value_axes.get((node.name, ()), {}).items():
                    kept = pruning._kept(key)
                    assert kept is not None  # an axis key has kept indices
                    expected = len(kept)
                    if meta.shape[dim] != expected:
                        raise SlimError(
                            f"node {node.name} dim {dim}: slim size "
                            f"{meta.shape[dim]} at input {list(x.shape)}, "
                            f"expected {expected} kept channels"
                        )
    finally:
        for m, training in modes.items():
            m.training = training
