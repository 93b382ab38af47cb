"""Ops that move elements without computing on them: cat, split/chunk, stack, permute,
reshapes, size reads, indexing and item assignment, index_add (overlap-add), windows
(unfold/fold)."""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from numpy.typing import NDArray
from torch import fx

from passes import runtime
from passes.axes import Axis
from passes.context import NodeContext
from passes.rules.pointwise import fixed_int, lower_tensor_of_sizes, mutates, regated, scaled_read
from passes.rules.registry import (
    RULES,
    GatedBuilderView,
    PruningView,
    arg,
    complex_rank,
    pruned,
    set_arg,
)
from passes.values import AxisKey, Shape, ValuePath, scalar_values, tensor_shapes


def _operands(ctx: NodeContext, sequence: Any) -> list[tuple[fx.Node, ValuePath]]:
    """The tensors of a cat/stack argument as (node, path): a list of nodes, or one node
    holding a tuple of tensors (``torch.cat(x.chunk(2))``)."""
    if isinstance(sequence, fx.Node):
        return [(sequence, p) for p in ctx.tensor_paths(sequence) if len(p) == 1]
    return [(t, ()) for t in sequence if isinstance(t, fx.Node)]


def _rank(x: Any) -> int:
    """The rank of the complex tensor ``x`` (ValueError when it is not one: an op mixing
    complex and real tensors that the lowering does not know)."""
    rank = complex_rank(x)
    if rank is None:
        raise ValueError("complex and real tensors mixed")
    return rank


def _complex_dim(node: fx.Node, index: int, name: str, default: Any, rank: int) -> None:
    """Argument ``index``/``name`` of ``node``, a dim of a complex tensor of ``rank``, counted
    from the front: the same dim of the (real, imaginary) pairs that carry it."""
    dim = arg(node, index, name, default)
    if isinstance(dim, (tuple, list)):
        set_arg(node, index, name, type(dim)(d % rank for d in dim))
    elif isinstance(dim, int):
        set_arg(node, index, name, dim % rank)
    else:
        raise ValueError(f"a computed dim of a complex tensor ({dim!r})")


class CatRule:
    def couple(self, ctx: NodeContext) -> None:
        node = ctx.node
        out_shape = ctx.shape()
        assert out_shape is not None  # a cat makes a tensor
        dim = arg(node, 1, "dim", 0) % len(out_shape)
        out = ctx.axis(None, dim)
        offset = 0
        broken = False
        for t, path in _operands(ctx, arg(node, 0, "tensors")):
            shape = ctx.shape(t, path)
            if shape is None or len(shape) != len(out_shape):
                continue  # an empty operand (numel 0, any rank) adds nothing
            n = shape[dim]
            a = ctx.axis(t, dim, path)
            if out is not None and a is not None:
                ctx.link(a, np.arange(n), out, offset + np.arange(n))
            elif out is not None and n > 0:
                broken = True
            else:
                ctx.freeze(a, "concatenated along a dynamic axis")
            for d in range(len(out_shape)):
                if d != dim:
                    ctx.same(ctx.axis(t, d, path), ctx.axis(None, d))
            offset += n
        if broken:
            ctx.freeze(out, "an operand of size 1 is concatenated along this axis")

    def lower(self, node: fx.Node, graph_module: fx.GraphModule) -> bool:
        """For export: drop empty operands (ONNX Runtime rejects their rank)."""
        tensors = arg(node, 0, "tensors")
        if not isinstance(tensors, (list, tuple)):  # one node holding a tuple: nothing to drop
            return False
        kept = [t for t in tensors if not _empty(t)]
        if not kept or len(kept) == len(tensors):
            return False
        node.args = (kept, *node.args[1:])
        return True

    def lower_complex(self, node: fx.Node, graph_module: fx.GraphModule) -> bool:
        tensors = arg(node, 0, "tensors")
        if not isinstance(tensors, (list, tuple)) or not tensors:
            raise ValueError("a concatenation of complex tensors held in one node")
        _complex_dim(node, 1, "dim", 0, _rank(tensors[0]))
        return True


def _empty(value: Any) -> bool:
    meta = value.meta.get("tensor_meta") if isinstance(value, fx.Node) else None
    return meta is not None and hasattr(meta, "shape") and meta.shape.numel() == 0


RULES.add(CatRule(), functions=[torch.cat, torch.concat])


