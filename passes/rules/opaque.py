"""The fallback for a module with no rule (an untraceable custom module or an unknown layer)."""

from __future__ import annotations

from typing import cast

import torch
from torch import fx, nn

from passes.context import NodeContext
from passes.rules.registry import RULES, describe_op
from passes.values import LEAF_INPUTS, Shape


class OpaqueLeafRule:
    """A module with no rule (a custom module that could not be traced, or an unknown layer):
    its channel behaviour is not guessed. An axis is passed through only where a numerical
    check certifies that the module commutes with channel subsetting along it,
    f(x[:, S]) == f(x)[:, S], on the recorded input and a random one, for several S; every
    other axis is frozen with the reason."""

    trials = 3

    def couple(self, ctx: NodeContext) -> None:
        node = ctx.node
        inputs = node.meta.get(LEAF_INPUTS)
        tensors = [a for a in node.args if isinstance(a, fx.Node)]
        name = describe_op(node, ctx.state.modules)
        out_shape = ctx.shape()
        # (a non-tensor input has no shape: len(None) raises, as before typing)
        if (
            inputs is None
            or len(tensors) != 1
            or node.kwargs
            or out_shape is None
            or len(out_shape) != len(cast(Shape, ctx.shape(tensors[0])))
        ):
            return ctx.freeze_all(f"opaque {name}: not a one-tensor-in, one-tensor-out module")
        x_node = tensors[0]
        x = inputs[0][0]
        for d, (a, o) in enumerate(zip(ctx.axes(x_node), ctx.axes())):
            if a is None and o is None:
                continue
            if (
                a is not None
                and o is not None
                and a.size == o.size
                and self._commutes(ctx.module, x, d)
            ):
                ctx.same(a, o)
            else:
                reason = f"opaque {name}: f(x[S]) != f(x)[S] along dim {d}"
                ctx.freeze(a, reason)
                ctx.freeze(o, reason)

    def _commutes(self, module: nn.Module, x: torch.Tensor, dim: int) -> bool:
        generator = torch.Generator().manual_seed(dim)  # drawn on the CPU: the same on any device
        n = x.shape[dim]
        try:
            with torch.no_grad():
                for trial in range(self.trials):
                    sample = (
                        x
                        if trial == 0
                        else torch.randn(x.shape, generator=generator, dtype=x.dtype, device="cpu")
                    ).to(x.device)
                    subset = torch.randperm(n, generator=generator, device="cpu")
                    subset = subset[: max(1, n // 2)].sort().values.to(x.device)
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


OPAQUE_LEAF = RULES.add(OpaqueLeafRule(), unknown_module=True)
