"""Separators that work in the STFT (time-frequency) domain, as published code writes them
(issue 28, item 4a): plain torch modules, ``torch.stft(..., return_complex=True)``, complex
spectra taken apart with ``.real``/``.imag`` or ``torch.view_as_real``, complex masks
multiplied in, ``torch.istft(..., length=T)``; sizes computed from the input's length, n_fft and
hop as module attributes. Every model maps ``wav[B, T]`` to ``[B, n_src, T]`` at 8 kHz and is
tiny.

| pattern in ``forward``                                                     | model |
|----------------------------------------------------------------------------|-------|
| window as a registered buffer, ``torch.stft`` on it, ``torch.stack([spec.real, spec.imag], 1)``, ``torch.complex(re, im)`` of the output, ``torch.istft(..., length=T)`` | GridNetLike (root) |
| intra-frame BLSTM over frequency ``(B*T, F, C)``, inter-frame BLSTM over time ``(B*F, T, C)``, multi-head self-attention over time per frequency, written out (``q @ k.transpose``, ``softmax``, heads by ``view(..., heads, -1)``) | GridNetLike (``GridBlock``) |
| an optional ``fs=None`` handed from the root's ``forward`` to an STFT wrapper that would store ``self.stft.n_fft = ...`` on a module, ``torch.stft(input.float(), **stft_kwargs)``, a window made in ``forward`` by ``getattr(torch, f"{window}_window")(..., device=input.device)``, ``torch.view_as_real``, frame counts ``(ilens + 2 * pad - n_fft) // hop + 1`` | CRNLike (``STFTEncoder``, ``Stft``) |
| conv2d encoder/decoder strided along frequency with concatenated skips, an LSTM over time with the frequency merged into its features, a complex mask multiplied in, ``torch.view_as_complex`` | CRNLike (``CRNSeparator``) |
| the padded frames of the spectrum zeroed in place by a mask built from the frame counts as Python ints (``lengths.tolist()``): the STFT layer and the encoder that calls it run as eager code, so the complex spectrum is made in eager glue (``torch.complex``) and crosses into the separator's graph | MaskedCRNLike (``MaskedStft``) |
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn


# ------------------------------------------------------------------------------------------
# 1. a TF-GridNet-like separator
# ------------------------------------------------------------------------------------------
class LayerNorm4D(nn.Module):
    """Layer norm over the channels of [B, C, T, F] (TF-GridNet's ``LayerNormalization4D``)."""

    def __init__(self, channels, eps=1e-5):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(1, channels, 1, 1))
        self.beta = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.eps = eps

    def forward(self, x):
        mu = x.mean(dim=1, keepdim=True)
        std = torch.sqrt(x.var(dim=1, unbiased=False, keepdim=True) + self.eps)
        return (x - mu) / std * self.gamma + self.beta


class GridBlock(nn.Module):
    def __init__(self, channels=16, hidden=16, heads=4):
        super().__init__()
        self.heads = heads
        self.head_dim = channels // heads
        self.intra_norm = LayerNorm4D(channels)
        self.intra_rnn = nn.LSTM(channels, hidden, batch_first=True, bidirectional=True)
        self.intra_linear = nn.Linear(2 * hidden, channels)
        self.inter_norm = LayerNorm4D(channels)
        self.inter_rnn = nn.LSTM(channels, hidden, batch_first=True, bidirectional=True)
        self.inter_linear = nn.Linear(2 * hidden, channels)
        self.attn_norm = LayerNorm4D(channels)
        self.to_q = nn.Conv2d(channels, channels, 1)
        self.to_k = nn.Conv2d(channels, channels, 1)
        self.to_v = nn.Conv2d(channels, channels, 1)
        self.attn_proj = nn.Sequential(nn.Conv2d(channels, channels, 1), nn.PReLU())

    def forward(self, x):
        B, C, T, Q = x.shape
        # intra-frame: a BLSTM over the frequency bins of each frame
        y = self.intra_norm(x).permute(0, 2, 3, 1).reshape(B * T, Q, C)
        y, _ = self.intra_rnn(y)
        y = self.intra_linear(y).view(B, T, Q, C).permute(0, 3, 1, 2)
        x = x + y
        # inter-frame: a BLSTM over the frames of each frequency bin
        y = self.inter_norm(x).permute(0, 3, 2, 1).reshape(B * Q, T, C)
        y, _ = self.inter_rnn(y)
        y = self.inter_linear(y).view(B, Q, T, C).permute(0, 3, 2, 1)
        x = x + y
        # cross-frame self-attention, per frequency bin, several heads
        y = self.attn_norm(x)
        q = self.to_q(y).permute(0, 3, 2, 1).reshape(B * Q, T, self.heads, -1).transpose(1, 2)
        k = self.to_k(y).permute(0, 3, 2, 1).reshape(B * Q, T, self.heads, -1).transpose(1, 2)
        v = self.to_v(y).permute(0, 3, 2, 1).reshape(B * Q, T, self.heads, -1).transpose(1, 2)
        attn = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(self.head_dim), dim=-1)
        y = (attn @ v).transpose(1, 2).reshape(B, Q, T, -1).permute(0, 3, 2, 1)
        return x + self.attn_proj(y)


