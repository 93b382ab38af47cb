"""Three small "wild" separation models, written the way people write them, with no concession
to torch.fx. Every one maps ``wav[B, T]`` to ``[B, n_src, T]`` at 8 kHz (``sample_rate = 8000``,
``n_src = 2``) and is tiny (8-64 channels).

Which model carries which pattern of the issue's table:

| pattern in ``forward``                                                   | model(s) |
|--------------------------------------------------------------------------|----------|
| ``if wav.ndim == 1: wav = wav.unsqueeze(0)`` in the root module          | TinyTransformer (root), TinyTDANet (root) |
| ``len(x.shape)``, ``torch.arange(1, len(x.shape)).tolist()`` in a custom global layer norm | TinyTDANet (``GlobalLayerNorm``: input norm and block norms) |
| ``torch.tensor(x.shape)`` to remember a shape                            | TinyTransformer (root: trims the output to ``shape[-1]``) |
| ``rest = k - int(x.shape[-1]) % k; if rest > 0: x = F.pad(x, (0, rest))`` | TinyTransformer (module-level helper ``pad_to_multiple`` called by the root, which therefore runs as an eager shell) |
| positional-encoding buffer ``pe[:, :x.size(1)]`` added to a channel axis | TinyTransformer (``SinusoidalPosition``: ``register_buffer`` of ``[1, max_len, D]``) |
| ``F.adaptive_avg_pool1d(y, output_size=z.shape[-1])`` to fuse scales     | TinyTDANet (global aggregation), TinyAFRCNN (down-sampling a neighbour scale) |
| ``torch.cat([torch.Tensor().to(x.device), a, b], 1)`` (empty operands)   | TinyAFRCNN (every scale's fusion) |
| ``nn.MultiheadAttention(batch_first=False)`` fed ``[B, T, C]``           | TinyTransformer (on purpose: it attends across the batch axis) |
| the same block called N times in a Python loop                           | TinyTDANet, TinyAFRCNN (one block, ``for _ in range(iters)``) |
| a branch computed and never used                                         | TinyAFRCNN (``UBlock.forward``: ``skip`` from ``self.aux``), TinyTDANet (``energy``) |
| a PReLU with one shared weight feeding a ``torch.cat``                   | TinyAFRCNN (``self.act = nn.PReLU()`` on every fused scale, then ``torch.cat``) |

TinyTDANet also uses ``nn.MultiheadAttention(batch_first=True)``, ``F.interpolate`` to a
size read from another tensor, and an asteroid-style ``pad_x_to_y`` (``F.pad`` by a length
difference); TinyAFRCNN trims its output by slicing with ``wav.shape[-1]``.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import toolkit


# ------------------------------------------------------------------------------------------
# shared helpers, as a toolkit would have them
# ------------------------------------------------------------------------------------------
def pad_to_multiple(x, k):
    """Right-pad the last axis of ``x`` so that its length is a multiple of ``k``."""
    rest = k - int(x.shape[-1]) % k
    if rest > 0:
        x = F.pad(x, (0, rest))
    return x, rest


def pad_x_to_y(x, y, axis=-1):
    """Pad (or trim) ``x`` along ``axis`` to the length of ``y`` (asteroid's helper)."""
    inp_len = y.shape[axis]
    out_len = x.shape[axis]
    return F.pad(x, [0, inp_len - out_len])


class GlobalLayerNorm(nn.Module):
    """gLN for inputs of any rank: statistics over every axis but the batch, affine per channel
    (axis 1). Written rank-agnostic, like the original code, from ``len(x.shape)``."""

    def __init__(self, channels, eps=1e-8):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x):
        dims = torch.arange(1, len(x.shape)).tolist()
        mean = x.mean(dim=dims, keepdim=True)
        var = ((x - mean) ** 2).mean(dim=dims, keepdim=True)
        view = [1, -1] + [1] * (len(x.shape) - 2)
        normed = (x - mean) / torch.sqrt(var + self.eps)
        return normed * self.weight.view(view) + self.bias.view(view)


# ------------------------------------------------------------------------------------------
# 1. TDANet-like
# ------------------------------------------------------------------------------------------
class DepthwiseNorm(nn.Module):
    """Depthwise conv (optionally strided) + gLN."""

    def __init__(self, channels, kernel_size=5, stride=1):
        super().__init__()
        self.conv = nn.Conv1d(
            channels,
            channels,
            kernel_size,
            stride=stride,
            padding=kernel_size // 2,
            groups=channels,
        )
        self.norm = GlobalLayerNorm(channels)

    def forward(self, x):
        return self.norm(self.conv(x))


