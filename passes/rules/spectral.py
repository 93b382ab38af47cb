"""The short-time Fourier transform and complex values: ``torch.stft``/``torch.istft``, window
functions, ``torch.complex``.

Channel semantics: an STFT's frequency bins are not channels (every bin is computed from the
same samples, and the inverse needs all of them), so its frequency axis is frozen, as is its
window; the axes it leaves to the model (batch, frames) are dynamic. What a model computes on
the spectrum (convolutions over [B, C, T, F], RNNs over time or frequency) is coupled by those
ops' own rules, which slide along (and so freeze) the frequency axis.

Export: ONNX has no complex type. The rules' ``lower_complex`` hooks (``passes.export``) carry
every complex tensor [..., n] as a real one [..., n, 2] holding the (real, imaginary) pair; here
``torch.stft`` becomes a strided convolution with DFT bases times the window (centre padding by
``F.pad``), ``torch.istft`` a transposed one (overlap-add) divided by the overlap-added squared
window and trimmed to ``length`` (``runtime.stft_pairs``, ``runtime.istft_pairs``), with every
size taken from the tensors at run time, so the time axis stays dynamic.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import torch
from torch import fx

from passes import runtime
from passes.context import NodeContext
from passes.rules.pointwise import ELEMENTWISE, fixed_int
from passes.rules.registry import RULES, arg, complex_rank


def _constant(graph_module: fx.GraphModule, node: fx.Node, name: str, value: torch.Tensor) -> Any:
    """A get_attr node (before ``node``) of a new buffer holding ``value``, on the device of
    the module's parameters."""
    tensors = [*graph_module.parameters(), *graph_module.buffers()]
    device = tensors[0].device if tensors else torch.device("cpu")
    target = f"_sepfx_{name}_{node.name}"
    graph_module.register_buffer(target, value.to(device))
    with graph_module.graph.inserting_before(node):
        return graph_module.graph.get_attr(target)


_STFT_ARGS = (
    ("input", None),
    ("n_fft", None),
    ("hop_length", None),
    ("win_length", None),
    ("window", None),
    ("center", True),
    ("pad_mode", "reflect"),
    ("normalized", False),
    ("onesided", None),
    ("return_complex", None),
    ("align_to_window", None),
)
_ISTFT_ARGS = (
    ("input", None),
    ("n_fft", None),
    ("hop_length", None),
    ("win_length", None),
    ("window", None),
    ("center", True),
    ("normalized", False),
    ("onesided", None),
    ("length", None),
    ("return_complex", False),
)


def _arguments(node: fx.Node, names: tuple[tuple[str, Any], ...]) -> dict[str, Any]:
    return {name: arg(node, i, name, default) for i, (name, default) in enumerate(names)}


def _sizes(values: dict[str, Any]) -> tuple[int, int, int]:
    """(n_fft, hop_length, win_length) as ints (torch's defaults: n_fft // 4, n_fft), or
    ValueError when the model computes one that varies with the input."""
    n_fft = fixed_int(values["n_fft"])
    if n_fft is None:
        raise ValueError("an n_fft that varies with the input")
    hop = n_fft // 4 if values["hop_length"] is None else fixed_int(values["hop_length"])
    win = n_fft if values["win_length"] is None else fixed_int(values["win_length"])
    if hop is None or win is None:
        raise ValueError("a hop or window length that varies with the input")
    return n_fft, hop, win


class StftRule:
    """``torch.stft(x [..., T])`` -> [..., F, frames] (complex, or [..., F, frames, 2] with
    ``return_complex=False``): the leading axes are ``x``'s, the frequency axis is frozen (bins
    are not channels), the window is frozen."""

    def couple(self, ctx: NodeContext) -> None:
        values = _arguments(ctx.node, _STFT_ARGS)
        x, window = values["input"], values["window"]
        x_shape, out_shape = ctx.shape(x), ctx.shape()
        assert x_shape is not None and out_shape is not None  # a signal in, a spectrum out
        for d in range(len(x_shape) - 1):
            ctx.same(ctx.axis(x, d), ctx.axis(None, d))
        ctx.touch(ctx.axis(x, -1))  # time: dynamic
        frequency = len(x_shape) - 1
        ctx.freeze(ctx.axis(None, frequency), "frequency bins of an STFT are not channels")
        ctx.touch(ctx.axis(None, frequency + 1))  # frames
        if len(out_shape) > frequency + 2:
            ctx.freeze(ctx.axis(None, -1), "the (real, imaginary) pair of an STFT")
        if isinstance(window, fx.Node):
            ctx.freeze(ctx.axis(window, 0), "the window of an STFT")

    def lower(self, node: fx.Node, graph_module: fx.GraphModule) -> bool:
        """``return_complex=False``: the same (real, imaginary) pairs as ``lower_complex``."""
        return self.lower_complex(node, graph_module)

    def lower_complex(self, node: fx.Node, graph_module: fx.GraphModule) -> bool:
        values = _arguments(node, _STFT_ARGS)
        n_fft, hop, win = _sizes(values)
        if values["align_to_window"] or complex_rank(values["input"]) is not None:
            raise ValueError("an STFT of a complex signal, or aligned to the window")
        if values["onesided"] is False:
            bins = n_fft
        else:
            bins = n_fft // 2 + 1
        meta: Any = node.meta.get("tensor_meta")
        table = runtime.dft_table(n_fft, bins, False, meta.dtype.to_real())
        node.op, node.target = "call_function", runtime.stft_pairs
        node.args = (
            values["input"],
            values["window"],
            _constant(graph_module, node, "dft", table),
            hop,
            win,
            values["center"],
            values["pad_mode"],
            values["normalized"],
        )
        node.kwargs = {}
        return True


