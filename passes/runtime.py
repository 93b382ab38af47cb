"""Functions and modules that run inside the GraphModules sepfx emits (gated and slim).

The gated model computes, for a keep set, exactly what the slim model computes: pruned channels
are zero everywhere, and every statistic that spans a channel axis (group/layer norm, a mean or
variance over channels) counts kept channels only.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from typing import Any, cast

import numpy as np
from numpy.typing import NDArray

import torch
import torch.nn.functional as F
from torch import nn


def _along(mask: torch.Tensor, ndim: int, dim: int) -> torch.Tensor:
    shape = [1] * ndim
    shape[dim] = -1
    return mask.reshape(shape)


def apply_gate(x: torch.Tensor, mask: torch.Tensor, dim: int) -> torch.Tensor:
    """Zero the channels of ``x`` along ``dim`` where ``mask`` is 0 (NaN/inf there included).

    The value is ``where(mask > 0, x, 0)``; the gradient with respect to ``mask`` is the
    straight-through one, ``x`` (so a closed gate still learns whether to reopen)."""
    m = _along(mask, x.dim(), dim)
    out = torch.where(m > 0, x, torch.zeros((), dtype=x.dtype, device=x.device))
    if mask.requires_grad:
        straight_through = (m - m.detach()).to(x.dtype)
        out = out + straight_through * torch.nan_to_num(x.detach(), 0.0, 0.0, 0.0)
    if out.stride() != x.stride():
        # x's memory layout, which the model's code may rely on (``x.view`` of a transposed
        # tensor): the broadcast mask can make the result's layout differ
        out = torch.empty_like(x).copy_(out)
    return out


def regate_(x: torch.Tensor, mask: torch.Tensor, dim: int) -> torch.Tensor:
    """``x`` with its pruned channels along ``dim`` zeroed again, in place: after an in-place op
    that may have written there (``masked_fill_(m, 0.5)``, ``buf[..., :T] = y``), so that every
    later reader of ``x`` sees what the slim model computes."""
    return x.copy_(apply_gate(x, mask, dim))


def _kept(
    x: torch.Tensor, masks: Sequence[torch.Tensor | None], dims: Sequence[int]
) -> torch.Tensor:
    """A broadcastable 0/1 tensor: 1 where every masked axis in ``dims`` is kept."""
    kept = torch.ones((), dtype=x.dtype, device=x.device)
    for mask, dim in zip(masks, dims):
        if mask is not None:
            kept = kept * (_along(mask, x.dim(), dim) > 0).to(x.dtype)
    return kept


def masked_moments(
    x: torch.Tensor,
    dims: list[int],
    masks: Sequence[torch.Tensor | None],
    mask_dims: Sequence[int],
    correction: float = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and variance of ``x`` over ``dims`` counting only kept channels."""
    kept = _kept(x, masks, mask_dims).expand_as(x)
    count = kept.sum(dim=dims, keepdim=True)
    mean = (x * kept).sum(dim=dims, keepdim=True) / count.clamp_min(1)
    centred = torch.where(kept > 0, x - mean, torch.zeros((), dtype=x.dtype, device=x.device))
    var = (centred * centred).sum(dim=dims, keepdim=True) / (count - correction).clamp_min(1)
    return mean, var


def masked_reduce(
    kind: str,
    x: torch.Tensor,
    dims: Sequence[int],
    keepdim: bool,
    correction: float,
    masks: Sequence[torch.Tensor | None],
    mask_dims: Sequence[int],
) -> torch.Tensor:
    """``x.mean/var/std(dims)`` over kept channels only (``masks[i]`` masks ``mask_dims[i]``)."""
    dims = [d % x.dim() for d in dims]
    mean, var = masked_moments(x, dims, masks, mask_dims, correction)
    out = {"mean": mean, "var": var}.get(kind)
    if out is None:
        out = var.sqrt()
    return out if keepdim else out.squeeze(tuple(dims))


def masked_group_norm(
    x: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    mask: torch.Tensor,
) -> torch.Tensor:
    b = x.shape[0]
    kept = (_along(mask, x.dim(), 1) > 0).to(x.dtype).expand_as(x).reshape(b, num_groups, -1)
    xg = x.reshape(b, num_groups, -1)
    count = kept.sum(-1, keepdim=True).clamp_min(1)
    mean = (xg * kept).sum(-1, keepdim=True) / count
    centred = torch.where(kept > 0, xg - mean, torch.zeros((), dtype=x.dtype, device=x.device))
    var = (centred * centred).sum(-1, keepdim=True) / count
    y = ((xg - mean) / torch.sqrt(var + eps)).reshape(x.shape)
    if weight is not None:  # affine: bias too
        y = y * _along(weight, x.dim(), 1) + _along(cast(torch.Tensor, bias), x.dim(), 1)
    return y


