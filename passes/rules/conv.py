"""Convolutions (modules and functional) and Linear."""

from __future__ import annotations

from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from numpy.typing import NDArray
from torch import fx, nn

from passes import runtime
from passes.axes import Axis
from passes.context import NodeContext
from passes.rules.registry import RULES, PruningView, arg, pruned, set_arg, sliced_parameter


class ConvRule:
    """Conv1d/2d and ConvTranspose1d/2d; groups == 1, depthwise (with multiplier) and general
    grouped convolutions (whole conv groups are pruned).

    A convolution slides along its spatial axes, so a static one is frozen, except where the
    kernel spans the whole axis (at least as many taps as input positions: Asteroid's
    SuDoRM-RF mask layer, a Conv2d over the channel axis): there the op is a dense matrix from
    input to output positions, whose positions prune like a Linear's features; the slim model
    folds such an axis into the channels (``runtime.SpannedConv``). Its cost term stays the
    convolution's, an upper bound (the folded form skips the taps that only see padding)."""

    def couple(self, ctx: NodeContext) -> None:
        m = cast(nn.modules.conv._ConvNd, ctx.module)
        x = ctx.node.args[0]
        c_in, c_out, groups = m.in_channels, m.out_channels, m.groups
        m_in, m_out = ctx.module_axis("in", c_in), ctx.module_axis("out", c_out)
        ctx.same(ctx.axis(x, 1), m_in)
        ctx.same(ctx.axis(None, 1), m_out)
        ctx.same(ctx.axis(x, 0), ctx.axis(None, 0))
        spans: list[Axis | None] = []
        out_shape = ctx.shape()
        assert out_shape is not None  # a convolution's output is a tensor
        for d in range(2, len(out_shape)):
            a_in, a_out = ctx.axis(x, d), ctx.axis(None, d)
            if groups == 1 and _spanned(ctx, m, d, a_in, a_out):
                assert a_in is not None  # _spanned is False without it
                s_in = ctx.module_axis(f"span{d}_in", a_in.size)
                ctx.same(a_in, s_in)
                spans.append(s_in)
                if a_out is not None:
                    s_out = ctx.module_axis(f"span{d}_out", a_out.size)
                    ctx.same(a_out, s_out)
                    spans.append(s_out)
                continue
            ctx.freeze(a_in, "a convolution slides along this axis")
            ctx.freeze(a_out, "a convolution slides along this axis")
        if groups == 1:
            ctx.cost((1.0, [m_in, m_out, *spans]))
            return
        per_in, per_out = c_in // groups, c_out // groups
        for g in range(groups):
            ins, outs = (
                np.arange(g * per_in, (g + 1) * per_in),
                np.arange(g * per_out, (g + 1) * per_out),
            )
            if m_in is not None and m_out is not None:
                ctx.link(m_in, np.repeat(ins[:1], per_out), m_out, outs)
                ctx.unite(m_in, ins)
            elif m_out is not None:
                ctx.unite(m_out, outs)
        ctx.cost((1.0, [m_out]))

    def slim_module(
        self, m: nn.modules.conv._ConvNd, pruning: PruningView, qualname: str
    ) -> nn.Module | None:
        kept_in = pruning.kept_module(qualname, "in")
        kept_out = pruning.kept_module(qualname, "out")
        spans = _pruned_spans(m, pruning, qualname)
        if not (pruned(kept_in, m.in_channels) or pruned(kept_out, m.out_channels) or spans):
            return None
        k_in = np.arange(m.in_channels) if kept_in is None else kept_in
        k_out = np.arange(m.out_channels) if kept_out is None else kept_out
        if spans:
            return runtime.SpannedConv.lowered(m, k_in, k_out, spans)
        transposed = isinstance(m, nn.modules.conv._ConvTransposeNd)
        if m.groups == 1:
            rows, cols = (k_in, k_out) if transposed else (k_out, k_in)
            m.weight = sliced_parameter(m.weight, rows, cols)
        else:
            per_out = m.out_channels // m.groups
            m.groups = len(np.unique(k_out // per_out))
            m.weight = sliced_parameter(m.weight, k_in if transposed else k_out)
        if m.bias is not None:
            m.bias = sliced_parameter(m.bias, k_out)
        m.in_channels, m.out_channels = len(k_in), len(k_out)
        return m

    def importance(self, m: nn.modules.conv._ConvNd, axis: str) -> list[tuple[torch.Tensor, int]]:
        return _weight_slices(
            m, axis, isinstance(m, nn.modules.conv._ConvTransposeNd), m.groups > 1
        )

    def lower(self, node: fx.Node, graph_module: fx.GraphModule) -> bool:
        """For export: a ConvTranspose1d given ``output_size`` (``(B, 1, ilens.max())``, a
        toolkit's decoder) computes its output padding in Python, which the exporters fix at
        the traced length. Without padding, the positions past its natural length hold only
        the bias: it runs at that length and is padded to the size in the graph."""
        if node.op != "call_module":
            return False
        m = graph_module.get_submodule(cast(str, node.target))
        size = arg(node, 1, "output_size")
        if not (
            isinstance(m, nn.ConvTranspose1d)
            and isinstance(size, (list, tuple))
            and m.padding == (0,)
            and m.output_padding == (0,)
        ):
            return False
        graph = graph_module.graph
        node.args, node.kwargs = node.args[:1], {}
        with graph.inserting_after(node):
            bias = graph.get_attr(f"{node.target}.bias") if m.bias is not None else None
        with graph.inserting_after(bias if bias is not None else node):
            padded = graph.call_function(runtime.pad_transposed, (node, size[-1], bias))
        node.replace_all_uses_with(padded, delete_user_cb=lambda user: user is not padded)
        return True


def _weight_slices(
    m: nn.modules.conv._ConvNd | nn.Linear, axis: str, transposed: bool, grouped: bool
) -> list[tuple[torch.Tensor, int]]:
    """(parameter, dim) pairs that the ``in``/``out`` axis of a conv or Linear indexes, for
    magnitude scores; a grouped weight's per-group dim is no channel index."""
    in_dim, out_dim = (0, 1) if transposed else (1, 0)
    if axis == "in":
        return [(m.weight, in_dim)] if in_dim == 0 or not grouped else []
    if axis == "out":
        bias: list[tuple[torch.Tensor, int]] = [(m.bias, 0)] if m.bias is not None else []
        return ([(m.weight, out_dim)] if out_dim == 0 or not grouped else []) + bias
    return []


RULES.add(ConvRule(), modules=[nn.Conv1d, nn.Conv2d, nn.ConvTranspose1d, nn.ConvTranspose2d])


def _spanned(
    ctx: NodeContext, m: nn.modules.conv._ConvNd, d: int, a_in: Axis | None, a_out: Axis | None
) -> bool:
    """Whether the (non-transposed, zero-padded) convolution ``m``'s kernel spans the whole
    static input axis ``d``, whose output axis is static too (or of size 1)."""
    if (
        isinstance(m, nn.modules.conv._ConvTransposeNd)
        or m.padding_mode != "zeros"
        or not isinstance(m.padding, tuple)
        or a_in is None
    ):
        return False
    out_shape = ctx.shape()
    assert out_shape is not None  # a convolution's output is a tensor
    if a_out is None and (out_shape[d] != 1 or ctx.is_dynamic(ctx.node, d)):
        return False
    return m.kernel_size[d - 2] >= a_in.size


def _pruned_spans(
    m: nn.modules.conv._ConvNd, pruning: PruningView, qualname: str
) -> dict[int, tuple[NDArray[Any], NDArray[Any]]]:
    """{axis: (kept input positions, kept output positions)} of the spanned axes of conv ``m``
    that lose positions in the keep set (``ConvRule``)."""
    spans: dict[int, tuple[NDArray[Any], NDArray[Any]]] = {}
    for d in range(2, 2 + len(m.kernel_size)):
        kept_in = pruning.kept_module(qualname, f"span{d}_in")
        if kept_in is None:
            continue
        key = pruning.analysis.module_axes[qualname][f"span{d}_in"]
        size_in = pruning.analysis.axes[key].size
        out_key = pruning.analysis.module_axes[qualname].get(f"span{d}_out")
        kept_out = (
            np.arange(1) if out_key is None else pruning.kept_module(qualname, f"span{d}_out")
        )
        assert kept_out is not None  # the axis exists: it has kept indices
        size_out = 1 if out_key is None else pruning.analysis.axes[out_key].size
        if len(kept_in) != size_in or len(kept_out) != size_out:
            spans[d] = (kept_in, kept_out)
    return spans


class FunctionalConvRule:
    """F.conv1d/conv2d(x, weight, bias, stride, padding, dilation, groups) and
    F.conv_transpose1d/2d(x, weight, bias, stride, padding, output_padding, groups, dilation):
    the layers' coupling on the weight's own axes ([out, in/groups, k...], transposed
    [in, out/groups, k...]). The weight is usually a module's parameter or buffer (a get_attr
    node, sliced by the slim pass with its axes); general groups prune whole conv groups, and a
    literal ``groups`` is rewritten to the kept count."""

    def __init__(self, transposed: bool) -> None:
        self.transposed = transposed

    def couple(self, ctx: NodeContext) -> None:
        node = ctx.node
        x, w, b = arg(node, 0, "input"), arg(node, 1, "weight"), arg(node, 2, "bias")
        groups = arg(node, 6, "groups", 1)
        w_shape, x_shape, out_shape = ctx.shape(w), ctx.shape(x), ctx.shape()
        if not isinstance(groups, int) or w_shape is None or x_shape is None:
            return ctx.freeze_all("convolution with a computed groups or weight")
        assert out_shape is not None  # a convolution's output is a tensor
        out_dim, in_dim = (1, 0) if self.transposed else (0, 1)
        x_ch, o_ch = ctx.axis(x, 1), ctx.axis(None, 1)
        w_in, w_out = ctx.axis(w, in_dim), ctx.axis(w, out_dim)
        ctx.same(ctx.axis(x, 0), ctx.axis(None, 0))
        for d in range(2, len(out_shape)):
            ctx.freeze(ctx.axis(x, d), "a convolution slides along this axis")
            ctx.freeze(ctx.axis(None, d), "a convolution slides along this axis")
        for d in range(2, len(w_shape)):
            ctx.freeze(ctx.axis(w, d), "kernel axis")
        if isinstance(b, fx.Node):
            ctx.same(ctx.axis(b, 0), o_ch)
        if groups == 1:
            ctx.same(x_ch, w_in)
            ctx.same(o_ch, w_out)
            ctx.cost((1.0, [x_ch, o_ch]))
            return
        # [out, in/groups] (or [in, out/groups]): the per-group axis is kept whole
        c_in, c_out = x_shape[1], out_shape[1]
        per_in, per_out = c_in // groups, c_out // groups
        ctx.same(o_ch if not self.transposed else x_ch, w_out if not self.transposed else w_in)
        ctx.freeze(
            w_in if not self.transposed else w_out,
            "per-group axis of a grouped convolution (whole groups are pruned)",
        )
        for g in range(groups):
            ins = np.arange(g * per_in, (g + 1) * per_in)
            outs = np.arange(g * per_out, (g + 1) * per_out)
            if x_ch is not None and o_ch is not None:
                ctx.link(x_ch, np.repeat(ins[:1], per_out), o_ch, outs)
                ctx.unite(x_ch, ins)
            elif o_ch is not None:
                ctx.unite(o_ch, outs)
            elif x_ch is not None:
                ctx.unite(x_ch, ins)
        ctx.cost((1.0, [x_ch if self.transposed else o_ch]))

    def rewrite(self, node: fx.Node, pruning: PruningView) -> None:
        groups = arg(node, 6, "groups", 1)
        if not isinstance(groups, int) or groups == 1:
            return
        x = cast(fx.Node, node.args[0])  # the input tensor
        x_shape, out_shape = pruning.shape(x), pruning.shape(node)
        assert x_shape is not None and out_shape is not None  # tensors in, tensor out
        c_in, c_out = x_shape[1], out_shape[1]
        if self.transposed:
            kept, per = pruning.kept_value(x, 1), c_in // groups
        else:
            kept, per = pruning.kept_value(node, 1), c_out // groups
        if kept is not None and pruned(kept, groups * per):
            set_arg(node, 6, "groups", int(len(np.unique(np.asarray(kept) // per))))


RULES.add(FunctionalConvRule(False), functions=[F.conv1d, F.conv2d, torch.conv1d, torch.conv2d])


RULES.add(
    FunctionalConvRule(True),
    functions=[
        F.conv_transpose1d,
        F.conv_transpose2d,
        torch.conv_transpose1d,
        torch.conv_transpose2d,
    ],
)


class LinearRule:
    def couple(self, ctx: NodeContext) -> None:
        m = cast(nn.Linear, ctx.module)
        x = ctx.node.args[0]
        m_in, m_out = ctx.module_axis("in", m.in_features), ctx.module_axis("out", m.out_features)
        ctx.same(ctx.axis(x, -1), m_in)
        ctx.same(ctx.axis(None, -1), m_out)
        for a, o in list(zip(ctx.axes(x), ctx.axes()))[:-1]:
            ctx.same(a, o)
        ctx.cost((1.0, [m_in, m_out]))

    def slim_module(self, m: nn.Linear, pruning: PruningView, qualname: str) -> nn.Module | None:
        k_in, k_out = pruning.kept_module(qualname, "in"), pruning.kept_module(qualname, "out")
        if not (pruned(k_in, m.in_features) or pruned(k_out, m.out_features)):
            return None
        m.weight = sliced_parameter(m.weight, k_out, k_in)
        if m.bias is not None:
            m.bias = sliced_parameter(m.bias, k_out)
        m.in_features = m.weight.shape[1]
        m.out_features = m.weight.shape[0]
        return m

    def importance(self, m: nn.Linear, axis: str) -> list[tuple[torch.Tensor, int]]:
        return _weight_slices(m, axis, False, False)


RULES.add(LinearRule(), modules=[nn.Linear])
