import itertools
import math

import numpy as np
import pytest
import torch

from sepfx.losses import (
    pit_align,
    pit_si_snr_loss,
    sdr_improvement,
    separation_metrics,
    si_snr,
    si_snr_improvement,
    snr,
)


def _rand(*shape, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=dtype)


def _np_si_snr(est, tgt):
    est = est - est.mean()
    tgt = tgt - tgt.mean()
    s_t = np.dot(est, tgt) / np.dot(tgt, tgt) * tgt
    e = est - s_t
    return 10 * np.log10(np.dot(s_t, s_t) / np.dot(e, e))


def test_si_snr_matches_numpy():
    rng = np.random.default_rng(1)
    tgt = rng.standard_normal(800)
    est = tgt + 0.5 * rng.standard_normal(800) + 0.3
    ref = _np_si_snr(est, tgt)
    got = si_snr(torch.from_numpy(est), torch.from_numpy(tgt))
    assert got.shape == ()
    assert abs(got.item() - ref) < 1e-6
    # float32 agrees too
    got32 = si_snr(torch.from_numpy(est).float(), torch.from_numpy(tgt).float())
    assert got32.dtype == torch.float32
    assert abs(got32.item() - ref) < 1e-3


def test_snr_matches_numpy_and_is_not_scale_invariant():
    rng = np.random.default_rng(2)
    tgt = rng.standard_normal(500)
    est = tgt + 0.2 * rng.standard_normal(500)
    ref = 10 * np.log10(np.sum(tgt**2) / np.sum((est - tgt) ** 2))
    assert abs(snr(torch.from_numpy(est), torch.from_numpy(tgt)).item() - ref) < 1e-6
    t, e = torch.from_numpy(tgt), torch.from_numpy(est)
    assert abs((snr(3 * e, t) - snr(e, t)).item()) > 1.0


@pytest.mark.parametrize("scale", [0.01, 0.5, 3.0, 100.0])
def test_si_snr_scale_invariant(scale):
    tgt = _rand(4, 2, 1000, seed=3)
    est = tgt + 0.7 * _rand(4, 2, 1000, seed=4)
    base = si_snr(est, tgt)
    assert base.shape == (4, 2)
    torch.testing.assert_close(si_snr(scale * est, tgt), base, atol=1e-6, rtol=0)
    # offset invariance (zero-mean)
    torch.testing.assert_close(si_snr(est + 5.0, tgt), base, atol=1e-6, rtol=0)


def test_perfect_estimate_is_large():
    tgt = _rand(3, 2000, seed=5)
    assert (si_snr(tgt.clone(), tgt) > 80).all()
    assert (snr(tgt.clone(), tgt) > 80).all()
    # a noisy estimate is far lower
    assert (si_snr(tgt + _rand(3, 2000, seed=6), tgt) < 10).all()


def _inverse(perm):
    inv = [0] * len(perm)
    for i, p in enumerate(perm):
        inv[p] = i
    return inv


@pytest.mark.parametrize("S", [2, 3, 4])
def test_pit_finds_swapped_permutation(S):
    B, T = 3, 1600
    sources = _rand(B, S, T, seed=7)
    estimates = sources + 0.3 * _rand(B, S, T, seed=8)
    loss_ref, perm_ref = pit_si_snr_loss(estimates, sources)
    assert perm_ref.dtype == torch.long and perm_ref.shape == (B, S)
    assert (perm_ref == torch.arange(S)).all()
    # explicit value: negative mean SI-SNR of the identity assignment
    torch.testing.assert_close(loss_ref, -si_snr(estimates, sources).mean())

    for q in itertools.permutations(range(S)):
        if list(q) == list(range(S)):
            continue
        swapped = estimates[:, list(q)]
        loss, perm = pit_si_snr_loss(swapped, sources)
        torch.testing.assert_close(loss, loss_ref)
        expected = torch.tensor(_inverse(q)).expand(B, S)
        assert torch.equal(perm, expected), (q, perm)
        torch.testing.assert_close(pit_align(swapped, sources), estimates)
        assert loss.item() < -5.0