class TopDownBlock(nn.Module):
    """One encoder-decoder pass: multi-scale down-sampling, global aggregation + attention at
    the coarsest scale, local gating of every scale, top-down fusion."""

    def __init__(self, io_channels=16, channels=32, depth=4, heads=4):
        super().__init__()
        self.depth = depth
        self.proj_in = nn.Conv1d(io_channels, channels, 1)
        self.norm_in = nn.GroupNorm(1, channels)
        self.act_in = nn.PReLU(channels)
        self.downs = nn.ModuleList(
            [DepthwiseNorm(channels, 5, 1)]
            + [DepthwiseNorm(channels, 5, 2) for _ in range(depth - 1)]
        )
        self.attn = nn.MultiheadAttention(channels, heads, batch_first=True)
        self.attn_norm = nn.LayerNorm(channels)
        self.ffn = nn.Sequential(
            nn.Conv1d(channels, 2 * channels, 1), nn.ReLU(), nn.Conv1d(2 * channels, channels, 1)
        )
        self.gate = nn.ModuleList([nn.Conv1d(channels, channels, 1) for _ in range(depth)])
        self.embed = nn.ModuleList([nn.Conv1d(channels, channels, 1) for _ in range(depth)])
        self.proj_out = nn.Conv1d(channels, io_channels, 1)

    def forward(self, x):
        residual = x
        y = self.act_in(self.norm_in(self.proj_in(x)))
        scales = []
        for down in self.downs:
            y = down(y)
            scales.append(y)
        z = scales[-1]
        # global aggregation: every scale pooled to the coarsest length
        g = z
        for s in scales[:-1]:
            g = g + F.adaptive_avg_pool1d(s, output_size=z.shape[-1])
        # global attention at the coarsest scale
        seq = g.transpose(1, 2)
        attended, _ = self.attn(seq, seq, seq)
        seq = self.attn_norm(seq + attended)
        g = seq.transpose(1, 2)
        g = g + self.ffn(g)
        # a statistic nobody uses any more (left over from an experiment)
        energy = g.pow(2).mean(dim=-1)  # noqa: F841 (dead code is what this model tests)
        # local attention: each scale gated by the global feature at its length
        local = []
        for i, s in enumerate(scales):
            gi = F.interpolate(g, size=s.shape[-1], mode="nearest")
            local.append(s * torch.sigmoid(self.gate[i](gi)) + self.embed[i](gi))
        # top-down fusion
        out = local[-1]
        for s in reversed(local[:-1]):
            out = s + F.interpolate(out, size=s.shape[-1], mode="nearest")
        return residual + self.proj_out(out)


class TinyTDANet(nn.Module):
    sample_rate = 8000

    def __init__(
        self,
        n_src=2,
        enc_channels=32,
        io_channels=16,
        channels=32,
        depth=4,
        iters=3,
        kernel_size=16,
    ):
        super().__init__()
        self.n_src = n_src
        self.iters = iters
        self.enc_channels = enc_channels
        stride = kernel_size // 2
        self.encoder = nn.Conv1d(
            1, enc_channels, kernel_size, stride=stride, padding=stride, bias=False
        )
        self.in_norm = GlobalLayerNorm(enc_channels)
        self.bottleneck = nn.Conv1d(enc_channels, io_channels, 1)
        self.block = TopDownBlock(io_channels, channels, depth)
        self.mask_act = nn.PReLU()
        self.mask_conv = nn.Conv1d(io_channels, n_src * enc_channels, 1)
        self.decoder = nn.ConvTranspose1d(
            enc_channels, 1, kernel_size, stride=stride, padding=stride, bias=False
        )

    def forward(self, wav):
        if wav.ndim == 1:
            wav = wav.unsqueeze(0)
        batch = wav.shape[0]
        w = torch.relu(self.encoder(wav.unsqueeze(1)))
        mixture = self.bottleneck(self.in_norm(w))
        # one block, weights shared, called iters times with the mixture re-injected
        x = self.block(mixture)
        for _ in range(self.iters - 1):
            x = self.block(mixture + x)
        masks = self.mask_conv(self.mask_act(x))
        masks = torch.relu(masks.view(batch, self.n_src, self.enc_channels, -1))
        masked = (masks * w.unsqueeze(1)).view(batch * self.n_src, self.enc_channels, -1)
        out = self.decoder(masked).view(batch, self.n_src, -1)
        return pad_x_to_y(out, wav)