def masked_layer_norm(
    x: torch.Tensor,
    k: int,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    masks: Sequence[torch.Tensor | None],
) -> torch.Tensor:
    """LayerNorm over the last ``k`` dims of ``x``; ``masks[i]`` masks dim ``-k + i``."""
    dims = list(range(x.dim() - k, x.dim()))
    mean, var = masked_moments(x, dims, masks, dims)
    y = (x - mean) / torch.sqrt(var + eps)
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y.contiguous()  # as F.layer_norm's output is: the model's code may ``view`` it


# -- recurrent layers -------------------------------------------------------------------------
def gate_blocks(rnn: nn.RNNBase) -> int:
    """How many [hidden, ...] blocks an LSTM (i, f, g, o: 4), a GRU (r, z, n: 3) or a plain RNN
    (1) stacks in each of its weights."""
    if isinstance(rnn, nn.LSTM):
        return 4
    return 3 if isinstance(rnn, nn.GRU) else 1


def _candidate_rows(rnn: nn.RNNBase, mask: torch.Tensor) -> torch.Tensor:
    """Row scale for a stacked gate weight: the candidate block (LSTM's g, GRU's n, a plain
    RNN's only block) times mask.

    With its candidate zeroed a unit's cell and hidden state stay exactly 0 from a zero initial
    state (tanh(0) = relu(0) = 0), which is what removing the unit computes; a given initial
    state is gated, so a pruned unit's starts at 0 too."""
    h = rnn.hidden_size
    blocks = gate_blocks(rnn)
    ones = torch.ones(h, dtype=mask.dtype, device=mask.device)
    parts = [ones] * blocks
    parts[2 if blocks > 1 else 0] = mask
    return torch.cat(parts)


class GatedRNN(nn.Module):
    """An nn.LSTM/nn.GRU whose hidden units are gated; weights stay those of ``rnn``."""

    def __init__(self, rnn: nn.RNNBase) -> None:
        super().__init__()
        self.rnn = rnn

    def forward(self, x: torch.Tensor, hidden_mask: torch.Tensor, hx: Any = None) -> Any:
        rows = _candidate_rows(self.rnn, hidden_mask)
        params: dict[str, torch.Tensor] = {}
        for name in self.rnn._flat_weights_names:
            w = getattr(self.rnn, name)
            if name.startswith(("weight_ih", "weight_hh")):
                w = w * rows[:, None].to(w.dtype)
            else:
                w = w * rows.to(w.dtype)
            params[name] = w
        return torch.func.functional_call(self.rnn, params, (x, hx))


# -- attention ---------------------------------------------------------------------------------
def attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    wq: torch.Tensor,
    bq: torch.Tensor | None,
    wk: torch.Tensor,
    bk: torch.Tensor | None,
    wv: torch.Tensor,
    bv: torch.Tensor | None,
    wo: torch.Tensor,
    bo: torch.Tensor | None,
    num_heads: int,
    head_dim: int,
    batch_first: bool,
    head_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Multi-head attention with separate projections, computed with plain ops (exports to any
    ONNX opset). ``head_mask`` (one entry per internal dim) zeroes pruned heads' outputs."""
    if not batch_first:
        query, key, value = (t.transpose(0, 1) for t in (query, key, value))
    b, lq = query.shape[0], query.shape[1]
    lk = key.shape[1]
    q = F.linear(query, wq, bq).reshape(b, lq, num_heads, head_dim).transpose(1, 2)
    k = F.linear(key, wk, bk).reshape(b, lk, num_heads, head_dim).transpose(1, 2)
    v = F.linear(value, wv, bv).reshape(b, lk, num_heads, head_dim).transpose(1, 2)
    scores = torch.matmul(q, k.transpose(-1, -2)) * (1.0 / math.sqrt(head_dim))
    out = torch.matmul(torch.softmax(scores, dim=-1), v)  # [b, heads, lq, head_dim]
    out = out.transpose(1, 2).reshape(b, lq, num_heads * head_dim)
    if head_mask is not None:
        out = apply_gate(out, head_mask, 2)
    out = F.linear(out, wo, bo)
    return out if batch_first else out.transpose(0, 1)


