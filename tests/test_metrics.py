"""sepfx.metrics: the field's metrics from its libraries (installed by the test extra)."""

import math

import pytest
import torch

from sepfx import metrics
from sepfx.data import RealVoiceSet
from sepfx.losses import si_snr_improvement


@pytest.fixture(scope="module")
def batch():
    dataset = RealVoiceSet(count=2, seconds=2.0)
    mixtures, sources = zip(*(dataset[i] for i in range(2)))
    length = min(m.shape[0] for m in mixtures)
    return torch.stack([m[:length] for m in mixtures]), torch.stack(
        [s[:, :length] for s in sources]
    )


def test_libraries_installed():
    assert metrics.missing() == []


def test_perfect_and_mixture_estimates(batch):
    mixture, sources = batch
    perfect = metrics.separation_scores(sources.flip(1), sources, mixture, 8000)  # any order
    assert set(perfect) == {"si_snri", "sdri", "stoi", "pesq"}
    assert all(v > 40 for v in perfect["sdri"]) and all(v > 0.99 for v in perfect["stoi"])
    assert all(v > 4.0 for v in perfect["pesq"])
    unseparated = metrics.separation_scores(
        mixture[:, None].expand_as(sources), sources, mixture, 8000
    )
    assert all(abs(v) < 1e-6 for v in unseparated["si_snri"])
    assert all(abs(v) < 1e-3 for v in unseparated["sdri"])


def test_sdr_is_bss_eval_not_snr(batch):
    """A filtered estimate loses SNR but not BSS-eval SDR, which allows a distortion filter."""
    mixture, sources = batch
    filtered = 0.5 * (sources + torch.roll(sources, 1, dims=-1))
    noisy = sources + 0.1 * torch.randn_like(sources) * sources.std()
    f = metrics.separation_scores(filtered, sources, mixture, 8000)
    n = metrics.separation_scores(noisy, sources, mixture, 8000)
    snri_filtered = si_snr_improvement(filtered, sources, mixture)
    assert all(s > t for s, t in zip(f["sdri"], snri_filtered.tolist()))
    assert all(math.isfinite(v) for v in n["sdri"] + n["stoi"] + n["pesq"])


def test_evaluate_on_examples_and_batches(batch):
    mixture, sources = batch

    class Copy(torch.nn.Module):
        def forward(self, x):
            return torch.stack([x, 0 * x + 1e-3 * torch.ones_like(x)], dim=1)

    examples = [(mixture[i], sources[i]) for i in range(2)]
    per_example = metrics.evaluate(Copy(), examples, 8000)
    per_batch = metrics.evaluate(Copy(), [(mixture, sources)], 8000)
    assert per_example.keys() == per_batch.keys() == {"si_snri", "sdri", "stoi", "pesq"}
    for key in per_example:
        assert per_example[key] == pytest.approx(per_batch[key], rel=1e-6)
