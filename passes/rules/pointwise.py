"""Pointwise ops: activations, arithmetic with broadcasting, in-place variants, casts, tensor
factories, PReLU, and parameters or buffers read by the graph."""

from __future__ import annotations

import operator
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import fx, nn

from passes import runtime
from passes.context import NodeContext
from passes.rules.registry import (
    RULES,
    GatedBuilderView,
    PruningView,
    complex_rank,
    complex_values,
    pruned,
    sliced_parameter,
)
from passes.values import AxisKey, scalar_values, tensor_shapes


class Elementwise:
    """Same index in, same index out, with broadcasting (activations, residual adds, ...)."""

    def couple(self, ctx: NodeContext) -> None:
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

    def lower(self, node: fx.Node, graph_module: fx.GraphModule) -> bool:
        """For export: ``atan2`` as ``runtime.atan2``, which is 0 where both operands are (the
        exporters write atan(y / x) with quadrant fixes: NaN there)."""
        if (node.op, node.target) in (("call_function", torch.atan2), ("call_method", "atan2")):
            if len(node.args) == 2 and not node.kwargs:
                node.op, node.target = "call_function", runtime.atan2
                return True
        return False

    def lower_complex(self, node: fx.Node, graph_module: fx.GraphModule) -> bool:
        """Complex values carried as (real, imaginary) pairs (``passes.rules.spectral``)."""
        return lower_pointwise_complex(node, graph_module)


# elementwise ops that act on a (real, imaginary) pair as on the complex value it carries
_PAIRWISE = {"contiguous", "clone", "detach", "neg"}
_UNARY = {"abs": runtime.complex_abs, "angle": runtime.complex_angle, "conj": runtime.complex_conj}


def lower_pointwise_complex(node: fx.Node, graph_module: fx.GraphModule) -> bool:
    """An elementwise op on complex values carried as (real, imaginary) pairs [..., 2]: a pair
    times or over a real tensor broadcasts it over the pair axis; a complex product or quotient
    is ``runtime.complex_mul``/``complex_div``; a real operand added to a complex one becomes a
    pair first; ``abs``, ``angle``, ``conj`` have their pair forms. Raises ValueError on any
    other op (or form) met with complex values."""
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
    name = name.strip("_")
    graph = graph_module.graph
    if name in _PAIRWISE and len(node.args) == 1 and not node.kwargs:
        return True
    if name in _UNARY and len(node.args) == 1 and not node.kwargs:
        node.op, node.target = "call_function", _UNARY[name]
        return True
    if len(node.args) != 2 or node.kwargs:
        raise ValueError(f"{name} of complex values with these arguments")
    a, b = node.args
    if name.startswith("r") and name[1:] in ("add", "sub", "mul", "truediv", "div"):
        name, a, b = name[1:], b, a  # ``2 * z`` as ``z.__rmul__(2)``: the operands in order
    complex_a = complex_rank(a) is not None or isinstance(a, complex)
    complex_b = complex_rank(b) is not None or isinstance(b, complex)

    def broadcast(x: Any) -> Any:  # a real operand of a pair: over the pair axis too
        if not isinstance(x, fx.Node):
            return x
        with graph.inserting_before(node):
            return graph.call_method("unsqueeze", (x, -1))

    def paired(x: Any, like: Any) -> Any:  # a real operand as a pair
        with graph.inserting_before(node):
            return graph.call_function(runtime.real_pair, (x, like))

    # a Python complex number (``x * 1j``): a constant pair, broadcast over the operand
    a = paired(a, b) if isinstance(a, complex) else a
    b = paired(b, a) if isinstance(b, complex) else b
    node.op = "call_function"
    if name == "mul":
        if complex_a and complex_b:
            node.target, node.args = runtime.complex_mul, (a, b)
        else:
            node.target = operator.mul
            node.args = (a, broadcast(b)) if complex_a else (broadcast(a), b)
    elif name in ("truediv", "div"):
        if complex_b:
            node.target = runtime.complex_div
            node.args = (a if complex_a else paired(a, b), b)
        else:
            node.target, node.args = operator.truediv, (a, broadcast(b))
    elif name in ("add", "sub"):
        node.target = operator.add if name == "add" else operator.sub
        node.args = (a if complex_a else paired(a, b), b if complex_b else paired(b, a))
    else:
        raise ValueError(f"{name} of complex values")
    return True


