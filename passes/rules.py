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
from passes.values import GLUE, scalar_values, tensor_shapes


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
            # arithmetic on Python numbers: sizes read into it are frozen by the check, but a
            # shape concatenated with a tuple (``x.shape[:2] + (4,)``) still carries its sizes,
            # and a size times or over a literal may feed a reshape or a slice bound
            _scaled_size(ctx)
            return _concatenated_sizes(ctx)
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


def _concatenated_sizes(ctx) -> None:
    """``shape + (4,)`` or ``[2] + list(shape)``: the sizes read from the operands, at their new
    positions, are the sizes of the result."""
    node = ctx.node
    if node.target is not operator.add or len(node.args) != 2:
        return
    reads, offset = {}, 0
    for operand in node.args:
        read = ctx.size_read(operand)
        if isinstance(operand, (tuple, list)):
            if any(isinstance(v, fx.Node) for v in operand):
                return
            offset += len(operand)
            continue
        values = scalar_values(operand) if isinstance(operand, fx.Node) else None
        if not isinstance(read, dict) or values is None or not isinstance(values[0], tuple):
            return
        reads.update({offset + d: key for d, key in read.items()})
        offset += len(values[0])
    ctx.touch(*[ctx.b.axes[k] for k in reads.values() if k is not None])
    ctx.read_size(reads)


def _scaled_read(ctx, value):
    """(axis key, k) for ``C * k`` (or ``k * C``), C a size read from a static axis; else
    None."""
    if not (isinstance(value, fx.Node) and value.target is operator.mul and len(value.args) == 2):
        return None
    for a, b in (value.args, value.args[::-1]):
        read = ctx.size_read(a)
        if isinstance(read, tuple) and isinstance(b, int) and not isinstance(b, bool) and b > 0:
            return read, b
    return None


def _scaled_size(ctx) -> None:
    """``C * K`` or ``C // 2`` of a size read from a channel axis, used only as a target size of
    a reshape (``ReshapeRule`` couples C with the reshaped axis, whose slim size is then C' * K)
    or as a slice bound (which ``GetItemRule`` checks is a fraction of that very axis): the read
    is accounted for there. Any other use leaves it to be frozen."""
    node = ctx.node
    if node.target not in (operator.mul, operator.floordiv) or len(node.args) != 2:
        return
    reads = [ctx.size_read(a) for a in node.args]
    keys = [r for r in reads if isinstance(r, tuple)]
    literals = [a for a in node.args if isinstance(a, int) and not isinstance(a, bool)]
    if len(keys) != 1 or len(literals) != 1 or (node.target is operator.floordiv
                                                and not isinstance(node.args[1], int)):
        return
    for user in node.users:
        if user.target is operator.getitem:
            items = user.args[1] if isinstance(user.args[1], tuple) else (user.args[1],)
            if not any(isinstance(i, slice) and node in (i.start, i.stop) for i in items):
                return
        elif user.target not in ("view", "reshape", torch.reshape) \
                or node.target is not operator.mul:
            return
    ctx.touch(ctx.b.axes[keys[0]])


_INPLACE_OPERATORS = {operator.setitem, operator.iadd, operator.isub, operator.imul,
                      operator.itruediv, operator.ifloordiv, operator.imod, operator.ipow,
                      operator.imatmul, operator.iand, operator.ior, operator.ixor,
                      operator.ilshift, operator.irshift}


def mutates(node: fx.Node) -> bool:
    """Whether ``node`` writes into its first argument: an in-place method or function (its name
    ends in ``_``, not a dunder: ``index_add_``, ``masked_fill_``, ``copy_``, ``torch.relu_``),
    ``x[i] = v`` (``operator.setitem``) or an in-place operator."""
    if node.op == "call_function" and node.target in _INPLACE_OPERATORS:
        return True
    if node.op == "call_method":
        name = node.target
    elif node.op == "call_function":
        name = getattr(node.target, "__name__", "")
    else:
        return False
    return isinstance(name, str) and name.endswith("_") and not name.startswith("__")


def regated(g, node):
    """The gated model of an in-place op: the op on the gated tensors, then the pruned channels
    of the tensor it wrote into zeroed again (in place: everyone reading that tensor afterwards
    reads the same object), since the op may write non-zero values there (``fill_(1)``,
    ``masked_fill_(m, 0.5)``, ``add_(0.1)``)."""
    new = g.copy(node)
    target = node.args[0] if node.args else None
    shape = g.shape(target) if isinstance(target, fx.Node) else None
    for dim in range(len(shape or ())):
        mask = g.value_mask(target, dim)
        if mask is not None:
            g.call_function(runtime.regate_, (g.env[target], mask, dim))
    return new


