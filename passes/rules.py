"""The op-rule registry: everything sepfx knows about how one kind of op treats channels.

One rule per op kind (a module class, a function, a tensor method). A rule may implement:

- ``couple(ctx)``: link, unite or freeze the static axes of the node's inputs, outputs and
  parameters (``passes.channels.NodeContext``). Axes it leaves untouched are frozen.
- ``cost(ctx)`` (inside ``couple``): how the node's MACs scale with kept channels.
- ``gated(g, node)``: how the gated model computes this node when channels are masked, where
  the plain op would not (norm statistics, recurrent state, attention heads). Default: run the
  op as is; the gate pass then zeroes pruned channels of the output.
- ``slim_module(module, s, qualname)``: the module with its channels sliced (slim pass).
- ``rewrite(node, s)``: fix literal sizes in the node's arguments (slim pass).

An op with no rule freezes every static axis it touches. Supporting a new op is one new entry.
"""
from __future__ import annotations

import operator
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

from passes import runtime
from passes.values import scalar_values, tensor_shapes


class Registry:
    def __init__(self):
        self.modules: dict[type, Any] = {}
        self.functions: dict[Any, Any] = {}
        self.methods: dict[str, Any] = {}

    def add(self, rule, modules=(), functions=(), methods=()):
        for m in modules:
            self.modules[m] = rule
        for f in functions:
            self.functions[f] = rule
        for name in methods:
            self.methods[name] = rule
        return rule


RULES = Registry()


def lookup(node: fx.Node, modules: dict[str, nn.Module]):
    if node.op == "call_module":  # exact type: a subclass may compute something else
        return RULES.modules.get(type(modules[node.target]), OPAQUE_LEAF)
    if node.op == "call_function":
        return RULES.functions.get(node.target)
    if node.op == "call_method":
        return RULES.methods.get(node.target)
    if node.op == "get_attr":
        return GET_ATTR
    return None


def describe_op(node: fx.Node, modules) -> str:
    if node.op == "call_module":
        return f"module {type(modules[node.target]).__name__} ({node.target})"
    if node.op == "call_function":
        return f"function {getattr(node.target, '__module__', '')}.{node.target.__name__}"
    return f"{node.op} {node.target}"


def arg(node: fx.Node, index: int, name: str, default=None):
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def set_arg(node: fx.Node, index: int, name: str, value) -> None:
    if len(node.args) > index:
        args = list(node.args)
        args[index] = value
        node.args = tuple(args)
    else:
        node.kwargs = {**node.kwargs, name: value}


def _pruned(kept, size) -> bool:
    return kept is not None and len(kept) != size


def _param(t: torch.Tensor, *index_by_dim) -> nn.Parameter:
    """``t`` sliced: ``index_by_dim[d]`` (an index array or None) along dim d."""
    out = t.detach()
    for d, idx in enumerate(index_by_dim):
        if idx is not None:
            out = out.index_select(d, torch.as_tensor(idx, dtype=torch.long, device=t.device))
    return nn.Parameter(out.clone(), requires_grad=t.requires_grad)


# -- pointwise ------------------------------------------------------------------------------
class Elementwise:
    """Same index in, same index out, with broadcasting (activations, residual adds, ...)."""

    def couple(self, ctx):
        out = ctx.shape()
        if out is None:
            return  # arithmetic on Python numbers: sizes read into it are frozen by the check
        for x in ctx.tensor_inputs():
            shape = ctx.shape(x)
            if shape is None:
                continue
            offset = len(out) - len(shape)
            for d in range(len(shape)):
                a = ctx.axis(x, d)
                if a is not None:
                    ctx.same(a, ctx.axis(None, d + offset))
        ctx.touch(*ctx.axes())


ELEMENTWISE = RULES.add(
    Elementwise(),
    modules=[nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.Sigmoid, nn.Tanh, nn.GELU, nn.SiLU, nn.ELU,
             nn.Softplus, nn.Mish, nn.Hardtanh, nn.Identity, nn.Dropout, nn.Dropout1d,
             nn.Dropout2d, nn.Hardswish, nn.Hardsigmoid],
    functions=[operator.add, operator.sub, operator.mul, operator.truediv, operator.neg,
               operator.pow, torch.add, torch.sub, torch.mul, torch.div, torch.true_divide,
               torch.maximum, torch.minimum, torch.where, torch.relu, torch.sigmoid, torch.tanh,
               torch.exp, torch.abs, torch.sqrt, torch.rsqrt, torch.pow, torch.clamp,
               torch.neg, torch.sin, torch.cos, torch.log, torch.log1p, torch.square,
               torch.zeros_like, torch.ones_like, torch.sign, torch.nan_to_num,
               F.relu, F.relu6, F.leaky_relu, F.gelu, F.silu, F.elu, F.softplus, F.mish,
               F.sigmoid, F.tanh, F.hardtanh, F.dropout, F.hardswish],
    methods=["add", "sub", "mul", "div", "truediv", "__add__", "__sub__", "__mul__",
             "__truediv__", "__radd__", "__rmul__", "__rsub__", "neg", "pow", "relu",
             "sigmoid", "tanh", "exp", "abs", "sqrt", "rsqrt", "clamp", "clamp_min",
             "clamp_max", "square", "log", "sin", "cos", "contiguous", "float", "double",
             "half", "detach", "clone", "masked_fill", "zero_", "sign",
             "add_", "mul_", "sub_", "div_", "relu_", "sigmoid_", "tanh_", "new_zeros_like"])


class CastRule:
    """x.to(...), x.type_as(y): the data is x; a tensor argument only lends dtype/device."""

    def couple(self, ctx):
        x = ctx.node.args[0]
        for a, o in zip(ctx.axes(x), ctx.axes()):
            ctx.same(a, o)
        for other in ctx.tensor_inputs():
            if other is not x:
                ctx.touch(*ctx.axes(other))


RULES.add(CastRule(), methods=["to", "type_as", "type"])


class PReLURule:
    def couple(self, ctx):
        m = ctx.module
        if m.num_parameters == 1:
            return ELEMENTWISE.couple(ctx)
        x = ctx.node.args[0]
        channel = ctx.module_axis("weight", m.num_parameters)
        ctx.same(ctx.axis(x, 1), channel)
        for d, (a, o) in enumerate(zip(ctx.axes(x), ctx.axes())):
            ctx.same(a, o)

    def slim_module(self, m, s, qualname):
        kept = s.kept_module(qualname, "weight")
        if not _pruned(kept, m.num_parameters):
            return None
        m.weight = _param(m.weight, kept)
        m.num_parameters = len(kept)
        return m