def _concatenated_sizes(ctx: NodeContext) -> None:
    """``shape + (4,)`` or ``[2] + list(shape)``: the sizes read from the operands, at their new
    positions, are the sizes of the result."""
    node = ctx.node
    if node.target is not operator.add or len(node.args) != 2:
        return
    reads: dict[int, AxisKey] = {}
    offset = 0
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
    ctx.touch(*[ctx.state.axes[k] for k in reads.values() if k is not None])
    ctx.read_size(reads)


def fixed_int(value: Any) -> int | None:
    """``value`` as an int when it is one: a literal, or a node holding the same int at the
    reference and probe inputs (``K`` of ``B, N, K, S = x.shape`` on a chunk axis). A size
    read among such nodes is frozen by the check on size reads unless a rule accounts for it,
    so the int cannot change when the model is slimmed."""
    if isinstance(value, fx.Node):
        values = scalar_values(value)
        value = values[0] if values is not None and values[0] == values[1] else None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def scaled_read(ctx: NodeContext, value: Any) -> tuple[AxisKey, int] | None:
    """(axis key, k) for ``C * k`` (or ``k * C``), C a size read from a static axis that is not
    frozen and k a number slimming does not change (``_factor``); else None."""
    if not (isinstance(value, fx.Node) and value.target is operator.mul and len(value.args) == 2):
        return None
    for a, b in (value.args, value.args[::-1]):
        read, factor = ctx.size_read(a), _factor(ctx, b)
        if (
            isinstance(read, tuple)
            and _fixed_size(ctx, read) is None
            and factor is not None
            and factor > 0
        ):
            return read, factor  # (k read from another axis: that one is frozen, untouched)
    return None


def _factor(ctx: NodeContext, value: Any) -> int | None:
    """A number that slimming does not change: the size of an axis already kept whole (a
    bidirectional state's direction axis in ``view(B, S, d * H)``), or a fixed int."""
    fixed = _fixed_size(ctx, ctx.size_read(value))
    return fixed if fixed is not None else fixed_int(value)


def _fixed_size(ctx: NodeContext, read: Any) -> int | None:
    """The size of the static axis ``read`` when every element of it is frozen by now."""
    if not isinstance(read, tuple) or read not in ctx.state.axes:
        return None
    find = ctx.state.union_find.find
    frozen = {find(int(e)) for key in ctx.state.frozen_axes for e in ctx.state.axes[key].elements}
    axis = ctx.state.axes[read]
    return axis.size if all(find(int(e)) in frozen for e in axis.elements) else None


def _scaled_size(ctx: NodeContext) -> None:
    """``C * K`` or ``C // 2`` of a size read from a channel axis, used only as a target size of
    a reshape (``ReshapeRule`` couples C with the reshaped axis, whose slim size is then C' * K)
    or as a slice bound (which ``GetItemRule`` checks is a fraction of that very axis): the read
    is accounted for there. Any other use leaves it to be frozen."""
    node = ctx.node
    if node.target not in (operator.mul, operator.floordiv) or len(node.args) != 2:
        return
    if node.target is operator.mul:
        found = scaled_read(ctx, node)
        if found is None:
            return
        key = found[0]
    else:
        reads = [ctx.size_read(a) for a in node.args]
        keys = [r for r in reads if isinstance(r, tuple)]
        literal = node.args[1]
        if len(keys) != 1 or not isinstance(literal, int) or isinstance(literal, bool):
            return
        key = keys[0]
    for user in node.users:
        if user.target is operator.getitem:
            items = user.args[1] if isinstance(user.args[1], tuple) else (user.args[1],)
            if not any(isinstance(i, slice) and node in (i.start, i.stop) for i in items):
                return
        elif (
            user.target not in ("view", "reshape", torch.reshape) or node.target is not operator.mul
        ):
            return
    ctx.touch(ctx.state.axes[key])


