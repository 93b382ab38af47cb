"""Normalisation layers: BatchNorm, InstanceNorm, GroupNorm (gLN), LayerNorm (cLN) and
F.layer_norm. Norms whose statistics span a channel axis are computed over kept channels only in
the gated model."""

from __future__ import annotations

from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

from passes import runtime
from passes.context import NodeContext
from passes.rules.registry import (
    RULES,
    GatedBuilderView,
    PruningView,
    arg,
    pruned,
    set_arg,
    sliced_parameter,
)
from passes.values import AxisKey, SizeRead, scalar_values


def _affine_slices(m: nn.Module) -> list[tuple[torch.Tensor, int]]:
    """(parameter, dim) pairs of a norm's per-channel affine parameters, for magnitude
    scores."""
    return [
        (p, 0)
        for p in (getattr(m, "weight", None), getattr(m, "bias", None))
        if p is not None and p.dim() >= 1
    ]


def _slim_running_norm(
    m: nn.modules.batchnorm._NormBase, pruning: PruningView, qualname: str
) -> nn.Module | None:
    """Batch and instance norms: slice the affine parameters and the running statistics to
    the kept channels (None when none is pruned)."""
    kept = pruning.kept_module(qualname, "channels")
    if not pruned(kept, m.num_features):
        return None
    if m.affine:
        m.weight, m.bias = sliced_parameter(m.weight, kept), sliced_parameter(m.bias, kept)
    if m.track_running_stats:
        assert m.running_mean is not None and m.running_var is not None  # tracked
        idx = torch.as_tensor(kept, dtype=torch.long, device=m.running_mean.device)
        m.running_mean = m.running_mean[idx].clone()
        m.running_var = m.running_var[idx].clone()
    m.num_features = len(kept)
    return m


class BatchNormRule:
    def couple(self, ctx: NodeContext) -> None:
        m = cast(nn.modules.batchnorm._BatchNorm, ctx.module)
        x = ctx.node.args[0]
        ctx.same(ctx.axis(x, 1), ctx.module_axis("channels", m.num_features))
        for a, o in zip(ctx.axes(x), ctx.axes()):
            ctx.same(a, o)  # per-channel statistics: every other axis maps through

    def slim_module(
        self, m: nn.modules.batchnorm._BatchNorm, pruning: PruningView, qualname: str
    ) -> nn.Module | None:
        return _slim_running_norm(m, pruning, qualname)

    def importance(
        self, m: nn.modules.batchnorm._BatchNorm, axis: str
    ) -> list[tuple[torch.Tensor, int]]:
        return _affine_slices(m) if axis == "channels" else []


RULES.add(BatchNormRule(), modules=[nn.BatchNorm1d, nn.BatchNorm2d])


class FunctionalBatchNormRule:
    """``F.batch_norm(x, running_mean, running_var, weight, bias, ...)``: per-channel statistics
    and parameters along axis 1 (usually parameters and buffers read by the graph, sliced by
    the slim pass with their axes); every axis maps through."""

    def couple(self, ctx: NodeContext) -> None:
        node = ctx.node
        x = node.args[0]
        channel = ctx.axis(x, 1)
        for i, name in enumerate(("running_mean", "running_var", "weight", "bias"), start=1):
            p = arg(node, i, name)
            if isinstance(p, fx.Node):
                ctx.same(channel, ctx.axis(p, 0))
        for a, o in zip(ctx.axes(x), ctx.axes()):
            ctx.same(a, o)


RULES.add(FunctionalBatchNormRule(), functions=[F.batch_norm, torch.batch_norm])


class InstanceNormRule:
    """InstanceNorm1d/2d, with or without affine parameters: statistics per sample and channel
    over the spatial axes, so channels map through (and its parameters follow them); a static
    spatial axis is frozen (the statistics span it)."""

    def couple(self, ctx: NodeContext) -> None:
        m = cast(nn.modules.instancenorm._InstanceNorm, ctx.module)
        x = ctx.node.args[0]
        spatial = 1 if isinstance(m, nn.InstanceNorm1d) else 2
        x_shape = ctx.shape(x)
        assert x_shape is not None  # the input is a tensor
        n = len(x_shape)
        channel = n - spatial - 1  # unbatched inputs have no batch axis
        ctx.same(ctx.axis(x, channel), ctx.module_axis("channels", m.num_features))
        for d in range(n):
            a, o = ctx.axis(x, d), ctx.axis(None, d)
            if d > channel:
                ctx.freeze(a, "instance norm statistics span this axis")
                ctx.freeze(o, "instance norm statistics span this axis")
            else:
                ctx.same(a, o)

    def slim_module(
        self, m: nn.modules.instancenorm._InstanceNorm, pruning: PruningView, qualname: str
    ) -> nn.Module | None:
        return _slim_running_norm(m, pruning, qualname)

    def importance(
        self, m: nn.modules.instancenorm._InstanceNorm, axis: str
    ) -> list[tuple[torch.Tensor, int]]:
        return _affine_slices(m) if axis == "channels" else []