def _mha_weights(
    mha: nn.MultiheadAttention,
) -> tuple[
    torch.Tensor,
    torch.Tensor | None,
    torch.Tensor,
    torch.Tensor | None,
    torch.Tensor,
    torch.Tensor | None,
    torch.Tensor,
    torch.Tensor | None,
]:
    """(wq, bq, wk, bk, wv, bv, wo, bo) of ``mha``, the in-projection split per input."""
    e = mha.embed_dim
    if mha._qkv_same_embed_dim:
        wq, wk, wv = (
            mha.in_proj_weight[:e],
            mha.in_proj_weight[e : 2 * e],
            mha.in_proj_weight[2 * e :],
        )
    else:
        wq, wk, wv = mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight
    if mha.in_proj_bias is not None:
        bq, bk, bv = mha.in_proj_bias[:e], mha.in_proj_bias[e : 2 * e], mha.in_proj_bias[2 * e :]
    else:
        bq = bk = bv = None
    return wq, bq, wk, bk, wv, bv, mha.out_proj.weight, mha.out_proj.bias


class GatedAttention(nn.Module):
    """nn.MultiheadAttention with pruned heads zeroed (weights stay those of ``mha``)."""

    def __init__(self, mha: nn.MultiheadAttention) -> None:
        super().__init__()
        self.mha = mha

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        head_mask: torch.Tensor | None = None,
        **unused: Any,
    ) -> tuple[torch.Tensor, None]:
        m = self.mha
        out = attention(
            query, key, value, *_mha_weights(m), m.num_heads, m.head_dim, m.batch_first, head_mask
        )
        return out, None