class SplitRule:
    """split/chunk along an axis: piece i holds a slice at an offset. The slim model splits
    with the kept sizes (chunk becomes split, since halves may keep different counts)."""

    def _pieces(self, ctx: NodeContext) -> list[ValuePath]:
        return [p for p in ctx.tensor_paths(ctx.node) if len(p) == 1]

    def couple(self, ctx: NodeContext) -> None:
        node = ctx.node
        x = node.args[0]
        x_shape = ctx.shape(x)
        assert x_shape is not None  # the split tensor
        dim = self._dim(node) % len(x_shape)
        source = ctx.axis(x, dim)
        offset = 0
        for path in self._pieces(ctx):
            piece_shape = ctx.shape(None, path)
            assert piece_shape is not None  # a tensor path
            n = piece_shape[dim]
            piece = ctx.axis(None, dim, path)
            if source is not None and piece is not None:
                ctx.link(source, offset + np.arange(n), piece, np.arange(n))
            elif source is not None:
                ctx.freeze(source, "split into pieces of size 1")
            for d in range(len(x_shape)):
                if d != dim:
                    ctx.same(ctx.axis(x, d), ctx.axis(None, d, path))
            offset += n

    def _dim(self, node: fx.Node) -> Any:
        return arg(node, 2, "dim", 0)

    def lower_complex(self, node: fx.Node, graph_module: fx.GraphModule) -> bool:
        _complex_dim(node, 2, "dim", 0, _rank(node.args[0]))
        return True

    def rewrite(self, node: fx.Node, pruning: PruningView) -> None:
        x = cast(fx.Node, node.args[0])  # the split tensor
        x_shape = pruning.shape(x)
        assert x_shape is not None
        dim = self._dim(node) % len(x_shape)
        kept = pruning.kept_value(x, dim)
        if not pruned(kept, x_shape[dim]):
            return
        sizes: list[int] = []
        offset = 0
        for path in sorted(p for p in pruning.tensor_paths(node) if len(p) == 1):
            piece_shape = pruning.shape(node, path)
            assert piece_shape is not None  # a tensor path
            n = piece_shape[dim]
            sizes.append(int(((kept >= offset) & (kept < offset + n)).sum()))
            offset += n
        if node.op == "call_method":
            node.target = "split"
        else:
            node.target = torch.split
        node.args = (x, sizes)
        node.kwargs = {"dim": dim}


RULES.add(SplitRule(), functions=[torch.split, torch.chunk], methods=["split", "chunk"])


class UnbindRule:
    """``x.unbind(dim)`` / ``torch.unbind(x, dim)`` (a mask tensor into one tensor per speaker):
    piece i is ``x`` indexed by i along ``dim``, which it drops; every other axis is the same
    axis in ``x`` and in each piece. A static ``dim`` is frozen, as indexing by a constant."""

    def couple(self, ctx: NodeContext) -> None:
        node = ctx.node
        x = node.args[0]
        x_shape = ctx.shape(x)
        assert x_shape is not None  # the unbound tensor
        dim = arg(node, 1, "dim", 0) % len(x_shape)
        ctx.freeze(ctx.axis(x, dim), "unbound into one piece per index")
        for path in (p for p in ctx.tensor_paths(node) if len(p) == 1):
            for d in range(len(x_shape)):
                if d != dim:
                    ctx.same(ctx.axis(x, d), ctx.axis(None, d - (d > dim), path))

    def lower_complex(self, node: fx.Node, graph_module: fx.GraphModule) -> bool:
        _complex_dim(node, 1, "dim", 0, _rank(node.args[0]))
        return True


RULES.add(UnbindRule(), functions=[torch.unbind], methods=["unbind"])


class StackRule:
    def couple(self, ctx: NodeContext) -> None:
        node = ctx.node
        out_shape = ctx.shape()
        assert out_shape is not None  # a stack makes a tensor
        n = len(out_shape)
        dim = arg(node, 1, "dim", 0) % n
        ctx.freeze(ctx.axis(None, dim), "stacked axis")
        for t, path in _operands(ctx, arg(node, 0, "tensors")):
            for d, a in enumerate(ctx.axes(t, path)):
                ctx.same(a, ctx.axis(None, d if d < dim else d + 1))

    def lower_complex(self, node: fx.Node, graph_module: fx.GraphModule) -> bool:
        tensors = arg(node, 0, "tensors")
        if not isinstance(tensors, (list, tuple)) or not tensors:
            raise ValueError("a stack of complex tensors held in one node")
        _complex_dim(node, 1, "dim", 0, _rank(tensors[0]) + 1)
        return True


RULES.add(StackRule(), functions=[torch.stack])


class RepeatRule:
    """``x.repeat(*factors)`` / ``torch.tile(x, factors)``: along a repeated static axis the r
    copies of element c (c, c + n, ... of the result) live and die together; the factors
    stay as they are in the slim model."""

    def couple(self, ctx: NodeContext) -> None:
        node = ctx.node
        x = node.args[0]
        factors: list[Any] = (
            list(node.args[1:]) if node.op == "call_method" else [arg(node, 1, "dims")]
        )
        if len(factors) == 1 and isinstance(factors[0], (tuple, list, torch.Size)):
            factors = list(factors[0])
        shape, out = ctx.shape(x), ctx.shape()
        if shape is None or out is None or not all(isinstance(f, int) for f in factors):
            return ctx.freeze_all("repeat by factors sepfx cannot read")
        offset = len(out) - len(shape)
        factors = [1] * (len(out) - len(factors)) + factors
        for d in range(len(shape)):
            a, o, r = ctx.axis(x, d), ctx.axis(None, d + offset), factors[d + offset]
            if r == 1 or a is None or o is None:
                ctx.same(a, o)
            else:
                ctx.link(a, np.tile(np.arange(a.size), r), o, np.arange(o.size))
        for d in range(offset):  # new leading axes: copies of the whole tensor
            ctx.freeze(ctx.axis(None, d), "a new axis of repeated copies")


RULES.add(RepeatRule(), functions=[torch.tile], methods=["repeat", "tile"])