RULES.add(InstanceNormRule(), modules=[nn.InstanceNorm1d, nn.InstanceNorm2d])


class GroupNormRule:
    """GroupNorm(G, C): G == C is per channel; 1 < G < C prunes whole groups; G == 1 (gLN) has
    statistics over every channel, so the gated model counts kept channels only."""

    def couple(self, ctx: NodeContext) -> None:
        m = cast(nn.GroupNorm, ctx.module)
        x = ctx.node.args[0]
        c, groups = m.num_channels, m.num_groups
        channels = ctx.module_axis("channels", c)
        ctx.same(ctx.axis(x, 1), channels)
        ctx.same(ctx.axis(x, 1), ctx.axis(None, 1))
        ctx.same(ctx.axis(x, 0), ctx.axis(None, 0))
        out_shape = ctx.shape()
        assert out_shape is not None  # the output is a tensor
        for d in range(2, len(out_shape)):
            if groups == c:
                ctx.same(ctx.axis(x, d), ctx.axis(None, d))
            else:
                ctx.freeze(ctx.axis(x, d), "group norm statistics span this axis")
                ctx.freeze(ctx.axis(None, d), "group norm statistics span this axis")
        if 1 < groups < c and channels is not None:
            per = c // groups
            for g in range(groups):
                ctx.unite(channels, np.arange(g * per, (g + 1) * per))

    def gated(self, builder: GatedBuilderView, node: fx.Node) -> fx.Node | None:
        m = cast(nn.GroupNorm, builder.module(cast(str, node.target)))  # a call_module node
        mask = builder.value_mask(cast(fx.Node, node.args[0]), 1)  # the input tensor
        if mask is None or m.num_groups == m.num_channels:
            return None
        return builder.call_function(
            runtime.masked_group_norm,
            (
                builder.arg(node.args[0]),
                m.num_groups,
                builder.get_attr(f"{node.target}.weight") if m.affine else None,
                builder.get_attr(f"{node.target}.bias") if m.affine else None,
                m.eps,
                mask,
            ),
        )

    def slim_module(self, m: nn.GroupNorm, pruning: PruningView, qualname: str) -> nn.Module | None:
        kept = pruning.kept_module(qualname, "channels")
        if not pruned(kept, m.num_channels):
            return None
        if m.num_groups not in (1, m.num_channels):
            m.num_groups = len(kept) // (m.num_channels // m.num_groups)
        elif m.num_groups == m.num_channels:
            m.num_groups = len(kept)
        if m.affine:
            m.weight, m.bias = sliced_parameter(m.weight, kept), sliced_parameter(m.bias, kept)
        m.num_channels = len(kept)
        return m

    def importance(self, m: nn.GroupNorm, axis: str) -> list[tuple[torch.Tensor, int]]:
        return _affine_slices(m) if axis == "channels" else []


RULES.add(GroupNormRule(), modules=[nn.GroupNorm])


class LayerNormRule:
    """LayerNorm over the last k dims (a channel-wise LayerNorm after a transpose is cLN)."""

    def couple(self, ctx: NodeContext) -> None:
        m = cast(nn.LayerNorm, ctx.module)
        x = ctx.node.args[0]
        k = len(m.normalized_shape)
        out_shape = ctx.shape()
        assert out_shape is not None  # the output is a tensor
        n = len(out_shape)
        for d, (a, o) in enumerate(zip(ctx.axes(x), ctx.axes())):
            ctx.same(a, o)
            if d >= n - k:
                # a module axis with or without parameters: it carries the kept size of
                # normalized_shape to slim_module
                i = d - (n - k)
                ctx.same(a, ctx.module_axis(f"dim{i}", m.normalized_shape[i]))

    def gated(self, builder: GatedBuilderView, node: fx.Node) -> fx.Node | None:
        m = cast(nn.LayerNorm, builder.module(cast(str, node.target)))  # a call_module node
        k = len(m.normalized_shape)
        x = cast(fx.Node, node.args[0])  # the input tensor
        x_shape = builder.shape(x)
        assert x_shape is not None
        n = len(x_shape)
        masks = [builder.value_mask(x, d) for d in range(n - k, n)]
        if all(mask is None for mask in masks):
            return None
        weight = builder.get_attr(f"{node.target}.weight") if m.weight is not None else None
        bias = builder.get_attr(f"{node.target}.bias") if m.bias is not None else None
        return builder.call_function(
            runtime.masked_layer_norm, (builder.arg(node.args[0]), k, weight, bias, m.eps, masks)
        )

    def slim_module(self, m: nn.LayerNorm, pruning: PruningView, qualname: str) -> nn.Module | None:
        kept = [pruning.kept_module(qualname, f"dim{i}") for i in range(len(m.normalized_shape))]
        if not any(pruned(k, size) for k, size in zip(kept, m.normalized_shape)):
            return None
        if m.weight is not None:
            m.weight = sliced_parameter(m.weight, *kept)
        if m.bias is not None:
            m.bias = sliced_parameter(m.bias, *kept)
        m.normalized_shape = tuple(
            len(k) if k is not None else size for k, size in zip(kept, m.normalized_shape)
        )
        return m

    def importance(self, m: nn.LayerNorm, axis: str) -> list[tuple[torch.Tensor, int]]:
        return _affine_slices(m) if axis == "dim0" else []


