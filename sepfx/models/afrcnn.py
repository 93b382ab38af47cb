"""A-FRCNN (Hu, Li, Zhang, Luo, Lemercier & Gerkmann, NeurIPS 2021), small re-implementation.

"Speech separation using an asynchronous fully recurrent convolutional neural network": ONE
multi-scale block applied ``iters`` times with shared weights.  Structure follows the authors'
``AFRCNN.py`` (recurrent mode "SC"):

Encoder Conv1d(1, N, L, stride L//2, padding L//2), no non-linearity -> gLN -> 1x1 bottleneck
N->B -> the recurrent block, ``x = block(x)`` then ``iters - 1`` times
``x = block(input_fusion(mixture + x))`` (a per-channel 1x1 conv + PReLU fusing the block input
with the previous iteration's output) -> PReLU -> 1x1 conv to n_src*N masks -> ReLU -> mask ->
one ConvTranspose1d decoder from all n_src*N masked channels to n_src waveforms (as the
original: the masked encodings of every source are viewed back as one n_src*N channel axis;
``padding=L//2``, ``output_padding=L//2 - 1``).

Recurrent block ``[batch, B, T'] -> same`` (every norm is a global layer norm over channels and
time, as the original's ``select_norm("gLN")``):
  * 1x1 conv B->C + gLN + PReLU;
  * bottom-up: a depthwise conv (stride 1) then ``depth - 1`` depthwise stride-2 convs, each +
    gLN, giving ``depth`` scales;
  * lateral fusion at every scale i: concatenate the finer neighbour down-sampled by a depthwise
    stride-2 conv + gLN (i > 0), the scale itself, and the coarser neighbour up-sampled by
    nearest interpolation (i < depth - 1); 1x1 conv (2C or 3C)->C + gLN + PReLU;
  * top-down: every fused scale is interpolated to the finest length, all are concatenated
    (depth*C) and fused by a 1x1 conv -> C + gLN + PReLU; 1x1 conv C->B; residual from the
    block's input.

Departure from the original, in the zoo's style: the padding is the traceable
``pad_right_to_multiple`` (the original copies the input into ``torch.zeros`` of the padded
length); the pad unit is the original's ``lcm(L // 2, 2 ** depth)``.

Fully traceable by torch.fx.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .layers import GlobalLayerNorm, pad_right_to_multiple


class ConvNorm(nn.Module):
    """Conv1d ("same" padding, depthwise when ``groups == in_chan``) + gLN, optionally + PReLU
    (the original's ``ConvNormAct`` in modes "CN" and "CNA")."""

    def __init__(
        self,
        in_chan: int,
        out_chan: int,
        kernel_size: int = 1,
        stride: int = 1,
        groups: int = 1,
        act: bool = False,
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
        self.norm = GlobalLayerNorm(out_chan)
        self.act = nn.PReLU() if act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(self.conv(x)))


class AFRCNNBlock(nn.Module):
    """The weight-shared multi-scale block, ``[B, in_chan, T'] -> same``."""

    def __init__(self, in_chan: int, hid_chan: int, depth: int, kernel_size: int = 5):
        super().__init__()
        if depth < 2:
            raise ValueError("depth must be at least 2 (the block fuses neighbouring scales)")
        self.depth = depth
        self.proj_in = ConvNorm(in_chan, hid_chan, 1, act=True)
        self.bottom_up = nn.ModuleList(
            [ConvNorm(hid_chan, hid_chan, kernel_size, 1, groups=hid_chan)]
            + [
                ConvNorm(hid_chan, hid_chan, kernel_size, 2, groups=hid_chan)
                for _ in range(depth - 1)
            ]
        )
        # fuse_down[i - 1] brings scale i - 1 to the resolution of scale i (same length as
        # bottom_up[i]'s output: both are stride-2 convs with "same" padding).
        self.fuse_down = nn.ModuleList(
            ConvNorm(hid_chan, hid_chan, kernel_size, 2, groups=hid_chan) for _ in range(depth - 1)
        )
        # The finest and the coarsest scale have one neighbour, the others two.
        self.fuse = nn.ModuleList(
            ConvNorm((2 if i in (0, depth - 1) else 3) * hid_chan, hid_chan, 1, act=True)
            for i in range(depth)
        )
        self.top_down = ConvNorm(depth * hid_chan, hid_chan, 1, act=True)
        self.proj_out = nn.Conv1d(hid_chan, in_chan, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.proj_in(x)
        # Bottom-up: scale 0 at the input resolution, each next one at half the previous.
        scales = [self.bottom_up[0](h)]
        for down in self.bottom_up[1:]:
            scales.append(down(scales[-1]))
        # Lateral fusion of every scale with its neighbours at its own resolution.
        fused = []
        for i, scale in enumerate(scales):
            parts = []
            if i > 0:
                parts.append(self.fuse_down[i - 1](scales[i - 1]))
            parts.append(scale)
            if i < self.depth - 1:
                parts.append(F.interpolate(scales[i + 1], size=scale.shape[-1], mode="nearest"))
            fused.append(self.fuse[i](torch.cat(parts, dim=1)))
        # Top-down: every scale up-sampled to the finest one, fused in one 1x1 conv.
        size = fused[0].shape[-1]
        up = [fused[0]] + [F.interpolate(f, size=size, mode="nearest") for f in fused[1:]]
        y = self.top_down(torch.cat(up, dim=1))
        return x + self.proj_out(y)


class AFRCNNSeparator(nn.Module):
    """gLN, bottleneck, the shared block unrolled ``iters`` times, masks."""

    def __init__(
        self,
        in_chan: int,
        n_src: int,
        bn_chan: int,
        hid_chan: int,
        depth: int,
        iters: int,
        kernel_size: int,
    ):
        super().__init__()
        self.n_src = n_src
        self.iters = iters
        self.norm = GlobalLayerNorm(in_chan)
        self.bottleneck = nn.Conv1d(in_chan, bn_chan, 1)
        self.block = AFRCNNBlock(bn_chan, hid_chan, depth, kernel_size)
        # The original's "concat_block" of mode SC: a per-channel 1x1 conv + PReLU applied to
        # the sum of the block input and the previous iteration's output.
        self.input_fusion = nn.Sequential(
            nn.Conv1d(bn_chan, bn_chan, 1, groups=bn_chan), nn.PReLU()
        )
        self.mask_act_in = nn.PReLU()
        self.mask_conv = nn.Conv1d(bn_chan, n_src * in_chan, 1)
        self.mask_act = nn.ReLU()

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        mixture = self.bottleneck(self.norm(w))
        x = self.block(mixture)
        for _ in range(self.iters - 1):  # same weights every iteration
            x = self.block(self.input_fusion(mixture + x))
        m = self.mask_conv(self.mask_act_in(x))
        return self.mask_act(m.view(w.shape[0], self.n_src, -1, w.shape[-1]))


class AFRCNN(nn.Module):
    sample_rate = 8000

    def __init__(
        self,
        n_src: int = 2,
        N: int = 32,
        L: int = 16,
        B: int = 16,
        C: int = 16,
        depth: int = 4,
        iters: int = 4,
        kernel_size: int = 5,
    ):
        super().__init__()
        if L % 2:
            raise ValueError("L must be even (stride is L // 2)")
        self.n_src = n_src
        self.stride = L // 2
        # As the original: pad to lcm(encoder stride, 2 ** depth) samples.
        self.pad_unit = math.lcm(self.stride, 2**depth)
        self.encoder = nn.Conv1d(1, N, L, stride=self.stride, padding=self.stride, bias=False)
        self.separator = AFRCNNSeparator(N, n_src, B, C, depth, iters, kernel_size)
        # Output length (frames - 1) * stride + stride - 1 >= the padded input's length.
        self.decoder = nn.ConvTranspose1d(
            n_src * N,
            n_src,
            L,
            stride=self.stride,
            padding=self.stride,
            output_padding=self.stride - 1,
            bias=False,
        )

    def forward(self, wav: torch.Tensor) -> torch.Tensor:
        x = pad_right_to_multiple(wav, self.pad_unit)
        w = self.encoder(x.unsqueeze(1))  # [B, N, T'], no non-linearity (as the original)
        masked = self.separator(w) * w.unsqueeze(1)  # [B, n_src, N, T']
        y = self.decoder(masked.view(wav.shape[0], -1, masked.shape[-1]))  # [B, n_src, T'']
        return y[..., : wav.shape[-1]]