class ComplexViewRule:
    """``torch.view_as_complex(x [..., 2])`` and ``torch.view_as_real(z)``: the axes but the
    (real, imaginary) pair are the same axes."""

    def __init__(self, to_complex: bool) -> None:
        self.to_complex = to_complex

    def couple(self, ctx: NodeContext) -> None:
        x = ctx.node.args[0]
        inner, outer = (x, None) if self.to_complex else (None, x)
        pair = ctx.axis(inner, -1)
        ctx.freeze(pair, "the (real, imaginary) pair of a complex view")
        outer_shape = ctx.shape(outer)
        assert outer_shape is not None  # tensor in, tensor out
        for d in range(len(outer_shape)):
            ctx.same(ctx.axis(inner, d), ctx.axis(outer, d))

    def lower_complex(self, node: fx.Node, graph_module: fx.GraphModule) -> bool:
        """The complex tensor is carried as its (real, imaginary) pairs: the view is that."""
        node.target, node.args, node.kwargs = runtime.pair_view, (node.args[0],), {}
        return True


RULES.add(ComplexViewRule(True), functions=[torch.view_as_complex])
RULES.add(ComplexViewRule(False), functions=[torch.view_as_real])


class PermuteRule:
    def couple(self, ctx: NodeContext) -> None:
        node = ctx.node
        x = node.args[0]
        x_shape = ctx.shape(x)
        assert x_shape is not None  # the permuted tensor
        n = len(x_shape)
        perm = self.permutation(node, n)
        for d_out, d_in in enumerate(perm):
            ctx.same(ctx.axis(x, d_in), ctx.axis(None, d_out))

    @staticmethod
    def permutation(node: fx.Node, n: int) -> list[int]:
        if node.target in ("transpose", torch.transpose, "swapaxes"):
            a, b = arg(node, 1, "dim0") % n, arg(node, 2, "dim1") % n
            perm = list(range(n))
            perm[a], perm[b] = perm[b], perm[a]
            return perm
        if node.target in ("t",):
            return [1, 0][:n]
        dims: Any = node.args[1:] if node.target == "permute" else (arg(node, 1, "dims"),)
        if len(dims) == 1 and isinstance(dims[0], (tuple, list)):
            dims = dims[0]
        return [d % n for d in dims]

    def lower_complex(self, node: fx.Node, graph_module: fx.GraphModule) -> bool:
        x = node.args[0]
        rank = _rank(x)
        perm = self.permutation(node, rank)
        node.op, node.target, node.kwargs = "call_method", "permute", {}
        node.args = (x, *perm, rank)
        return True


RULES.add(
    PermuteRule(),
    functions=[torch.transpose, torch.permute],
    methods=["transpose", "permute", "t", "swapaxes"],
)


