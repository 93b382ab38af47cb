"""Separation losses and metrics: SI-SNR, SNR, permutation-invariant training.

All functions work on torch tensors, are batched over leading axes, keep the
autograd graph (except :func:`separation_metrics`, which returns floats), and
support float32 and float64 (mixed inputs are promoted to the wider type).

Shape conventions for the PIT helpers: ``estimates`` and ``sources`` are
``[B, S, T]`` (batch, speakers, samples); ``mixture`` is ``[B, T]`` or
``[B, 1, T]``.
"""

from __future__ import annotations

import itertools
import math
from typing import Dict, Tuple

import torch
from torch import Tensor

__all__ = [
    "si_snr",
    "snr",
    "pairwise_si_snr",
    "pit_si_snr_loss",
    "pit_align",
    "si_snr_improvement",
    "sdr_improvement",
    "separation_metrics",
]


# --------------------------------------------------------------------------
# validation helpers
# --------------------------------------------------------------------------


def _as_tensor(x, name: str) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    return x


def _promote(a: Tensor, b: Tensor) -> Tuple[Tensor, Tensor]:
    """Cast both tensors to a common floating dtype."""
    dtype = torch.promote_types(a.dtype, b.dtype)
    if not dtype.is_floating_point:
        dtype = torch.get_default_dtype()
    return a.to(dtype), b.to(dtype)


def _check_same_shape(a: Tensor, b: Tensor, name_a: str, name_b: str, min_dims: int = 1) -> None:
    if a.dim() < min_dims:
        raise ValueError(
            f"{name_a} has shape {tuple(a.shape)} ({a.dim()} dims); expected at "
            f"least {min_dims} dims with time on the last axis"
        )
    if b.dim() < min_dims:
        raise ValueError(
            f"{name_b} has shape {tuple(b.shape)} ({b.dim()} dims); expected at "
            f"least {min_dims} dims with time on the last axis"
        )
    if a.shape != b.shape:
        raise ValueError(
            f"{name_a} has shape {tuple(a.shape)} but {name_b} has shape "
            f"{tuple(b.shape)}; expected identical shapes"
        )
    if a.shape[-1] == 0:
        raise ValueError(f"{name_a} has shape {tuple(a.shape)}; expected a non-empty time axis")


def _check_bst(estimates: Tensor, sources: Tensor) -> None:
    """Validate a pair of ``[B, S, T]`` tensors."""
    _as_tensor(estimates, "estimates")
    _as_tensor(sources, "sources")
    for name, x in (("estimates", estimates), ("sources", sources)):
        if x.dim() != 3:
            raise ValueError(
                f"{name} has shape {tuple(x.shape)} ({x.dim()} dims); expected "
                f"3 dims [B, S, T] (batch, sources, time)"
            )
    _check_same_shape(estimates, sources, "estimates", "sources", min_dims=3)
    if estimates.shape[1] < 1:
        raise ValueError(f"estimates has shape {tuple(estimates.shape)}; expected S >= 1 sources")


def _check_mixture(mixture: Tensor, sources: Tensor) -> Tensor:
    """Validate ``mixture`` against ``sources [B, S, T]``; return it as ``[B, 1, T]``."""
    _as_tensor(mixture, "mixture")
    b, _, t = sources.shape
    if mixture.dim() == 2 and tuple(mixture.shape) == (b, t):
        return mixture.unsqueeze(1)
    if mixture.dim() == 3 and tuple(mixture.shape) == (b, 1, t):
        return mixture
    raise ValueError(
        f"mixture has shape {tuple(mixture.shape)}; expected [B, T] = ({b}, {t}) "
        f"or [B, 1, T] = ({b}, 1, {t}) to match sources of shape "
        f"{tuple(sources.shape)}"
    )


# --------------------------------------------------------------------------
# core metrics (no shape checks: broadcasting allowed)
# --------------------------------------------------------------------------


