"""Dual-path RNN (Luo, Chen & Yoshioka, 2020), small re-implementation.

Encoder Conv1d(1, N, L, stride L//2) + ReLU -> cLN (nn.LayerNorm over
channels) -> 1x1 bottleneck N->C -> split the frames into non-overlapping
chunks of K frames ``[B, C, S, K]`` -> DPRNN blocks (intra-chunk BLSTM over K,
inter-chunk (B)LSTM over S, each followed by Linear back to C, a norm and a
residual) -> merge chunks -> PReLU -> 1x1 conv to n_src*N masks -> mask ->
ConvTranspose1d decoder.

Fully traceable by torch.fx: all padding amounts are shape arithmetic.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .layers import (
    ChannelLayerNorm,
    TransposedLayerNorm,
    merge_chunks,
    pad_right_to_multiple,
    split_chunks,
)


class DPRNNBlock(nn.Module):
    """One dual-path block on ``[B, C, S, K]`` (S chunks of K frames)."""

    def __init__(
        self,
        chan: int,
        hidden: int,
        inter_bidirectional: bool = True,
        inter_layers: int = 1,
    ):
        super().__init__()
        self.intra_rnn = nn.LSTM(chan, hidden, num_layers=1, batch_first=True, bidirectional=True)
        self.intra_linear = nn.Linear(2 * hidden, chan)
        # cLN through nn.LayerNorm on the channels-last layout.
        self.intra_norm = nn.LayerNorm(chan, eps=1e-8)
        self.inter_rnn = nn.LSTM(
            chan,
            hidden,
            num_layers=inter_layers,
            batch_first=True,
            bidirectional=inter_bidirectional,
        )
        self.inter_linear = nn.Linear(hidden * (2 if inter_bidirectional else 1), chan)
        # cLN written by hand, on the channels-first 4-D layout.
        self.inter_norm = ChannelLayerNorm(chan, ndim=4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, s, k = x.shape
        # Intra-chunk: sequences of length K, batch B*S.
        y = x.permute(0, 2, 3, 1).reshape(b * s, k, c)
        y = self.intra_rnn(y)[0]
        y = self.intra_norm(self.intra_linear(y))
        y = y.reshape(b, s, k, c).permute(0, 3, 1, 2)
        x = x + y
        # Inter-chunk: sequences of length S, batch B*K.
        z = x.permute(0, 3, 2, 1).reshape(b * k, s, c)
        z = self.inter_linear(self.inter_rnn(z)[0])
        z = z.reshape(b, k, s, c).permute(0, 3, 2, 1)
        return x + self.inter_norm(z)


class DPRNNSeparator(nn.Module):
    """``[B, N, T'] -> masks [B, n_src, N, T']``."""

    def __init__(
        self,
        in_chan: int,
        n_src: int,
        bn_chan: int,
        hidden: int,
        chunk_size: int,
        n_blocks: int,
        inter_bidirectional: bool,
        inter_layers: int,
        mask_act: str,
    ):
        super().__init__()
        self.n_src = n_src
        self.chunk_size = chunk_size
        self.norm = TransposedLayerNorm(in_chan)
        self.bottleneck = nn.Conv1d(in_chan, bn_chan, 1)
        self.blocks = nn.ModuleList(
            DPRNNBlock(bn_chan, hidden, inter_bidirectional, inter_layers) for _ in range(n_blocks)
        )
        self.mask_act_in = nn.PReLU()
        self.mask_conv = nn.Conv1d(bn_chan, n_src * in_chan, 1)
        self.mask_act = nn.Sigmoid() if mask_act == "sigmoid" else nn.ReLU()

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        n_frames = w.shape[-1]
        x = self.bottleneck(self.norm(w))
        x = split_chunks(x, self.chunk_size)  # [B, C, S, K]
        for block in self.blocks:
            x = block(x)
        x = merge_chunks(x, n_frames)  # [B, C, T']
        m = self.mask_conv(self.mask_act_in(x))
        m = m.view(w.shape[0], self.n_src, -1, n_frames)
        return self.mask_act(m)


class DPRNN(nn.Module):
    sample_rate = 8000

    def __init__(
        self,
        n_src: int = 2,
        N: int = 32,
        L: int = 16,
        C: int = 32,
        hidden: int = 16,
        chunk_size: int = 50,
        n_blocks: int = 2,
        inter_bidirectional: bool = True,
        inter_layers: int = 1,
        mask_act: str = "relu",
    ):
        super().__init__()
        if L % 2:
            raise ValueError("L must be even (stride is L // 2)")
        if mask_act not in ("relu", "sigmoid"):
            raise ValueError(f"mask_act must be 'relu' or 'sigmoid', got {mask_act!r}")
        self.n_src = n_src
        self.stride = L // 2
        self.encoder = nn.Conv1d(1, N, L, stride=self.stride, bias=False)
        self.encoder_act = nn.ReLU()
        self.separator = DPRNNSeparator(
            N, n_src, C, hidden, chunk_size, n_blocks, inter_bidirectional, inter_layers, mask_act
        )
        self.decoder = nn.ConvTranspose1d(N, 1, L, stride=self.stride, bias=False)

    def forward(self, wav: torch.Tensor) -> torch.Tensor:
        x = pad_right_to_multiple(wav, self.stride)
        w = self.encoder_act(self.encoder(x.unsqueeze(1)))  # [B, N, T']
        masks = self.separator(w)  # [B, n_src, N, T']
        y = self.decoder((masks * w.unsqueeze(1)).flatten(0, 1))
        y = y.view(wav.shape[0], self.n_src, -1)
        return y[..., : wav.shape[-1]]
