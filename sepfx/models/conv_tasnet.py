"""Conv-TasNet (Luo & Mesgarani, 2019), small re-implementation.

Encoder: Conv1d(1, N, L, stride L//2) + ReLU.
Separator (TCN): gLN -> 1x1 bottleneck N->B -> R repeats of X temporal blocks
(1x1 B->H, PReLU, GroupNorm(1, H), depthwise dilated conv, PReLU, GroupNorm,
then 1x1 residual conv H->B and 1x1 skip conv H->Sc) -> sum of skips -> PReLU
-> 1x1 conv Sc -> n_src*N -> mask nonlinearity.
Decoder: ConvTranspose1d(N, 1, L, stride L//2) on the masked encoder output.

As in the reference implementation, the residual conv of the *last* temporal
block is computed but its result never reaches the output (dead branch, kept
on purpose: its parameters receive no gradient).

Deliberately "wild" (not fx-traceable) bits, all in the root / pad module:
``if wav.ndim == 1`` in :meth:`ConvTasNet.forward` and the ``int()`` based
padding in :class:`~sepfx.models.layers.PadToMultiple`.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .layers import GlobalLayerNorm, PadToMultiple


class TemporalBlock(nn.Module):
    """One 1-D conv block of the TCN. Returns ``(residual, skip)``."""

    def __init__(
        self, bn_chan: int, hid_chan: int, skip_chan: int, kernel_size: int, dilation: int
    ):
        super().__init__()
        padding = dilation * (kernel_size - 1) // 2  # 'same' for odd kernels
        self.in_conv = nn.Conv1d(bn_chan, hid_chan, 1)
        self.act1 = nn.PReLU()
        self.norm1 = nn.GroupNorm(1, hid_chan)
        self.dconv = nn.Conv1d(
            hid_chan, hid_chan, kernel_size, padding=padding, dilation=dilation, groups=hid_chan
        )
        self.act2 = nn.PReLU()
        self.norm2 = nn.GroupNorm(1, hid_chan)
        self.res_conv = nn.Conv1d(hid_chan, bn_chan, 1)
        self.skip_conv = nn.Conv1d(hid_chan, skip_chan, 1)

    def forward(self, x: torch.Tensor):
        y = self.norm1(self.act1(self.in_conv(x)))
        y = self.norm2(self.act2(self.dconv(y)))
        return self.res_conv(y), self.skip_conv(y)


class TDConvNet(nn.Module):
    """Conv-TasNet separator: ``[B, N, T'] -> masks [B, n_src, N, T']``."""

    def __init__(
        self,
        in_chan: int,
        n_src: int,
        bn_chan: int,
        hid_chan: int,
        skip_chan: int,
        kernel_size: int,
        n_blocks: int,
        n_repeats: int,
        mask_act: str = "relu",
    ):
        super().__init__()
        self.n_src = n_src
        self.norm = GlobalLayerNorm(in_chan)
        self.bottleneck = nn.Conv1d(in_chan, bn_chan, 1)
        self.blocks = nn.ModuleList(
            TemporalBlock(bn_chan, hid_chan, skip_chan, kernel_size, 2**x)
            for _ in range(n_repeats)
            for x in range(n_blocks)
        )
        self.mask_act_in = nn.PReLU()
        self.mask_conv = nn.Conv1d(skip_chan, n_src * in_chan, 1)
        if mask_act == "relu":
            self.mask_act = nn.ReLU()
        elif mask_act == "sigmoid":
            self.mask_act = nn.Sigmoid()
        else:
            raise ValueError(f"mask_act must be 'relu' or 'sigmoid', got {mask_act!r}")

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        x = self.bottleneck(self.norm(w))
        skip_sum = None
        for block in self.blocks:
            residual, skip = block(x)
            # For the last block this sum is dead code (as in the reference).
            x = x + residual
            skip_sum = skip if skip_sum is None else skip_sum + skip
        m = self.mask_conv(self.mask_act_in(skip_sum))
        m = m.view(w.shape[0], self.n_src, -1, w.shape[-1])
        return self.mask_act(m)


class ConvTasNet(nn.Module):
    sample_rate = 8000

    def __init__(
        self,
        n_src: int = 2,
        N: int = 32,
        L: int = 16,
        B: int = 16,
        H: int = 32,
        P: int = 3,
        X: int = 3,
        R: int = 1,
        Sc: int | None = None,
        mask_act: str = "relu",
    ):
        super().__init__()
        if L % 2:
            raise ValueError("L must be even (stride is L // 2)")
        self.n_src = n_src
        stride = L // 2
        Sc = B if Sc is None else Sc
        self.pad = PadToMultiple(stride)
        self.encoder = nn.Conv1d(1, N, L, stride=stride, bias=False)
        self.encoder_act = nn.ReLU()
        self.separator = TDConvNet(N, n_src, B, H, Sc, P, X, R, mask_act)
        self.decoder = nn.ConvTranspose1d(N, 1, L, stride=stride, bias=False)

    def forward(self, wav: torch.Tensor) -> torch.Tensor:
        if wav.ndim == 1:
            wav = wav.unsqueeze(0)
        x = self.pad(wav)
        w = self.encoder_act(self.encoder(x.unsqueeze(1)))  # [B, N, T']
        masks = self.separator(w)  # [B, n_src, N, T']
        masked = masks * w.unsqueeze(1)
        y = self.decoder(masked.flatten(0, 1))  # [B*n_src, 1, T_pad]
        y = y.view(wav.shape[0], self.n_src, -1)
        return y[..., : wav.shape[-1]]