RULES.add(LayerNormRule(), modules=[nn.LayerNorm])


class FunctionalLayerNormRule:
    """F.layer_norm(x, normalized_shape, weight, bias, eps) (a LayerNorm subclass calling
    ``super().forward``, or a direct call): every axis maps through, the last k are also the
    weight's and bias's; the gated model takes the statistics over kept channels only, and the
    slim model is given the kept sizes where ``normalized_shape`` is literal."""

    def couple(self, ctx: NodeContext) -> None:
        node = ctx.node
        x = node.args[0]
        shape = arg(node, 1, "normalized_shape")
        out_shape, x_shape = ctx.shape(None), ctx.shape(x)
        assert out_shape is not None and x_shape is not None  # tensor in, tensor out
        k = len(out_shape) - len(x_shape) + self._k(shape, ctx)
        n = len(x_shape)
        for d, (a, o) in enumerate(zip(ctx.axes(x), ctx.axes())):
            ctx.same(a, o)
            if d >= n - k:
                for p in (arg(node, 2, "weight"), arg(node, 3, "bias")):
                    if isinstance(p, fx.Node):
                        ctx.same(a, ctx.axis(p, d - (n - k)))
        read = ctx.size_read(shape)
        for key in _read_keys_of(read):
            ctx.touch(ctx.state.axes[key])

    @staticmethod
    def _k(shape: Any, ctx: NodeContext | None = None) -> int:
        if isinstance(shape, int):
            return 1
        if isinstance(shape, (tuple, list)):
            return len(shape)
        values = scalar_values(shape) if isinstance(shape, fx.Node) else None
        if values is not None and isinstance(values[0], (tuple, list)):
            return len(values[0])
        return 1

    def gated(self, builder: GatedBuilderView, node: fx.Node) -> fx.Node | None:
        x = cast(fx.Node, node.args[0])  # the input tensor
        k = self._k(arg(node, 1, "normalized_shape"))
        x_shape = builder.shape(x)
        assert x_shape is not None
        n = len(x_shape)
        masks = [builder.value_mask(x, d) for d in range(n - k, n)]
        if all(mask is None for mask in masks):
            return None
        weight, bias = arg(node, 2, "weight"), arg(node, 3, "bias")
        return builder.call_function(
            runtime.masked_layer_norm,
            (
                builder.arg(x),
                k,
                builder.arg(weight),
                builder.arg(bias),
                arg(node, 4, "eps", 1e-5),
                masks,
            ),
        )

    def rewrite(self, node: fx.Node, pruning: PruningView) -> None:
        shape = arg(node, 1, "normalized_shape")
        x = cast(fx.Node, node.args[0])  # the input tensor
        sizes = [shape] if isinstance(shape, int) else shape
        if not isinstance(sizes, (tuple, list)):
            return
        x_shape = pruning.shape(x)
        assert x_shape is not None
        n = len(x_shape)
        new = list(sizes)
        for i, size in enumerate(sizes):
            kept = pruning.kept_value(x, n - len(sizes) + i)
            if isinstance(size, int) and pruned(kept, size):
                new[i] = len(kept)
        if new != list(sizes):
            set_arg(node, 1, "normalized_shape", new[0] if isinstance(shape, int) else tuple(new))


def _read_keys_of(read: SizeRead) -> list[AxisKey]:
    if isinstance(read, dict):
        return [k for k in read.values() if k is not None]
    return [read] if isinstance(read, tuple) else []


RULES.add(FunctionalLayerNormRule(), functions=[F.layer_norm, torch.layer_norm])
