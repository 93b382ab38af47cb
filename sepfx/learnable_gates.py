"""SepPrune's learnable gate, one per channel group unit.

Per unit: ``m = 1[sigmoid((alpha + g) / tau) > eps]`` with g logistic noise (the difference of
two Gumbel draws) while learning and g = 0 otherwise; the forward is hard, the backward is
straight-through with the gradient clipped to [-1, 1] (the paper's defaults: eps = 0.7,
tau = 1, alpha ~ U(0, 1)). With logistic noise the keep probability has the closed form
``sigmoid(alpha - tau * logit(eps))``, which the MAC budget term uses.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from passes.axes import ChannelAnalysis
from passes.gates import GateBank


class _HardThreshold(torch.autograd.Function):
    @staticmethod
    def forward(ctx, scaled_logits, eps):
        return (torch.sigmoid(scaled_logits) > eps).to(scaled_logits.dtype)

    @staticmethod
    def backward(ctx, grad):
        return grad.clamp(-1.0, 1.0), None


class LearnableGates(GateBank):
    """A GateBank whose units have learnable logits ``alpha`` (unit 0, 'always kept', stays 1).

    ``stochastic`` (set by ``train()``) adds logistic noise; in eval mode the gate is the
    deterministic ``1[sigmoid(alpha / tau) > eps]``; ``set_keep`` overrides both with a fixed
    hard mask (``hard = True``)."""

    def __init__(
        self,
        analysis: ChannelAnalysis,
        eps: float = 0.7,
        tau: float = 1.0,
        init: np.ndarray | None = None,
        generator: torch.Generator | None = None,
    ):
        super().__init__(analysis)
        # the noise is drawn where the generator lives (the CPU by default) and then moved, so
        # that gates learn from the same draws on any device
        self.noise_device = torch.device("cpu") if generator is None else generator.device
        if init is None:
            init = (
                torch.rand(analysis.num_units, generator=generator, device=self.noise_device)
                .cpu()
                .numpy()
            )
        alpha = torch.as_tensor(np.asarray(init, dtype=np.float32), device=self.hard_mask.device)
        alpha = alpha.clone()
        alpha[0] = 0.0
        self.alpha = nn.Parameter(alpha)
        self.eps, self.tau = float(eps), float(tau)
        self.hard = False
        self.generator = generator
        # (first unit, size, fewest units to keep) per group, for the final keep set
        self.group_spans = [(g.offset, g.size, max(1, g.min_size)) for g in analysis.groups]

    def keep_probability(self) -> torch.Tensor:
        """P(unit kept) under the logistic noise; unit 0 is 1."""
        p = torch.sigmoid(self.alpha - self.tau * math.log(self.eps / (1 - self.eps)))
        return torch.cat([torch.ones(1, dtype=p.dtype, device=p.device), p[1:]])

    def deterministic_keep(self) -> np.ndarray:
        """The gates without noise, as a flat bool keep vector; a group whose open gates are
        fewer than it must keep (one, or its ``min_size``) keeps its highest logits instead."""
        flat = (torch.sigmoid(self.alpha / self.tau) > self.eps).detach().cpu().numpy()
        flat[0] = True
        alpha = self.alpha.detach().cpu().numpy()
        for offset, size, least in self.group_spans:
            if flat[offset : offset + size].sum() < least:
                top = np.argsort(-alpha[offset : offset + size], kind="stable")[:least]
                flat[offset + top] = True
        return flat

    def set_keep(self, flat_keep: np.ndarray) -> None:
        super().set_keep(flat_keep)
        self.hard = True

    def forward(self) -> torch.Tensor:
        if self.hard:
            return self.hard_mask
        logits: torch.Tensor = self.alpha
        if self.training:
            u = torch.rand(logits.shape, generator=self.generator, device=self.noise_device)
            u = u.to(logits.device)
            u = u.clamp(1e-6, 1 - 1e-6)
            logits = logits + torch.log(u) - torch.log1p(-u)  # logistic = Gumbel - Gumbel
        mask = _HardThreshold.apply(logits / self.tau, self.eps)
        always = torch.ones(1, dtype=mask.dtype, device=mask.device)
        return torch.cat([always, mask[1:]])


def magnitude_init(
    analysis: ChannelAnalysis,
    magnitudes: dict[int, np.ndarray],
    eps: float = 0.7,
    tau: float = 1.0,
    spread: float = 3.0,
) -> np.ndarray:
    """Data-free logits: within each group, units ranked by weight magnitude get logits spread
    around the keep threshold, largest first (so the deterministic keep set is the top half)."""
    init = np.zeros(analysis.num_units, dtype=np.float32)
    threshold = tau * math.log(eps / (1 - eps))
    for group in analysis.groups:
        scores = magnitudes[group.index]
        ranks = np.argsort(np.argsort(scores)) / max(group.size - 1, 1)  # 0 smallest, 1 largest
        init[group.units] = threshold + spread * (ranks - 0.5)
    return init
