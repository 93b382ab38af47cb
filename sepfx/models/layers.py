"""Small layers shared by the model zoo.

Everything in here is written to be traceable by ``torch.fx.symbolic_trace``
(torch.nn layers are leaves, these custom modules are traced through), with the
single deliberate exception of :class:`PadToMultiple`, which converts the time
length to a Python ``int`` the way many real-world separation models do.

Conventions: feature maps are ``[batch, channels, time]`` (3-D) or, inside the
dual-path models, ``[batch, channels, n_chunks, chunk_len]`` (4-D).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "GlobalLayerNorm",
    "ChannelLayerNorm",
    "TransposedLayerNorm",
    "PadToMultiple",
    "PositionalEncoding",
    "pad_right_to_multiple",
    "split_chunks",
    "merge_chunks",
]


class GlobalLayerNorm(nn.Module):
    """gLN of Conv-TasNet: normalise over channels *and* time of each example.

    ``x`` is ``[B, C, T]``; statistics are taken over dims (1, 2); the affine
    parameters are per channel, shape ``[1, C, 1]``.
    """

    def __init__(self, num_channels: int, eps: float = 1e-8):
        super().__init__()
        self.eps = eps
        self.gamma = nn.Parameter(torch.ones(1, num_channels, 1))
        self.beta = nn.Parameter(torch.zeros(1, num_channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(dim=(1, 2), keepdim=True)
        centered = x - mean
        var = (centered * centered).mean(dim=(1, 2), keepdim=True)
        return self.gamma * centered / torch.sqrt(var + self.eps) + self.beta


class ChannelLayerNorm(nn.Module):
    """cLN: normalise over the channel dim (dim 1) only, at every position.

    Works on ``[B, C, T]`` (``ndim=3``) or ``[B, C, S, K]`` (``ndim=4``); the
    gamma/beta parameters have shape ``[1, C, 1]`` resp. ``[1, C, 1, 1]``.
    """

    def __init__(self, num_channels: int, eps: float = 1e-8, ndim: int = 3):
        super().__init__()
        self.eps = eps
        shape = [1, num_channels] + [1] * (ndim - 2)
        self.gamma = nn.Parameter(torch.ones(*shape))
        self.beta = nn.Parameter(torch.zeros(*shape))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(dim=1, keepdim=True)
        centered = x - mean
        var = (centered * centered).mean(dim=1, keepdim=True)
        return self.gamma * centered / torch.sqrt(var + self.eps) + self.beta


class TransposedLayerNorm(nn.Module):
    """cLN implemented with ``nn.LayerNorm`` over the channel dim.

    The channel dim (1) is moved last, normalised, and moved back.
    """

    def __init__(self, num_channels: int, eps: float = 1e-8):
        super().__init__()
        self.norm = nn.LayerNorm(num_channels, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.transpose(1, -1)).transpose(1, -1)


class PadToMultiple(nn.Module):
    """Right-pad the last dim so that its length is a multiple of ``k``.

    Written the way it is often written in the wild: the length goes through
    ``int()``, so this module is *not* symbolically traceable (on purpose).
    When the length is already a multiple, a full extra ``k`` is padded; the
    caller trims the output back to the input length anyway.
    """

    def __init__(self, k: int):
        super().__init__()
        self.k = int(k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rest = self.k - int(x.shape[-1]) % self.k
        return F.pad(x, (0, rest))


class PositionalEncoding(nn.Module):
    """Sinusoidal positional encoding added to batch-first ``[N, L, E]`` input."""

    def __init__(self, d_model: int, max_len: int = 8000):
        super().__init__()
        position = torch.arange(max_len, dtype=torch.float32).unsqueeze(1)
        div_term = torch.exp(
            torch.arange(0, d_model, 2, dtype=torch.float32) * (-math.log(10000.0) / d_model)
        )
        pe = torch.zeros(max_len, d_model)
        pe[:, 0::2] = torch.sin(position * div_term)
        pe[:, 1::2] = torch.cos(position * div_term[: d_model // 2])
        self.register_buffer("pe", pe.unsqueeze(0), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pe = self.pe.to(x)  # follow the input's dtype/device
        return x + pe[:, : x.size(1)]


# --------------------------------------------------------------------------
# Traceable helpers (plain functions, traced inline by torch.fx)
# --------------------------------------------------------------------------


def pad_right_to_multiple(x: torch.Tensor, k: int) -> torch.Tensor:
    """Right-pad the last dim to a multiple of ``k`` (0 padding if already one).

    The amount is pure shape arithmetic, so it stays symbolic under torch.fx.
    """
    rest = (k - x.shape[-1] % k) % k
    return F.pad(x, (0, rest))


def split_chunks(x: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """``[B, C, T] -> [B, C, S, K]`` with non-overlapping chunks of ``K`` frames.

    The time axis is zero-padded on the right to ``S * K`` frames first.
    """
    x = pad_right_to_multiple(x, chunk_size)
    return x.reshape(x.shape[0], x.shape[1], -1, chunk_size)


def merge_chunks(x: torch.Tensor, n_frames) -> torch.Tensor:
    """Inverse of :func:`split_chunks`: ``[B, C, S, K] -> [B, C, n_frames]``."""
    return x.reshape(x.shape[0], x.shape[1], -1)[..., :n_frames]