def reshape_groups(
    in_shape: Sequence[int], out_shape: Sequence[int]
) -> list[tuple[list[int], list[int]]] | None:
    """Pair runs of input dims with runs of output dims of equal product (size-1 dims left
    out). Returns a list of (input dims, output dims), or None when the shapes do not pair."""
    ins = [d for d, s in enumerate(in_shape) if s != 1]
    outs = [d for d, s in enumerate(out_shape) if s != 1]
    groups: list[tuple[list[int], list[int]]] = []
    i, j = 0, 0
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

    def couple(self, ctx: NodeContext) -> None:
        node = ctx.node
        x = node.args[0]
        x_shapes, out_shapes = _shapes(x), _shapes(node)
        assert x_shapes is not None and out_shapes is not None  # tensor in, tensor out
        (ref_in, probe_in), (ref_out, probe_out) = x_shapes, out_shapes
        groups = reshape_groups(ref_in, ref_out)
        if groups is None or reshape_groups(probe_in, probe_out) is None:
            return ctx.freeze_all("reshape mixes axes in a way sepfx cannot follow")
        for dims_in, dims_out in groups:
            dynamic = any(ref_in[d] != probe_in[d] for d in dims_in) or any(
                ref_out[d] != probe_out[d] for d in dims_out
            )
            if dynamic and self._inner_static(
                ctx, x, dims_in, dims_out, ref_in, probe_in, ref_out, probe_out
            ):
                continue
            if dynamic:
                for d in dims_in:
                    ctx.freeze(
                        ctx.axis(x, d), "merged with or split from a batch/time axis"
                    ) if len(dims_in) + len(dims_out) > 2 else ctx.touch(ctx.axis(x, d))
                for d in dims_out:
                    ctx.freeze(
                        ctx.axis(None, d), "merged with or split from a batch/time axis"
                    ) if len(dims_in) + len(dims_out) > 2 else ctx.touch(ctx.axis(None, d))
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
    def _inner_static(
        ctx: NodeContext,
        x: Any,
        dims_in: list[int],
        dims_out: list[int],
        ref_in: Shape,
        probe_in: Shape,
        ref_out: Shape,
        probe_out: Shape,
    ) -> bool:
        """[B, r*C] <-> [B*r, C] (a mask conv's n_src x C channels folded into the batch, or
        unfolded back): when the one static axis on each side is the innermost of the group,
        channel c on the narrow side is channel c of every block of the wide side."""
        static_in = [d for d in dims_in if ref_in[d] == probe_in[d]]
        static_out = [d for d in dims_out if ref_out[d] == probe_out[d]]
        if (
            len(static_in) != 1
            or len(static_out) != 1
            or static_in[0] != dims_in[-1]
            or static_out[0] != dims_out[-1]
        ):
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
    def _factor(
        ctx: NodeContext,
        x: Any,
        dims_in: list[int],
        dims_out: list[int],
        ref_in: Shape,
        ref_out: Shape,
    ) -> None:
        split = len(dims_in) == 1
        whole = ctx.axis(x, dims_in[0]) if split else ctx.axis(None, dims_out[0])
        factors = dims_out if split else dims_in
        sizes = [(ref_out if split else ref_in)[d] for d in factors]
        coords = np.unravel_index(np.arange(int(np.prod(sizes))), sizes)
        keep = _prunable_factor(
            ctx,
            whole,
            [ctx.axis(None, d) if split else ctx.axis(x, d) for d in factors],
            sizes,
            coords,
        )
        for i, d in enumerate(factors):
            axis = ctx.axis(None, d) if split else ctx.axis(x, d)
            if i == keep:
                # static axes of a size other than 1 (reshape_groups leaves size 1 out)
                assert whole is not None and axis is not None
                ctx.link(whole, np.arange(whole.size), axis, coords[i])
            else:
                ctx.freeze(axis, "another factor of a split channel axis is the prunable one")

    @staticmethod
    def _shape_args(ctx: NodeContext, ref_out: Shape) -> None:
        """A size read from another tensor passed as a target size ties that axis here."""
        sizes = _size_args(ctx.node)
        if sizes is None:
            return
        whole = ctx.size_read(sizes[0]) if len(sizes) == 1 else None
        if isinstance(whole, dict) and len(ref_out) > 1:
            # ``y.view(x.shape)``: every axis of the result is the same axis of ``x``
            for j, key in whole.items():
                if j < len(ref_out):
                    ctx.same(ctx.state.axes[key], ctx.axis(None, j))
            return
        for j, s in enumerate(sizes):
            read = ctx.size_read(s)
            if isinstance(read, tuple) and j < len(ref_out):
                a = ctx.state.axes[read]
                ctx.same(a, ctx.axis(None, j))
            elif j < len(ref_out) and scaled_read(ctx, s) is not None:
                # ``x.reshape(B, C * K, S)``: channel c of the tensor C was read from is the
                # block c*K..c*K+K-1 of this axis (C the outer factor)
                key, factor = cast(tuple[AxisKey, int], scaled_read(ctx, s))  # not None
                a, o = ctx.state.axes[key], ctx.axis(None, j)
                if o is not None and o.size == a.size * factor:
                    ctx.link(a, np.repeat(np.arange(a.size), factor), o, np.arange(o.size))
                else:
                    ctx.freeze(a, "its size times a literal is not the reshaped axis")

    def rewrite(self, node: fx.Node, pruning: PruningView) -> None:
        if node.target in ("unflatten", torch.unflatten):
            return self._rewrite_unflatten(node, pruning)
        sizes = _size_args(node)
        if sizes is None:
            return
        out = pruning.shape(node)
        assert out is not None  # a reshape makes a tensor
        new = list(sizes)
        changed = False
        for j, size in enumerate(sizes):
            if isinstance(size, int) and size == out[j] and size > 1:
                kept = pruning.kept_value(node, j)
                if pruned(kept, size):
                    new[j] = len(kept)
                    changed = True
        if changed:
            node.args = (
                (node.args[0], *new)
                if node.target in ("view", "reshape")
                else (node.args[0], tuple(new))
            )
        if (
            node.op == "call_method"
            and node.target == "view"
            and not any(isinstance(v, torch.dtype) for v in sizes)
            and (changed or self._touches_pruned(node, pruning))
        ):
            # slimming changes strides (a Linear over a transposed axis, a broadcast product):
            # a view that merged dims of the dense tensor may not be viewable any more at some
            # batch size; reshape is the same view where one exists and a copy where not
            node.target = "reshape"

    def lower_complex(self, node: fx.Node, graph_module: fx.GraphModule) -> bool:
        """The same reshape of the (real, imaginary) pairs that carry a complex tensor: target
        sizes get the pair axis, dims count from the front."""
        x = node.args[0]
        rank = _rank(x)
        target = node.target
        if target in ("view", "reshape", torch.reshape):
            sizes = _size_args(node)
            if sizes is None and len(node.args) == 2 and isinstance(node.args[1], fx.Node):
                with graph_module.graph.inserting_before(node):  # ``z.view(y.shape)``
                    shape = graph_module.graph.call_function(
                        runtime.with_pair_axis, (node.args[1],)
                    )
                node.args = (x, shape)
            elif sizes is None or any(isinstance(v, torch.dtype) for v in sizes):
                raise ValueError("a reshape of a complex tensor sepfx cannot read")
            else:
                node.args = (x, (*sizes, 2))
            node.op, node.target, node.kwargs = "call_method", "reshape", {}
        elif target in ("flatten", torch.flatten):
            start, end = arg(node, 1, "start_dim", 0), arg(node, 2, "end_dim", -1)
            node.args, node.kwargs = (x, start % rank, end % rank), {}
        elif target in ("unsqueeze", torch.unsqueeze):
            _complex_dim(node, 1, "dim", None, rank + 1)
        elif target in ("squeeze", torch.squeeze):
            if arg(node, 1, "dim") is not None:
                _complex_dim(node, 1, "dim", None, rank)
        elif target in ("unflatten", torch.unflatten):
            _complex_dim(node, 1, "dim", None, rank)
        else:
            raise ValueError(f"{target} of a complex tensor")
        return True

    @staticmethod
    def _touches_pruned(node: fx.Node, pruning: PruningView) -> bool:
        for x in (node.args[0], node):
            shape = pruning.shape(x) if isinstance(x, fx.Node) else None
            for d, size in enumerate(shape or ()):
                if pruned(pruning.kept_value(cast(fx.Node, x), d), size):  # a node: has a shape
                    return True
        return False

    @staticmethod
    def _rewrite_unflatten(node: fx.Node, pruning: PruningView) -> None:
        """x.unflatten(dim, sizes): literal sizes of pruned output dims become kept counts."""
        dim, sizes = arg(node, 1, "dim"), arg(node, 2, "sizes")
        out = pruning.shape(node)
        if not isinstance(sizes, (tuple, list)) or out is None:
            return
        x_shape = pruning.shape(cast(fx.Node, node.args[0]))  # the input tensor
        assert x_shape is not None
        dim = dim % len(x_shape)
        new = list(sizes)
        for i, size in enumerate(sizes):
            kept = pruning.kept_value(node, dim + i)
            if isinstance(size, int) and size == out[dim + i] and pruned(kept, size):
                new[i] = len(kept)
        if new != list(sizes):
            set_arg(node, 2, "sizes", tuple(new))