def test_pit_per_example_permutations_differ():
    sources = _rand(2, 2, 1000, seed=9)
    est = sources + 0.2 * _rand(2, 2, 1000, seed=10)
    est[1] = est[1, [1, 0]]
    _, perm = pit_si_snr_loss(est, sources)
    assert perm.tolist() == [[0, 1], [1, 0]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gradients_finite(dtype):
    sources = _rand(2, 3, 400, dtype=dtype, seed=11)
    est = sources[:, [2, 0, 1]] + 0.5 * _rand(2, 3, 400, dtype=dtype, seed=12)
    est.requires_grad_(True)
    loss, _ = pit_si_snr_loss(est, sources)
    assert loss.dtype == dtype and loss.dim() == 0
    loss.backward()
    assert est.grad is not None
    assert torch.isfinite(est.grad).all()
    assert est.grad.abs().sum() > 0
    # perfect estimate: still finite gradients
    est2 = sources.clone().requires_grad_(True)
    loss2, _ = pit_si_snr_loss(est2, sources)
    loss2.backward()
    assert torch.isfinite(est2.grad).all()
    # SI-SNRi is differentiable as well
    est3 = est.detach().clone().requires_grad_(True)
    si_snr_improvement(est3, sources, sources.sum(1)).sum().backward()
    assert torch.isfinite(est3.grad).all()


def test_gradient_descent_improves_si_snr():
    sources = _rand(1, 2, 256, seed=13)
    est = _rand(1, 2, 256, seed=14).requires_grad_(True)
    opt = torch.optim.SGD([est], lr=5.0)
    first = None
    for _ in range(50):
        opt.zero_grad()
        loss, _ = pit_si_snr_loss(est, sources)
        if first is None:
            first = loss.item()
        loss.backward()
        opt.step()
    assert loss.item() < first - 5.0


def test_improvement_of_mixture_is_zero():
    B, S, T = 3, 2, 1200
    sources = _rand(B, S, T, seed=15)
    mixture = sources.sum(1)
    mix_as_est = mixture.unsqueeze(1).expand(B, S, T)
    imp = si_snr_improvement(mix_as_est, sources, mixture)
    assert imp.shape == (B,)
    assert imp.abs().max() < 1e-6
    sdri = sdr_improvement(mix_as_est, sources, mixture.unsqueeze(1))
    assert sdri.shape == (B,)
    assert sdri.abs().max() < 1e-6


def test_improvement_positive_and_metrics_dict():
    B, S, T = 2, 2, 1000
    sources = _rand(B, S, T, seed=16)
    mixture = sources.sum(1)
    est = (sources + 0.1 * _rand(B, S, T, seed=17))[:, [1, 0]]
    sii = si_snr_improvement(est, sources, mixture)
    sdri = sdr_improvement(est, sources, mixture)
    assert (sii > 10).all() and (sdri > 10).all()
    # manual: aligned SI-SNR minus mixture SI-SNR, averaged over sources
    aligned = est[:, [1, 0]]
    manual = (
        si_snr(aligned, sources) - si_snr(mixture.unsqueeze(1).expand_as(sources), sources)
    ).mean(1)
    torch.testing.assert_close(sii, manual)
    m = separation_metrics(est, sources, mixture)
    assert set(m) == {"si_snr", "si_snri", "sdri"}
    assert all(isinstance(v, float) for v in m.values())
    assert math.isclose(m["si_snri"], sii.mean().item(), rel_tol=1e-9)
    assert math.isclose(m["sdri"], sdri.mean().item(), rel_tol=1e-9)
    assert math.isclose(m["si_snr"], si_snr(aligned, sources).mean().item(), rel_tol=1e-9)


def test_mixed_dtypes_promote():
    s = _rand(2, 2, 300, seed=18)
    e = (s + 0.1 * _rand(2, 2, 300, seed=19)).float()
    assert si_snr(e, s).dtype == torch.float64
    loss, _ = pit_si_snr_loss(e, s)
    assert loss.dtype == torch.float64


def test_shape_errors():
    a = torch.randn(2, 2, 100)
    with pytest.raises(ValueError, match=r"estimate.*\(2, 2, 100\).*target.*\(2, 2, 99\)"):
        si_snr(a, torch.randn(2, 2, 99))
    with pytest.raises(ValueError, match="shape"):
        snr(torch.randn(3, 10), torch.randn(2, 10))
    with pytest.raises(ValueError, match=r"estimate.*\(\).*dims"):
        si_snr(torch.tensor(1.0), torch.tensor(1.0))
    with pytest.raises(ValueError, match=r"sources.*\(2, 3, 100\)"):
        pit_si_snr_loss(a, torch.randn(2, 3, 100))
    with pytest.raises(ValueError, match=r"estimates.*\(2, 100\).*\[B, S, T\]"):
        pit_si_snr_loss(torch.randn(2, 100), torch.randn(2, 100))
    with pytest.raises(ValueError, match=r"estimates.*\(100,\)"):
        pit_align(torch.randn(100), torch.randn(100))
    with pytest.raises(ValueError, match=r"mixture.*\(2, 99\).*\[B, T\]"):
        si_snr_improvement(a, a, torch.randn(2, 99))
    with pytest.raises(ValueError, match="mixture"):
        sdr_improvement(a, a, torch.randn(2, 2, 100))
    with pytest.raises(ValueError, match="mixture"):
        separation_metrics(a, a, torch.randn(3, 100))
