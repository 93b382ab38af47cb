"""Recurrent layers: nn.LSTM, nn.GRU and nn.RNN."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import numpy as np
import torch
from torch import fx, nn

from passes import runtime
from passes.axes import Axis
from passes.context import NodeContext
from passes.rules.registry import (
    RULES,
    GatedBuilderView,
    PruningView,
    arg,
    pruned,
    sliced_parameter,
)


class RecurrentRule:
    """nn.LSTM / nn.GRU / nn.RNN: one group of hidden units across every layer and direction
    (the slim model is again an nn.LSTM/GRU/RNN, whose hidden size is one number). Its MACs are
    the closed form gates x hidden x (input + hidden) per step, direction and layer (the
    counter does not see inside), frozen or not."""

    def couple(self, ctx: NodeContext) -> None:
        m = cast(nn.RNNBase, ctx.module)
        node = ctx.node
        x = node.args[0]
        self._cost(ctx, m, x, None, None)
        initial = arg(node, 1, "hx")
        states = _initial_states(m, initial)
        if states is None or len(node.args) > 2 or set(node.kwargs) - {"hx"} or m.proj_size > 0:
            return ctx.freeze_all(
                "recurrent layer with projections or an initial state that is not "
                "a tensor (GRU, RNN) or a tensor pair (LSTM)"
            )
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
        # initial and final states: [layers*dirs, batch, hidden]
        finals = [(None, path) for path in ctx.tensor_paths(node)[1:]]
        for value, path in [(s, ()) for s in states] + finals:
            state = ctx.axis(value, 2, path)
            if state is not None and hidden is not None:
                ctx.link(state, np.arange(h), hidden, np.arange(h))
            ctx.freeze(ctx.axis(value, 0, path), "layers x directions axis of a state")
            ctx.same(ctx.axis(x, batch), ctx.axis(value, 1, path))
        self._cost(ctx, m, x, m_in, hidden)

    @staticmethod
    def _cost(
        ctx: NodeContext, m: nn.RNNBase, x: Any, m_in: Axis | None, hidden: Axis | None
    ) -> None:
        d = 2 if m.bidirectional else 1
        h, out = m.hidden_size, m.proj_size or m.hidden_size
        step, batch = (1, 0) if m.batch_first else (0, 1)
        shape = ctx.shape(x)
        assert shape is not None  # the input sequence is a tensor
        steps, batch_size = shape[step], (shape[batch] if len(shape) == 3 else 1)
        unit = runtime.gate_blocks(m) * h * steps * batch_size * d
        terms: list[tuple[float, list[Axis | None]]] = [(unit * m.input_size, [m_in, hidden])]
        terms += [(unit * d * out, [hidden, hidden])] * (m.num_layers - 1)
        terms += [(unit * out, [hidden, hidden])] * m.num_layers
        if m.proj_size:
            terms += [(steps * batch_size * d * h * m.proj_size, [hidden])] * m.num_layers
        ctx.cost(*terms, absolute=True)

    def gated(self, builder: GatedBuilderView, node: fx.Node) -> fx.Node | None:
        qualname = cast(str, node.target)  # a call_module node
        mask = builder.module_mask(qualname, "hidden")
        if mask is None:
            return None
        rnn = cast(nn.RNNBase, builder.module(qualname))
        target = builder.add_module(runtime.GatedRNN(rnn), qualname)
        # an initial state arrives gated: a pruned unit starts at 0, as a removed one
        initial = builder.arg(arg(node, 1, "hx"))
        return builder.call_module(target, (builder.arg(node.args[0]), mask, initial))

    def slim_module(self, m: nn.RNNBase, pruning: PruningView, qualname: str) -> nn.Module | None:
        k_in, k_h = pruning.kept_module(qualname, "input"), pruning.kept_module(qualname, "hidden")
        if not (pruned(k_in, m.input_size) or pruned(k_h, m.hidden_size)):
            return None
        h = m.hidden_size
        k_in = np.arange(m.input_size) if k_in is None else k_in
        k_h = np.arange(h) if k_h is None else k_h
        gates = runtime.gate_blocks(m)
        d = 2 if m.bidirectional else 1
        rows = np.concatenate([b * h + k_h for b in range(gates)])
        deeper_cols = np.concatenate([j * h + k_h for j in range(d)])
        options = {"nonlinearity": m.nonlinearity} if isinstance(m, nn.RNN) else {}
        # nn.LSTM/GRU/RNN(input_size, hidden_size, ...), not RNNBase(mode, ...)
        rnn_class = cast(Callable[..., nn.RNNBase], type(m))
        first = cast(torch.Tensor, m.weight_ih_l0)  # a parameter (Module.__getattr__)
        new = rnn_class(
            len(k_in),
            len(k_h),
            num_layers=m.num_layers,
            bias=m.bias,
            batch_first=m.batch_first,
            dropout=m.dropout,
            bidirectional=m.bidirectional,
            device=first.device,
            dtype=first.dtype,
            **options,
        )
        for name in m._flat_weights_names:
            w = getattr(m, name)
            layer = int(name.split("_l")[1].split("_")[0])
            if name.startswith("weight_ih"):
                p = sliced_parameter(w, rows, k_in if layer == 0 else deeper_cols)
            elif name.startswith("weight_hh"):
                p = sliced_parameter(w, rows, k_h)
            else:
                p = sliced_parameter(w, rows)
            setattr(new, name, p)
        new.train(m.training)
        return new

    def importance(self, m: nn.RNNBase, axis: str) -> list[tuple[torch.Tensor, int]]:
        # weight_hh_l0: a parameter (Module.__getattr__)
        return [(cast(torch.Tensor, m.weight_hh_l0), 1)] if axis == "hidden" else []


def _initial_states(m: nn.RNNBase, initial: Any) -> list[fx.Node] | None:
    """The initial state tensors passed to ``m`` (none when it starts from zeros); None when
    they are not what ``m`` takes (a tensor, or an LSTM's ``(h, c)`` pair of tensors)."""
    if initial is None:
        return []
    if isinstance(m, nn.LSTM):
        ok = isinstance(initial, (tuple, list)) and len(initial) == 2
        states = list(initial) if ok else []
    else:
        states = [initial]
    return states if states and all(isinstance(s, fx.Node) for s in states) else None


RULES.add(RecurrentRule(), modules=[nn.LSTM, nn.GRU, nn.RNN])
