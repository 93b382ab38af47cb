"""The field's separation metrics from the field's libraries, for evaluation (not for training):
SI-SNRi (sepfx.losses), BSS-eval SDRi (``fast-bss-eval``), STOI (``pystoi``) and narrow-band
PESQ (``pesq``). The last three are optional: ``pip install -e '.[metrics]'``; a metric whose
library is missing is left out of the results (:func:`missing` names them)."""

from __future__ import annotations

import importlib.util

import numpy as np
import torch
from torch import Tensor

from sepfx.losses import pit_align, si_snr_improvement

LIBRARIES = {"sdri": "fast_bss_eval", "stoi": "pystoi", "pesq": "pesq"}


def missing() -> list[str]:
    """The metrics whose library is not installed."""
    return [m for m, lib in LIBRARIES.items() if importlib.util.find_spec(lib) is None]


def _sdr(references: np.ndarray, estimates: np.ndarray) -> np.ndarray:
    import fast_bss_eval

    # 512-tap distortion filter as in BSS-eval v4; float64 for the filter's linear solve
    return np.asarray(fast_bss_eval.sdr(references, estimates, filter_length=512))


@torch.no_grad()
def separation_scores(
    estimates: Tensor, sources: Tensor, mixture: Tensor, sample_rate: int
) -> dict[str, list[float]]:
    """Per-item scores of a batch (``estimates`` and ``sources`` ``[B, S, T]``, ``mixture``
    ``[B, T]``): ``si_snri`` and, where the library is installed, ``sdri`` (BSS-eval SDR of
    the estimate minus that of the mixture, dB), ``stoi`` (of the estimate, 0..1) and
    ``pesq`` (narrow band, of the estimate; needs 8 or 16 kHz). Sources are matched to the
    estimates by SI-SNR; each value is the mean over sources."""
    scores: dict[str, list[float]] = {
        "si_snri": si_snr_improvement(estimates, sources, mixture).tolist()
    }
    absent = set(missing())
    aligned = pit_align(estimates, sources).double().cpu().numpy()
    refs = sources.double().cpu().numpy()
    mix = mixture.double().cpu().numpy()
    for b in range(refs.shape[0]):
        ref, est = refs[b], aligned[b]
        if "sdri" not in absent:
            mixes = np.broadcast_to(mix[b], ref.shape).copy()
            scores.setdefault("sdri", []).append(float((_sdr(ref, est) - _sdr(ref, mixes)).mean()))
        if "stoi" not in absent:
            from pystoi import stoi

            values = [stoi(r, e, sample_rate) for r, e in zip(ref, est)]
            scores.setdefault("stoi", []).append(float(np.mean(values)))
        if "pesq" not in absent and sample_rate in (8000, 16000):
            from pesq import pesq

            values = [pesq(sample_rate, r, e, "nb") for r, e in zip(ref, est)]
            scores.setdefault("pesq", []).append(float(np.mean(values)))
    return scores


@torch.no_grad()
def evaluate(model: torch.nn.Module, items, sample_rate: int) -> dict[str, float]:
    """Mean scores of :func:`separation_scores` over ``items``: an iterable of
    ``(mixture[B, T], sources[B, S, T])`` batches or of ``(mixture[T], sources[S, T])``
    examples (a dataset)."""
    model.eval()
    totals: dict[str, list[float]] = {}
    for mixture, sources in items:
        if mixture.dim() == 1:
            mixture, sources = mixture[None], sources[None]
        for name, values in separation_scores(
            model(mixture), sources, mixture, sample_rate
        ).items():
            totals.setdefault(name, []).extend(values)
    return {name: float(np.mean(values)) for name, values in totals.items()}