RULES.add(PReLURule(), modules=[nn.PReLU])


class GetAttr:
    """A parameter or buffer read by the graph: its axes are the attribute's own."""

    def couple(self, ctx):
        node = ctx.node
        owner = node.target.rsplit(".", 1)[0] if "." in node.target else ""
        called = {n.target for n in node.graph.nodes if n.op == "call_module"}
        inside_called = any(owner == c or owner.startswith(c + ".") for c in called)
        for d, axis in enumerate(ctx.axes()):
            if axis is None:
                continue
            if inside_called:
                ctx.freeze(axis, "parameter of a called module is also read directly")
            else:
                ctx.same(axis, ctx.attr_axis(node.target, d, axis.size))


GET_ATTR = GetAttr()


# -- layers with weights -----------------------------------------------------------------
class ConvRule:
    """Conv1d/2d and ConvTranspose1d/2d; groups == 1, depthwise (with multiplier) and general
    grouped convolutions (whole conv groups are pruned)."""

    def couple(self, ctx):
        m = ctx.module
        x = ctx.node.args[0]
        c_in, c_out, groups = m.in_channels, m.out_channels, m.groups
        m_in, m_out = ctx.module_axis("in", c_in), ctx.module_axis("out", c_out)
        ctx.same(ctx.axis(x, 1), m_in)
        ctx.same(ctx.axis(None, 1), m_out)
        ctx.same(ctx.axis(x, 0), ctx.axis(None, 0))
        for d in range(2, len(ctx.shape())):
            ctx.freeze(ctx.axis(x, d), "a convolution slides along this axis")
            ctx.freeze(ctx.axis(None, d), "a convolution slides along this axis")
        if groups == 1:
            ctx.cost((1.0, [m_in, m_out]))
            return
        per_in, per_out = c_in // groups, c_out // groups
        for g in range(groups):
            ins, outs = np.arange(g * per_in, (g + 1) * per_in), np.arange(g * per_out, (g + 1) * per_out)
            if m_in is not None and m_out is not None:
                ctx.link(m_in, np.repeat(ins[:1], per_out), m_out, outs)
                ctx.unite(m_in, ins)
            elif m_out is not None:
                ctx.unite(m_out, outs)
        ctx.cost((1.0, [m_out]))

    def slim_module(self, m, s, qualname):
        k_in, k_out = s.kept_module(qualname, "in"), s.kept_module(qualname, "out")
        if not (_pruned(k_in, m.in_channels) or _pruned(k_out, m.out_channels)):
            return None
        k_in = np.arange(m.in_channels) if k_in is None else k_in
        k_out = np.arange(m.out_channels) if k_out is None else k_out
        transposed = isinstance(m, nn.modules.conv._ConvTransposeNd)
        if m.groups == 1:
            rows, cols = (k_in, k_out) if transposed else (k_out, k_in)
            m.weight = _param(m.weight, rows, cols)
        else:
            per_out = m.out_channels // m.groups
            m.groups = len(np.unique(k_out // per_out))
            m.weight = _param(m.weight, k_in if transposed else k_out)
        if m.bias is not None:
            m.bias = _param(m.bias, k_out)
        m.in_channels, m.out_channels = len(k_in), len(k_out)
        return m


RULES.add(ConvRule(), modules=[nn.Conv1d, nn.Conv2d, nn.ConvTranspose1d, nn.ConvTranspose2d])


class LinearRule:
    def couple(self, ctx):
        m = ctx.module
        x = ctx.node.args[0]
        m_in, m_out = ctx.module_axis("in", m.in_features), ctx.module_axis("out", m.out_features)
        ctx.same(ctx.axis(x, -1), m_in)
        ctx.same(ctx.axis(None, -1), m_out)
        for a, o in list(zip(ctx.axes(x), ctx.axes()))[:-1]:
            ctx.same(a, o)
        ctx.cost((1.0, [m_in, m_out]))

    def slim_module(self, m, s, qualname):
        k_in, k_out = s.kept_module(qualname, "in"), s.kept_module(qualname, "out")
        if not (_pruned(k_in, m.in_features) or _pruned(k_out, m.out_features)):
            return None
        m.weight = _param(m.weight, k_out, k_in)
        if m.bias is not None:
            m.bias = _param(m.bias, k_out)
        m.in_features = m.weight.shape[1]
        m.out_features = m.weight.shape[0]
        return m


RULES.add(LinearRule(), modules=[nn.Linear])


# -- norms ----------------------------------------------------------------------------------
class BatchNormRule:
    def couple(self, ctx):
        m = ctx.module
        x = ctx.node.args[0]
        ctx.same(ctx.axis(x, 1), ctx.module_axis("channels", m.num_features))
        for a, o in zip(ctx.axes(x), ctx.axes()):
            ctx.same(a, o)  # per-channel statistics: every other axis maps through

    def slim_module(self, m, s, qualname):
        kept = s.kept_module(qualname, "channels")
        if not _pruned(kept, m.num_features):
            return None
        idx = torch.as_tensor(kept, dtype=torch.long)
        if m.affine:
            m.weight, m.bias = _param(m.weight, kept), _param(m.bias, kept)
        if m.track_running_stats:
            m.running_mean = m.running_mean[idx].clone()
            m.running_var = m.running_var[idx].clone()
        m.num_features = len(kept)
        return m


RULES.add(BatchNormRule(), modules=[nn.BatchNorm1d, nn.BatchNorm2d])


class GroupNormRule:
    """GroupNorm(G, C): G == C is per channel; 1 < G < C prunes whole groups; G == 1 (gLN) has
    statistics over every channel, so the gated model counts kept channels only."""

    def couple(self, ctx):
        m = ctx.module
        x = ctx.node.args[0]
        c, groups = m.num_channels, m.num_groups
        channels = ctx.module_axis("channels", c)
        ctx.same(ctx.axis(x, 1), channels)
        ctx.same(ctx.axis(x, 1), ctx.axis(None, 1))
        ctx.same(ctx.axis(x, 0), ctx.axis(None, 0))
        for d in range(2, len(ctx.shape())):
            if groups == c:
                ctx.same(ctx.axis(x, d), ctx.axis(None, d))
            else:
                ctx.freeze(ctx.axis(x, d), "group norm statistics span this axis")
                ctx.freeze(ctx.axis(None, d), "group norm statistics span this axis")
        if 1 < groups < c and channels is not None:
            per = c // groups
            for g in range(groups):
                ctx.unite(channels, np.arange(g * per, (g + 1) * per))

    def gated(self, g, node):
        m = g.module(node.target)
        mask = g.value_mask(node.args[0], 1)
        if mask is None or m.num_groups == m.num_channels:
            return None
        return g.call_function(runtime.masked_group_norm, (
            g.arg(node.args[0]), m.num_groups, g.get_attr(f"{node.target}.weight")
            if m.affine else None, g.get_attr(f"{node.target}.bias") if m.affine else None,
            m.eps, mask))

    def slim_module(self, m, s, qualname):
        kept = s.kept_module(qualname, "channels")
        if not _pruned(kept, m.num_channels):
            return None
        if m.num_groups not in (1, m.num_channels):
            m.num_groups = len(kept) // (m.num_channels // m.num_groups)
        elif m.num_groups == m.num_channels:
            m.num_groups = len(kept)
        if m.affine:
            m.weight, m.bias = _param(m.weight, kept), _param(m.bias, kept)
        m.num_channels = len(kept)
        return m


RULES.add(GroupNormRule(), modules=[nn.GroupNorm])


class LayerNormRule:
    """LayerNorm over the last k dims (a channel-wise LayerNorm after a transpose is cLN)."""

    def couple(self, ctx):
        m = ctx.module
        x = ctx.node.args[0]
        k = len(m.normalized_shape)
        n = len(ctx.shape())
        for d, (a, o) in enumerate(zip(ctx.axes(x), ctx.axes())):
            ctx.same(a, o)
            if d >= n - k:
                i = d - (n - k)
                if m.weight is not None:
                    ctx.same(a, ctx.module_axis(f"dim{i}", m.normalized_shape[i]))
                elif m.bias is not None:
                    ctx.same(a, ctx.module_axis(f"dim{i}", m.normalized_shape[i]))

    def gated(self, g, node):
        m = g.module(node.target)
        k = len(m.normalized_shape)
        n = len(g.shape(node.args[0]))
        masks = [g.value_mask(node.args[0], d) for d in range(n - k, n)]
        if all(mask is None for mask in masks):
            return None
        weight = g.get_attr(f"{node.target}.weight") if m.weight is not None else None
        bias = g.get_attr(f"{node.target}.bias") if m.bias is not None else None
        return g.call_function(runtime.masked_layer_norm,
                               (g.arg(node.args[0]), k, weight, bias, m.eps, masks))

    def slim_module(self, m, s, qualname):
        kept = [s.kept_module(qualname, f"dim{i}") for i in range(len(m.normalized_shape))]
        if not any(_pruned(k, size) for k, size in zip(kept, m.normalized_shape)):
            return None
        if m.weight is not None:
            m.weight = _param(m.weight, *kept)
        if m.bias is not None:
            m.bias = _param(m.bias, *kept)
        m.normalized_shape = tuple(len(k) if k is not None else size
                                   for k, size in zip(kept, m.normalized_shape))
        return m


RULES.add(LayerNormRule(), modules=[nn.LayerNorm])


# -- recurrent layers -----------------------------------------------------------------------
class RecurrentRule:
    """nn.LSTM / nn.GRU: one group of hidden units across every layer and direction (the slim
    model is again an nn.LSTM/GRU, whose hidden size is one number)."""

    def couple(self, ctx):
        m: nn.RNNBase = ctx.module
        node = ctx.node
        x = node.args[0]
        if len(node.args) > 1 or node.kwargs or m.proj_size > 0:
            return ctx.freeze_all("recurrent layer with an initial state or projections")
        d = 2 if m.bidirectional else 1
        h = m.hidden_size
        m_in = ctx.module_axis("input", m.input_size)
        hidden = ctx.module_axis("hidden", h)
        ctx.same(ctx.axis(x, 2), m_in)
        out = ctx.axis(None, 2, (0,))
        if out is not None and hidden is not None:
            ctx.link(out, np.arange(d * h), hidden, np.tile(np.arange(h), d))
        step, batch = (1, 0) if m.batch_first else (0, 1)
        ctx.same(ctx.axis(x, batch), ctx.axis(None, batch, (0,)))
        for t in (ctx.axis(x, step), ctx.axis(None, step, (0,))):
            ctx.freeze(t, "the recurrence runs along this axis")
        for path in ctx.tensor_paths(node)[1:]:  # final states [layers*dirs, batch, hidden]
            state = ctx.axis(None, 2, path)
            if state is not None and hidden is not None:
                ctx.link(state, np.arange(h), hidden, np.arange(h))
            ctx.freeze(ctx.axis(None, 0, path), "layers x directions axis of a final state")
            ctx.same(ctx.axis(x, batch), ctx.axis(None, 1, path))
        gates = 4 if isinstance(m, nn.LSTM) else 3
        steps = ctx.shape(x)[step]
        batch_size = ctx.shape(x)[batch]
        unit = gates * h * steps * batch_size * d
        terms = [(unit * m.input_size, [m_in, hidden])]
        terms += [(unit * d * h, [hidden, hidden])] * (m.num_layers - 1)
        terms += [(unit * h, [hidden, hidden])] * m.num_layers
        ctx.cost(*terms, absolute=True)

    def gated(self, g, node):
        mask = g.module_mask(node.target, "hidden")
        if mask is None:
            return None
        target = g.add_module(runtime.GatedRNN(g.module(node.target)), node.target)
        return g.call_module(target, (g.arg(node.args[0]), mask))

    def slim_module(self, m, s, qualname):
        k_in, k_h = s.kept_module(qualname, "input"), s.kept_module(qualname, "hidden")
        if not (_pruned(k_in, m.input_size) or _pruned(k_h, m.hidden_size)):
            return None
        h = m.hidden_size
        k_in = np.arange(m.input_size) if k_in is None else k_in
        k_h = np.arange(h) if k_h is None else k_h
        gates = 4 if isinstance(m, nn.LSTM) else 3
        d = 2 if m.bidirectional else 1
        rows = np.concatenate([b * h + k_h for b in range(gates)])
        deeper_cols = np.concatenate([j * h + k_h for j in range(d)])
        new = type(m)(len(k_in), len(k_h), num_layers=m.num_layers, bias=m.bias,
                      batch_first=m.batch_first, dropout=m.dropout, bidirectional=m.bidirectional)
        new = new.to(device=m.weight_ih_l0.device, dtype=m.weight_ih_l0.dtype)
        for name in m._flat_weights_names:
            w = getattr(m, name)
            layer = int(name.split("_l")[1].split("_")[0])
            if name.startswith("weight_ih"):
                p = _param(w, rows, k_in if layer == 0 else deeper_cols)
            elif name.startswith("weight_hh"):
                p = _param(w, rows, k_h)
            else:
                p = _param(w, rows)
            setattr(new, name, p)
        new.train(m.training)
        return new


RULES.add(RecurrentRule(), modules=[nn.LSTM, nn.GRU])


class AttentionRule:
    """nn.MultiheadAttention: whole heads (q/k/v rows and out_proj columns), and its input and
    output embedding axes, which it shares with the residual stream. The slim model uses
    ``runtime.SlimMultiheadAttention`` (nn.MultiheadAttention needs in == out == inner width)."""

    def _inputs(self, node):
        return [arg(node, i, name) for i, name in enumerate(("query", "key", "value"))]

    def couple(self, ctx):
        m: nn.MultiheadAttention = ctx.module
        node = ctx.node
        q, k, v = self._inputs(node)
        for name in ("key_padding_mask", "attn_mask"):
            if arg(node, {"key_padding_mask": 3, "attn_mask": 5}[name], name) is not None:
                return ctx.freeze_all(f"attention with a {name}")
        e, h, hd = m.embed_dim, m.num_heads, m.head_dim
        heads = ctx.module_axis("heads", e)
        for i in range(h):
            ctx.unite(heads, np.arange(i * hd, (i + 1) * hd))
        if m._qkv_same_embed_dim:
            ins = [ctx.module_axis("in", e)] * 3
        else:
            ins = [ctx.module_axis("in_q", e), ctx.module_axis("in_k", m.kdim),
                   ctx.module_axis("in_v", m.vdim)]
        out = ctx.module_axis("out", e)
        for t, m_in in zip((q, k, v), ins):
            ctx.same(ctx.axis(t, 2), m_in)
        ctx.same(ctx.axis(None, 2, (0,)), out)
        seq, batch = (1, 0) if m.batch_first else (0, 1)
        for t in (q, k, v):
            ctx.same(ctx.axis(t, batch), ctx.axis(None, batch, (0,)))
        ctx.same(ctx.axis(q, seq), ctx.axis(None, seq, (0,)))
        for t in (k, v):
            ctx.freeze(ctx.axis(t, seq), "attention mixes along this axis")
        weights_used = any(u.target is operator.getitem and u.args[1] == 1 for u in node.users)
        if weights_used:
            ctx.freeze(heads, "the attention weights (averaged over heads) are used")
        for path in ctx.tensor_paths(node)[1:]:
            for a in ctx.axes(None, path):
                ctx.freeze(a, "attention weights")
        lq, lk = ctx.shape(q)[seq], ctx.shape(k)[seq]
        b = ctx.shape(q)[batch]
        ctx.cost((b * lq * e * e, [ins[0], heads]), (b * lk * m.kdim * e, [ins[1], heads]),
                 (b * lk * m.vdim * e, [ins[2], heads]), (2 * b * lq * lk * e, [heads]),
                 (b * lq * e * e, [heads, out]), absolute=True)

    def gated(self, g, node):
        mask = g.module_mask(node.target, "heads")
        q, k, v = self._inputs(node)
        target = g.add_module(runtime.GatedAttention(g.module(node.target)), node.target)
        return g.call_module(target, (g.arg(q), g.arg(k), g.arg(v), mask))

    def slim_module(self, m, s, qualname):
        names = ["in", "in", "in"] if m._qkv_same_embed_dim else ["in_q", "in_k", "in_v"]
        sizes = [m.embed_dim, m.kdim, m.vdim]
        kept_in = [s.kept_module(qualname, n) for n in names]
        kept_in = [np.arange(n) if k is None else k for k, n in zip(kept_in, sizes)]
        heads = s.kept_module(qualname, "heads")
        heads = np.arange(m.embed_dim) if heads is None else heads
        out = s.kept_module(qualname, "out")
        out = np.arange(m.embed_dim) if out is None else out
        if all(len(k) == n for k, n in zip(kept_in, sizes)) and len(heads) == m.embed_dim \
                and len(out) == m.embed_dim:
            return None
        wq, bq, wk, bk, wv, bv, wo, bo = runtime._mha_weights(m)
        new = runtime.SlimMultiheadAttention(
            len(kept_in[0]), len(kept_in[1]), len(kept_in[2]), len(heads) // m.head_dim,
            m.head_dim, len(out), bias=bq is not None, batch_first=m.batch_first)
        new = new.to(device=wq.device, dtype=wq.dtype)
        for proj, w, b, cols in ((new.q_proj, wq, bq, kept_in[0]), (new.k_proj, wk, bk, kept_in[1]),
                                 (new.v_proj, wv, bv, kept_in[2])):
            proj.weight = _param(w, heads, cols)
            if b is not None:
                proj.bias = _param(b, heads)
        new.out_proj.weight = _param(wo, out, heads)
        if bo is not None:
            new.out_proj.bias = _param(bo, out)
        new.train(m.training)
        return new


RULES.add(AttentionRule(), modules=[nn.MultiheadAttention])


# -- layout ---------------------------------------------------------------------------------
class CatRule:
    def couple(self, ctx):
        node = ctx.node
        tensors = [t for t in arg(node, 0, "tensors") if isinstance(t, fx.Node)]
        out_shape = ctx.shape()
        dim = arg(node, 1, "dim", 0) % len(out_shape)
        out = ctx.axis(None, dim)
        offset = 0
        broken = False
        for t in tensors:
            shape = ctx.shape(t)
            if shape is None or len(shape) != len(out_shape):
                continue  # an empty operand (numel 0, any rank) adds nothing
            n = shape[dim]
            a = ctx.axis(t, dim)
            if out is not None and a is not None:
                ctx.link(a, np.arange(n), out, offset + np.arange(n))
            elif out is not None and n > 0:
                broken = True
            else:
                ctx.freeze(a, "concatenated along a dynamic axis")
            for d in range(len(out_shape)):
                if d != dim:
                    ctx.same(ctx.axis(t, d), ctx.axis(None, d))
            offset += n
        if broken:
            ctx.freeze(out, "an operand of size 1 is concatenated along this axis")


RULES.add(CatRule(), functions=[torch.cat, torch.concat])


class SplitRule:
    """split/chunk along an axis: piece i holds a slice at an offset. The slim model splits
    with the kept sizes (chunk becomes split, since halves may keep different counts)."""

    def _pieces(self, ctx):
        return [p for p in ctx.tensor_paths(ctx.node) if len(p) == 1]

    def couple(self, ctx):
        node = ctx.node
        x = node.args[0]
        dim = self._dim(node) % len(ctx.shape(x))
        source = ctx.axis(x, dim)
        offset = 0
        for path in self._pieces(ctx):
            n = ctx.shape(None, path)[dim]
            piece = ctx.axis(None, dim, path)
            if source is not None and piece is not None:
                ctx.link(source, offset + np.arange(n), piece, np.arange(n))
            elif source is not None:
                ctx.freeze(source, "split into pieces of size 1")
            for d in range(len(ctx.shape(x))):
                if d != dim:
                    ctx.same(ctx.axis(x, d), ctx.axis(None, d, path))
            offset += n

    def _dim(self, node):
        return arg(node, 2, "dim", 0)

    def rewrite(self, node, s):
        x = node.args[0]
        dim = self._dim(node) % len(s.shape(x))
        kept = s.kept_value(x, dim)
        if not _pruned(kept, s.shape(x)[dim]):
            return
        sizes, offset = [], 0
        for path in sorted(p for p in s.tensor_paths(node) if len(p) == 1):
            n = s.shape(node, path)[dim]
            sizes.append(int(((kept >= offset) & (kept < offset + n)).sum()))
            offset += n
        if node.op == "call_method":
            node.target = "split"
        else:
            node.target = torch.split
        node.args = (x, sizes)
        node.kwargs = {"dim": dim}


RULES.add(SplitRule(), functions=[torch.split, torch.chunk], methods=["split", "chunk"])


class StackRule:
    def couple(self, ctx):
        node = ctx.node
        tensors = [t for t in arg(node, 0, "tensors") if isinstance(t, fx.Node)]
        n = len(ctx.shape())
        dim = arg(node, 1, "dim", 0) % n
        ctx.freeze(ctx.axis(None, dim), "stacked axis")
        for t in tensors:
            for d, a in enumerate(ctx.axes(t)):
                ctx.same(a, ctx.axis(None, d if d < dim else d + 1))


RULES.add(StackRule(), functions=[torch.stack])


class PermuteRule:
    def couple(self, ctx):
        node = ctx.node
        x = node.args[0]
        n = len(ctx.shape(x))
        perm = self.permutation(node, n)
        for d_out, d_in in enumerate(perm):
            ctx.same(ctx.axis(x, d_in), ctx.axis(None, d_out))

    @staticmethod
    def permutation(node, n):
        if node.target in ("transpose", torch.transpose, "swapaxes"):
            a, b = arg(node, 1, "dim0") % n, arg(node, 2, "dim1") % n
            perm = list(range(n))
            perm[a], perm[b] = perm[b], perm[a]
            return perm
        if node.target in ("t",):
            return [1, 0][:n]
        dims = node.args[1:] if node.target == "permute" else (arg(node, 1, "dims"),)
        if len(dims) == 1 and isinstance(dims[0], (tuple, list)):
            dims = dims[0]
        return [d % n for d in dims]


RULES.add(PermuteRule(), functions=[torch.transpose, torch.permute],
          methods=["transpose", "permute", "t", "swapaxes"])


def reshape_groups(in_shape, out_shape):
    """Pair runs of input dims with runs of output dims of equal product (size-1 dims left
    out). Returns a list of (input dims, output dims), or None when the shapes do not pair."""
    ins = [d for d, s in enumerate(in_shape) if s != 1]
    outs = [d for d, s in enumerate(out_shape) if s != 1]
    groups, i, j = [], 0, 0
    while i < len(ins) and j < len(outs):
        gi, go = [ins[i]], [outs[j]]
        pi, po = in_shape[ins[i]], out_shape[outs[j]]
        i, j = i + 1, j + 1
        while pi != po:
            if pi < po and i < len(ins):
                gi.append(ins[i])
                pi *= in_shape[ins[i]]
                i += 1
            elif po < pi and j < len(outs):
                go.append(outs[j])
                po *= out_shape[outs[j]]
                j += 1
            else:
                return None
        groups.append((gi, go))
    if i != len(ins) or j != len(outs):
        return None
    return groups


class ReshapeRule:
    """view/reshape/flatten/unflatten/squeeze/unsqueeze. A channel axis split into factors
    (n_src x C, heads x head_dim) keeps its largest factor prunable and freezes the others; an
    axis merged with a batch or time axis is frozen. Literal sizes are fixed by the slim pass."""

    def couple(self, ctx):
        node = ctx.node
        x = node.args[0]
        (ref_in, probe_in), (ref_out, probe_out) = _shapes(x), _shapes(node)
        groups = reshape_groups(ref_in, ref_out)
        if groups is None or reshape_groups(probe_in, probe_out) is None:
            return ctx.freeze_all("reshape mixes axes in a way sepfx cannot follow")
        for dims_in, dims_out in groups:
            dynamic = any(ref_in[d] != probe_in[d] for d in dims_in) or \
                any(ref_out[d] != probe_out[d] for d in dims_out)
            if dynamic and self._inner_static(ctx, x, dims_in, dims_out, ref_in, probe_in,
                                              ref_out, probe_out):
                continue
            if dynamic:
                for d in dims_in:
                    ctx.freeze(ctx.axis(x, d), "merged with or split from a batch/time axis") \
                        if len(dims_in) + len(dims_out) > 2 else ctx.touch(ctx.axis(x, d))
                for d in dims_out:
                    ctx.freeze(ctx.axis(None, d), "merged with or split from a batch/time axis") \
                        if len(dims_in) + len(dims_out) > 2 else ctx.touch(ctx.axis(None, d))
            elif len(dims_in) == 1 and len(dims_out) == 1:
                ctx.same(ctx.axis(x, dims_in[0]), ctx.axis(None, dims_out[0]))
            elif len(dims_in) == 1 or len(dims_out) == 1:
                self._factor(ctx, x, dims_in, dims_out, ref_in, ref_out)
            else:
                for d in dims_in:
                    ctx.freeze(ctx.axis(x, d), "reshape regroups several axes")
                for d in dims_out:
                    ctx.freeze(ctx.axis(None, d), "reshape regroups several axes")
        self._shape_args(ctx, ref_out)

    @staticmethod
    def _inner_static(ctx, x, dims_in, dims_out, ref_in, probe_in, ref_out, probe_out) -> bool:
        """[B, r*C] <-> [B*r, C] (a mask conv's n_src x C channels folded into the batch, or
        unfolded back): when the one static axis on each side is the innermost of the group,
        channel c on the narrow side is channel c of every block of the wide side."""
        static_in = [d for d in dims_in if ref_in[d] == probe_in[d]]
        static_out = [d for d in dims_out if ref_out[d] == probe_out[d]]
        if len(static_in) != 1 or len(static_out) != 1 or static_in[0] != dims_in[-1] \
                or static_out[0] != dims_out[-1]:
            return False
        a, o = ctx.axis(x, static_in[0]), ctx.axis(None, static_out[0])
        if a is None or o is None or (a.size % o.size and o.size % a.size):
            return False
        if a.size >= o.size:
            ctx.link(a, np.arange(a.size), o, np.arange(a.size) % o.size)
        else:
            ctx.link(a, np.arange(o.size) % a.size, o, np.arange(o.size))
        return True

    @staticmethod
    def _factor(ctx, x, dims_in, dims_out, ref_in, ref_out):
        split = len(dims_in) == 1
        whole = ctx.axis(x, dims_in[0]) if split else ctx.axis(None, dims_out[0])
        factors = dims_out if split else dims_in
        sizes = [(ref_out if split else ref_in)[d] for d in factors]
        keep = max(range(len(factors)), key=lambda i: (sizes[i], i))
        coords = np.unravel_index(np.arange(int(np.prod(sizes))), sizes)
        for i, d in enumerate(factors):
            axis = ctx.axis(None, d) if split else ctx.axis(x, d)
            if i == keep:
                ctx.link(whole, np.arange(whole.size), axis, coords[i])
            else:
                ctx.freeze(axis, "another factor of a split channel axis is the prunable one")

    @staticmethod
    def _shape_args(ctx, ref_out):
        """A size read from another tensor passed as a target size ties that axis here."""
        sizes = _size_args(ctx.node)
        if sizes is None:
            return
        for j, s in enumerate(sizes):
            read = ctx.size_read(s)
            if isinstance(read, tuple) and j < len(ref_out):
                a = ctx.b.axes[read]
                ctx.same(a, ctx.axis(None, j))

    def rewrite(self, node, s):
        if node.target in ("unflatten", torch.unflatten):
            return self._rewrite_unflatten(node, s)
        sizes = _size_args(node)
        if sizes is None:
            return
        out = s.shape(node)
        new = list(sizes)
        changed = False
        for j, size in enumerate(sizes):
            if isinstance(size, int) and size == out[j] and size > 1:
                kept = s.kept_value(node, j)
                if _pruned(kept, size):
                    new[j] = len(kept)
                    changed = True
        if changed:
            node.args = (node.args[0], *new) if node.target in ("view", "reshape") \
                else (node.args[0], tuple(new))


    @staticmethod
    def _rewrite_unflatten(node, s):
        """x.unflatten(dim, sizes): literal sizes of pruned output dims become kept counts."""
        dim, sizes = arg(node, 1, "dim"), arg(node, 2, "sizes")
        out = s.shape(node)
        if not isinstance(sizes, (tuple, list)) or out is None:
            return
        dim = dim % len(s.shape(node.args[0]))
        new = list(sizes)
        for i, size in enumerate(sizes):
            kept = s.kept_value(node, dim + i)
            if isinstance(size, int) and size == out[dim + i] and _pruned(kept, size):
                new[i] = len(kept)
        if new != list(sizes):
            set_arg(node, 2, "sizes", tuple(new))


def _size_args(node):
    """The target sizes of view/reshape, as a list, or None."""
    if node.target in ("unflatten", torch.unflatten):
        return None
    if node.target in ("view", "reshape") or node.target is torch.reshape:
        rest = node.args[1:]
        if len(rest) == 1 and isinstance(rest[0], (tuple, list)):
            return list(rest[0])
        return list(rest) if rest and all(not isinstance(r, (tuple, list)) for r in rest) else None
    return None


def _shapes(node):
    return tensor_shapes(node)


RULES.add(ReshapeRule(), functions=[torch.reshape, torch.flatten, torch.squeeze, torch.unsqueeze,
                                    torch.unflatten],
          methods=["view", "reshape", "flatten", "squeeze", "unsqueeze", "unflatten"])


class SizeRule:
    """x.shape / x.size() / x.size(d) / x.dim(): reading sizes couples nothing, but the value
    carries the sizes of static axes, so whoever uses it must account for them."""

    def couple(self, ctx):
        node = ctx.node
        x = node.args[0]
        ctx.touch(*ctx.axes(x))
        if node.target is getattr:
            attr = node.args[1]
            if attr == "shape":
                ctx.read_size({d: a.key for d, a in enumerate(ctx.axes(x)) if a is not None})
            elif attr not in ("ndim", "dtype", "device", "is_cuda", "requires_grad"):
                ctx.freeze_all(f"tensor attribute .{attr}")
            return
        if node.target == "size":
            d = arg(node, 1, "dim")
            if d is None:
                ctx.read_size({i: a.key for i, a in enumerate(ctx.axes(x)) if a is not None})
            else:
                a = ctx.axis(x, d)
                ctx.read_size(a.key if a is not None else None)


RULES.add(SizeRule(), functions=[getattr], methods=["size", "dim"])


class ShapeTensorRule:
    """torch.tensor(x.shape): a tensor holding sizes. It carries the sizes like the shape does,
    so indexing it reads a size; any other use of a static size in it freezes that axis."""

    def couple(self, ctx):
        source = ctx.node.args[0] if ctx.node.args else None
        read = ctx.size_read(source)
        if not isinstance(read, dict):
            return ctx.freeze_all("tensor made from Python values")
        ctx.touch(*[ctx.b.axes[k] for k in read.values()])
        ctx.touch(*ctx.axes())
        ctx.read_size(read)


RULES.add(ShapeTensorRule(), functions=[torch.tensor, torch.as_tensor, runtime.shape_tensor,
                                        runtime.shape_as_tensor])


class GetItemRule:
    """Indexing a tuple (a layer's several outputs), a shape, or a tensor (literal slices)."""

    def couple(self, ctx):
        node = ctx.node
        source, index = node.args
        if source.name in ctx.b.size_reads:
            read = ctx.b.size_reads[source.name]
            ctx.touch(*[ctx.b.axes[k] for k in read.values()]) if isinstance(read, dict) else None
            if isinstance(index, int) and isinstance(read, dict):
                shape = ctx_shape_len(source) or (ctx.shape(source) or [None])[0]
                ctx.read_size(read.get(index % shape) if shape else None)
            elif isinstance(read, dict):
                for k in read.values():
                    ctx.b.freeze(k, f"{ctx.where()}: sliced shape")
            return
        if ctx.tensor_paths(source) and ctx.tensor_paths(source) != [()]:
            for path in ctx.tensor_paths(node):
                for a, b in zip(ctx.axes(source, (index,) + path), ctx.axes(None, path)):
                    ctx.same(a, b)
            # the source's other outputs are not this node's business
            for path in ctx.tensor_paths(source):
                if path[:1] != (index,):
                    ctx.touch(*ctx.axes(source, path))
            return
        self._tensor_index(ctx, source, index)

    def _tensor_index(self, ctx, x, index):
        items = _index_items(index, len(ctx.shape(x)))
        if items is None:
            return ctx.freeze_all("indexing with tensors or unsupported items")
        d_out = 0
        for d_in, item in items:
            if item is None:
                d_out += 1
                continue
            a = ctx.axis(x, d_in)
            if isinstance(item, int):
                ctx.freeze(a, "indexed by a constant")
                continue
            o = ctx.axis(None, d_out)
            d_out += 1
            if item == slice(None):
                ctx.same(a, o)
            elif a is None:
                ctx.touch(o) if o is None else ctx.freeze(o, "slice of a dynamic axis")
            elif _literal_slice(item):
                idx = np.arange(a.size)[item]
                if o is not None:
                    ctx.link(a, idx, o, np.arange(len(idx)))
                if item.step not in (None, 1):
                    ctx.freeze(a, "strided slice of a channel axis")
                else:
                    ctx.touch(a)
            else:
                ctx.freeze(a, "sliced by a length that varies with the input")
                ctx.freeze(o, "sliced by a length that varies with the input")

    def rewrite(self, node, s):
        source, index = node.args
        if not isinstance(source, fx.Node) or s.shape(source) is None \
                or s.tensor_paths(source) != [()]:
            return
        items = _index_items(index, len(s.shape(source)))
        if items is None:
            return
        new_items = []
        changed = False
        for d_in, item in items:
            if isinstance(item, slice) and item != slice(None) and _literal_slice(item):
                kept = s.kept_value(source, d_in)
                if _pruned(kept, s.shape(source)[d_in]):
                    start, stop, _ = item.indices(s.shape(source)[d_in])
                    item = slice(int((kept < start).sum()), int((kept < stop).sum()))
                    changed = True
            new_items.append(item)
        if changed:
            node.args = (source, tuple(new_items))


def ctx_shape_len(x):
    values = scalar_values(x)
    return len(values[0]) if values and isinstance(values[0], tuple) else None


def _literal_slice(item: slice) -> bool:
    return all(v is None or isinstance(v, int) for v in (item.start, item.stop, item.step))


def _index_items(index, ndim):
    """[(input dim or None, item)] for a tensor index, Ellipsis expanded; None if unsupported."""
    items = list(index) if isinstance(index, tuple) else [index]
    if any(isinstance(i, fx.Node) or isinstance(i, (list, torch.Tensor)) for i in items):
        return None
    used = sum(1 for i in items if i is not None and i is not Ellipsis)
    out, d = [], 0
    for item in items:
        if item is Ellipsis:
            for _ in range(ndim - used):
                out.append((d, slice(None)))
                d += 1
        elif item is None:
            out.append((None, None))
        else:
            if not isinstance(item, (int, slice)):
                return None
            out.append((d, item))
            d += 1
    while d < ndim:
        out.append((d, slice(None)))
        d += 1
    return out


RULES.add(GetItemRule(), functions=[operator.getitem])


# -- reductions and the like -----------------------------------------------------------------
def _reduce_dims(node, ndim):
    dims = arg(node, 1, "dim")
    if dims is None:
        return list(range(ndim))
    if isinstance(dims, int):
        dims = [dims]
    return [d % ndim for d in dims]


class ReduceRule:
    """sum/mean/var/std (and max-like, which freeze what they reduce). A mean or variance over
    a prunable axis counts only kept channels in the gated model."""

    def __init__(self, kind):
        self.kind = kind

    def couple(self, ctx):
        node = ctx.node
        x = node.args[0]
        n = len(ctx.shape(x))
        dims, keepdim, _ = _reduce_options(node, self.kind, n)
        d_out = 0
        for d in range(n):
            a = ctx.axis(x, d)
            if d in dims:
                if self.kind == "max":
                    ctx.freeze(a, "a maximum over this axis changes when channels are removed")
                else:
                    ctx.touch(a)
                d_out += 1 if keepdim else 0
            else:
                ctx.same(a, ctx.axis(None, d_out))
                d_out += 1

    def gated(self, g, node):
        if self.kind not in ("mean", "var", "std"):
            return None
        x = node.args[0]
        dims, keepdim, correction = _reduce_options(node, self.kind, len(g.shape(x)))
        masks = [g.value_mask(x, d) for d in dims]
        if all(m is None for m in masks):
            return None
        return g.call_function(runtime.masked_reduce,
                               (self.kind, g.arg(x), dims, keepdim, correction, masks, dims))


def _reduce_options(node, kind, ndim):
    """(reduced dims, keepdim, correction) of sum/mean/var/std/amax calls."""
    dims = _reduce_dims(node, ndim)
    positional = list(node.args[2:])
    correction = 0
    if kind in ("var", "std"):  # x.var(dim, unbiased, keepdim) or keyword forms
        unbiased = positional.pop(0) if positional and isinstance(positional[0], bool) else \
            node.kwargs.get("unbiased", True)
        correction = node.kwargs.get("correction", 1 if unbiased else 0)
    keepdim = positional[0] if positional else node.kwargs.get("keepdim", False)
    return dims, bool(keepdim), correction


RULES.add(ReduceRule("sum"), functions=[torch.sum], methods=["sum"])
RULES.add(ReduceRule("mean"), functions=[torch.mean], methods=["mean"])
RULES.add(ReduceRule("var"), functions=[torch.var], methods=["var"])
RULES.add(ReduceRule("std"), functions=[torch.std], methods=["std"])
RULES.add(ReduceRule("max"), functions=[torch.amax, torch.amin, torch.logsumexp],
          methods=["amax", "amin", "logsumexp"])


class SoftmaxRule:
    def couple(self, ctx):
        node = ctx.node
        x = node.args[0]
        if node.op == "call_module":
            dim = ctx.module.dim
        else:
            dim = arg(node, 1, "dim")
        n = len(ctx.shape(x))
        for d, (a, o) in enumerate(zip(ctx.axes(x), ctx.axes())):
            if d == dim % n:
                ctx.freeze(a, "softmax normalises over this axis")
                ctx.freeze(o, "softmax normalises over this axis")
            else:
                ctx.same(a, o)


RULES.add(SoftmaxRule(), modules=[nn.Softmax, nn.LogSoftmax],
          functions=[torch.softmax, F.softmax, F.log_softmax, torch.log_softmax],
          methods=["softmax", "log_softmax"])


class ChannelwiseRule:
    """Ops acting on each channel of [B, C, *spatial] independently (pooling, resampling,
    padding of the spatial axes): batch and channel axes map through; static spatial axes are
    frozen."""

    def couple(self, ctx):
        node = ctx.node
        x = node.args[0]
        for d, (a, o) in enumerate(zip(ctx.axes(x), ctx.axes())):
            if d < 2:
                ctx.same(a, o)
            else:
                ctx.freeze(a, "resampled or pooled along this axis")
                ctx.freeze(o, "resampled or pooled along this axis")


RULES.add(ChannelwiseRule(),
          modules=[nn.AvgPool1d, nn.MaxPool1d, nn.AdaptiveAvgPool1d, nn.AdaptiveMaxPool1d,
                   nn.Upsample, nn.AvgPool2d, nn.MaxPool2d],
          functions=[F.interpolate, F.adaptive_avg_pool1d, F.adaptive_max_pool1d,
                     F.avg_pool1d, F.max_pool1d, F.upsample])


class PadRule:
    """F.pad: unpadded axes map through; a padded static axis is frozen."""

    def couple(self, ctx):
        node = ctx.node
        x = node.args[0]
        pad = arg(node, 1, "pad")
        n = len(ctx.shape(x))
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


RULES.add(PadRule(), functions=[F.pad])


class MatmulRule:
    """a @ b with both operands at least 2-D: the contracted axes of a and b are one axis."""

    def couple(self, ctx):
        a_node, b_node = ctx.node.args[:2]
        sa, sb, so = ctx.shape(a_node), ctx.shape(b_node), ctx.shape()
        if sa is None or sb is None or len(sa) < 2 or len(sb) < 2:
            return ctx.freeze_all("matmul with a 1-D operand")
        n = len(so)
        for x, shape in ((a_node, sa), (b_node, sb)):
            offset = n - len(shape)
            for d in range(len(shape) - 2):
                a = ctx.axis(x, d)
                if a is not None:
                    ctx.same(a, ctx.axis(None, d + offset))
        rows, inner_a = ctx.axis(a_node, -2), ctx.axis(a_node, -1)
        inner_b, cols = ctx.axis(b_node, -2), ctx.axis(b_node, -1)
        ctx.same(rows, ctx.axis(None, -2))
        ctx.same(cols, ctx.axis(None, -1))
        ctx.same(inner_a, inner_b)
        ctx.cost((1.0, [rows, inner_a, cols]))


RULES.add(MatmulRule(), functions=[torch.matmul, operator.matmul, torch.bmm],
          methods=["matmul", "bmm"])



class OpaqueLeafRule:
    """A module with no rule (a custom module that could not be traced, or an unknown layer):
    its channel behaviour is not guessed. An axis is passed through only where a numerical
    check certifies that the module commutes with channel subsetting along it,
    f(x[:, S]) == f(x)[:, S], on the recorded input and a random one, for several S; every
    other axis is frozen with the reason."""

    trials = 3

    def couple(self, ctx):
        node = ctx.node
        inputs = node.meta.get("sepfx_leaf_inputs")
        tensors = [a for a in node.args if isinstance(a, fx.Node)]
        name = describe_op(node, ctx.b.modules)
        if inputs is None or len(tensors) != 1 or node.kwargs or ctx.shape() is None \
                or len(ctx.shape()) != len(ctx.shape(tensors[0])):
            return ctx.freeze_all(f"opaque {name}: not a one-tensor-in, one-tensor-out module")
        x_node = tensors[0]
        x = inputs[0][0]
        for d, (a, o) in enumerate(zip(ctx.axes(x_node), ctx.axes())):
            if a is None and o is None:
                continue
            if a is not None and o is not None and a.size == o.size \
                    and self._commutes(ctx.module, x, d):
                ctx.same(a, o)
            else:
                reason = f"opaque {name}: f(x[S]) != f(x)[S] along dim {d}"
                ctx.freeze(a, reason)
                ctx.freeze(o, reason)

    def _commutes(self, module, x, dim) -> bool:
        generator = torch.Generator().manual_seed(dim)
        n = x.shape[dim]
        try:
            with torch.no_grad():
                for trial in range(self.trials):
                    sample = x if trial == 0 else torch.randn(x.shape, generator=generator,
                                                              dtype=x.dtype)
                    subset = torch.randperm(n, generator=generator)[: max(1, n // 2)].sort().values
                    full = module(sample).index_select(dim, subset)
                    part = module(sample.index_select(dim, subset))
                    if part.shape != full.shape:
                        return False
                    scale = full.abs().max().clamp_min(1e-12)
                    if float((part - full).abs().max() / scale) > 1e-5:
                        return False
        except Exception:
            return False
        return True


OPAQUE_LEAF = OpaqueLeafRule()
