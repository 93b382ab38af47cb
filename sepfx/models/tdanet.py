"""TDANet (Li, Chen, Hu & Yuan, ICLR 2023), small re-implementation.

Encoder Conv1d(1, N, L, stride L//2) + ReLU -> layer norm -> 1x1 bottleneck
N->B -> ONE recurrent encoder-decoder block applied ``iters`` times with
shared weights (``x = block(x + mixture)``) -> PReLU -> 1x1 conv to n_src*N
masks -> ReLU -> mask -> ConvTranspose1d decoder.

Recurrent block (top-down attention):
  * 1x1 conv B->C + GroupNorm + PReLU;
  * bottom-up: a depthwise conv (stride 1) then ``depth - 1`` depthwise
    stride-2 down-sampling convs, each + GroupNorm;
  * global aggregation: every scale is ``adaptive_avg_pool1d``-ed to the
    coarsest length and summed;
  * global attention at the coarsest scale: nn.MultiheadAttention
    (batch_first) on ``[B, T', C]`` with residual + LayerNorm, then an FFN
    (1x1 conv, depthwise conv, 1x1 conv) with residual;
  * local attention: each scale is gated by the (interpolated) global
    feature (``local * sigmoid(g_act) + g_emb``);
  * top-down fusion: coarse maps are interpolated to the finer map's length
    and added; 1x1 conv C->B; residual.

Deliberately "wild" (not fx-traceable) bits, confined to the root and the
input norm: :class:`ShapeAgnosticLayerNorm` computes its reduction dims from
``len(x.shape)``, and :meth:`TDANet.forward` does ``assert x.ndim == 3``.
Everything inside the recurrent block is traceable.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .layers import pad_right_to_multiple


class ShapeAgnosticLayerNorm(nn.Module):
    """Global layer norm over every non-batch dim, for inputs of any rank.

    The reduction dims are derived from ``len(x.shape)`` (not fx-traceable).
    gamma/beta are per channel (dim 1).
    """

    def __init__(self, num_channels: int, eps: float = 1e-8):
        super().__init__()
        self.eps = eps
        self.gamma = nn.Parameter(torch.ones(num_channels))
        self.beta = nn.Parameter(torch.zeros(num_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dims = tuple(range(1, len(x.shape)))
        mean = x.mean(dim=dims, keepdim=True)
        var = ((x - mean) ** 2).mean(dim=dims, keepdim=True)
        shape = (1, -1) + (1,) * (len(x.shape) - 2)
        x = (x - mean) / torch.sqrt(var + self.eps)
        return x * self.gamma.view(shape) + self.beta.view(shape)


class ConvNorm(nn.Module):
    """Conv1d (depthwise when ``groups == chan``) + GroupNorm(1, C)."""

    def __init__(
        self, in_chan: int, out_chan: int, kernel_size: int, stride: int = 1, groups: int = 1
    ):
        super().__init__()
        self.conv = nn.Conv1d(
            in_chan,
            out_chan,
            kernel_size,
            stride=stride,
            padding=(kernel_size - 1) // 2,
            groups=groups,
        )
        self.norm = nn.GroupNorm(1, out_chan)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(x))


class GlobalAttention(nn.Module):
    """MHSA (batch_first) + residual + LayerNorm, then conv FFN + residual."""

    def __init__(self, chan: int, n_heads: int, ffn_chan: int, kernel_size: int = 5):
        super().__init__()
        self.mha = nn.MultiheadAttention(chan, n_heads, batch_first=True)
        self.attn_norm = nn.LayerNorm(chan)
        self.ffn_in = nn.Conv1d(chan, ffn_chan, 1)
        self.ffn_dw = nn.Conv1d(
            ffn_chan, ffn_chan, kernel_size, padding=(kernel_size - 1) // 2, groups=ffn_chan
        )
        self.ffn_act = nn.ReLU()
        self.ffn_out = nn.Conv1d(ffn_chan, chan, 1)
        self.ffn_norm = nn.GroupNorm(1, chan)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.transpose(1, 2)  # [B, T', C]
        a = self.mha(t, t, t, need_weights=False)[0]
        x = self.attn_norm(t + a).transpose(1, 2)  # [B, C, T']
        y = self.ffn_out(self.ffn_act(self.ffn_dw(self.ffn_in(x))))
        return self.ffn_norm(x + y)


class LocalGlobalFusion(nn.Module):
    """Top-down "injection": gate a local map with a (coarser) global map."""

    def __init__(self, chan: int, kernel_size: int = 5):
        super().__init__()
        self.local_emb = ConvNorm(chan, chan, kernel_size, groups=chan)
        self.global_emb = ConvNorm(chan, chan, kernel_size, groups=chan)
        self.global_act = ConvNorm(chan, chan, kernel_size, groups=chan)
        self.gate = nn.Sigmoid()

    def forward(self, local: torch.Tensor, glob: torch.Tensor) -> torch.Tensor:
        size = local.shape[-1]
        gate = F.interpolate(self.gate(self.global_act(glob)), size=size, mode="nearest")
        emb = F.interpolate(self.global_emb(glob), size=size, mode="nearest")
        return self.local_emb(local) * gate + emb


class RecurrentBlock(nn.Module):
    """The weight-shared TDANet encoder-decoder block, ``[B, B, T'] -> same``."""

    def __init__(
        self,
        in_chan: int,
        hid_chan: int,
        depth: int,
        n_heads: int,
        ffn_chan: int,
        kernel_size: int = 5,
    ):
        super().__init__()
        self.proj_in = nn.Conv1d(in_chan, hid_chan, 1)
        self.proj_norm = nn.GroupNorm(1, hid_chan)
        self.proj_act = nn.PReLU()
        self.down = nn.ModuleList(
            [ConvNorm(hid_chan, hid_chan, kernel_size, 1, groups=hid_chan)]
            + [
                ConvNorm(hid_chan, hid_chan, kernel_size, 2, groups=hid_chan)
                for _ in range(depth - 1)
            ]
        )
        self.attention = GlobalAttention(hid_chan, n_heads, ffn_chan, kernel_size)
        self.fuse = nn.ModuleList(LocalGlobalFusion(hid_chan, kernel_size) for _ in range(depth))
        self.proj_out = nn.Conv1d(hid_chan, in_chan, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.proj_act(self.proj_norm(self.proj_in(x)))
        # Bottom-up multi-scale features.
        scales = []
        for down in self.down:
            h = down(h)
            scales.append(h)
        # Global aggregation at the coarsest scale.
        coarse_len = scales[-1].shape[-1]
        g = scales[-1]
        for s in scales[:-1]:
            g = g + F.adaptive_avg_pool1d(s, coarse_len)
        g = self.attention(g)
        # Local/global fusion at every scale.
        fused = [fuse(s, g) for fuse, s in zip(self.fuse, scales)]
        # Top-down reconstruction.
        y = fused[-1]
        for finer in reversed(fused[:-1]):
            y = finer + F.interpolate(y, size=finer.shape[-1], mode="nearest")
        return x + self.proj_out(y)


class TDANetSeparator(nn.Module):
    """Bottleneck, the shared recurrent block unrolled ``iters`` times, masks."""

    def __init__(
        self,
        in_chan: int,
        n_src: int,
        bn_chan: int,
        hid_chan: int,
        depth: int,
        iters: int,
        n_heads: int,
        ffn_chan: int,
        kernel_size: int,
    ):
        super().__init__()
        self.n_src = n_src
        self.iters = iters
        self.bottleneck = nn.Conv1d(in_chan, bn_chan, 1)
        self.block = RecurrentBlock(bn_chan, hid_chan, depth, n_heads, ffn_chan, kernel_size)
        self.mask_act_in = nn.PReLU()
        self.mask_conv = nn.Conv1d(bn_chan, n_src * in_chan, 1)
        self.mask_act = nn.ReLU()

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        mixture = self.bottleneck(w)
        x = self.block(mixture)
        for _ in range(self.iters - 1):  # same weights every iteration
            x = self.block(x + mixture)
        m = self.mask_conv(self.mask_act_in(x))
        return self.mask_act(m.view(w.shape[0], self.n_src, -1, w.shape[-1]))


class TDANet(nn.Module):
    sample_rate = 8000

    def __init__(
        self,
        n_src: int = 2,
        N: int = 32,
        L: int = 16,
        B: int = 16,
        C: int = 32,
        depth: int = 4,
        iters: int = 3,
        n_heads: int = 2,
        ffn_chan: int = 64,
        kernel_size: int = 5,
    ):
        super().__init__()
        if L % 2:
            raise ValueError("L must be even (stride is L // 2)")
        self.n_src = n_src
        self.stride = L // 2
        self.encoder = nn.Conv1d(1, N, L, stride=self.stride, bias=False)
        self.encoder_act = nn.ReLU()
        self.norm = ShapeAgnosticLayerNorm(N)
        self.separator = TDANetSeparator(
            N, n_src, B, C, depth, iters, n_heads, ffn_chan, kernel_size
        )
        self.decoder = nn.ConvTranspose1d(N, 1, L, stride=self.stride, bias=False)

    def forward(self, wav: torch.Tensor) -> torch.Tensor:
        x = pad_right_to_multiple(wav, self.stride)
        w = self.encoder_act(self.encoder(x.unsqueeze(1)))  # [B, N, T']
        assert w.ndim == 3, "encoder output must be [batch, channels, frames]"
        masks = self.separator(self.norm(w))  # [B, n_src, N, T']
        y = self.decoder((masks * w.unsqueeze(1)).flatten(0, 1))
        y = y.view(wav.shape[0], self.n_src, -1)
        return y[..., : wav.shape[-1]]