_INPLACE_OPERATORS = {
    operator.setitem,
    operator.iadd,
    operator.isub,
    operator.imul,
    operator.itruediv,
    operator.ifloordiv,
    operator.imod,
    operator.ipow,
    operator.imatmul,
    operator.iand,
    operator.ior,
    operator.ixor,
    operator.ilshift,
    operator.irshift,
}


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


def regated(builder: GatedBuilderView, node: fx.Node) -> fx.Node:
    """The gated model of an in-place op: the op on the gated tensors, then the pruned channels
    of the tensor it wrote into zeroed again (in place: everyone reading that tensor afterwards
    reads the same object), since the op may write non-zero values there (``fill_(1)``,
    ``masked_fill_(m, 0.5)``, ``add_(0.1)``)."""
    new = builder.copy(node)
    target = node.args[0] if node.args else None
    shape = builder.shape(target) if isinstance(target, fx.Node) else None
    for dim in range(len(shape or ())):
        written = cast(fx.Node, target)  # a node: it has a shape
        mask = builder.value_mask(written, dim)
        if mask is not None:
            builder.call_function(runtime.regate_, (builder.env[written], mask, dim))
    return new


ELEMENTWISE = RULES.add(
    Elementwise(),
    modules=[
        nn.ReLU,
        nn.ReLU6,
        nn.LeakyReLU,
        nn.Sigmoid,
        nn.Tanh,
        nn.GELU,
        nn.SiLU,
        nn.ELU,
        nn.Softplus,
        nn.Mish,
        nn.Hardtanh,
        nn.Identity,
        nn.Dropout,
        nn.Dropout1d,
        nn.Dropout2d,
        nn.Hardswish,
        nn.Hardsigmoid,
    ],
    functions=[
        operator.add,
        operator.sub,
        operator.mul,
        operator.truediv,
        operator.neg,
        operator.floordiv,
        operator.pow,
        torch.add,
        torch.sub,
        torch.mul,
        torch.div,
        torch.true_divide,
        torch.maximum,
        torch.minimum,
        torch.where,
        torch.relu,
        torch.sigmoid,
        torch.tanh,
        torch.exp,
        torch.abs,
        torch.sqrt,
        torch.rsqrt,
        torch.pow,
        torch.clamp,
        torch.atan2,
        torch.neg,
        torch.sin,
        torch.cos,
        torch.log,
        torch.log1p,
        torch.square,
        torch.zeros_like,
        torch.ones_like,
        torch.sign,
        torch.nan_to_num,
        torch.angle,
        torch.conj,
        torch.empty_like,
        torch.full_like,
        torch.masked_fill,
        F.relu,
        F.relu6,
        F.leaky_relu,
        F.gelu,
        F.silu,
        F.elu,
        F.softplus,
        F.mish,
        F.sigmoid,
        F.tanh,
        F.hardtanh,
        F.dropout,
        F.hardswish,
    ],
    methods=[
        "add",
        "sub",
        "mul",
        "div",
        "truediv",
        "__add__",
        "__sub__",
        "__mul__",
        "__truediv__",
        "__radd__",
        "__rmul__",
        "__rsub__",
        "atan2",
        "expand_as",
        "__rdiv__",
        "__rtruediv__",
        "neg",
        "positive",
        "pow",
        "__rpow__",
        "relu",
        "sigmoid",
        "tanh",
        "exp",
        "abs",
        "sqrt",
        "rsqrt",
        "clamp",
        "clamp_min",
        "clamp_max",
        "square",
        "log",
        "sin",
        "cos",
        "contiguous",
        "float",
        "double",
        "half",
        "detach",
        "clone",
        "masked_fill",
        "zero_",
        "sign",
        "angle",
        "conj",
        "add_",
        "mul_",
        "sub_",
        "div_",
        "relu_",
        "sigmoid_",
        "tanh_",
        "new_zeros_like",
    ],
)