class GridNetLike(nn.Module):
    sample_rate = 8000
    n_src = 2

    def __init__(self, n_fft=128, hop=64, channels=16, hidden=16, heads=4, blocks=2):
        super().__init__()
        self.n_fft = n_fft
        self.hop = hop
        self.register_buffer("window", torch.hann_window(n_fft))
        self.embed = nn.Sequential(nn.Conv2d(2, channels, 3, padding=1), nn.GroupNorm(1, channels))
        self.blocks = nn.ModuleList([GridBlock(channels, hidden, heads) for _ in range(blocks)])
        self.deconv = nn.ConvTranspose2d(channels, 2 * self.n_src, 3, padding=1)

    def forward(self, mixture):
        B, T = mixture.shape
        spec = torch.stft(
            mixture, self.n_fft, self.hop, window=self.window, return_complex=True
        )  # B, F, L
        spec = spec.transpose(1, 2)  # B, L, F
        std = spec.abs().pow(2).mean(dim=(1, 2), keepdim=True).sqrt() + 1e-8
        spec = spec / std
        x = torch.stack([spec.real, spec.imag], dim=1)  # B, 2, L, F
        x = self.embed(x)
        for block in self.blocks:
            x = block(x)
        x = self.deconv(x)  # B, 2 * n_src, L, F
        x = x.view(B, self.n_src, 2, x.shape[-2], x.shape[-1])
        est = torch.complex(x[:, :, 0], x[:, :, 1]) * std.unsqueeze(1)  # B, n_src, L, F
        est = est.transpose(2, 3).reshape(B * self.n_src, -1, est.shape[2])  # B*n_src, F, L
        wav = torch.istft(est, self.n_fft, self.hop, window=self.window, length=T)
        return wav.view(B, self.n_src, T)


def gridnet_like():
    return GridNetLike()


# ------------------------------------------------------------------------------------------
# 2. a DC-CRN-like separator behind a toolkit's STFT encoder and decoder
# ------------------------------------------------------------------------------------------
class Stft(nn.Module):
    """The toolkit's STFT layer: ``(input, ilens) -> (real/imag pairs, frame counts)``."""

    def __init__(self, n_fft=128, win_length=None, hop_length=32, window="hann", center=True):
        super().__init__()
        self.n_fft = n_fft
        self.win_length = n_fft if win_length is None else win_length
        self.hop_length = hop_length
        self.center = center
        self.normalized = False
        self.onesided = True
        self.window = window

    def forward(self, input, ilens=None):
        if self.window is not None:
            window_func = getattr(torch, f"{self.window}_window")
            window = window_func(self.win_length, dtype=input.dtype, device=input.device)
        else:
            window = None
        stft_kwargs = dict(
            n_fft=self.n_fft,
            win_length=self.win_length,
            hop_length=self.hop_length,
            center=self.center,
            window=window,
            normalized=self.normalized,
            onesided=self.onesided,
        )
        stft_kwargs["return_complex"] = True
        output = torch.stft(input.float(), **stft_kwargs)
        output = torch.view_as_real(output)  # B, F, L, 2
        output = output.transpose(1, 2)  # B, L, F, 2
        if ilens is not None:
            pad = self.n_fft // 2 if self.center else 0
            olens = (ilens + 2 * pad - self.n_fft) // self.hop_length + 1
        else:
            olens = None
        return output, olens


def padded_frames(lengths, xs, dim):
    """True at the frames of ``xs`` (along ``dim``) past each item's frame count, as [B, ...]
    like ``xs``; the counts are read as Python ints, as the toolkit does."""
    counts = lengths.long().tolist()
    frames = torch.arange(xs.size(dim), device=xs.device)
    mask = frames.unsqueeze(0) >= frames.new_tensor(counts).unsqueeze(-1)  # B, L
    shape = [len(counts)] + [1] * (xs.dim() - 1)
    shape[dim] = xs.size(dim)
    return mask.view(shape).expand_as(xs)


class MaskedStft(Stft):
    """The STFT layer that zeroes, in place, the frames past each item's length."""

    def forward(self, input, ilens=None):
        output, olens = super().forward(input, ilens)
        if olens is not None:
            output.masked_fill_(padded_frames(olens, output, 1), 0.0)
        return output, olens