RULES.add(StftRule(), functions=[torch.stft], methods=["stft"])


class IstftRule:
    """``torch.istft(z [..., F, frames])`` -> [..., T]: the leading axes are ``z``'s, the
    frequency axis and the window are frozen."""

    def couple(self, ctx: NodeContext) -> None:
        values = _arguments(ctx.node, _ISTFT_ARGS)
        z, window = values["input"], values["window"]
        z_shape, out_shape = ctx.shape(z), ctx.shape()
        assert z_shape is not None and out_shape is not None  # a spectrum in, a signal out
        frequency = len(out_shape) - 1
        for d in range(frequency):
            ctx.same(ctx.axis(z, d), ctx.axis(None, d))
        ctx.freeze(ctx.axis(z, frequency), "frequency bins of an inverse STFT are not channels")
        ctx.touch(ctx.axis(z, frequency + 1), ctx.axis(None, -1))  # frames, time
        if len(z_shape) > frequency + 2:
            ctx.freeze(ctx.axis(z, -1), "the (real, imaginary) pair of an inverse STFT")
        if isinstance(window, fx.Node):
            ctx.freeze(ctx.axis(window, 0), "the window of an inverse STFT")

    def lower_complex(self, node: fx.Node, graph_module: fx.GraphModule) -> bool:
        values = _arguments(node, _ISTFT_ARGS)
        n_fft, hop, win = _sizes(values)
        rank = complex_rank(values["input"])
        if rank is None or values["return_complex"]:
            raise ValueError("an inverse STFT to a complex signal")
        bins_meta: Any = values["input"].meta["tensor_meta"]
        bins = int(bins_meta.shape[-2])
        if values["onesided"] is False or bins == n_fft and n_fft > 2:
            raise ValueError("an inverse STFT of a full (two-sided) spectrum")
        meta: Any = node.meta.get("tensor_meta")
        table = runtime.dft_table(n_fft, bins, True, meta.dtype)
        node.op, node.target = "call_function", runtime.istft_pairs
        node.args = (
            values["input"],
            values["window"],
            _constant(graph_module, node, "inverse_dft", table),
            hop,
            win,
            values["center"],
            values["normalized"],
            values["length"],
        )
        node.kwargs = {}
        return True


RULES.add(IstftRule(), functions=[torch.istft], methods=["istft"])


_WINDOWS = [
    torch.hann_window,
    torch.hamming_window,
    torch.blackman_window,
    torch.bartlett_window,
    torch.kaiser_window,
]


class WindowRule:
    """``torch.hann_window(n, ...)`` and the other window functions: a new tensor of window
    samples (frozen: not channels)."""

    def couple(self, ctx: NodeContext) -> None:
        ctx.freeze(ctx.axis(None, 0), "samples of a window function")

    def lower(self, node: fx.Node, graph_module: fx.GraphModule) -> bool:
        """For export: a window of literal sizes as a constant (the exporters may not know the
        function), computed here with the call's own arguments but the device, in the dtype
        it had at the shape propagation (``dtype=x.dtype``)."""
        meta: Any = node.meta.get("tensor_meta")
        kwargs = {k: v for k, v in node.kwargs.items() if k != "device"}
        if "dtype" in kwargs and meta is not None:
            kwargs["dtype"] = meta.dtype
        if any(isinstance(a, fx.Node) for a in (*node.args, *kwargs.values())):
            return False
        window = cast(Callable[..., torch.Tensor], node.target)(*node.args, **kwargs)
        node.replace_all_uses_with(_constant(graph_module, node, "window", window))
        return True


RULES.add(WindowRule(), functions=_WINDOWS)


class ComplexRule:
    """``torch.complex(real, imag)``: elementwise (with broadcasting)."""

    def couple(self, ctx: NodeContext) -> None:
        ELEMENTWISE.couple(ctx)

    def lower_complex(self, node: fx.Node, graph_module: fx.GraphModule) -> bool:
        node.args = (arg(node, 0, "real"), arg(node, 1, "imag"))
        node.target, node.kwargs = runtime.complex_pair, {}
        return True


RULES.add(ComplexRule(), functions=[torch.complex])