class InplaceElementwise(Elementwise):
    """An elementwise op that writes into its first argument (``x.masked_fill_(m, 0.5)``,
    ``buf.copy_(y)``, ``x.add_(0.1)``): coupled like any elementwise op; the gated model zeroes
    the written tensor's pruned channels again afterwards (in eager code, where that cannot be
    done, its axes are frozen)."""

    def gated(self, builder: GatedBuilderView, node: fx.Node) -> fx.Node | None:
        return regated(builder, node)

    def lower_complex(self, node: fx.Node, graph_module: fx.GraphModule) -> bool:
        raise ValueError("an in-place op on complex values")


RULES.add(
    InplaceElementwise(),
    functions=[torch.relu_],
    methods=[
        "zero_",
        "add_",
        "mul_",
        "sub_",
        "div_",
        "relu_",
        "sigmoid_",
        "tanh_",
        "masked_fill_",
        "copy_",
        "fill_",
        "clamp_",
        "clamp_min_",
        "clamp_max_",
        "neg_",
        "abs_",
        "exp_",
        "sqrt_",
        "pow_",
        "square_",
        "nan_to_num_",
    ],
)


class CastRule:
    """x.to(...), x.type_as(y), x.type(x.type()), x.long(), Variable(x): the data is x; a tensor
    argument only lends dtype/device. ``x.new_tensor(data)``: the data is ``data``. ``x.type()``
    with no argument is a string (metadata)."""

    def couple(self, ctx: NodeContext) -> None:
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

    def lower(self, node: fx.Node, graph_module: fx.GraphModule) -> bool:
        """For export: ``x.new_tensor([... sizes ...])`` as ``runtime.tensor_of_sizes``."""
        if node.target != "new_tensor":
            return False
        return lower_tensor_of_sizes(node, node.args[1] if len(node.args) > 1 else None)

    def lower_complex(self, node: fx.Node, graph_module: fx.GraphModule) -> bool:
        return lower_new_from_complex(self, node, graph_module)


def lower_new_from_complex(rule: Any, node: fx.Node, graph_module: fx.GraphModule) -> bool:
    """``spec.new_tensor(counts, dtype=torch.long)`` and the other ``x.new_*`` of a complex
    ``x`` making a real tensor: ``x`` lends only its device, which its (real, imaginary) pair
    has too. Anything else computing on complex values here has no lowering."""
    if node.op != "call_method" or not str(node.target).startswith("new_"):
        raise ValueError(
            f"{node.target} of a complex tensor has no lowering to (real, imaginary) pairs"
        )
    if complex_values(node):
        raise ValueError(f"{node.target} making a complex tensor has no lowering to pairs")
    return bool(rule.lower(node, graph_module))


def lower_tensor_of_sizes(node: fx.Node, data: Any) -> bool:
    """For export: a tensor made from a flat list holding sizes (nodes; ints of a generalized
    recorded run, ``passes.generalize``) as ``runtime.tensor_of_sizes``: the exporters would
    bake the sizes in. ``x.new_tensor(data)`` takes ``x``'s device."""
    meta = node.meta.get("tensor_meta")
    one = _is_size_expression(data)
    if one:
        data = [data]  # one size: made a 0-d tensor
    if (
        not isinstance(data, (list, tuple))
        or not any(isinstance(v, fx.Node) for v in data)
        or any(isinstance(v, (list, tuple)) for v in data)
        or set(node.kwargs) - {"dtype", "device"}
        or meta is None
    ):
        return False
    like = node.args[0] if node.op == "call_method" else None
    node.op, node.target = "call_function", runtime.tensor_of_sizes
    node.args, node.kwargs = (data[0] if one else list(data), meta.dtype, like), {}
    return True


def _is_size_expression(value: Any) -> bool:
    """Whether ``value`` is an integer computed from sizes: ``x.size(d)``, or arithmetic of such
    and literal integers (what ``passes.generalize`` writes)."""
    if not isinstance(value, fx.Node):
        return False
    if value.op == "call_method" and value.target == "size" and len(value.args) == 2:
        return True
    return (
        value.op == "call_function"
        and value.target in (operator.add, operator.sub, operator.mul, operator.mod)
        and all(_is_size_expression(a) or type(a) is int for a in value.args)
    )


