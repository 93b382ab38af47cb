"""Reductions over axes (sum, mean, var, std, max-like), softmax, and per-channel ops along
the spatial axes (pooling, resampling, padding)."""

from __future__ import annotations

from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

from passes import runtime
from passes.context import NodeContext
from passes.rules.registry import RULES, GatedBuilderView, arg, set_arg
from passes.values import GLUE


def _reduce_dims(node: fx.Node, ndim: int) -> list[int]:
    dims = arg(node, 1, "dim")
    if dims is None:
        return list(range(ndim))
    if isinstance(dims, int):
        dims = [dims]
    return [d % ndim for d in dims]


class ReduceRule:
    """sum/mean/var/std (and max-like, which freeze what they reduce). A mean or variance over
    a prunable axis counts only kept channels in the gated model."""

    handles_eager_code = True  # freezes what it cannot mask when recorded from eager code

    def __init__(self, kind: str) -> None:
        self.kind = kind

    def couple(self, ctx: NodeContext) -> None:
        node = ctx.node
        x = node.args[0]
        x_shape = ctx.shape(x)
        assert x_shape is not None  # the reduced tensor
        n = len(x_shape)
        dims, keepdim, correction = _reduce_options(node, self.kind, n)
        correction = 1 if correction is None else correction
        d_out = 0
        for d in range(n):
            a = ctx.axis(x, d)
            if d in dims:
                if self.kind == "max":
                    ctx.freeze(a, "a maximum over this axis changes when channels are removed")
                elif self.kind != "sum" and ctx.node.meta.get(GLUE):
                    # eager code runs unchanged in the gated model: it would count pruned ones
                    ctx.freeze(a, f"a {self.kind} over channels computed in eager code")
                else:
                    ctx.touch(a)
                    if self.kind in ("var", "std") and correction > 0:
                        # an n - correction divisor: NaN unless more than ``correction`` kept
                        ctx.require_min_kept(a, int(np.floor(correction)) + 1)
                d_out += 1 if keepdim else 0
            else:
                ctx.same(a, ctx.axis(None, d_out))
                d_out += 1

    def gated(self, builder: GatedBuilderView, node: fx.Node) -> fx.Node | None:
        if self.kind not in ("mean", "var", "std"):
            return None
        x = cast(fx.Node, node.args[0])  # the reduced tensor
        x_shape = builder.shape(x)
        assert x_shape is not None
        dims, keepdim, correction = _reduce_options(node, self.kind, len(x_shape))
        masks = [builder.value_mask(x, d) for d in dims]
        if all(m is None for m in masks):
            return None
        return builder.call_function(
            runtime.masked_reduce,
            (self.kind, builder.arg(x), dims, keepdim, correction, masks, dims),
        )

    def lower(self, node: fx.Node, graph_module: fx.GraphModule) -> bool:
        """For export: a sum or mean over several axes as one reduction per axis (the same
        value): ONNX Runtime reduces in one float32 pass whose error grows with the count (a
        global layer norm of 128 channels x 4 s at 8 kHz: 9e-5 relative; per axis: 1e-7)."""
        x = node.args[0]
        meta: Any = x.meta.get("tensor_meta") if isinstance(x, fx.Node) else None
        if (
            self.kind not in ("sum", "mean")
            or len(node.args) > 3  # a dtype given by position
            or node.kwargs.get("dtype") is not None
            or not hasattr(meta, "shape")
        ):
            return False
        dims, keepdim, _ = _reduce_options(node, self.kind, len(meta.shape))
        if len(dims) < 2:
            return False
        value = cast(fx.Node, x)
        reduce = torch.sum if self.kind == "sum" else torch.mean
        with graph_module.graph.inserting_before(node):
            for d in sorted(dims, reverse=True):  # the last first: the others keep their index
                value = graph_module.graph.call_function(reduce, (value, d, keepdim))
        node.replace_all_uses_with(value)
        graph_module.graph.erase_node(node)
        return True


def _reduce_options(node: fx.Node, kind: str, ndim: int) -> tuple[list[int], bool, Any]:
    """(reduced dims, keepdim, correction) of sum/mean/var/std/amax calls (the correction as
    the call gives it)."""
    dims = _reduce_dims(node, ndim)
    positional = list(node.args[2:])
    correction: Any = 0  # a number (or None) from the call's arguments
    if kind in ("var", "std"):  # x.var(dim, unbiased, keepdim) or keyword forms
        unbiased = (
            positional.pop(0)
            if positional and isinstance(positional[0], bool)
            else node.kwargs.get("unbiased", True)
        )
        correction = node.kwargs.get("correction", 1 if unbiased else 0)
    keepdim = positional[0] if positional else node.kwargs.get("keepdim", False)
    return dims, bool(keepdim), correction