def _size_args(node: fx.Node) -> list[Any] | None:
    """The target sizes of view/reshape, as a list, or None."""
    if node.target in ("unflatten", torch.unflatten):
        return None
    if node.target in ("view", "reshape") or node.target is torch.reshape:
        rest = node.args[1:]
        if len(rest) == 1 and isinstance(rest[0], (tuple, list)):
            return list(rest[0])
        return list(rest) if rest and all(not isinstance(r, (tuple, list)) for r in rest) else None
    return None


def _shapes(node: Any) -> tuple[Shape, Shape] | None:
    return tensor_shapes(node)


def _prunable_factor(
    ctx: NodeContext,
    whole: Axis | None,
    factor_axes: list[Axis | None],
    sizes: list[int],
    coords: tuple[NDArray[np.intp], ...],
) -> int:
    """Which factor of a channel axis split into (or merged from) several stays prunable: one
    along which the elements already coupled together agree (an F.unfold's [C*K] blocks are
    units of K consecutive elements: C, the outer factor), and not frozen by a rule; among
    those, the largest."""
    candidates = [i for i, a in enumerate(factor_axes) if a is not None]
    if len(candidates) <= 1 or whole is None:
        return max(range(len(sizes)), key=lambda i: (sizes[i], i))
    union_find = ctx.state.union_find
    roots = [union_find.find(whole.start + e) for e in range(whole.size)]

    def agrees(i: int) -> bool:
        seen: dict[int, Any] = {}
        return all(seen.setdefault(r, c) == c for r, c in zip(roots, coords[i]))

    fitting = [i for i in candidates if agrees(i)] or candidates
    if len(fitting) > 1:
        frozen = {
            union_find.find(ctx.state.axes[key].start + j)
            for key in ctx.state.frozen_axes
            for j in range(ctx.state.axes[key].size)
        }
        axes = cast(list[Axis], factor_axes)  # those of ``fitting``, candidates, are not None
        free = [
            i
            for i in fitting
            if not any(union_find.find(axes[i].start + j) in frozen for j in range(axes[i].size))
        ]
        fitting = free or fitting
    return max(fitting, key=lambda i: (sizes[i], i))


RULES.add(
    ReshapeRule(),
    functions=[torch.reshape, torch.flatten, torch.squeeze, torch.unsqueeze, torch.unflatten],
    methods=["view", "reshape", "flatten", "squeeze", "unsqueeze", "unflatten"],
)


class SizeRule:
    """x.shape / x.size() / x.size(d) / x.dim(): reading sizes couples nothing, but the value
    carries the sizes of static axes, so whoever uses it must account for them."""

    def couple(self, ctx: NodeContext) -> None:
        node = ctx.node
        x = node.args[0]
        ctx.touch(*ctx.axes(x))
        if node.target is getattr:
            attr = node.args[1]
            if attr == "shape":
                ctx.read_size({d: a.key for d, a in enumerate(ctx.axes(x)) if a is not None})
            elif attr in ("real", "imag"):  # a complex tensor's parts: the same axes
                for a, o in zip(ctx.axes(x), ctx.axes()):
                    ctx.same(a, o)
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

    def lower_complex(self, node: fx.Node, graph_module: fx.GraphModule) -> bool:
        """Sizes and parts of a complex tensor carried as (real, imaginary) pairs."""
        x = node.args[0]
        rank = _rank(x)
        what = node.args[1] if node.target is getattr else node.target
        if what in ("real", "imag"):
            node.target = operator.getitem
            part: Any = (Ellipsis, int(what == "imag"))  # ``z[..., 0]``: fx's types lack ``...``
            node.args = (x, part)
        elif what == "shape" or (what == "size" and arg(node, 1, "dim") is None):
            node.op, node.target, node.kwargs = "call_function", runtime.pair_shape, {}
            node.args = (x,)
        elif what == "size":
            _complex_dim(node, 1, "dim", None, rank)
        elif what in ("dim", "ndim"):
            node.op, node.target, node.kwargs = "call_function", runtime.pair_dim, {}
            node.args = (x,)
        elif what not in ("device", "is_cuda", "requires_grad"):
            raise ValueError(f".{what} of a complex tensor")
        return True


