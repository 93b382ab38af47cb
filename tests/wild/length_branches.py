"""Separators whose forward branches on the input's length, as published recipes write it.

``TrimOrPad`` restores the input length the way SepFormer-style recipes do after a strided
encoder and a transposed-conv decoder: ``T_origin = mix.size(1)``, ``T_est = est.size(1)``,
then ``if T_origin > T_est: pad else slice``. The decoder's output is shorter than the input
unless the length is a multiple of the stride, so which side runs depends on the length; the
masker's global layer norm spans the time axis, so a wrongly kept pad changes every sample.
``PadToBlock`` pads the mixture to a multiple of a block length before the encoder
(``rest = k - T % k; if rest > 0: pad``) and trims the output back.

Both map ``wav[B, T]`` to ``[B, n_src, T]`` at 8 kHz.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class GlobalLayerNorm(nn.Module):
    """gLN: statistics over channels and time, affine per channel."""

    def __init__(self, channels, eps=1e-8):
        super().__init__()
        self.eps = eps
        self.gamma = nn.Parameter(torch.ones(1, channels, 1))
        self.beta = nn.Parameter(torch.zeros(1, channels, 1))

    def forward(self, x):
        mean = x.mean(dim=(1, 2), keepdim=True)
        var = ((x - mean) ** 2).mean(dim=(1, 2), keepdim=True)
        return self.gamma * (x - mean) / torch.sqrt(var + self.eps) + self.beta


class Encoder(nn.Module):
    def __init__(self, kernel_size=16, out_channels=32):
        super().__init__()
        self.conv1d = nn.Conv1d(1, out_channels, kernel_size, stride=kernel_size // 2, bias=False)

    def forward(self, x):
        return F.relu(self.conv1d(x.unsqueeze(1)))


class Decoder(nn.ConvTranspose1d):
    def forward(self, x):
        return torch.squeeze(super().forward(x), dim=1)


class MaskNet(nn.Module):
    def __init__(self, channels=32, hidden=48, num_spks=2):
        super().__init__()
        self.num_spks = num_spks
        self.norm = GlobalLayerNorm(channels)
        self.conv_in = nn.Conv1d(channels, hidden, 1)
        self.depthwise = nn.Conv1d(hidden, hidden, 3, padding=1, groups=hidden)
        self.prelu = nn.PReLU()
        self.conv_out = nn.Conv1d(hidden, channels * num_spks, 1)

    def forward(self, x):
        b, c, frames = x.shape
        h = self.prelu(self.depthwise(self.conv_in(self.norm(x))))
        masks = torch.sigmoid(self.conv_out(h)).view(b, self.num_spks, c, frames)
        return masks.transpose(0, 1)  # [num_spks, B, C, frames]


class TrimOrPad(nn.Module):
    sample_rate = 8000
    n_src = 2

    def __init__(self, channels=32, kernel_size=16):
        super().__init__()
        self.num_spks = self.n_src
        self.encoder = Encoder(kernel_size, channels)
        self.masknet = MaskNet(channels, num_spks=self.num_spks)
        self.decoder = Decoder(channels, 1, kernel_size, stride=kernel_size // 2, bias=False)

    def forward(self, mix):
        mix_w = self.encoder(mix)
        est_mask = self.masknet(mix_w)
        mix_w = torch.stack([mix_w] * self.num_spks)
        sep_h = mix_w * est_mask
        est_source = torch.cat(
            [self.decoder(sep_h[i]).unsqueeze(-1) for i in range(self.num_spks)], dim=-1
        )
        # T changed after conv1d in encoder, fix it here
        T_origin = mix.size(1)
        T_est = est_source.size(1)
        if T_origin > T_est:
            est_source = F.pad(est_source, (0, 0, 0, T_origin - T_est))
        else:
            est_source = est_source[:, :T_origin, :]
        return est_source.transpose(1, 2)  # [B, n_src, T]


class PadToBlock(TrimOrPad):
    block = 40

    def forward(self, mix):
        T = mix.shape[-1]
        rest = self.block - T % self.block
        if rest > 0:
            mix = F.pad(mix, (0, rest))
        return super().forward(mix)[..., :T]


MODELS = {"trim_or_pad": TrimOrPad, "pad_to_block": PadToBlock}


def build(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return MODELS[name]().eval()