class SlimMultiheadAttention(nn.Module):
    """Multi-head attention whose input, internal (heads x head_dim) and output widths are
    independent, which is what pruning nn.MultiheadAttention leaves. Same call signature."""

    def __init__(
        self,
        q_in: int,
        k_in: int,
        v_in: int,
        num_heads: int,
        head_dim: int,
        out_dim: int,
        bias: bool = True,
        batch_first: bool = False,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        inner = num_heads * head_dim
        self.q_proj = nn.Linear(q_in, inner, bias, device, dtype)
        self.k_proj = nn.Linear(k_in, inner, bias, device, dtype)
        self.v_proj = nn.Linear(v_in, inner, bias, device, dtype)
        self.out_proj = nn.Linear(inner, out_dim, bias, device, dtype)
        self.num_heads, self.head_dim, self.batch_first = num_heads, head_dim, batch_first

    def forward(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, **unused: Any
    ) -> tuple[torch.Tensor, None]:
        out = attention(
            query,
            key,
            value,
            self.q_proj.weight,
            self.q_proj.bias,
            self.k_proj.weight,
            self.k_proj.bias,
            self.v_proj.weight,
            self.v_proj.bias,
            self.out_proj.weight,
            self.out_proj.bias,
            self.num_heads,
            self.head_dim,
            self.batch_first,
        )
        return out, None


class SpannedConv(nn.Module):
    """A Conv1d/Conv2d whose kernel spans one or more static axes, with those axes folded into
    its channels. Along a folded axis the convolution is a dense (Toeplitz) matrix from input
    positions to output positions, so keeping only some positions there (rows and columns of
    that matrix) is exact. The other axes are convolved as before; when none remains, the op is
    a matrix product."""

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        folded: list[int],
        out_sizes: list[int],
        ndim: int,
        stride: Sequence[int],
        padding: Sequence[int],
        dilation: Sequence[int],
    ) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight)  # [oc * prod(O), ic * prod(I), kernel of the rest]
        self.bias = None if bias is None else nn.Parameter(bias)  # [oc * prod(O)]
        self.folded, self.out_sizes = list(folded), list(out_sizes)
        self.rest = [d for d in range(2, ndim) if d not in folded]
        self.stride = [stride[d - 2] for d in self.rest]
        self.padding = [padding[d - 2] for d in self.rest]
        self.dilation = [dilation[d - 2] for d in self.rest]
        self.in_order = [0, 1, *self.folded, *self.rest]
        self.out_order = [self.in_order.index(d) for d in range(ndim)]
        self.out_channels = weight.shape[0] // max(int(np.prod(out_sizes)), 1)

    @classmethod
    def lowered(
        cls,
        conv: nn.modules.conv._ConvNd,
        kept_in: NDArray[Any],
        kept_out: NDArray[Any],
        spans: dict[int, tuple[NDArray[Any], NDArray[Any]]],
    ) -> "SpannedConv":
        """``conv`` (groups 1, zero padding given as numbers) keeping channels ``kept_in`` and
        ``kept_out`` and, per folded axis d, the positions ``spans[d] = (kept input positions,
        kept output positions)``."""
        device = conv.weight.device

        def index(kept: NDArray[Any]) -> torch.Tensor:
            return torch.as_tensor(np.asarray(kept), dtype=torch.long, device=device)

        weight = conv.weight.detach()[index(kept_out)]
        weight = weight[:, index(kept_in)]
        ndim = weight.dim()  # = the input's rank: [B, C, spatial...] vs [oc, ic, kernel...]
        padding = conv.padding if isinstance(conv.padding, tuple) else (0,) * (ndim - 2)
        letters = iter("cdefghijklmnopqrstuvwxyz")
        kernel = [next(letters) for _ in range(ndim - 2)]
        operands, matrices, outs, ins = [], [], [], []
        for d in sorted(spans):
            j = d - 2
            kept_i, kept_o = (index(v) for v in spans[d])
            taps = torch.arange(conv.kernel_size[j], device=device).view(-1, 1, 1)
            # A[t, o, i] = 1 where input position i = o * stride - padding + t * dilation
            position = kept_o.view(1, -1, 1) * conv.stride[j] - padding[j] + taps * conv.dilation[j]
            matrices.append((position == kept_i.view(1, 1, -1)).to(weight.dtype))
            o, i = next(letters), next(letters)
            operands.append(kernel[j] + o + i)
            outs.append(o)
            ins.append(i)
        rest = [kernel[d - 2] for d in range(2, ndim) if d not in spans]
        equation = (
            "ab"
            + "".join(kernel)
            + ","
            + ",".join(operands)
            + "->a"
            + "".join(outs)
            + "b"
            + "".join(ins)
            + "".join(rest)
        )
        expanded = torch.einsum(equation, weight, *matrices)
        out_sizes = [len(spans[d][1]) for d in sorted(spans)]
        in_count = len(kept_in) * int(np.prod([len(spans[d][0]) for d in spans]))
        flat = expanded.reshape(
            len(kept_out) * int(np.prod(out_sizes)), in_count, *expanded.shape[2 + 2 * len(spans) :]
        )
        bias = None
        if conv.bias is not None:
            b = conv.bias.detach()[index(kept_out)]
            bias = b.repeat_interleave(int(np.prod(out_sizes)))
        return cls(
            flat.clone(), bias, sorted(spans), out_sizes, ndim, conv.stride, padding, conv.dilation
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch = x.shape[0]
        x = x.permute(self.in_order)
        rest = x.shape[2 + len(self.folded) :]
        x = x.reshape(batch, self.weight.shape[1], *rest)
        if not self.rest:
            y = F.linear(x, self.weight, self.bias)
        else:
            conv = (F.conv1d, F.conv2d, F.conv3d)[len(self.rest) - 1]
            y = conv(x, self.weight, self.bias, self.stride, self.padding, self.dilation)
        y = y.reshape(batch, self.out_channels, *self.out_sizes, *y.shape[2:])
        return y.permute(self.out_order)


# -- Python values recorded in graphs ------------------------------------------------------
# The tracer records ``int(size)`` and ``torch.tensor(shape)`` as calls of these. They are
# proxy-aware, so a GraphModule holding them can be traced again (unpickling does that).
def _traced(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """A proxy for ``fn(*args, **kwargs)`` when an argument is one (tracing), else None."""
    from torch import fx

    proxies = [
        a for a in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(a, fx.Proxy)
    ]
    if proxies:
        return proxies[0].tracer.create_proxy("call_function", fn, args, kwargs)
    return None


def as_int(value: Any) -> Any:
    """``int(value)``, recordable on a proxy."""
    traced = _traced(as_int, (value,), {})
    return int(value) if traced is None else traced


def as_variable(data: Any, *args: Any, **kwargs: Any) -> Any:
    """``torch.autograd.Variable(data, ...)`` (the legacy wrapper: a tensor sharing ``data``'s
    storage, detached), recordable on a proxy."""
    traced = _traced(as_variable, (data, *args), kwargs)
    if traced is not None:
        return traced
    # the stubs know torch.autograd.variable only as a function; at run time it has .Variable
    return torch.autograd.variable.Variable(data, *args, **kwargs)  # type: ignore[attr-defined]


def shape_tensor(data: Any, *args: Any, **kwargs: Any) -> Any:
    """``torch.tensor(data, ...)``, recordable on a proxy (``torch.tensor(x.shape)``)."""
    traced = _traced(shape_tensor, (data, *args), kwargs)
    return torch.tensor(data, *args, **kwargs) if traced is None else traced


def shape_as_tensor(data: Any, *args: Any, **kwargs: Any) -> Any:
    """``torch.as_tensor(data, ...)``, recordable on a proxy."""
    traced = _traced(shape_as_tensor, (data, *args), kwargs)
    return torch.as_tensor(data, *args, **kwargs) if traced is None else traced


# -- export lowerings --------------------------------------------------------------------------
def tensor_of_sizes(values: Any, dtype: torch.dtype, like: Any = None) -> torch.Tensor:
    """``torch.tensor(values)`` (or ``like.new_tensor(values)``) of integers some of which are
    sizes, as the exporters keep them variable: under tracing a size is a 0-d tensor, which
    ``torch.tensor`` would bake in."""
    device = like.device if isinstance(like, torch.Tensor) else None
    if not isinstance(values, (list, tuple)):  # one size: a 0-d tensor
        return torch.as_tensor(values, device=device).to(dtype)
    return torch.stack([torch.as_tensor(v, device=device).to(dtype).reshape(()) for v in values])


def filled(size: Sequence[Any], value: Any, dtype: torch.dtype, like: Any = None) -> torch.Tensor:
    """``torch.full(size, value)`` (or ``like.new_full``) with a fill value that is a size, kept
    variable for the exporters (``torch.full`` bakes a traced fill value in)."""
    device = like.device if isinstance(like, torch.Tensor) else None
    return torch.zeros(size, dtype=dtype, device=device) + torch.as_tensor(value, device=device)


def adaptive_avg_pool1d(
    x: torch.Tensor, output_size: int | tuple[int, ...] | list[int]
) -> torch.Tensor:
    """F.adaptive_avg_pool1d from the sizes at run time (PyTorch's bins: [floor(i*L/n),
    ceil((i+1)*L/n))), so that an ONNX export keeps both lengths dynamic; the exporters refuse
    or fix them for the built-in op. Each bin's mean is the difference of a running sum at its
    ends: O(L) work per channel where a bin-averaging matrix costs O(n*L) (in TDANet at 4 s
    that matmul was most of the model's time in ONNX Runtime). The sum runs along the first
    axis (ONNX Runtime's CumSum adds whole rows there, element by element along the last) and
    over the mean-removed input, so float32 keeps the bins' digits (a sum far from zero would
    lose them)."""
    if isinstance(output_size, (tuple, list)):
        output_size = output_size[0]
    length, d = x.shape[-1], x.dim()
    i = torch.arange(output_size, device=x.device)
    start = torch.div(i * length, output_size, rounding_mode="floor")
    end = torch.div((i + 1) * length + output_size - 1, output_size, rounding_mode="floor")
    t = x.permute([d - 1, *range(d - 1)])  # [L, ...]
    mean = t.mean(0, keepdim=True)
    # total[j]: the sum of the first j steps (of t - mean)
    total = torch.cat([torch.zeros_like(t[:1]), torch.cumsum(t - mean, 0)], 0)
    sums = total.index_select(0, end) - total.index_select(0, start)
    width = (end - start).to(x.dtype).reshape([-1] + [1] * (d - 1))
    return (sums / width + mean).permute([*range(1, d), 0])


def fold_1d(
    x: torch.Tensor,
    output_size: Sequence[int],
    kernel_size: int | tuple[int, ...] | list[int],
    dilation: int | tuple[int, ...] | list[int],
    padding: int | tuple[int, ...] | list[int],
    stride: int | tuple[int, ...] | list[int],
    channels: int,
    axis: int = 0,
) -> torch.Tensor:
    """``F.fold`` for windows along one spatial axis only (``axis`` 0: kernel ``(k, 1)``,
    output ``(T, 1)``; 1: kernel ``(1, k)``, output ``(1, T)``: dual-path overlap-add) of
    ``x [B, channels * k, L]``, as a grouped transposed convolution with an identity kernel,
    which the exporters keep dynamic in ``T`` (TorchScript's Col2Im cannot). ``channels`` is
    given, so that the kernel's shape is known when exporting."""
    k, d, p, s = (
        v[axis] if isinstance(v, (tuple, list)) else v
        for v in (kernel_size, dilation, padding, stride)
    )
    identity = torch.eye(k, dtype=x.dtype, device=x.device).repeat(channels, 1).unsqueeze(1)
    y = F.conv_transpose1d(x, identity, stride=s, dilation=d, groups=channels)  # from -p
    y = y[..., p:]
    y = F.pad(y, (0, output_size[axis] - y.shape[-1]))  # the windows' tail: crop, or zeros
    return y.unsqueeze(-1 if axis == 0 else -2)


def pad_transposed(y: torch.Tensor, length: Any, bias: torch.Tensor | None) -> torch.Tensor:
    """A ConvTranspose1d's output (no padding) at ``length`` positions, as its ``output_size``
    makes it: the positions past its natural length hold the bias alone. ``length`` may be a
    value of the graph (a tensor), which the exporters keep."""
    out = F.pad(y, (0, length - y.shape[-1]))
    if bias is not None:
        tail = (torch.arange(out.shape[-1], device=y.device) >= y.shape[-1]).to(y.dtype)
        out = out + bias[:, None] * tail
    return out


def _channel_weight(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return weight.reshape([1, -1] + [1] * (x.dim() - 2)) if weight.numel() > 1 else weight


def prelu(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """PReLU as relu(x) - w * relu(-x): the same values, and about 9x faster in ONNX Runtime's
    CPU kernels than its PRelu (measured on [1, 128, 4000], 1 thread), where Conv-TasNet's
    PReLUs took 43% of the dense model's time."""
    return torch.relu(x) - _channel_weight(x, weight) * torch.relu(-x)


def prelu_max(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """PReLU when every slope is <= 1: max(x, w*x), two element passes instead of five (2x faster
    than ``prelu`` in ONNX Runtime on [1, 128, 4000])."""
    return torch.maximum(x, _channel_weight(x, weight) * x)


def prelu_min(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """PReLU when every slope is >= 1: min(x, w*x)."""
    return torch.minimum(x, _channel_weight(x, weight) * x)


def lower_prelu(
    module: nn.PReLU, weight: Any
) -> tuple[Callable[..., torch.Tensor], tuple[Any, ...]]:
    """The fastest exact form for this module's slopes, chosen once at export: (function, its
    arguments after the input), ``weight`` being the graph node of the module's weight. One
    shared slope is ONNX LeakyRelu, which ONNX Runtime fuses into the Conv before it."""
    if module.weight.numel() == 1:
        return F.leaky_relu, (float(module.weight.detach()),)
    if bool((module.weight <= 1).all()):
        return prelu_max, (weight,)
    if bool((module.weight >= 1).all()):
        return prelu_min, (weight,)
    return prelu, (weight,)


# -- complex values as (real, imaginary) pairs, for export -----------------------------------
# ONNX has no complex type: the export lowering (``passes.export``, the rules' ``lower_complex``
# hooks) carries a complex tensor [..., n] as a real one [..., n, 2] whose last axis is the
# (real, imaginary) pair, and an STFT as a strided convolution with DFT bases.


def dft_table(n_fft: int, bins: int, inverse: bool, dtype: torch.dtype) -> torch.Tensor:
    """[2 * bins, n_fft]: rows k of cos(2 pi k n / n_fft) then of -sin(...) (forward), or the
    inverse real DFT's synthesis rows for the onesided (Hermitian) spectrum: c_k cos(...) / n_fft
    then -c_k sin(...) / n_fft, c_k = 2 but for the bins that are their own mirror (k = 0,
    k = n_fft / 2), as ``torch.fft.irfft`` computes; with ``bins == n_fft`` (a full spectrum)
    c_k = 1. Made in float64 from the exact phase (k n mod n_fft), then cast."""
    k = torch.arange(bins, dtype=torch.float64)[:, None]
    n = torch.arange(n_fft, dtype=torch.float64)[None, :]
    phase = 2 * math.pi * torch.remainder(k * n, n_fft) / n_fft
    cos, sin = torch.cos(phase), -torch.sin(phase)
    if inverse:
        weight = torch.ones(bins, 1, dtype=torch.float64)
        if bins != n_fft:
            weight = 2 * weight
            weight[0] = 1
            if n_fft % 2 == 0 and bins == n_fft // 2 + 1:
                weight[-1] = 1
        cos, sin = cos * weight / n_fft, sin * weight / n_fft
    return torch.cat([cos, sin]).to(dtype)


def _framed_window(
    window: torch.Tensor | None, n_fft: int, win_length: int, like: torch.Tensor
) -> torch.Tensor:
    """The window centred in ``n_fft`` samples, as ``torch.stft`` pads it (ones when None)."""
    if window is None:
        window = torch.ones(win_length, dtype=like.dtype, device=like.device)
    left, right = (n_fft - win_length) // 2, n_fft - win_length - (n_fft - win_length) // 2
    if left == right == 0:
        return window.to(like.dtype)
    # zeros of literal sizes, not F.pad: the TorchScript exporter must know the kernel's shape
    zeros = torch.zeros(max(left, right), dtype=like.dtype, device=like.device)
    return torch.cat([zeros[:left], window.to(like.dtype), zeros[:right]])


def stft_pairs(
    x: torch.Tensor,
    window: torch.Tensor | None,
    table: torch.Tensor,
    hop_length: int,
    win_length: int,
    center: bool,
    pad_mode: str,
    normalized: bool,
) -> torch.Tensor:
    """``torch.stft(x, ...)`` [..., bins, frames] as (real, imaginary) pairs [..., bins, frames,
    2]: the (reflect-)padded signal through a strided convolution whose kernels are the DFT
    bases (``table``, from ``dft_table``) times the window."""
    n_fft = table.shape[-1]
    bins = table.shape[0] // 2
    signal = x.reshape(-1, 1, x.shape[-1])
    if center:
        signal = F.pad(signal, (n_fft // 2, n_fft // 2), mode=pad_mode)
    kernels = (table * _framed_window(window, n_fft, win_length, x)).unsqueeze(1)
    out = F.conv1d(signal, kernels, stride=hop_length)  # [N, 2 * bins, frames]
    if normalized:
        out = out / math.sqrt(n_fft)
    out = torch.stack([out[:, :bins], out[:, bins:]], dim=-1)
    return out.reshape(list(x.shape[:-1]) + [bins, out.shape[-2], 2])


def istft_pairs(
    z: torch.Tensor,
    window: torch.Tensor | None,
    table: torch.Tensor,
    hop_length: int,
    win_length: int,
    center: bool,
    normalized: bool,
    length: Any,
) -> torch.Tensor:
    """``torch.istft`` of (real, imaginary) pairs [..., bins, frames, 2]: each frame's inverse
    DFT times the window (a transposed strided convolution with the synthesis rows of
    ``dft_table`` times the window: overlap-add), divided by the overlap-added squared window,
    trimmed by ``n_fft // 2`` when centred and to ``length`` (zero-padded where it is longer)."""
    n_fft = table.shape[-1]
    bins = table.shape[0] // 2
    spec = z.reshape([-1, bins, z.shape[-2], 2])
    spec = torch.cat([spec[..., 0], spec[..., 1]], dim=1)  # [N, 2 * bins, frames]
    if normalized:
        spec = spec * math.sqrt(n_fft)
    window = _framed_window(window, n_fft, win_length, z)
    y = F.conv_transpose1d(spec, (table * window).unsqueeze(1), stride=hop_length)
    envelope = F.conv_transpose1d(
        torch.ones_like(spec[:1, :1]), (window * window).reshape(1, 1, -1), stride=hop_length
    )
    start = n_fft // 2 if center else 0
    if length is None:
        end = y.shape[-1] - start
    else:
        end = start + length
    y = y[..., start:end] / envelope[..., start:end]
    if length is not None:
        y = F.pad(y, (0, length - y.shape[-1]))
    return y.reshape(list(z.shape[:-3]) + [y.shape[-1]])


def complex_mul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The product of two complex tensors carried as (real, imaginary) pairs."""
    ar, ai, br, bi = a[..., 0], a[..., 1], b[..., 0], b[..., 1]
    return torch.stack([ar * br - ai * bi, ar * bi + ai * br], dim=-1)


def complex_div(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a / b of two complex tensors carried as (real, imaginary) pairs."""
    ar, ai, br, bi = a[..., 0], a[..., 1], b[..., 0], b[..., 1]
    scale = br * br + bi * bi
    return torch.stack([(ar * br + ai * bi) / scale, (ai * br - ar * bi) / scale], dim=-1)


def complex_abs(a: torch.Tensor) -> torch.Tensor:
    """|a| of a complex tensor carried as (real, imaginary) pairs."""
    return torch.sqrt(a[..., 0] * a[..., 0] + a[..., 1] * a[..., 1])


def atan2(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``torch.atan2`` as the exporters keep it right where ``x = y = 0`` (0 there, as torch
    has it; their atan(y / x) with quadrant fixes is NaN): x is 1 there instead."""
    return torch.atan2(y, torch.where((x == 0) & (y == 0), torch.ones_like(x), x))


def complex_angle(a: torch.Tensor) -> torch.Tensor:
    """The phase of a complex tensor carried as (real, imaginary) pairs."""
    return atan2(a[..., 1], a[..., 0])


def complex_conj(a: torch.Tensor) -> torch.Tensor:
    """The conjugate of a complex tensor carried as (real, imaginary) pairs."""
    return torch.stack([a[..., 0], -a[..., 1]], dim=-1)


def complex_pair(real: torch.Tensor, imag: torch.Tensor) -> torch.Tensor:
    """``torch.complex(real, imag)`` as a (real, imaginary) pair (broadcast to one shape)."""
    real, imag = cast(Callable[..., tuple[torch.Tensor, ...]], torch.broadcast_tensors)(real, imag)
    return torch.stack([real, imag], dim=-1)


def real_pair(x: Any, like: torch.Tensor) -> torch.Tensor:
    """A real tensor or a number (a Python complex one too) as a complex value carried as a
    (real, imaginary) pair, in the dtype and on the device of ``like``."""
    if not isinstance(x, torch.Tensor):
        z = complex(x)
        return torch.tensor([z.real, z.imag], dtype=like.dtype, device=like.device)
    return torch.stack([x, torch.zeros_like(x)], dim=-1)


def pair_view(x: torch.Tensor) -> torch.Tensor:
    """``torch.view_as_real``/``view_as_complex`` once complex tensors are carried as their
    (real, imaginary) pairs: nothing to do (a node of its own, so that the graph keeps the
    complex or real value's shape propagation at the view)."""
    return x


def pair_shape(x: torch.Tensor) -> torch.Size:
    """The shape of the complex tensor that the (real, imaginary) pairs ``x`` carry."""
    return x.shape[:-1]


def pair_dim(x: torch.Tensor) -> int:
    """The rank of the complex tensor that the (real, imaginary) pairs ``x`` carry."""
    return x.dim() - 1


def with_pair_axis(shape: Sequence[Any]) -> tuple[Any, ...]:
    """A complex tensor's target shape (``z.view(x.shape)``) for its (real, imaginary) pairs."""
    return (*shape, 2)


def assigned(x: torch.Tensor, index: Any, value: Any) -> torch.Tensor:
    """``x[index] = value`` as a function: a copy of ``x`` holding what the assignment leaves in
    ``x`` (recorded eager code's in-place assignments, ``passes.capture``)."""
    out = x.clone()
    out[index] = value
    return out


class _DressedPart:
    """Mixed into a subclass of a captured module's own class (``dressed``): the module keeps
    its class, name, attributes and children for eager code that dispatches on them
    (``type(m).__name__ == ...``, ``isinstance``), and runs the part's graph as its forward."""

    _sepfx_original: type[nn.Module]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return cast(nn.Module, self).get_submodule(PART_CALL)(*args, **kwargs)

    def __reduce__(self) -> Any:  # the subclass is made at run time: rebuilt from the original
        return (_bare_dressed_instance, (self._sepfx_original,), dict(vars(self)))


PART_CALL = "sepfx_part"
_dressed_classes: dict[type[nn.Module], type[nn.Module]] = {}


def _dressed_class(original: type[nn.Module]) -> type[nn.Module]:
    if original not in _dressed_classes:
        namespace = {
            "__module__": original.__module__,
            "__qualname__": original.__qualname__,
            "_sepfx_original": original,
        }
        _dressed_classes[original] = type(original.__name__, (_DressedPart, original), namespace)
    return _dressed_classes[original]


def _bare_dressed_instance(original: type[nn.Module]) -> nn.Module:
    return object.__new__(_dressed_class(original))


def dressed(module: nn.Module, call: nn.Module) -> nn.Module:
    """A module of ``module``'s class, with its attributes, parameters and children (shared),
    whose forward is ``call`` (a ``PartCall``). Hooks are not carried over; ``module`` is not
    modified."""
    original = getattr(type(module), "_sepfx_original", type(module))
    new = _bare_dressed_instance(original)
    fresh = vars(nn.Module())  # empty hook tables
    carried = {"training", "_parameters", "_buffers", "_modules", "_non_persistent_buffers_set"}
    for name, value in vars(module).items():
        if name not in fresh or name in carried:
            fresh[name] = copy.copy(value) if isinstance(value, (dict, set)) else value
    fresh["_modules"].pop(PART_CALL, None)
    new.__dict__.update(fresh)
    new._modules[PART_CALL] = call
    return new


class PartCall(nn.Module):
    """A captured part (``passes.capture``) as its callers call it: binds positional and keyword
    arguments to the graph's placeholders by the part's forward signature."""

    def __init__(self, graph_module: nn.Module, names: list[str], defaults: dict[str, Any]) -> None:
        super().__init__()
        self.graph_module = graph_module
        self.names = list(names)
        self.defaults = dict(defaults)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        values = dict(zip(self.names, args))
        values.update(kwargs)
        return self.graph_module(*[values.get(n, self.defaults.get(n)) for n in self.names])