RULES.add(SizeRule(), functions=[getattr], methods=["size", "dim"])


class ShapeTensorRule:
    """torch.tensor(x.shape): a tensor holding sizes. It carries the sizes like the shape does,
    so indexing it reads a size; any other use of a static size in it freezes that axis."""

    def couple(self, ctx: NodeContext) -> None:
        source = ctx.node.args[0] if ctx.node.args else None
        read = ctx.size_read(source)
        if not isinstance(read, dict):
            return ctx.freeze_all("tensor made from Python values")
        ctx.touch(*[ctx.state.axes[k] for k in read.values()])
        ctx.touch(*ctx.axes())
        ctx.read_size(read)

    def lower(self, node: fx.Node, graph_module: fx.GraphModule) -> bool:
        """For export: ``torch.tensor([... sizes ...])`` kept variable."""
        return lower_tensor_of_sizes(node, node.args[0] if node.args else None)


RULES.add(
    ShapeTensorRule(),
    functions=[torch.tensor, torch.as_tensor, runtime.shape_tensor, runtime.shape_as_tensor],
)


class GetItemRule:
    """Indexing a tuple (a layer's several outputs), a shape, or a tensor (literal slices)."""

    def couple(self, ctx: NodeContext) -> None:
        node = ctx.node
        source, index = cast(tuple[fx.Node, Any], node.args)  # indexing a node's value
        if isinstance(source, (tuple, list)):
            # a literal sequence of values (a part's ``hc`` argument that its caller passed as
            # ``(h, c)``): the item itself
            item = source[index]
            if isinstance(item, fx.Node):
                for path in ctx.tensor_paths(node):
                    for a, b in zip(ctx.axes(item, path), ctx.axes(None, path)):
                        ctx.same(a, b)
            for other in source:  # the other items are not this node's business
                if other is not item and isinstance(other, fx.Node):
                    for path in ctx.tensor_paths(other):
                        ctx.touch(*ctx.axes(other, path))
            return
        if source.name in ctx.state.size_reads:
            read = ctx.state.size_reads[source.name]
            ctx.touch(*[ctx.state.axes[k] for k in read.values()]) if isinstance(
                read, dict
            ) else None
            if isinstance(index, int) and isinstance(read, dict):
                shape = ctx_shape_len(source) or (ctx.shape(source) or [None])[0]
                ctx.read_size(read.get(index % shape) if shape else None)
            elif (
                isinstance(index, slice)
                and _literal_slice(index)
                and isinstance(read, dict)
                and ctx_shape_len(source) is not None
            ):
                # ``x.size()[-2:]``, ``x.shape[:-1]``: the same sizes, renumbered
                dims = list(range(cast(int, ctx_shape_len(source))))[index]  # not None
                ctx.read_size({j: read[d] for j, d in enumerate(dims) if d in read})
            elif isinstance(read, dict):
                for k in read.values():
                    ctx.state.freeze(k, f"{ctx.where()}: sliced shape")
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

    def _tensor_index(self, ctx: NodeContext, x: fx.Node, index: Any) -> None:
        x_shape = ctx.shape(x)
        if x_shape is None:
            return  # indexing a Python value: sizes read into it are checked by their users
        items = _index_items(index, len(x_shape))
        if items is None:
            return ctx.freeze_all("indexing with tensors or unsupported items")
        d_out = 0
        for d_in, item in items:
            if item is None:
                d_out += 1
                continue
            assert d_in is not None  # only a new axis (item None) has no input dim
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
                elif len(idx):  # ``e[:, 2:3]``: one channel, feeding an axis of size 1
                    ctx.keep_elements(a, idx, "a literal slice takes it alone")
                if item.step not in (None, 1):
                    ctx.freeze(a, "strided slice of a channel axis")
                else:
                    ctx.touch(a)
            elif _fraction_slice(ctx, item, a) is not None:
                item, blocks = cast(tuple[slice, int], _fraction_slice(ctx, item, a))  # not None
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

    def lower_complex(self, node: fx.Node, graph_module: fx.GraphModule) -> bool:
        """An item of a tuple of complex tensors is one; a complex tensor carried as (real,
        imaginary) pairs is indexed alike, its pair axis whole."""
        source, index = node.args
        if complex_rank(source) is None:
            return True  # a tuple or list holding complex tensors
        items = list(index) if isinstance(index, tuple) else [index]
        if any(not (i is None or i is Ellipsis or isinstance(i, (int, slice))) for i in items):
            raise ValueError("a complex tensor indexed with tensors or computed indices")
        node.args = (source, (*items, slice(None)))
        return True

    def rewrite(self, node: fx.Node, pruning: PruningView) -> None:
        source, index = node.args
        source_shape = pruning.shape(source) if isinstance(source, fx.Node) else None
        if (
            not isinstance(source, fx.Node)
            or source_shape is None
            or pruning.tensor_paths(source) != [()]
        ):
            return
        new_index = _kept_slices(index, source, pruning)
        if new_index is not None:
            node.args = (source, new_index)


