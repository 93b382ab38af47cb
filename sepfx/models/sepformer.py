"""SepFormer (Subakan et al., 2021), small re-implementation.

Encoder Conv1d(1, N, L, stride L//2) + ReLU -> cLN -> 1x1 bottleneck N->C ->
non-overlapping chunks ``[B, C, S, K]`` -> dual-path blocks, each an
intra-chunk transformer (over K) and an inter-chunk transformer (over S), both
with a sinusoidal positional encoding, a Linear, a LayerNorm and a residual
around them -> merge chunks -> PReLU -> 1x1 conv to n_src*C -> gated output
(tanh * sigmoid) -> 1x1 conv C->N -> ReLU masks -> mask -> ConvTranspose1d.

Transformer layer: pre-LayerNorm, nn.MultiheadAttention with
``batch_first=False`` (so the batch-first activations are transposed to
``[L, N, E]`` and back), FFN Linear-ReLU-Linear, residuals.

Fully traceable by torch.fx.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .layers import (
    PositionalEncoding,
    TransposedLayerNorm,
    merge_chunks,
    pad_right_to_multiple,
    split_chunks,
)


class TransformerLayer(nn.Module):
    """Pre-LN transformer encoder layer on batch-first ``[N, L, E]`` input."""

    def __init__(self, d_model: int, n_heads: int, d_ffn: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(d_model)
        self.attn = nn.MultiheadAttention(d_model, n_heads, dropout=dropout, batch_first=False)
        self.norm2 = nn.LayerNorm(d_model)
        self.ffn = nn.Sequential(
            nn.Linear(d_model, d_ffn),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(d_ffn, d_model),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x).transpose(0, 1)  # [L, N, E]
        a = self.attn(h, h, h, need_weights=False)[0]
        x = x + a.transpose(0, 1)
        return x + self.ffn(self.norm2(x))


class TransformerStack(nn.Module):
    """Positional encoding + ``n_layers`` transformer layers + final LayerNorm."""

    def __init__(self, d_model: int, n_layers: int, n_heads: int, d_ffn: int, max_len: int):
        super().__init__()
        self.pos_enc = PositionalEncoding(d_model, max_len)
        self.layers = nn.ModuleList(
            TransformerLayer(d_model, n_heads, d_ffn) for _ in range(n_layers)
        )
        self.norm = nn.LayerNorm(d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pos_enc(x)
        for layer in self.layers:
            x = layer(x)
        return self.norm(x)


class DualPathBlock(nn.Module):
    """Intra-chunk then inter-chunk transformer on ``[B, C, S, K]``."""

    def __init__(self, chan: int, n_layers: int, n_heads: int, d_ffn: int, max_len: int):
        super().__init__()
        self.intra = TransformerStack(chan, n_layers, n_heads, d_ffn, max_len)
        self.intra_linear = nn.Linear(chan, chan)
        self.intra_norm = nn.LayerNorm(chan)
        self.inter = TransformerStack(chan, n_layers, n_heads, d_ffn, max_len)
        self.inter_linear = nn.Linear(chan, chan)
        self.inter_norm = nn.LayerNorm(chan)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, s, k = x.shape[0], x.shape[1], x.shape[2], x.shape[3]
        # Intra-chunk: [B*S, K, C]
        y = x.permute(0, 2, 3, 1).reshape(b * s, k, c)
        y = self.intra_norm(self.intra_linear(self.intra(y)))
        x = x + y.reshape(b, s, k, c).permute(0, 3, 1, 2)
        # Inter-chunk: [B*K, S, C]
        z = x.permute(0, 3, 2, 1).reshape(b * k, s, c)
        z = self.inter_norm(self.inter_linear(self.inter(z)))
        return x + z.reshape(b, k, s, c).permute(0, 3, 2, 1)


class SepformerSeparator(nn.Module):
    def __init__(
        self,
        in_chan: int,
        n_src: int,
        chan: int,
        chunk_size: int,
        n_blocks: int,
        n_layers: int,
        n_heads: int,
        d_ffn: int,
        max_len: int,
    ):
        super().__init__()
        self.n_src = n_src
        self.chunk_size = chunk_size
        self.norm = TransposedLayerNorm(in_chan)
        self.bottleneck = nn.Conv1d(in_chan, chan, 1)
        self.blocks = nn.ModuleList(
            DualPathBlock(chan, n_layers, n_heads, d_ffn, max_len) for _ in range(n_blocks)
        )
        self.mask_act_in = nn.PReLU()
        self.mask_conv = nn.Conv1d(chan, n_src * chan, 1)
        self.out_tanh = nn.Sequential(nn.Conv1d(chan, chan, 1), nn.Tanh())
        self.out_gate = nn.Sequential(nn.Conv1d(chan, chan, 1), nn.Sigmoid())
        self.end_conv = nn.Conv1d(chan, in_chan, 1, bias=False)
        self.mask_act = nn.ReLU()

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        n_frames = w.shape[-1]
        x = self.bottleneck(self.norm(w))
        x = split_chunks(x, self.chunk_size)  # [B, C, S, K]
        for block in self.blocks:
            x = block(x)
        x = merge_chunks(x, n_frames)  # [B, C, T']
        x = self.mask_conv(self.mask_act_in(x))  # [B, n_src*C, T']
        x = x.reshape(w.shape[0] * self.n_src, -1, n_frames)  # [B*n_src, C, T']
        x = self.out_tanh(x) * self.out_gate(x)
        m = self.mask_act(self.end_conv(x))  # [B*n_src, N, T']
        return m.view(w.shape[0], self.n_src, -1, n_frames)


class Sepformer(nn.Module):
    sample_rate = 8000

    def __init__(
        self,
        n_src: int = 2,
        N: int = 32,
        L: int = 16,
        C: int = 32,
        chunk_size: int = 50,
        n_blocks: int = 1,
        n_layers: int = 1,
        n_heads: int = 2,
        d_ffn: int = 32,
        max_len: int = 8000,
    ):
        super().__init__()
        if L % 2:
            raise ValueError("L must be even (stride is L // 2)")
        self.n_src = n_src
        self.stride = L // 2
        self.encoder = nn.Conv1d(1, N, L, stride=self.stride, bias=False)
        self.encoder_act = nn.ReLU()
        self.separator = SepformerSeparator(
            N, n_src, C, chunk_size, n_blocks, n_layers, n_heads, d_ffn, max_len
        )
        self.decoder = nn.ConvTranspose1d(N, 1, L, stride=self.stride, bias=False)

    def forward(self, wav: torch.Tensor) -> torch.Tensor:
        x = pad_right_to_multiple(wav, self.stride)
        w = self.encoder_act(self.encoder(x.unsqueeze(1)))
        masks = self.separator(w)
        y = self.decoder((masks * w.unsqueeze(1)).flatten(0, 1))
        y = y.view(wav.shape[0], self.n_src, -1)
        return y[..., : wav.shape[-1]]
