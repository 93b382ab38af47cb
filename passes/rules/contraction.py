"""Contractions: matmul/bmm and einsum."""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any, cast

import torch
from torch import fx

from passes.axes import Axis
from passes.context import NodeContext
from passes.rules.registry import RULES
from passes.values import Shape


class MatmulRule:
    """a @ b with both operands at least 2-D: the contracted axes of a and b are one axis."""

    def couple(self, ctx: NodeContext) -> None:
        a_node, b_node = ctx.node.args[:2]
        sa, sb, so = ctx.shape(a_node), ctx.shape(b_node), ctx.shape()
        if sa is None or sb is None or len(sa) < 2 or len(sb) < 2:
            return ctx.freeze_all("matmul with a 1-D operand")
        assert so is not None  # the product of two tensors
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


RULES.add(
    MatmulRule(), functions=[torch.matmul, operator.matmul, torch.bmm], methods=["matmul", "bmm"]
)


class EinsumRule:
    """torch.einsum(equation, *operands): axes carrying the same letter (in any operand or the
    output) are one axis; a letter left out of the output is summed over, which pruning keeps
    exact (pruned channels are zero). ``...`` stands for the same axes in every operand,
    aligned from the right. Costs as a matmul: the product of every letter's kept fraction."""

    def couple(self, ctx: NodeContext) -> None:
        node = ctx.node
        parsed = _einsum_parse(node, ctx.shape)
        if parsed is None:
            return ctx.freeze_all("einsum equation sepfx cannot read")
        specs, out_spec, operands = parsed
        by_letter: dict[str, list[tuple[fx.Node | None, int]]] = {}
        for x, spec in zip(operands, specs):
            for d, letter in enumerate(spec):
                by_letter.setdefault(letter, []).append((x, d))
        for d, letter in enumerate(out_spec):
            by_letter.setdefault(letter, []).append((None, d))
        representatives: list[Axis | None] = []
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


def _einsum_parse(
    node: fx.Node, shape_of: Callable[[Any], Shape | None]
) -> tuple[list[str], str, list[fx.Node]] | None:
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
    ranks = [len(cast(Shape, shape_of(x))) for x in operands]  # not None: checked above
    widths = [rank - (len(spec) - 3) if "..." in spec else 0 for spec, rank in zip(specs, ranks)]
    width = max(widths, default=0)
    ellipsis = "".join(str(i) for i in range(width))
    specs = [spec.replace("...", ellipsis[width - w :]) for spec, w in zip(specs, widths)]
    if any(len(spec) != rank for spec, rank in zip(specs, ranks)):
        return None
    if arrow:
        out = rhs.replace("...", ellipsis)
    else:  # implicit output: the letters seen once, in order
        letters = "".join(specs)
        out = ellipsis + "".join(
            sorted(c for c in set(letters) if letters.count(c) == 1 and not c.isdigit())
        )
    if len(out) != len(shape_of(node) or ()):
        return None
    return specs, out, cast(list[fx.Node], operands)  # all nodes: checked above


RULES.add(EinsumRule(), functions=[torch.einsum])
