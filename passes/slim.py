"""The slim rewrite: a new GraphModule with the pruned channels removed.

Every dependent parameter and buffer is sliced (never re-initialised), module attributes
(``in_channels``, ``num_groups``, ``hidden_size``, ...) follow, and literal sizes in the graph
(``view`` sizes, ``split`` sizes, slice bounds) are fixed by the op rules. The input
GraphModule is not modified.
"""
from __future__ import annotations

import copy

import numpy as np
import torch
from torch import fx, nn

from passes.channels import ChannelAnalysis, NodeContext, tensor_shapes
from passes.errors import KeepSetError, SlimError


def check_keep(analysis: ChannelAnalysis, keep: dict) -> dict[int, np.ndarray]:
    """Validate a keep set {group index: unit indices}; return it as sorted int arrays."""
    if not isinstance(keep, dict):
        raise KeepSetError(f"a keep set is a dict {{group index: indices}}, got {type(keep).__name__}")
    out = {}
    known = {g.index for g in analysis.groups}
    extra = set(keep) - known
    if extra:
        raise KeepSetError(f"keep set names unknown groups {sorted(extra)}; the groups are "
                           f"0..{len(analysis.groups) - 1}")
    for group in analysis.groups:
        if group.index not in keep:
            raise KeepSetError(f"keep set has no entry for {group.describe()}")
        idx = np.asarray(keep[group.index])
        if idx.ndim != 1 or (idx.size and not np.issubdtype(idx.dtype, np.integer)):
            raise KeepSetError(f"keep[{group.index}] must be a 1-D list of integer indices "
                               f"({group.describe()})")
        if idx.size == 0:
            raise KeepSetError(f"keep[{group.index}] is empty: every group keeps at least one "
                               f"unit ({group.describe()})")
        if idx.min() < 0 or idx.max() >= group.size:
            raise KeepSetError(f"keep[{group.index}] has index {int(idx.max()) if idx.max() >= group.size else int(idx.min())} "
                               f"out of range 0..{group.size - 1} ({group.describe()})")
        if len(np.unique(idx)) != len(idx):
            raise KeepSetError(f"keep[{group.index}] repeats an index ({group.describe()})")
        out[group.index] = np.sort(idx.astype(np.int64))
    return out


class SlimContext:
    """What a rule's ``slim_module``/``rewrite`` sees: kept indices of every axis."""

    def __init__(self, analysis: ChannelAnalysis, flat_keep: np.ndarray):
        self.analysis = analysis
        self.flat_keep = flat_keep
        self.original = {n.name: n for n in analysis.graph_module.graph.nodes}

    def _kept(self, key):
        return None if key is None else self.analysis.kept_indices(key, self.flat_keep)

    def kept_module(self, qualname: str, name: str):
        return self._kept(self.analysis.module_axes.get(qualname, {}).get(name))

    def kept_value(self, x: fx.Node, dim: int, path: tuple = ()):
        shape = self.shape(x, path)
        axes = self.analysis.value_axes.get((x.name, path), {})
        return self._kept(axes.get(dim % len(shape))) if shape else None

    def shape(self, x: fx.Node, path: tuple = ()):
        shapes = tensor_shapes(self.original[x.name], path)
        return None if shapes is None else shapes[0]

    def tensor_paths(self, x: fx.Node):
        return NodeContext.tensor_paths(self.original[x.name])


def slim(analysis: ChannelAnalysis, keep: dict) -> fx.GraphModule:
    """The slim GraphModule for ``keep`` ({group index: indices of units to keep})."""
    keep = check_keep(analysis, keep)
    flat_keep = analysis.keep_vector(keep)
    s = SlimContext(analysis, flat_keep)
    gm = copy.deepcopy(analysis.graph_module)
    modules = dict(gm.named_modules())
    rule_by_target = {n.target: analysis.rules[n.name]
                      for n in analysis.graph_module.graph.nodes if n.op == "call_module"}
    for qualname in analysis.module_axes:
        rule = rule_by_target.get(qualname)
        if rule is None or not hasattr(rule, "slim_module"):
            continue
        new = rule.slim_module(modules[qualname], s, qualname)
        if new is not None and new is not modules[qualname]:
            gm.set_submodule(qualname, new)
    for target, dims in analysis.attr_axes.items():
        _slice_attr(gm, target, {d: s._kept(key) for d, key in dims.items()})
    for node in gm.graph.nodes:
        rule = analysis.rules.get(node.name)
        if hasattr(rule, "rewrite"):
            rule.rewrite(node, s)
    gm.graph.lint()
    gm.recompile()
    _check_shapes(gm, analysis, s)
    return gm


def _slice_attr(gm: fx.GraphModule, target: str, kept_by_dim: dict) -> None:
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


def _check_shapes(gm: fx.GraphModule, analysis: ChannelAnalysis, s: SlimContext) -> None:
    """Run the slim model once and check every tensor's static axes have the kept sizes."""
    from torch.fx.passes.shape_prop import ShapeProp

    try:
        with torch.no_grad():
            ShapeProp(gm).propagate(analysis.example_input)
    except Exception as error:
        raise SlimError(f"the slim model does not run: {type(error).__name__}: {error}") from error
    for node in gm.graph.nodes:
        meta = node.meta.get("tensor_meta")
        if node.op == "output" or not hasattr(meta, "shape"):
            continue
        for dim, key in analysis.value_axes.get((node.name, ()), {}).items():
            expected = len(s._kept(key))
            if meta.shape[dim] != expected:
                raise SlimError(f"node {node.name} dim {dim}: slim size {meta.shape[dim]}, "
                                f"expected {expected} kept channels")