RULES.add(ReduceRule("sum"), functions=[torch.sum], methods=["sum"])


RULES.add(ReduceRule("mean"), functions=[torch.mean], methods=["mean"])


RULES.add(ReduceRule("var"), functions=[torch.var], methods=["var"])


RULES.add(ReduceRule("std"), functions=[torch.std], methods=["std"])


RULES.add(
    ReduceRule("max"),
    functions=[torch.amax, torch.amin, torch.logsumexp],
    methods=["amax", "amin", "logsumexp"],
)


class SoftmaxRule:
    def couple(self, ctx: NodeContext) -> None:
        node = ctx.node
        x = node.args[0]
        dim: int | None
        if node.op == "call_module":
            dim = cast("nn.Softmax | nn.LogSoftmax", ctx.module).dim
        else:
            dim = arg(node, 1, "dim")
        x_shape = ctx.shape(x)
        assert x_shape is not None  # the input is a tensor
        n = len(x_shape)
        if not isinstance(dim, int):  # softmax's deprecated implicit dim: nothing to rely on
            return ctx.freeze_all("softmax without an explicit dim")
        for d, (a, o) in enumerate(zip(ctx.axes(x), ctx.axes())):
            if d == dim % n:
                ctx.freeze(a, "softmax normalises over this axis")
                ctx.freeze(o, "softmax normalises over this axis")
            else:
                ctx.same(a, o)


RULES.add(
    SoftmaxRule(),
    modules=[nn.Softmax, nn.LogSoftmax],
    functions=[torch.softmax, F.softmax, F.log_softmax, torch.log_softmax],
    methods=["softmax", "log_softmax"],
)


class ChannelwiseRule:
    """Ops acting on each channel of [B, C, *spatial] independently (pooling, resampling,
    padding of the spatial axes): batch and channel axes map through; static spatial axes are
    frozen."""

    def couple(self, ctx: NodeContext) -> None:
        node = ctx.node
        x = node.args[0]
        for d, (a, o) in enumerate(zip(ctx.axes(x), ctx.axes())):
            if d < 2:
                ctx.same(a, o)
            else:
                ctx.freeze(a, "resampled or pooled along this axis")
                ctx.freeze(o, "resampled or pooled along this axis")

    def lower(self, node: fx.Node, graph_module: fx.GraphModule) -> bool:
        """For export: ``F.adaptive_avg_pool1d``, which the exporters cannot keep dynamic, as an
        equivalent matmul (``runtime.adaptive_avg_pool1d``)."""
        if node.op == "call_function" and node.target is F.adaptive_avg_pool1d:
            node.target = runtime.adaptive_avg_pool1d
            return True
        return False


RULES.add(
    ChannelwiseRule(),
    modules=[
        nn.AvgPool1d,
        nn.MaxPool1d,
        nn.AdaptiveAvgPool1d,
        nn.AdaptiveMaxPool1d,
        nn.Upsample,
        nn.AvgPool2d,
        nn.MaxPool2d,
    ],
    functions=[
        F.interpolate,
        F.adaptive_avg_pool1d,
        F.adaptive_max_pool1d,
        F.avg_pool1d,
        F.max_pool1d,
        F.upsample,
    ],
)


class PadRule:
    """F.pad: unpadded axes map through; a padded static axis is frozen."""

    def couple(self, ctx: NodeContext) -> None:
        node = ctx.node
        x = node.args[0]
        pad = arg(node, 1, "pad")
        x_shape = ctx.shape(x)
        assert x_shape is not None  # the padded tensor
        n = len(x_shape)
        padded = set()
        for i in range(0, len(pad), 2):
            if not (pad[i] == 0 and pad[i + 1] == 0):
                padded.add(n - 1 - i // 2)
        for d, (a, o) in enumerate(zip(ctx.axes(x), ctx.axes())):
            if d in padded:
                ctx.freeze(a, "padded along this axis")
                ctx.freeze(o, "padded along this axis")
            else:
                ctx.same(a, o)

    def lower_complex(self, node: fx.Node, graph_module: fx.GraphModule) -> bool:
        """A complex tensor carried as (real, imaginary) pairs: the same pad, none along the
        pair axis. Zero padding only (a complex value or a reflection is not written)."""
        pad = arg(node, 1, "pad")
        mode = arg(node, 2, "mode", "constant")
        value = arg(node, 3, "value", None)
        if mode != "constant" or value not in (None, 0) or not isinstance(pad, (list, tuple)):
            raise ValueError(f"a {mode} pad of complex values (value {value})")
        set_arg(node, 1, "pad", (0, 0, *pad))
        return True


RULES.add(PadRule(), functions=[F.pad])