class STFTEncoder(nn.Module):
    def __init__(self, n_fft=128, hop_length=32, window="hann", default_fs=8000, stft=Stft):
        super().__init__()
        self.stft = stft(n_fft, hop_length=hop_length, window=window)
        self._output_dim = n_fft // 2 + 1
        self.n_fft = n_fft
        self.hop_length = hop_length
        self.win_length = n_fft
        self.default_fs = default_fs

    @property
    def output_dim(self):
        return self._output_dim

    def forward(self, input, ilens, fs=None):
        if fs is not None:  # the toolkit rescales the STFT to the sampling rate
            self.stft.n_fft = self.n_fft * fs // self.default_fs
            self.stft.win_length = self.win_length * fs // self.default_fs
            self.stft.hop_length = self.hop_length * fs // self.default_fs
        if input.dtype in (torch.float16, torch.bfloat16):
            spectrum, flens = self.stft(input.float(), ilens)
            spectrum = spectrum.to(dtype=input.dtype)
        else:
            spectrum, flens = self.stft(input, ilens)
        spectrum = torch.complex(spectrum[..., 0], spectrum[..., 1])  # B, L, F
        return spectrum, flens


class STFTDecoder(nn.Module):
    def __init__(self, n_fft=128, hop_length=32, window="hann"):
        super().__init__()
        self.n_fft = n_fft
        self.hop_length = hop_length
        self.window = window

    def forward(self, input, ilens, fs=None):
        # input: B, L, F complex
        window = getattr(torch, f"{self.window}_window")(self.n_fft, device=input.device)
        wav = torch.istft(
            input.transpose(1, 2),
            n_fft=self.n_fft,
            hop_length=self.hop_length,
            window=window,
            center=True,
            length=ilens.max(),
        )
        return wav, ilens


class CRNSeparator(nn.Module):
    """Conv2d encoder strided along frequency, an LSTM over time on the frequency merged into
    the features, a decoder with concatenated skips, one complex mask per speaker."""

    def __init__(self, n_freq=65, channels=(16, 24, 32), hidden=64, num_spk=2):
        super().__init__()
        self.num_spk = num_spk
        self.encoders = nn.ModuleList()
        c_in = 2
        freq = n_freq
        for c in channels:
            self.encoders.append(
                nn.Sequential(
                    nn.Conv2d(c_in, c, (1, 3), stride=(1, 2), padding=(0, 1)),
                    nn.BatchNorm2d(c),
                    nn.PReLU(c),
                )
            )
            c_in, freq = c, (freq - 1) // 2 + 1
        self.lstm = nn.LSTM(channels[-1] * freq, hidden, batch_first=True)
        self.fc = nn.Linear(hidden, channels[-1] * freq)
        self.decoders = nn.ModuleList()
        outs = list(channels[-2::-1]) + [2 * num_spk]
        for c_skip, c_out in zip(channels[::-1], outs):
            last = c_out == 2 * num_spk
            self.decoders.append(
                nn.Sequential(
                    nn.ConvTranspose2d(2 * c_skip, c_out, (1, 3), stride=(1, 2), padding=(0, 1)),
                    nn.Identity() if last else nn.BatchNorm2d(c_out),
                    nn.Identity() if last else nn.PReLU(c_out),
                )
            )

    def forward(self, input, ilens, additional=None):
        # input: B, L, F complex
        x = torch.stack([input.real, input.imag], dim=1)  # B, 2, L, F
        skips = []
        for encoder in self.encoders:
            x = encoder(x)
            skips.append(x)
        B, C, L, Fe = x.shape
        h = x.permute(0, 2, 1, 3).reshape(B, L, C * Fe)
        h, _ = self.lstm(h)
        h = self.fc(h).reshape(B, L, C, Fe).permute(0, 2, 1, 3)
        for decoder, skip in zip(self.decoders, reversed(skips)):
            h = decoder(torch.cat([h, skip], dim=1))
        masks = h.view(B, self.num_spk, 2, L, -1).permute(0, 1, 3, 4, 2).contiguous()
        masks = torch.view_as_complex(masks)  # B, n_spk, L, F
        masked = [input * m for m in masks.unbind(dim=1)]
        return masked, ilens, {f"mask_spk{i + 1}": m for i, m in enumerate(masks.unbind(1))}


class CRNLike(nn.Module):
    sample_rate = 8000
    n_src = 2

    def __init__(self, stft=Stft):
        super().__init__()
        self.encoder = STFTEncoder(128, 32, stft=stft)
        self.separator = CRNSeparator(n_freq=self.encoder.output_dim)
        self.decoder = STFTDecoder(128, 32)

    def forward(self, speech_mix, fs=None):
        speech_lengths = torch.full((speech_mix.shape[0],), speech_mix.shape[1], dtype=torch.long)
        feature_mix, flens = self.encoder(speech_mix, speech_lengths, fs=fs)
        feature_pre, flens, others = self.separator(feature_mix, flens)
        speech_pre = [self.decoder(ps, speech_lengths, fs=fs)[0] for ps in feature_pre]
        return torch.stack(speech_pre, dim=1)


def crn_like():
    return CRNLike()


def masked_crn_like():
    return CRNLike(stft=MaskedStft)


MODELS = {"gridnet_like": gridnet_like, "crn_like": crn_like, "masked_crn_like": masked_crn_like}


def build(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return MODELS[name]().eval()