RULES.add(
    CastRule(),
    functions=[runtime.as_variable],
    methods=["to", "type_as", "type", "long", "int", "bool", "new_tensor"],
)


class FactoryRule:
    """torch.zeros/ones/empty/full(sizes) and x.new_zeros/new_ones/new_empty/new_full(sizes):
    a new tensor, a source of its static axes. A size read from another tensor (``B, N, T =
    x.shape``; ``list(x.shape[:-1]) + [pad]``; ``x.shape``) makes the axis that tensor's axis,
    and the slim model reads the kept size by itself; a literal size makes a fresh axis that
    whoever uses the tensor couples (a cat, an add), and the slim model is given the kept count;
    a size computed any other way freezes the axis. ``x`` of ``x.new_*`` only lends its dtype."""

    def couple(self, ctx: NodeContext) -> None:
        sizes = self._sizes(ctx.node)
        if sizes is None:
            return ctx.freeze_all("tensor factory with sizes sepfx cannot read")
        whole = self._whole(ctx.node)
        for j, size in enumerate(sizes if whole is None else ()):
            o = ctx.axis(None, j)
            read = ctx.size_read(size)
            if isinstance(read, tuple):  # an int read from an axis
                ctx.same(ctx.state.axes[read], o)
            elif o is None:
                continue
            elif isinstance(size, int) and not isinstance(size, bool):
                ctx.touch(o)
            else:
                ctx.freeze(o, "a factory's size computed from other values")
        read = ctx.size_read(whole)
        if whole is not None and not isinstance(read, dict):
            return ctx.freeze_all("a factory's sizes computed from other values")
        # whole given: read is a shape {dim: axis} (else returned above)
        for j, key in cast(dict[int, AxisKey], read).items() if whole is not None else ():
            ctx.same(ctx.state.axes[key], ctx.axis(None, j))
        for x in ctx.tensor_inputs():
            ctx.touch(*ctx.axes(x))

    @staticmethod
    def _size_slot(node: fx.Node) -> tuple[tuple[str, Any], Any]:
        """(where, sizes): where the sizes are given, ``("args", start)`` for separate arguments
        from ``start``, ``("arg", i)`` for one sequence or shape argument, ``("kwarg", name)``;
        sizes is that sequence (None for a shape node)."""
        start = 1 if node.op == "call_method" else 0
        if "size" in node.kwargs:
            return ("kwarg", "size"), node.kwargs["size"]
        full = node.target in ("new_full", torch.full)
        rest = node.args[start:]
        if full or (
            len(rest) == 1
            and (isinstance(rest[0], (tuple, list, torch.Size)) or _is_shape(rest[0]))
        ):
            return ("arg", start), rest[0] if rest else None
        return ("args", start), list(rest)

    def _whole(self, node: fx.Node) -> fx.Node | None:
        _, sizes = self._size_slot(node)
        return sizes if isinstance(sizes, fx.Node) else None

    def _sizes(self, node: fx.Node) -> list[Any] | None:
        """The size given for each output dim (int, node or None), or None if unreadable."""
        _, sizes = self._size_slot(node)
        if isinstance(sizes, fx.Node):
            shape = tensor_shapes(node)
            return [None] * len(shape[0]) if shape else None
        if isinstance(sizes, (tuple, list, torch.Size)):
            return list(sizes)
        return None

    def rewrite(self, node: fx.Node, pruning: PruningView) -> None:
        (where, at), sizes = self._size_slot(node)
        if isinstance(sizes, fx.Node) or sizes is None:
            return
        out = pruning.shape(node)
        assert out is not None  # a factory makes a tensor
        new = list(sizes)
        for j, size in enumerate(sizes):
            if (
                isinstance(size, int)
                and not isinstance(size, bool)
                and j < len(out)
                and size == out[j]
            ):
                kept = pruning.kept_value(node, j)
                if pruned(kept, size):
                    new[j] = len(kept)
        if new == list(sizes):
            return
        if where == "kwarg":
            node.kwargs = {**node.kwargs, at: type(sizes)(new) if isinstance(sizes, tuple) else new}
        elif where == "arg":
            args = list(node.args)
            args[at] = tuple(new) if isinstance(sizes, tuple) else new
            node.args = tuple(args)
        else:
            node.args = tuple(node.args[:at]) + tuple(new)

    def lower(self, node: fx.Node, graph_module: fx.GraphModule) -> bool:
        """For export: ``torch.full(size, n)`` whose fill value ``n`` is a size (a node) as
        ``runtime.filled``: the exporters would bake it in."""
        if node.target not in ("new_full", torch.full) or set(node.kwargs) - {"dtype", "device"}:
            return False
        start = 1 if node.op == "call_method" else 0
        size, value = (list(node.args[start:]) + [None, None])[:2]
        meta = node.meta.get("tensor_meta")
        if not isinstance(value, fx.Node) or meta is None:
            return False
        like = node.args[0] if start else None
        node.op, node.target = "call_function", runtime.filled
        node.args, node.kwargs = (size, value, meta.dtype, like), {}
        return True

    def lower_complex(self, node: fx.Node, graph_module: fx.GraphModule) -> bool:
        return lower_new_from_complex(self, node, graph_module)