def ctx_shape_len(x: fx.Node) -> int | None:
    values = scalar_values(x)
    return len(values[0]) if values and isinstance(values[0], tuple) else None


def _fraction_slice(ctx: NodeContext, item: slice, axis: Axis) -> tuple[slice, int] | None:
    """For a slice of ``axis`` whose bounds are literal or ``size // m`` of that very axis
    (rotary embeddings' halves): (the slice with its bounds' values, m); else None."""
    if item.step not in (None, 1):
        return None
    blocks: int | None = None
    bounds: list[int | None] = []
    for bound in (item.start, item.stop):
        if bound is None or (isinstance(bound, int) and not isinstance(bound, bool)):
            bounds.append(bound)
            continue
        if not (
            isinstance(bound, fx.Node)
            and bound.target is operator.floordiv
            and isinstance(bound.args[1], int)
            and bound.args[1] > 0
            and ctx.size_read(bound.args[0]) == axis.key
            and axis.size % bound.args[1] == 0
            and blocks in (None, bound.args[1])
        ):
            return None
        blocks = bound.args[1]
        bounds.append(axis.size // blocks)
    if blocks is None:
        return None
    return slice(bounds[0], bounds[1]), blocks


def _literal_slice(item: slice) -> bool:
    return all(v is None or isinstance(v, int) for v in (item.start, item.stop, item.step))


def _index_items(index: Any, ndim: int) -> list[tuple[int | None, int | slice | None]] | None:
    """[(input dim or None, item)] for a tensor index, Ellipsis expanded; None if unsupported."""
    items = list(index) if isinstance(index, tuple) else [index]
    if any(isinstance(i, fx.Node) or isinstance(i, (list, torch.Tensor)) for i in items):
        return None
    used = sum(1 for i in items if i is not None and i is not Ellipsis)
    out: list[tuple[int | None, int | slice | None]] = []
    d = 0
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

    def couple(self, ctx: NodeContext) -> None:
        target, index, value = ctx.node.args[:3]
        shape = ctx.shape(target)
        if shape is None:
            return ctx.freeze_all("item assignment into something that is not a tensor")
        items = _index_items(index, len(shape))
        if items is None:
            return ctx.freeze_all("item assignment with tensor or unsupported indices")
        # (target axis or None, item) of each dim of the indexed part
        view: list[tuple[Axis | None, slice | None]] = []
        for d_in, item in items:
            if item is None:
                view.append((None, None))
                continue
            assert d_in is not None  # only a new axis (item None) has no input dim
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
            assert item is not None  # a target axis comes with its slice
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

    def gated(self, builder: GatedBuilderView, node: fx.Node) -> fx.Node | None:
        return regated(builder, node)

    def rewrite(self, node: fx.Node, pruning: PruningView) -> None:
        target, index, value = node.args[:3]
        if not isinstance(target, fx.Node) or pruning.shape(target) is None:
            return
        new_index = _kept_slices(index, target, pruning)
        if new_index is not None:
            node.args = (target, new_index, value)


def _kept_slices(
    index: Any, x: fx.Node, pruning: PruningView
) -> tuple[int | slice | None, ...] | None:
    """``index`` into ``x`` with literal slices of pruned axes narrowed to the kept elements,
    or None if nothing changes."""
    x_shape = pruning.shape(x)
    assert x_shape is not None  # the caller checked
    items = _index_items(index, len(x_shape))
    if items is None:
        return None
    new_items: list[int | slice | None] = []
    changed = False
    for d_in, item in items:
        if isinstance(item, slice) and item != slice(None) and _literal_slice(item):
            assert d_in is not None  # a slice indexes an input dim
            kept = pruning.kept_value(x, d_in)
            if pruned(kept, x_shape[d_in]):
                start, stop, _ = item.indices(x_shape[d_in])
                item = slice(int((kept < start).sum()), int((kept < stop).sum()))
                changed = True
        new_items.append(item)
    return tuple(new_items) if changed else None


RULES.add(SetItemRule(), functions=[operator.setitem])


class IndexAddRule:
    """``x.index_add_(dim, index, source)`` (overlap-add) and ``x.index_add(...)``: every axis
    but ``dim`` is the same axis in ``x``, ``source`` and the result; along ``dim`` (time, made
    of frames) nothing maps; a static ``dim`` is frozen."""

    def couple(self, ctx: NodeContext) -> None:
        node = ctx.node
        x, dim, index, source = (
            arg(node, i, name) for i, name in enumerate(("self", "dim", "index", "source"))
        )
        shape, source_shape = ctx.shape(x), ctx.shape(source)
        if shape is None or source_shape is None or len(source_shape) != len(shape):
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

    def gated(self, builder: GatedBuilderView, node: fx.Node) -> fx.Node | None:
        return regated(builder, node) if mutates(node) else None


RULES.add(IndexAddRule(), functions=[torch.index_add], methods=["index_add_", "index_add"])


class WindowsRule:
    """``x.unfold(dim, size, step)`` (frames of a signal, or of an index range): the other axes
    map through; ``dim`` becomes the frame axis and a new last axis the window; both are frozen
    when static."""

    def couple(self, ctx: NodeContext) -> None:
        node = ctx.node
        x = node.args[0]
        x_shape = ctx.shape(x)
        assert x_shape is not None  # the windowed tensor
        n = len(x_shape)
        dim = arg(node, 1, "dimension") % n
        for d in range(n):
            if d == dim:
                ctx.freeze(ctx.axis(x, d), "cut into windows along this axis")
                ctx.freeze(ctx.axis(None, d), "frames of a windowed axis")
            else:
                ctx.same(ctx.axis(x, d), ctx.axis(None, d))
        ctx.freeze(ctx.axis(None, n), "window axis")


RULES.add(WindowsRule(), methods=["unfold"])


class UnfoldRule:
    """F.unfold(x [B, C, H, W], kernel) -> [B, C*k, L] and F.fold([B, C*k, L], size, kernel) ->
    [B, C, H, W] (dual-path chunking): channel c is the block of k consecutive elements
    c*k..c*k+k-1 of the merged axis (C is the outer factor), so they live and die together.
    The spatial and block axes are frozen when static."""

    def __init__(self, fold: bool) -> None:
        self.fold = fold

    def couple(self, ctx: NodeContext) -> None:
        node = ctx.node
        x = node.args[0]
        size = _pair(arg(node, 2 if self.fold else 1, "kernel_size"))
        k = int(np.prod(size)) if size is not None else None
        channels, merged = (
            (ctx.axis(None, 1), ctx.axis(x, 1))
            if self.fold
            else (ctx.axis(x, 1), ctx.axis(None, 1))
        )
        ctx.same(ctx.axis(x, 0), ctx.axis(None, 0))
        for t, d_from in ((x, 2), (None, 2)):
            t_shape = ctx.shape(t)
            assert t_shape is not None  # tensor in, tensor out
            for d in range(d_from, len(t_shape)):
                ctx.freeze(ctx.axis(t, d), "a sliding-window axis")
        if k is None or merged is None or channels is None or merged.size != channels.size * k:
            ctx.freeze(channels, "channels folded with kernel positions sepfx cannot follow")
            ctx.freeze(merged, "channels folded with kernel positions sepfx cannot follow")
            return
        ctx.link(channels, np.repeat(np.arange(channels.size), k), merged, np.arange(merged.size))

    def lower(self, node: fx.Node, graph_module: fx.GraphModule) -> bool:
        """For export: a dual-path fold (windows along one axis) as ``runtime.fold_1d``."""
        if not self.fold or node.op != "call_function":
            return False
        names = ("input", "output_size", "kernel_size", "dilation", "padding", "stride")
        values = [
            arg(node, i, name, default)
            for i, (name, default) in enumerate(zip(names, (None, None, None, 1, 0, 1)))
        ]
        # sizes computed in the forward that hold one value at every input as ints: the
        # TorchScript exporter needs a convolution's kernel shape and stride as constants
        values[2:] = [
            type(v)(_fixed_or_node(e) for e in v) if isinstance(v, (tuple, list)) else v
            for v in values[2:]
        ]
        _, size, kernel, dilation, padding, stride = values

        def along(axis: int) -> list[Any]:  # (size, kernel, dilation, padding, stride) there
            return [
                v[axis]
                if isinstance(v, (tuple, list)) and len(v) == 2
                else v
                if isinstance(v, int) and v is not size
                else None
                for v in (size, kernel, dilation, padding, stride)
            ]

        # the windows run along one spatial axis, the other has size 1 and a kernel of 1
        axis = next((a for a in (0, 1) if along(1 - a) == [1, 1, 1, 0, 1]), None)
        # the input's TensorMetadata, or None
        meta: Any = values[0].meta.get("tensor_meta") if isinstance(values[0], fx.Node) else None
        if axis is None or not hasattr(meta, "shape") or len(meta.shape) != 3:
            return False
        window = kernel[axis] if isinstance(kernel, (tuple, list)) else kernel
        channels: Any = int(meta.shape[1]) // window if isinstance(window, int) else None
        if channels is None:
            # a kernel size computed in the forward (``B, N, K, S = x.shape``): the channel
            # count is computed in the graph too, from the input's size at run time
            with graph_module.graph.inserting_before(node):
                merged = graph_module.graph.call_method("size", (values[0], 1))
                channels = graph_module.graph.call_function(operator.floordiv, (merged, window))
        node.target = runtime.fold_1d
        node.args, node.kwargs = (*values, channels, axis), {}
        return True


def _fixed_or_node(value: Any) -> Any:
    fixed = fixed_int(value)
    return value if fixed is None else fixed


def _pair(size: Any) -> tuple[int, ...] | None:
    """A kernel size as ints: literals, or sizes computed in the forward that hold the same
    value at every input (``fixed_int``)."""
    if isinstance(size, (tuple, list)):
        sizes = [fixed_int(v) for v in size]
        return tuple(v for v in sizes if v is not None) if None not in sizes else None
    single = fixed_int(size)
    return None if single is None else (single, single)


RULES.add(UnfoldRule(False), functions=[F.unfold])
RULES.add(UnfoldRule(True), functions=[F.fold])