# ------------------------------------------------------------------------------------------
# 2. A-FRCNN-like
# ------------------------------------------------------------------------------------------
class ConvBN(nn.Module):
    def __init__(self, in_channels, out_channels, kernel_size=1, stride=1, groups=1):
        super().__init__()
        self.conv = nn.Conv1d(
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=(kernel_size - 1) // 2,
            groups=groups,
        )
        self.bn = nn.BatchNorm1d(out_channels)

    def forward(self, x):
        return self.bn(self.conv(x))


class UBlock(nn.Module):
    """Bottom-up, then every scale fused from itself and its neighbours (the finer one
    down-sampled, the coarser one up-sampled), then top-down concatenation of all scales."""

    def __init__(self, io_channels=16, channels=32, scales=3):
        super().__init__()
        self.scales = scales
        self.proj_in = ConvBN(io_channels, channels, 1)
        self.act_in = nn.PReLU(channels)
        self.bottom_up = nn.ModuleList(
            [ConvBN(channels, channels, 5, 1, channels)]
            + [ConvBN(channels, channels, 5, 2, channels) for _ in range(scales - 1)]
        )
        self.fuse = nn.ModuleList()
        for i in range(scales):
            parts = 1 + (i > 0) + (i < scales - 1)
            self.fuse.append(ConvBN(parts * channels, channels, 1))
        self.act = nn.PReLU()  # ONE weight, shared by every fused scale
        self.aux = nn.Conv1d(channels, channels, 3, padding=1)
        self.merge = ConvBN(scales * channels, channels, 1)
        self.proj_out = nn.Conv1d(channels, io_channels, 1)

    def forward(self, x):
        y = self.act_in(self.proj_in(x))
        skip = self.aux(y)  # noqa: F841 computed, never used (a branch someone switched off)
        levels = [self.bottom_up[0](y)]
        for conv in self.bottom_up[1:]:
            levels.append(conv(levels[-1]))
        fused = []
        for i in range(self.scales):
            here = levels[i]
            y = torch.cat([torch.Tensor().to(x.device), here], 1)
            if i > 0:
                finer = F.adaptive_avg_pool1d(levels[i - 1], output_size=here.shape[-1])
                y = torch.cat([torch.Tensor().to(x.device), finer, y], 1)
            if i < self.scales - 1:
                coarser = F.interpolate(levels[i + 1], size=here.shape[-1], mode="nearest")
                y = torch.cat([y, coarser], 1)
            fused.append(self.act(self.fuse[i](y)))
        length = fused[0].shape[-1]
        top = torch.cat(
            [fused[0]] + [F.interpolate(f, size=length, mode="nearest") for f in fused[1:]], dim=1
        )
        return x + self.proj_out(self.merge(top))


class TinyAFRCNN(nn.Module):
    sample_rate = 8000

    def __init__(
        self,
        n_src=2,
        enc_channels=32,
        io_channels=16,
        channels=32,
        scales=3,
        iters=3,
        kernel_size=16,
    ):
        super().__init__()
        self.n_src = n_src
        self.iters = iters
        self.enc_channels = enc_channels
        self.stride = kernel_size // 2
        self.encoder = nn.Conv1d(1, enc_channels, kernel_size, stride=self.stride, bias=False)
        self.norm = nn.GroupNorm(1, enc_channels)
        self.bottleneck = nn.Conv1d(enc_channels, io_channels, 1)
        self.block = UBlock(io_channels, channels, scales)
        self.concat = nn.Sequential(nn.Conv1d(2 * io_channels, io_channels, 1), nn.PReLU())
        self.mask = nn.Conv1d(io_channels, n_src * enc_channels, 1)
        self.decoder = nn.ConvTranspose1d(
            enc_channels, 1, kernel_size, stride=self.stride, bias=False
        )

    def forward(self, wav):
        s = self.stride
        w = self.encoder(F.pad(wav.unsqueeze(1), (s, s)))
        mixture = self.bottleneck(self.norm(w))
        x = mixture
        for i in range(self.iters):
            if i > 0:
                x = self.concat(torch.cat([mixture, x], dim=1))
            x = self.block(x)
        masks = torch.sigmoid(self.mask(x)).unflatten(1, (self.n_src, self.enc_channels))
        masked = masks * w.unsqueeze(1)
        b = masked.shape[0]
        out = self.decoder(masked.flatten(0, 1))
        out = out.reshape(b, self.n_src, -1)
        return out[..., s : s + wav.shape[-1]]