def _is_shape(value: Any) -> bool:
    """A node whose value is a shape (``x.shape``, ``x.size()``, a slice of one)."""
    values = scalar_values(value) if isinstance(value, fx.Node) else None
    return values is not None and isinstance(values[0], tuple)


RULES.add(
    FactoryRule(),
    functions=[torch.zeros, torch.ones, torch.empty, torch.full],
    methods=["new_zeros", "new_ones", "new_empty", "new_full"],
)


class PReLURule:
    def couple(self, ctx: NodeContext) -> None:
        m = cast(nn.PReLU, ctx.module)
        if m.num_parameters == 1:
            return ELEMENTWISE.couple(ctx)
        x = ctx.node.args[0]
        channel = ctx.module_axis("weight", m.num_parameters)
        ctx.same(ctx.axis(x, 1), channel)
        for d, (a, o) in enumerate(zip(ctx.axes(x), ctx.axes())):
            ctx.same(a, o)

    def slim_module(self, m: nn.PReLU, pruning: PruningView, qualname: str) -> nn.Module | None:
        kept = pruning.kept_module(qualname, "weight")
        if not pruned(kept, m.num_parameters):
            return None
        m.weight = sliced_parameter(m.weight, kept)
        m.num_parameters = len(kept)
        return m

    def importance(self, m: nn.PReLU, axis: str) -> list[tuple[torch.Tensor, int]]:
        return [(m.weight, 0)] if axis == "weight" else []

    def lower(self, node: fx.Node, graph_module: fx.GraphModule) -> bool:
        """For export: the fastest exact elementwise form for this module's slopes
        (``runtime.lower_prelu``) instead of ONNX PRelu, which ONNX Runtime runs slowly."""
        if len(node.args) != 1 or node.kwargs:
            return False
        module = cast(nn.PReLU, graph_module.get_submodule(cast(str, node.target)))
        with graph_module.graph.inserting_before(node):  # dropped by the caller if unused
            weight = graph_module.graph.get_attr(f"{node.target}.weight")
        function, args = runtime.lower_prelu(module, weight)
        node.op, node.target, node.args = "call_function", function, (node.args[0], *args)
        return True


RULES.add(PReLURule(), modules=[nn.PReLU])


class GetAttr:
    """A parameter or buffer read by the graph: its axes are the attribute's own."""

    def couple(self, ctx: NodeContext) -> None:
        node = ctx.node
        target = cast(str, node.target)  # a get_attr node: the attribute's qualified name
        owner = target.rsplit(".", 1)[0] if "." in target else ""
        called = {n.target for n in node.graph.nodes if n.op == "call_module"}
        inside_called = any(owner == c or owner.startswith(c + ".") for c in called)
        for d, axis in enumerate(ctx.axes()):
            if axis is None:
                continue
            if inside_called:
                ctx.freeze(axis, "parameter of a called module is also read directly")
            else:
                ctx.same(axis, ctx.attr_axis(target, d, axis.size))


GET_ATTR = RULES.add(GetAttr(), node_ops=["get_attr"])