ELEMENTWISE = RULES.add(
    Elementwise(),
    modules=[nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.Sigmoid, nn.Tanh, nn.GELU, nn.SiLU, nn.ELU,
             nn.Softplus, nn.Mish, nn.Hardtanh, nn.Identity, nn.Dropout, nn.Dropout1d,
             nn.Dropout2d, nn.Hardswish, nn.Hardsigmoid],
    functions=[operator.add, operator.sub, operator.mul, operator.truediv, operator.neg,
               operator.floordiv,
               operator.pow, torch.add, torch.sub, torch.mul, torch.div, torch.true_divide,
               torch.maximum, torch.minimum, torch.where, torch.relu, torch.sigmoid, torch.tanh,
               torch.exp, torch.abs, torch.sqrt, torch.rsqrt, torch.pow, torch.clamp,
               torch.neg, torch.sin, torch.cos, torch.log, torch.log1p, torch.square,
               torch.zeros_like, torch.ones_like, torch.sign, torch.nan_to_num,
               torch.empty_like, torch.full_like, torch.masked_fill,
               F.relu, F.relu6, F.leaky_relu, F.gelu, F.silu, F.elu, F.softplus, F.mish,
               F.sigmoid, F.tanh, F.hardtanh, F.dropout, F.hardswish],
    methods=["add", "sub", "mul", "div", "truediv", "__add__", "__sub__", "__mul__",
             "__truediv__", "__radd__", "__rmul__", "__rsub__", "neg", "pow", "relu",
             "sigmoid", "tanh", "exp", "abs", "sqrt", "rsqrt", "clamp", "clamp_min",
             "clamp_max", "square", "log", "sin", "cos", "contiguous", "float", "double",
             "half", "detach", "clone", "masked_fill", "zero_", "sign",
             "add_", "mul_", "sub_", "div_", "relu_", "sigmoid_", "tanh_", "new_zeros_like"])


class InplaceElementwise(Elementwise):
    """An elementwise op that writes into its first argument (``x.masked_fill_(m, 0.5)``,
    ``buf.copy_(y)``, ``x.add_(0.1)``): coupled like any elementwise op; the gated model zeroes
    the written tensor's pruned channels again afterwards (in eager code, where that cannot be
    done, its axes are frozen)."""

    def gated(self, g, node):
        return regated(g, node)


RULES.add(InplaceElementwise(), functions=[torch.relu_],
          methods=["zero_", "add_", "mul_", "sub_", "div_", "relu_", "sigmoid_", "tanh_",
                   "masked_fill_", "copy_", "fill_", "clamp_", "clamp_min_", "clamp_max_",
                   "neg_", "abs_", "exp_", "sqrt_", "pow_", "square_", "nan_to_num_"])


class CastRule:
    """x.to(...), x.type_as(y), x.type(x.type()), x.long(), Variable(x): the data is x; a tensor
    argument only lends dtype/device. ``x.new_tensor(data)``: the data is ``data``. ``x.type()``
    with no argument is a string (metadata)."""

    def couple(self, ctx):
        node = ctx.node
        x = node.args[1] if node.target == "new_tensor" and len(node.args) > 1 else node.args[0]
        if isinstance(x, fx.Node):
            for a, o in zip(ctx.axes(x), ctx.axes()):
                ctx.same(a, o)
            if ctx.shape() is None:  # x.type(): a string
                ctx.touch(*ctx.axes(x))
        for other in ctx.tensor_inputs():
            if other is not x:
                ctx.touch(*ctx.axes(other))


RULES.add(CastRule(), functions=[runtime.as_variable],
          methods=["to", "type_as", "type", "long", "int", "bool", "new_tensor"])