# ------------------------------------------------------------------------------------------
# 3. a toolkit-style transformer (asteroid / speechbrain habits)
# ------------------------------------------------------------------------------------------
class SinusoidalPosition(nn.Module):
    def __init__(self, channels, max_len=4000):
        super().__init__()
        position = torch.arange(max_len).unsqueeze(1)
        div = torch.exp(torch.arange(0, channels, 2) * (-math.log(10000.0) / channels))
        pe = torch.zeros(1, max_len, channels)
        pe[0, :, 0::2] = torch.sin(position * div)
        pe[0, :, 1::2] = torch.cos(position * div)
        self.register_buffer("pe", pe)

    def forward(self, x):
        return x + self.pe[:, : x.size(1)]


class EncoderLayer(nn.Module):
    """Pre-norm transformer layer. The attention is sequence-first (the default) but is fed
    batch-first tensors: it attends across the batch axis. Kept on purpose."""

    def __init__(self, d_model=32, heads=4, d_ff=64, dropout=0.1):
        super().__init__()
        self.norm1 = nn.LayerNorm(d_model)
        self.attn = nn.MultiheadAttention(d_model, heads, dropout=dropout)
        self.drop = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)
        self.ffn = nn.Sequential(
            nn.Linear(d_model, d_ff), nn.ReLU(), nn.Dropout(dropout), nn.Linear(d_ff, d_model)
        )

    def forward(self, x):
        h = self.norm1(x)
        a, _ = self.attn(h, h, h)
        x = x + self.drop(a)
        return x + self.drop(self.ffn(self.norm2(x)))


class TinyTransformer(nn.Module):
    sample_rate = 8000

    def __init__(self, n_src=2, enc_channels=32, d_model=32, layers=2, kernel_size=16):
        super().__init__()
        self.n_src = n_src
        self.enc_channels = enc_channels
        self.kernel_size = kernel_size
        self.encoder = nn.Conv1d(1, enc_channels, kernel_size, stride=kernel_size // 2, bias=False)
        self.enc_norm = nn.LayerNorm(enc_channels)
        self.in_proj = nn.Linear(enc_channels, d_model)
        self.position = SinusoidalPosition(d_model)
        self.layers = nn.ModuleList([EncoderLayer(d_model) for _ in range(layers)])
        self.out_norm = nn.LayerNorm(d_model)
        self.masker = nn.Linear(d_model, n_src * enc_channels)
        self.decoder = nn.ConvTranspose1d(
            enc_channels, 1, kernel_size, stride=kernel_size // 2, bias=False
        )

    def forward(self, wav):
        if wav.ndim == 1:
            wav = wav.unsqueeze(0)
        shape = torch.tensor(wav.shape)
        x, _ = pad_to_multiple(wav.unsqueeze(1), self.kernel_size // 2)
        w = torch.relu(self.encoder(x))  # [B, C, L]
        h = self.in_proj(self.enc_norm(w.transpose(1, 2)))  # [B, L, D]
        h = self.position(h)
        for layer in self.layers:
            h = layer(h)
        m = torch.relu(self.masker(self.out_norm(h)))  # [B, L, n_src * C]
        m = m.view(m.shape[0], m.shape[1], self.n_src, self.enc_channels).permute(0, 2, 3, 1)
        masked = m * w.unsqueeze(1)  # [B, n_src, C, L]
        out = self.decoder(masked.reshape(-1, self.enc_channels, masked.shape[-1]))
        out = out.view(-1, self.n_src, out.shape[-1])
        return out[..., : shape[-1]]


MODELS = {
    "tdanet": TinyTDANet,
    "afrcnn": TinyAFRCNN,
    "transformer": TinyTransformer,
    **toolkit.MODELS,  # separators composed as toolkits compose them (tests/wild/toolkit.py)
}


def build(name: str, seed: int = 0) -> nn.Module:
    """Model ``name`` with deterministic weights, in eval mode."""
    torch.manual_seed(seed)
    return MODELS[name]().eval()
