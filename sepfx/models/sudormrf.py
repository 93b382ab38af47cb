"""SuDoRM-RF (Tzinis, Wang & Smaragdis, 2020), small re-implementation.

Encoder Conv1d(1, N, L, stride L//2) + ReLU -> gLN -> 1x1 bottleneck N->B ->
a stack of U-ConvBlocks -> PReLU -> 1x1 conv to n_src*N masks -> ReLU ->
mask -> ConvTranspose1d decoder.

U-ConvBlock: 1x1 conv B->C, PReLU, GroupNorm(1, C); a depthwise conv (stride
1) + norm; ``depth - 1`` successive depthwise stride-2 down-sampling convs,
each + norm; coarse-to-fine fusion: interpolate the coarser map to the finer
map's length and add; GroupNorm + PReLU; 1x1 conv C->B; residual.

Fully traceable by torch.fx.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .layers import GlobalLayerNorm, pad_right_to_multiple


class DepthwiseConvNorm(nn.Module):
    """Depthwise Conv1d (optionally strided) followed by GroupNorm(1, C)."""

    def __init__(self, chan: int, kernel_size: int, stride: int):
        super().__init__()
        self.conv = nn.Conv1d(
            chan, chan, kernel_size, stride=stride, padding=(kernel_size - 1) // 2, groups=chan
        )
        self.norm = nn.GroupNorm(1, chan)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(x))


class UConvBlock(nn.Module):
    def __init__(self, in_chan: int, hid_chan: int, depth: int = 4, kernel_size: int = 5):
        super().__init__()
        self.proj_in = nn.Conv1d(in_chan, hid_chan, 1)
        self.proj_act = nn.PReLU()
        self.proj_norm = nn.GroupNorm(1, hid_chan)
        self.spp = nn.ModuleList(
            [DepthwiseConvNorm(hid_chan, kernel_size, 1)]
            + [DepthwiseConvNorm(hid_chan, kernel_size, 2) for _ in range(depth - 1)]
        )
        self.final_norm = nn.GroupNorm(1, hid_chan)
        self.final_act = nn.PReLU()
        self.proj_out = nn.Conv1d(hid_chan, in_chan, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.proj_norm(self.proj_act(self.proj_in(x)))
        scales = [self.spp[0](h)]
        for down in self.spp[1:]:
            scales.append(down(scales[-1]))
        # Coarse-to-fine fusion.
        y = scales[-1]
        for finer in reversed(scales[:-1]):
            y = finer + F.interpolate(y, size=finer.shape[-1], mode="nearest")
        y = self.final_act(self.final_norm(y))
        return x + self.proj_out(y)


class SuDORMRFSeparator(nn.Module):
    def __init__(
        self,
        in_chan: int,
        n_src: int,
        bn_chan: int,
        hid_chan: int,
        n_blocks: int,
        depth: int,
        kernel_size: int,
    ):
        super().__init__()
        self.n_src = n_src
        self.norm = GlobalLayerNorm(in_chan)
        self.bottleneck = nn.Conv1d(in_chan, bn_chan, 1)
        self.blocks = nn.Sequential(
            *[UConvBlock(bn_chan, hid_chan, depth, kernel_size) for _ in range(n_blocks)]
        )
        self.mask_act_in = nn.PReLU()
        self.mask_conv = nn.Conv1d(bn_chan, n_src * in_chan, 1)
        self.mask_act = nn.ReLU()

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.bottleneck(self.norm(w)))
        m = self.mask_conv(self.mask_act_in(x))
        m = m.view(w.shape[0], self.n_src, -1, w.shape[-1])
        return self.mask_act(m)


class SuDORMRF(nn.Module):
    sample_rate = 8000

    def __init__(
        self,
        n_src: int = 2,
        N: int = 32,
        L: int = 16,
        B: int = 16,
        C: int = 32,
        n_blocks: int = 3,
        depth: int = 3,
        kernel_size: int = 5,
    ):
        super().__init__()
        if L % 2:
            raise ValueError("L must be even (stride is L // 2)")
        self.n_src = n_src
        self.stride = L // 2
        self.encoder = nn.Conv1d(1, N, L, stride=self.stride, bias=False)
        self.encoder_act = nn.ReLU()
        self.separator = SuDORMRFSeparator(N, n_src, B, C, n_blocks, depth, kernel_size)
        self.decoder = nn.ConvTranspose1d(N, 1, L, stride=self.stride, bias=False)

    def forward(self, wav: torch.Tensor) -> torch.Tensor:
        x = pad_right_to_multiple(wav, self.stride)
        w = self.encoder_act(self.encoder(x.unsqueeze(1)))
        masks = self.separator(w)
        y = self.decoder((masks * w.unsqueeze(1)).flatten(0, 1))
        y = y.view(wav.shape[0], self.n_src, -1)
        return y[..., : wav.shape[-1]]