class FactoryRule:
    """torch.zeros/ones/empty/full(sizes) and x.new_zeros/new_ones/new_empty/new_full(sizes):
    a new tensor, a source of its static axes. A size read from another tensor (``B, N, T =
    x.shape``; ``list(x.shape[:-1]) + [pad]``; ``x.shape``) makes the axis that tensor's axis,
    and the slim model reads the kept size by itself; a literal size makes a fresh axis that
    whoever uses the tensor couples (a cat, an add), and the slim model is given the kept count;
    a size computed any other way freezes the axis. ``x`` of ``x.new_*`` only lends its dtype."""

    def couple(self, ctx):
        sizes = self._sizes(ctx.node)
        if sizes is None:
            return ctx.freeze_all("tensor factory with sizes sepfx cannot read")
        whole = self._whole(ctx.node)
        for j, size in enumerate(sizes if whole is None else ()):
            o = ctx.axis(None, j)
            read = ctx.size_read(size)
            if isinstance(read, tuple):  # an int read from an axis
                ctx.same(ctx.b.axes[read], o)
            elif o is None:
                continue
            elif isinstance(size, int) and not isinstance(size, bool):
                ctx.touch(o)
            else:
                ctx.freeze(o, "a factory's size computed from other values")
        read = ctx.size_read(whole)
        if whole is not None and not isinstance(read, dict):
            return ctx.freeze_all("a factory's sizes computed from other values")
        for j, key in (read.items() if whole is not None else ()):
            ctx.same(ctx.b.axes[key], ctx.axis(None, j))
        for x in ctx.tensor_inputs():
            ctx.touch(*ctx.axes(x))

    @staticmethod
    def _size_slot(node):
        """(where, sizes): where the sizes are given, ``("args", start)`` for separate arguments
        from ``start``, ``("arg", i)`` for one sequence or shape argument, ``("kwarg", name)``;
        sizes is that sequence (None for a shape node)."""
        start = 1 if node.op == "call_method" else 0
        if "size" in node.kwargs:
            return ("kwarg", "size"), node.kwargs["size"]
        full = node.target in ("new_full", torch.full)
        rest = node.args[start:]
        if full or (len(rest) == 1 and (isinstance(rest[0], (tuple, list, torch.Size))
                                        or _is_shape(rest[0]))):
            return ("arg", start), rest[0] if rest else None
        return ("args", start), list(rest)

    def _whole(self, node):
        _, sizes = self._size_slot(node)
        return sizes if isinstance(sizes, fx.Node) else None

    def _sizes(self, node):
        """The size given for each output dim (int, node or None), or None if unreadable."""
        _, sizes = self._size_slot(node)
        if isinstance(sizes, fx.Node):
            shape = tensor_shapes(node)
            return [None] * len(shape[0]) if shape else None
        if isinstance(sizes, (tuple, list, torch.Size)):
            return list(sizes)
        return None

    def rewrite(self, node, s):
        (where, at), sizes = self._size_slot(node)
        if isinstance(sizes, fx.Node) or sizes is None:
            return
        out = s.shape(node)
        new = list(sizes)
        for j, size in enumerate(sizes):
            if isinstance(size, int) and not isinstance(size, bool) and j < len(out) \
                    and size == out[j]:
                kept = s.kept_value(node, j)
                if _pruned(kept, size):
                    new[j] = len(kept)
        if new == list(sizes):
            return
        if where == "kwarg":
            node.kwargs = {**node.kwargs, at: type(sizes)(new) if isinstance(sizes, tuple)
                           else new}
        elif where == "arg":
            args = list(node.args)
            args[at] = tuple(new) if isinstance(sizes, tuple) else new
            node.args = tuple(args)
        else:
            node.args = tuple(node.args[:at]) + tuple(new)


def _is_shape(value) -> bool:
    """A node whose value is a shape (``x.shape``, ``x.size()``, a slice of one)."""
    values = scalar_values(value) if isinstance(value, fx.Node) else None
    return values is not None and isinstance(values[0], tuple)


RULES.add(FactoryRule(), functions=[torch.zeros, torch.ones, torch.empty, torch.full],
          methods=["new_zeros", "new_ones", "new_empty", "new_full"])


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
    grouped convolutions (whole conv groups are pruned).

    A convolution slides along its spatial axes, so a static one is frozen, except where the
    kernel spans the whole axis (at least as many taps as input positions: Asteroid's
    SuDoRM-RF mask layer, a Conv2d over the channel axis): there the op is a dense matrix from
    input to output positions, whose positions prune like a Linear's features; the slim model
    folds such an axis into the channels (``runtime.SpannedConv``). Its cost term stays the
    convolution's, an upper bound (the folded form skips the taps that only see padding)."""

    def couple(self, ctx):
        m = ctx.module
        x = ctx.node.args[0]
        c_in, c_out, groups = m.in_channels, m.out_channels, m.groups
        m_in, m_out = ctx.module_axis("in", c_in), ctx.module_axis("out", c_out)
        ctx.same(ctx.axis(x, 1), m_in)
        ctx.same(ctx.axis(None, 1), m_out)
        ctx.same(ctx.axis(x, 0), ctx.axis(None, 0))
        spans = []
        for d in range(2, len(ctx.shape())):
            a_in, a_out = ctx.axis(x, d), ctx.axis(None, d)
            if groups == 1 and _spanned(ctx, m, d, a_in, a_out):
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
            ins, outs = np.arange(g * per_in, (g + 1) * per_in), np.arange(g * per_out, (g + 1) * per_out)
            if m_in is not None and m_out is not None:
                ctx.link(m_in, np.repeat(ins[:1], per_out), m_out, outs)
                ctx.unite(m_in, ins)
            elif m_out is not None:
                ctx.unite(m_out, outs)
        ctx.cost((1.0, [m_out]))

    def slim_module(self, m, s, qualname):
        k_in, k_out = s.kept_module(qualname, "in"), s.kept_module(qualname, "out")
        spans = _pruned_spans(m, s, qualname)
        if not (_pruned(k_in, m.in_channels) or _pruned(k_out, m.out_channels) or spans):
            return None
        k_in = np.arange(m.in_channels) if k_in is None else k_in
        k_out = np.arange(m.out_channels) if k_out is None else k_out
        if spans:
            return runtime.SpannedConv.lowered(m, k_in, k_out, spans)
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