def _si_snr_raw(estimate: Tensor, target: Tensor, eps: float) -> Tensor:
    estimate = estimate - estimate.mean(dim=-1, keepdim=True)
    target = target - target.mean(dim=-1, keepdim=True)
    dot = (estimate * target).sum(dim=-1, keepdim=True)
    target_energy = (target * target).sum(dim=-1, keepdim=True)
    s_target = dot / (target_energy + eps) * target
    e_noise = estimate - s_target
    num = (s_target * s_target).sum(dim=-1)
    den = (e_noise * e_noise).sum(dim=-1)
    return 10.0 * torch.log10((num + eps) / (den + eps))


def _snr_raw(estimate: Tensor, target: Tensor, eps: float) -> Tensor:
    noise = estimate - target
    num = (target * target).sum(dim=-1)
    den = (noise * noise).sum(dim=-1)
    return 10.0 * torch.log10((num + eps) / (den + eps))


def si_snr(estimate: Tensor, target: Tensor, eps: float = 1e-8) -> Tensor:
    """Scale-invariant SNR in dB over the last axis.

    Both signals are made zero-mean, ``target`` is projected onto by the
    estimate (``s_t = <e, t> t / ||t||^2``) and the result is
    ``10 log10(||s_t||^2 / ||e - s_t||^2)``. ``eps`` stabilises the divisions.
    Shapes must match; returns a tensor of the leading shape ``x.shape[:-1]``.
    """
    _as_tensor(estimate, "estimate")
    _as_tensor(target, "target")
    _check_same_shape(estimate, target, "estimate", "target")
    estimate, target = _promote(estimate, target)
    return _si_snr_raw(estimate, target, eps)


def snr(estimate: Tensor, target: Tensor, eps: float = 1e-8) -> Tensor:
    """Plain SNR in dB over the last axis: ``10 log10(||t||^2 / ||e - t||^2)``.

    This is what :func:`sdr_improvement` uses as "SDR". The BSS-eval SDR (which
    first fits a distortion filter allowing for a short linear filtering of the
    target) is *not* implemented; like the "SDR" code of many separation papers
    with no filter, we report the plain, non-scale-invariant SNR.
    """
    _as_tensor(estimate, "estimate")
    _as_tensor(target, "target")
    _check_same_shape(estimate, target, "estimate", "target")
    estimate, target = _promote(estimate, target)
    return _snr_raw(estimate, target, eps)


# --------------------------------------------------------------------------
# permutation-invariant training
# --------------------------------------------------------------------------


def pairwise_si_snr(estimates: Tensor, sources: Tensor, eps: float = 1e-8) -> Tensor:
    """SI-SNR matrix ``M[b, i, j] = si_snr(estimates[b, i], sources[b, j])``, ``[B, S, S]``."""
    _check_bst(estimates, sources)
    estimates, sources = _promote(estimates, sources)
    return _si_snr_raw(estimates.unsqueeze(2), sources.unsqueeze(1), eps)


_PERM_CACHE: Dict[Tuple[int, str], Tensor] = {}


def _permutations(n: int, device: torch.device) -> Tensor:
    """All ``n!`` permutations of ``range(n)`` as a LongTensor ``[n!, n]``."""
    key = (n, str(device))
    perms = _PERM_CACHE.get(key)
    if perms is None:
        perms = torch.tensor(
            list(itertools.permutations(range(n))), dtype=torch.long, device=device
        ).reshape(math.factorial(n), n)
        _PERM_CACHE[key] = perms
    return perms


def _best_perm(pair: Tensor) -> Tuple[Tensor, Tensor]:
    """From ``pair [B, S, S]`` return (best mean score ``[B]``, best perm ``[B, S]``).

    ``perm[b, j]`` is the index of the estimate matched to source ``j``.
    """
    b, s, _ = pair.shape
    perms = _permutations(s, pair.device)  # [P, S]
    cols = torch.arange(s, device=pair.device)
    # scores[b, p, j] = pair[b, perms[p, j], j]
    scores = pair[:, perms, cols].mean(dim=-1)  # [B, P]
    best_score, best_idx = scores.max(dim=1)
    return best_score, perms[best_idx]


