"""nn.MultiheadAttention: whole heads."""

from __future__ import annotations

import operator
from typing import Any, cast

import numpy as np
import torch
from torch import fx, nn

from passes import runtime
from passes.context import NodeContext
from passes.rules.registry import RULES, GatedBuilderView, PruningView, arg, sliced_parameter


class AttentionRule:
    """nn.MultiheadAttention: whole heads (q/k/v rows and out_proj columns), and its input and
    output embedding axes, which it shares with the residual stream. The slim model uses
    ``runtime.SlimMultiheadAttention`` (nn.MultiheadAttention needs in == out == inner width)."""

    def _inputs(self, node: fx.Node) -> list[Any]:
        return [arg(node, i, name) for i, name in enumerate(("query", "key", "value"))]

    def couple(self, ctx: NodeContext) -> None:
        m = cast(nn.MultiheadAttention, ctx.module)
        node = ctx.node
        q, k, v = self._inputs(node)
        for name in ("key_padding_mask", "attn_mask"):
            if arg(node, {"key_padding_mask": 3, "attn_mask": 5}[name], name) is not None:
                return ctx.freeze_all(f"attention with a {name}")
        e, h, hd = m.embed_dim, m.num_heads, m.head_dim
        heads = ctx.module_axis("heads", e)
        if heads is not None:  # None: e == 1, one head of one unit, nothing to unite
            for i in range(h):
                ctx.unite(heads, np.arange(i * hd, (i + 1) * hd))
        if m._qkv_same_embed_dim:
            ins = [ctx.module_axis("in", e)] * 3
        else:
            ins = [
                ctx.module_axis("in_q", e),
                ctx.module_axis("in_k", m.kdim),
                ctx.module_axis("in_v", m.vdim),
            ]
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
        # recorded eager code unpacks both outputs (``out, _ = mha(...)``): used means read
        weights_used = any(
            u.target is operator.getitem and u.args[1] == 1 and u.users for u in node.users
        )
        if weights_used:
            ctx.freeze(heads, "the attention weights (averaged over heads) are used")
        for path in ctx.tensor_paths(node)[1:]:
            for a in ctx.axes(None, path):
                ctx.freeze(a, "attention weights")
        q_shape, k_shape = ctx.shape(q), ctx.shape(k)
        assert q_shape is not None and k_shape is not None  # query and key are tensors
        lq, lk = q_shape[seq], k_shape[seq]
        b = q_shape[batch]
        ctx.cost(
            (b * lq * e * e, [ins[0], heads]),
            (b * lk * m.kdim * e, [ins[1], heads]),
            (b * lk * m.vdim * e, [ins[2], heads]),
            (2 * b * lq * lk * e, [heads]),
            (b * lq * e * e, [heads, out]),
            absolute=True,
        )

    def gated(self, builder: GatedBuilderView, node: fx.Node) -> fx.Node | None:
        qualname = cast(str, node.target)  # a call_module node
        mask = builder.module_mask(qualname, "heads")
        q, k, v = self._inputs(node)
        mha = cast(nn.MultiheadAttention, builder.module(qualname))
        target = builder.add_module(runtime.GatedAttention(mha), qualname)
        return builder.call_module(target, (builder.arg(q), builder.arg(k), builder.arg(v), mask))

    def slim_module(
        self, m: nn.MultiheadAttention, pruning: PruningView, qualname: str
    ) -> nn.Module | None:
        names = ["in", "in", "in"] if m._qkv_same_embed_dim else ["in_q", "in_k", "in_v"]
        sizes = [m.embed_dim, m.kdim, m.vdim]
        found_in = [pruning.kept_module(qualname, n) for n in names]
        kept_in = [np.arange(n) if k is None else k for k, n in zip(found_in, sizes)]
        heads = pruning.kept_module(qualname, "heads")
        heads = np.arange(m.embed_dim) if heads is None else heads
        out = pruning.kept_module(qualname, "out")
        out = np.arange(m.embed_dim) if out is None else out
        if (
            all(len(k) == n for k, n in zip(kept_in, sizes))
            and len(heads) == m.embed_dim
            and len(out) == m.embed_dim
        ):
            return None
        wq, bq, wk, bk, wv, bv, wo, bo = runtime._mha_weights(m)
        new = runtime.SlimMultiheadAttention(
            len(kept_in[0]),
            len(kept_in[1]),
            len(kept_in[2]),
            len(heads) // m.head_dim,
            m.head_dim,
            len(out),
            bias=bq is not None,
            batch_first=m.batch_first,
            device=wq.device,
            dtype=wq.dtype,
        )
        for proj, w, b, cols in (
            (new.q_proj, wq, bq, kept_in[0]),
            (new.k_proj, wk, bk, kept_in[1]),
            (new.v_proj, wv, bv, kept_in[2]),
        ):
            proj.weight = sliced_parameter(w, heads, cols)
            if b is not None:
                proj.bias = sliced_parameter(b, heads)
        new.out_proj.weight = sliced_parameter(wo, out, heads)
        if bo is not None:
            new.out_proj.bias = sliced_parameter(bo, out)
        new.train(m.training)
        return new

    def lower(self, node: fx.Node, graph_module: fx.GraphModule) -> bool:
        """For export: plain ops (``runtime.GatedAttention``, no head mask), as in the slim
        model. The TorchScript exporter bakes nn.MultiheadAttention's traced sequence length
        into its reshapes, so a model keeping its attention whole exported only with dynamo,
        about 5x slower to export."""
        if node.op != "call_module" or any(
            arg(node, i, name) is not None
            for i, name in ((3, "key_padding_mask"), (5, "attn_mask"))
        ):
            return False
        if arg(node, 7, "is_causal") or any(
            u.target is operator.getitem and u.args[1] == 1 and u.users for u in node.users
        ):  # a causal mask, or the attention weights are read
            return False
        qualname = cast(str, node.target)
        module = graph_module.get_submodule(qualname)
        if isinstance(module, nn.MultiheadAttention):  # not yet lowered at another call site
            graph_module.set_submodule(qualname, runtime.GatedAttention(module))
        node.args, node.kwargs = tuple(self._inputs(node)), {}
        return True

    def importance(self, m: nn.MultiheadAttention, axis: str) -> list[tuple[torch.Tensor, int]]:
        if axis != "heads":
            return []
        rows = m.in_proj_weight if m._qkv_same_embed_dim else m.q_proj_weight
        return [(rows[: m.embed_dim], 0), (m.out_proj.weight, 1)]


RULES.add(AttentionRule(), modules=[nn.MultiheadAttention])