def _spanned(ctx, m, d: int, a_in, a_out) -> bool:
    """Whether the (non-transposed, zero-padded) convolution ``m``'s kernel spans the whole
    static input axis ``d``, whose output axis is static too (or of size 1)."""
    if isinstance(m, nn.modules.conv._ConvTransposeNd) or m.padding_mode != "zeros" \
            or not isinstance(m.padding, tuple) or a_in is None:
        return False
    if a_out is None and (ctx.shape()[d] != 1 or ctx.is_dynamic(ctx.node, d)):
        return False
    return m.kernel_size[d - 2] >= a_in.size


def _pruned_spans(m, s, qualname) -> dict:
    """{axis: (kept input positions, kept output positions)} of the spanned axes of conv ``m``
    that lose positions in the keep set (``ConvRule``)."""
    spans = {}
    for d in range(2, 2 + len(m.kernel_size)):
        kept_in = s.kept_module(qualname, f"span{d}_in")
        if kept_in is None:
            continue
        key = s.analysis.module_axes[qualname][f"span{d}_in"]
        size_in = s.analysis.axes[key].size
        out_key = s.analysis.module_axes[qualname].get(f"span{d}_out")
        kept_out = np.arange(1) if out_key is None else s.kept_module(qualname, f"span{d}_out")
        size_out = 1 if out_key is None else s.analysis.axes[out_key].size
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

    def __init__(self, transposed: bool):
        self.transposed = transposed

    def couple(self, ctx):
        node = ctx.node
        x, w, b = arg(node, 0, "input"), arg(node, 1, "weight"), arg(node, 2, "bias")
        groups = arg(node, 6, "groups", 1)
        if not isinstance(groups, int) or ctx.shape(w) is None or ctx.shape(x) is None:
            return ctx.freeze_all("convolution with a computed groups or weight")
        out_dim, in_dim = (1, 0) if self.transposed else (0, 1)
        x_ch, o_ch = ctx.axis(x, 1), ctx.axis(None, 1)
        w_in, w_out = ctx.axis(w, in_dim), ctx.axis(w, out_dim)
        ctx.same(ctx.axis(x, 0), ctx.axis(None, 0))
        for d in range(2, len(ctx.shape())):
            ctx.freeze(ctx.axis(x, d), "a convolution slides along this axis")
            ctx.freeze(ctx.axis(None, d), "a convolution slides along this axis")
        for d in range(2, len(ctx.shape(w))):
            ctx.freeze(ctx.axis(w, d), "kernel axis")
        if isinstance(b, fx.Node):
            ctx.same(ctx.axis(b, 0), o_ch)
        if groups == 1:
            ctx.same(x_ch, w_in)
            ctx.same(o_ch, w_out)
            ctx.cost((1.0, [x_ch, o_ch]))
            return
        # [out, in/groups] (or [in, out/groups]): the per-group axis is kept whole
        c_in, c_out = ctx.shape(x)[1], ctx.shape()[1]
        per_in, per_out = c_in // groups, c_out // groups
        ctx.same(o_ch if not self.transposed else x_ch, w_out if not self.transposed else w_in)
        ctx.freeze(w_in if not self.transposed else w_out, "per-group axis of a grouped "
                   "convolution (whole groups are pruned)")
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

    def rewrite(self, node, s):
        groups = arg(node, 6, "groups", 1)
        if not isinstance(groups, int) or groups == 1:
            return
        x = node.args[0]
        c_in, c_out = s.shape(x)[1], s.shape(node)[1]
        if self.transposed:
            kept, per = s.kept_value(x, 1), c_in // groups
        else:
            kept, per = s.kept_value(node, 1), c_out // groups
        if kept is not None and _pruned(kept, groups * per):
            set_arg(node, 6, "groups", int(len(np.unique(np.asarray(kept) // per))))


RULES.add(FunctionalConvRule(False), functions=[F.conv1d, F.conv2d, torch.conv1d, torch.conv2d])
RULES.add(FunctionalConvRule(True), functions=[F.conv_transpose1d, F.conv_transpose2d,
                                               torch.conv_transpose1d, torch.conv_transpose2d])


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


class InstanceNormRule:
    """InstanceNorm1d/2d, with or without affine parameters: statistics per sample and channel
    over the spatial axes, so channels map through (and its parameters follow them); a static
    spatial axis is frozen (the statistics span it)."""

    def couple(self, ctx):
        m = ctx.module
        x = ctx.node.args[0]
        spatial = 1 if isinstance(m, nn.InstanceNorm1d) else 2
        n = len(ctx.shape(x))
        channel = n - spatial - 1  # unbatched inputs have no batch axis
        ctx.same(ctx.axis(x, channel), ctx.module_axis("channels", m.num_features))
        for d in range(n):
            a, o = ctx.axis(x, d), ctx.axis(None, d)
            if d > channel:
                ctx.freeze(a, "instance norm statistics span this axis")
                ctx.freeze(o, "instance norm statistics span this axis")
            else:
                ctx.same(a, o)

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


RULES.add(InstanceNormRule(), modules=[nn.InstanceNorm1d, nn.InstanceNorm2d])


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
                # a module axis with or without parameters: it carries the kept size of
                # normalized_shape to slim_module
                i = d - (n - k)
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


class FunctionalLayerNormRule:
    """F.layer_norm(x, normalized_shape, weight, bias, eps) (a LayerNorm subclass calling
    ``super().forward``, or a direct call): every axis maps through, the last k are also the
    weight's and bias's; the gated model takes the statistics over kept channels only, and the
    slim model is given the kept sizes where ``normalized_shape`` is literal."""

    def couple(self, ctx):
        node = ctx.node
        x = node.args[0]
        shape = arg(node, 1, "normalized_shape")
        k = len(ctx.shape(None)) - len(ctx.shape(x)) + self._k(shape, ctx)
        n = len(ctx.shape(x))
        for d, (a, o) in enumerate(zip(ctx.axes(x), ctx.axes())):
            ctx.same(a, o)
            if d >= n - k:
                for p in (arg(node, 2, "weight"), arg(node, 3, "bias")):
                    if isinstance(p, fx.Node):
                        ctx.same(a, ctx.axis(p, d - (n - k)))
        read = ctx.size_read(shape)
        for key in _read_keys_of(read):
            ctx.touch(ctx.b.axes[key])

    @staticmethod
    def _k(shape, ctx=None):
        if isinstance(shape, int):
            return 1
        if isinstance(shape, (tuple, list)):
            return len(shape)
        values = scalar_values(shape) if isinstance(shape, fx.Node) else None
        if values is not None and isinstance(values[0], (tuple, list)):
            return len(values[0])
        return 1

    def gated(self, g, node):
        x = node.args[0]
        k = self._k(arg(node, 1, "normalized_shape"))
        n = len(g.shape(x))
        masks = [g.value_mask(x, d) for d in range(n - k, n)]
        if all(mask is None for mask in masks):
            return None
        weight, bias = arg(node, 2, "weight"), arg(node, 3, "bias")
        return g.call_function(runtime.masked_layer_norm, (
            g.arg(x), k, g.arg(weight), g.arg(bias), arg(node, 4, "eps", 1e-5), masks))

    def rewrite(self, node, s):
        shape = arg(node, 1, "normalized_shape")
        x = node.args[0]
        sizes = [shape] if isinstance(shape, int) else shape
        if not isinstance(sizes, (tuple, list)):
            return
        n = len(s.shape(x))
        new = list(sizes)
        for i, size in enumerate(sizes):
            kept = s.kept_value(x, n - len(sizes) + i)
            if isinstance(size, int) and _pruned(kept, size):
                new[i] = len(kept)
        if new != list(sizes):
            set_arg(node, 1, "normalized_shape", new[0] if isinstance(shape, int) else tuple(new))


def _read_keys_of(read) -> list:
    if isinstance(read, dict):
        return [k for k in read.values() if k is not None]
    return [read] if isinstance(read, tuple) else []


RULES.add(FunctionalLayerNormRule(), functions=[F.layer_norm, torch.layer_norm])


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
        coords = np.unravel_index(np.arange(int(np.prod(sizes))), sizes)
        keep = _prunable_factor(ctx, whole, [ctx.axis(None, d) if split else ctx.axis(x, d)
                                             for d in factors], sizes, coords)
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
            elif j < len(ref_out) and _scaled_read(ctx, s) is not None:
                # ``x.reshape(B, C * K, S)``: channel c of the tensor C was read from is the
                # block c*K..c*K+K-1 of this axis (C the outer factor)
                key, factor = _scaled_read(ctx, s)
                a, o = ctx.b.axes[key], ctx.axis(None, j)
                if o is not None and o.size == a.size * factor:
                    ctx.link(a, np.repeat(np.arange(a.size), factor), o, np.arange(o.size))
                else:
                    ctx.freeze(a, "its size times a literal is not the reshaped axis")

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
        if node.op == "call_method" and node.target == "view" and not any(
                isinstance(v, torch.dtype) for v in sizes) and (
                changed or self._touches_pruned(node, s)):
            # slimming changes strides (a Linear over a transposed axis, a broadcast product):
            # a view that merged dims of the dense tensor may not be viewable any more at some
            # batch size; reshape is the same view where one exists and a copy where not
            node.target = "reshape"

    @staticmethod
    def _touches_pruned(node, s) -> bool:
        for x in (node.args[0], node):
            shape = s.shape(x) if isinstance(x, fx.Node) else None
            for d, size in enumerate(shape or ()):
                if _pruned(s.kept_value(x, d), size):
                    return True
        return False


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


def _prunable_factor(ctx, whole, factor_axes, sizes, coords) -> int:
    """Which factor of a channel axis split into (or merged from) several stays prunable: one
    along which the elements already coupled together agree (an F.unfold's [C*K] blocks are
    units of K consecutive elements: C, the outer factor), and not frozen by a rule; among
    those, the largest."""
    candidates = [i for i, a in enumerate(factor_axes) if a is not None]
    if len(candidates) <= 1 or whole is None:
        return max(range(len(sizes)), key=lambda i: (sizes[i], i))
    uf = ctx.b.uf
    roots = [uf.find(whole.start + e) for e in range(whole.size)]

    def agrees(i):
        seen = {}
        return all(seen.setdefault(r, c) == c for r, c in zip(roots, coords[i]))

    fitting = [i for i in candidates if agrees(i)] or candidates
    if len(fitting) > 1:
        frozen = {uf.find(ctx.b.axes[key].start + j) for key in ctx.b.frozen_axes
                  for j in range(ctx.b.axes[key].size)}
        free = [i for i in fitting if not any(
            uf.find(factor_axes[i].start + j) in frozen for j in range(factor_axes[i].size))]
        fitting = free or fitting
    return max(fitting, key=lambda i: (sizes[i], i))


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
            elif isinstance(index, slice) and _literal_slice(index) and isinstance(read, dict) \
                    and ctx_shape_len(source) is not None:
                # ``x.size()[-2:]``, ``x.shape[:-1]``: the same sizes, renumbered
                dims = list(range(ctx_shape_len(source)))[index]
                ctx.read_size({j: read[d] for j, d in enumerate(dims) if d in read})
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
        if ctx.shape(x) is None:
            return  # indexing a Python value: sizes read into it are checked by their users
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
            elif _fraction_slice(ctx, item, a) is not None:
                item, blocks = _fraction_slice(ctx, item, a)
                idx = np.arange(a.size)[item]
                if o is not None:
                    ctx.link(a, idx, o, np.arange(len(idx)))
                # ``x[:, :C // 2]``: the slim model slices at C' // 2, which is the kept count
                # of the first half only if every half keeps as many: element i of each block
                # lives and dies with element i of the others
                width = a.size // blocks
                for i in range(width):
                    ctx.unite(a, i + width * np.arange(blocks))
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


def _fraction_slice(ctx, item: slice, axis):
    """For a slice of ``axis`` whose bounds are literal or ``size // m`` of that very axis
    (rotary embeddings' halves): (the slice with its bounds' values, m); else None."""
    if item.step not in (None, 1):
        return None
    blocks, bounds = None, []
    for bound in (item.start, item.stop):
        if bound is None or (isinstance(bound, int) and not isinstance(bound, bool)):
            bounds.append(bound)
            continue
        if not (isinstance(bound, fx.Node) and bound.target is operator.floordiv
                and isinstance(bound.args[1], int) and bound.args[1] > 0
                and ctx.size_read(bound.args[0]) == axis.key
                and axis.size % bound.args[1] == 0 and blocks in (None, bound.args[1])):
            return None
        blocks = bound.args[1]
        bounds.append(axis.size // blocks)
    if blocks is None:
        return None
    return slice(bounds[0], bounds[1]), blocks


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


class SetItemRule:
    """``x[index] = value`` (in place; the node's own value is None). The indexed part of ``x``
    and ``value`` (broadcast from the right) share their axes: a whole axis (``:``) is the same
    axis, a literal slice of a channel axis links its elements (rewritten for the kept ones in
    the slim model), a slice of a dynamic axis maps nothing; a value broadcast along a channel
    axis is written into every kept channel alike. A channel axis indexed by a constant or
    sliced by a varying bound is frozen. The gated model zeroes ``x``'s pruned channels again
    after the write (what the slim model, which has none, computes)."""

    def couple(self, ctx):
        target, index, value = ctx.node.args[:3]
        shape = ctx.shape(target)
        if shape is None:
            return ctx.freeze_all("item assignment into something that is not a tensor")
        items = _index_items(index, len(shape))
        if items is None:
            return ctx.freeze_all("item assignment with tensor or unsupported indices")
        view = []  # (target axis or None, item) of each dim of the indexed part
        for d_in, item in items:
            if item is None:
                view.append((None, None))
                continue
            a = ctx.axis(target, d_in)
            if isinstance(item, int):
                ctx.freeze(a, "assigned at a constant index")
            else:
                view.append((a, item))
        value_axes = ctx.axes(value) if isinstance(value, fx.Node) else []
        offset = len(view) - len(value_axes)
        if offset < 0:
            return ctx.freeze_all("item assignment of a value of higher rank")
        for j, (a, item) in enumerate(view):
            v = value_axes[j - offset] if j >= offset else None
            if a is None:
                ctx.touch(v) if v is None else ctx.freeze(v, "written into a dynamic axis")
                continue
            if j >= offset and v is None and ctx.is_dynamic(value, j - offset):
                ctx.freeze(a, "a dynamic axis is written into it")
            elif item == slice(None):
                ctx.same(a, v) if v is not None else ctx.touch(a)
            elif _literal_slice(item) and item.step in (None, 1):
                idx = np.arange(a.size)[item]
                if v is not None:
                    ctx.link(a, idx, v, np.arange(len(idx)))
                ctx.touch(a)
            else:
                ctx.freeze(a, "assigned through a slice sepfx cannot follow")
                ctx.freeze(v, "assigned through a slice sepfx cannot follow")
        for d, a in enumerate(ctx.axes(target)):
            ctx.touch(a)

    def gated(self, g, node):
        return regated(g, node)

    def rewrite(self, node, s):
        target, index, value = node.args[:3]
        if not isinstance(target, fx.Node) or s.shape(target) is None:
            return
        new_index = _kept_slices(index, target, s)
        if new_index is not None:
            node.args = (target, new_index, value)


def _kept_slices(index, x, s):
    """``index`` into ``x`` with literal slices of pruned axes narrowed to the kept elements,
    or None if nothing changes."""
    items = _index_items(index, len(s.shape(x)))
    if items is None:
        return None
    new_items, changed = [], False
    for d_in, item in items:
        if isinstance(item, slice) and item != slice(None) and _literal_slice(item):
            kept = s.kept_value(x, d_in)
            if _pruned(kept, s.shape(x)[d_in]):
                start, stop, _ = item.indices(s.shape(x)[d_in])
                item = slice(int((kept < start).sum()), int((kept < stop).sum()))
                changed = True
        new_items.append(item)
    return tuple(new_items) if changed else None


RULES.add(SetItemRule(), functions=[operator.setitem])


class IndexAddRule:
    """``x.index_add_(dim, index, source)`` (overlap-add) and ``x.index_add(...)``: every axis
    but ``dim`` is the same axis in ``x``, ``source`` and the result; along ``dim`` (time, made
    of frames) nothing maps; a static ``dim`` is frozen."""

    def couple(self, ctx):
        node = ctx.node
        x, dim, index, source = (arg(node, i, name) for i, name in
                                 enumerate(("self", "dim", "index", "source")))
        shape = ctx.shape(x)
        if shape is None or ctx.shape(source) is None or len(ctx.shape(source)) != len(shape):
            return ctx.freeze_all("index_add with operands sepfx cannot follow")
        dim = dim % len(shape)
        for d in range(len(shape)):
            a, v, o = ctx.axis(x, d), ctx.axis(source, d), ctx.axis(None, d)
            if d == dim:
                for axis in (a, v, o):
                    ctx.freeze(axis, "index_add along this axis")
                continue
            ctx.same(a, v)
            ctx.same(a, o)
        if isinstance(index, fx.Node):
            for axis in ctx.axes(index):
                ctx.freeze(axis, "index of an index_add")

    def gated(self, g, node):
        return regated(g, node) if mutates(node) else None


RULES.add(IndexAddRule(), functions=[torch.index_add], methods=["index_add_", "index_add"])


class WindowsRule:
    """``x.unfold(dim, size, step)`` (frames of a signal, or of an index range): the other axes
    map through; ``dim`` becomes the frame axis and a new last axis the window; both are frozen
    when static."""

    def couple(self, ctx):
        node = ctx.node
        x = node.args[0]
        n = len(ctx.shape(x))
        dim = arg(node, 1, "dimension") % n
        for d in range(n):
            if d == dim:
                ctx.freeze(ctx.axis(x, d), "cut into windows along this axis")
                ctx.freeze(ctx.axis(None, d), "frames of a windowed axis")
            else:
                ctx.same(ctx.axis(x, d), ctx.axis(None, d))
        ctx.freeze(ctx.axis(None, n), "window axis")


RULES.add(WindowsRule(), methods=["unfold"])


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

    handles_eager_code = True  # freezes what it cannot mask when recorded from eager code

    def __init__(self, kind):
        self.kind = kind

    def couple(self, ctx):
        node = ctx.node
        x = node.args[0]
        n = len(ctx.shape(x))
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


class EinsumRule:
    """torch.einsum(equation, *operands): axes carrying the same letter (in any operand or the
    output) are one axis; a letter left out of the output is summed over, which pruning keeps
    exact (pruned channels are zero). ``...`` stands for the same axes in every operand,
    aligned from the right. Costs as a matmul: the product of every letter's kept fraction."""

    def couple(self, ctx):
        node = ctx.node
        parsed = _einsum_parse(node, ctx.shape)
        if parsed is None:
            return ctx.freeze_all("einsum equation sepfx cannot read")
        specs, out_spec, operands = parsed
        by_letter: dict[str, list] = {}
        for x, spec in zip(operands, specs):
            for d, letter in enumerate(spec):
                by_letter.setdefault(letter, []).append((x, d))
        for d, letter in enumerate(out_spec):
            by_letter.setdefault(letter, []).append((None, d))
        representatives = []
        for letter, places in by_letter.items():
            static = [ctx.axis(x, d) for x, d in places]
            dynamic = any(ctx.is_dynamic(x if x is not None else node, d) for x, d in places)
            static = [a for a in static if a is not None]
            if dynamic:
                for a in static:
                    ctx.freeze(a, f"einsum letter {letter!r} is a dynamic axis elsewhere")
                continue
            for a in static[1:]:
                ctx.same(static[0], a)
            if static:
                representatives.append(static[0])
        ctx.cost((1.0, representatives))


def _einsum_parse(node, shape_of):
    """(operand letter strings, output letter string, operand nodes), ``...`` replaced by
    digits (one per broadcast axis, aligned from the right), or None."""
    equation, *operands = node.args
    if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
        operands = list(operands[0])
    if not isinstance(equation, str) or not all(isinstance(x, fx.Node) for x in operands):
        return None
    equation = equation.replace(" ", "")
    lhs, arrow, rhs = equation.partition("->")
    specs = lhs.split(",")
    if len(specs) != len(operands) or any(shape_of(x) is None for x in operands):
        return None
    ranks = [len(shape_of(x)) for x in operands]
    widths = [rank - (len(spec) - 3) if "..." in spec else 0 for spec, rank in zip(specs, ranks)]
    width = max(widths, default=0)
    ellipsis = "".join(str(i) for i in range(width))
    specs = [spec.replace("...", ellipsis[width - w:]) for spec, w in zip(specs, widths)]
    if any(len(spec) != rank for spec, rank in zip(specs, ranks)):
        return None
    if arrow:
        out = rhs.replace("...", ellipsis)
    else:  # implicit output: the letters seen once, in order
        letters = "".join(specs)
        out = ellipsis + "".join(sorted(c for c in set(letters) if letters.count(c) == 1
                                        and not c.isdigit()))
    if len(out) != len(shape_of(node) or ()):
        return None
    return specs, out, operands


RULES.add(EinsumRule(), functions=[torch.einsum])


class UnfoldRule:
    """F.unfold(x [B, C, H, W], kernel) -> [B, C*k, L] and F.fold([B, C*k, L], size, kernel) ->
    [B, C, H, W] (dual-path chunking): channel c is the block of k consecutive elements
    c*k..c*k+k-1 of the merged axis (C is the outer factor), so they live and die together.
    The spatial and block axes are frozen when static."""

    def __init__(self, fold: bool):
        self.fold = fold

    def couple(self, ctx):
        node = ctx.node
        x = node.args[0]
        size = _pair(arg(node, 2 if self.fold else 1, "kernel_size"))
        k = int(np.prod(size)) if size is not None else None
        channels, merged = (ctx.axis(None, 1), ctx.axis(x, 1)) if self.fold else \
            (ctx.axis(x, 1), ctx.axis(None, 1))
        ctx.same(ctx.axis(x, 0), ctx.axis(None, 0))
        for t, d_from in ((x, 2), (None, 2)):
            for d in range(d_from, len(ctx.shape(t))):
                ctx.freeze(ctx.axis(t, d), "a sliding-window axis")
        if k is None or merged is None or channels is None or merged.size != channels.size * k:
            ctx.freeze(channels, "channels folded with kernel positions sepfx cannot follow")
            ctx.freeze(merged, "channels folded with kernel positions sepfx cannot follow")
            return
        ctx.link(channels, np.repeat(np.arange(channels.size), k), merged,
                 np.arange(merged.size))


def _pair(size):
    if isinstance(size, int):
        return (size, size)
    if isinstance(size, (tuple, list)) and all(isinstance(v, int) for v in size):
        return tuple(size)
    return None


RULES.add(UnfoldRule(False), functions=[F.unfold])
RULES.add(UnfoldRule(True), functions=[F.fold])



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