def pit_si_snr_loss(estimates: Tensor, sources: Tensor, eps: float = 1e-8) -> Tuple[Tensor, Tensor]:
    """Negative SI-SNR with permutation-invariant training.

    Builds the ``S x S`` pairwise SI-SNR matrix once, scores all ``S!``
    assignments, keeps the best per example and returns
    ``(loss, best_perm)``: ``loss`` is the scalar ``-mean_b max_perm
    mean_j SI-SNR`` (differentiable), ``best_perm`` a LongTensor ``[B, S]`` with
    ``best_perm[b, j]`` = index of the estimate assigned to source ``j``
    (so ``estimates[b, best_perm[b]]`` aligns with ``sources[b]``).
    Cost grows as ``S!``; fine for the usual S <= 5.
    """
    pair = pairwise_si_snr(estimates, sources, eps)
    best_score, best_perm = _best_perm(pair)
    return -best_score.mean(), best_perm


def _reorder(estimates: Tensor, perm: Tensor) -> Tensor:
    idx = perm.unsqueeze(-1).expand(-1, -1, estimates.shape[-1])
    return torch.gather(estimates, 1, idx)


def pit_align(estimates: Tensor, sources: Tensor, eps: float = 1e-8) -> Tensor:
    """Return ``estimates [B, S, T]`` reordered along S to the best SI-SNR permutation."""
    with torch.no_grad():
        _, perm = _best_perm(pairwise_si_snr(estimates, sources, eps))
    return _reorder(estimates, perm)


def _improvement(metric, estimates: Tensor, sources: Tensor, mixture: Tensor, eps: float) -> Tensor:
    _check_bst(estimates, sources)
    mix = _check_mixture(mixture, sources)
    aligned = pit_align(estimates, sources, eps)
    aligned, src = _promote(aligned, sources)
    mix = mix.to(src.dtype).expand_as(src)
    return (metric(aligned, src, eps) - metric(mix, src, eps)).mean(dim=1)


def si_snr_improvement(
    estimates: Tensor, sources: Tensor, mixture: Tensor, eps: float = 1e-8
) -> Tensor:
    """SI-SNRi ``[B]``: SI-SNR(PIT-aligned estimate) - SI-SNR(mixture), mean over sources."""
    return _improvement(_si_snr_raw, estimates, sources, mixture, eps)


def sdr_improvement(
    estimates: Tensor, sources: Tensor, mixture: Tensor, eps: float = 1e-8
) -> Tensor:
    """SDRi ``[B]``: like :func:`si_snr_improvement` but with plain :func:`snr` as SDR.

    See :func:`snr`: no BSS-eval distortion filter is fitted. The permutation is
    still chosen by SI-SNR.
    """
    return _improvement(_snr_raw, estimates, sources, mixture, eps)


@torch.no_grad()
def separation_metrics(
    estimates: Tensor, sources: Tensor, mixture: Tensor, eps: float = 1e-8
) -> Dict[str, float]:
    """Batch means as Python floats: ``si_snr`` (PIT-aligned), ``si_snri``, ``sdri``."""
    _check_bst(estimates, sources)
    mix = _check_mixture(mixture, sources)
    aligned = pit_align(estimates, sources, eps)
    aligned, src = _promote(aligned, sources)
    mix = mix.to(src.dtype).expand_as(src)
    est_si = _si_snr_raw(aligned, src, eps)
    mix_si = _si_snr_raw(mix, src, eps)
    est_snr = _snr_raw(aligned, src, eps)
    mix_snr = _snr_raw(mix, src, eps)
    return {
        "si_snr": float(est_si.mean()),
        "si_snri": float((est_si - mix_si).mean()),
        "sdri": float((est_snr - mix_snr).mean()),
    }
