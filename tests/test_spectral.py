"""The STFT and complex values for export (``passes.rules.spectral``, the rules'
``lower_complex`` hooks, ``passes.runtime``'s pair functions): what the lowering computes
matches torch.stft / torch.istft / complex arithmetic, and a model that uses them exports with a
dynamic time axis."""

from __future__ import annotations

import pytest
import torch
from torch import fx, nn

import sepfx
from passes import export, runtime
from passes.rules.registry import complex_values


def signal(batch, length, dtype=torch.float64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, length, generator=generator, dtype=dtype)


# (n_fft, hop, win_length, window name, center, pad_mode, normalized)
STFT_CASES = [
    (128, 32, 128, "hann", True, "reflect", False),
    (128, 64, 100, "hann", False, "reflect", False),
    (64, 16, 64, "hamming", True, "constant", True),
    (63, 16, 50, "hann", True, "reflect", False),
    (32, 8, 32, None, False, "reflect", False),
]
LENGTHS = [8000, 12345, 16001, 1001]


def window_of(name, length, dtype=torch.float64):
    return None if name is None else getattr(torch, f"{name}_window")(length, dtype=dtype)


@pytest.mark.parametrize("case", STFT_CASES, ids=str)
@pytest.mark.parametrize("onesided", [True, False])
def test_stft_pairs_match_torch(case, onesided):
    n_fft, hop, win, name, center, pad_mode, normalized = case
    window = window_of(name, win)
    bins = n_fft // 2 + 1 if onesided else n_fft
    table = runtime.dft_table(n_fft, bins, False, torch.float64)
    for length in LENGTHS:
        x = signal(2, length, seed=length)
        expected = torch.view_as_real(
            torch.stft(
                x,
                n_fft,
                hop,
                win,
                window,
                center=center,
                pad_mode=pad_mode,
                normalized=normalized,
                onesided=onesided,
                return_complex=True,
            )
        )
        got = runtime.stft_pairs(x, window, table, hop, win, center, pad_mode, normalized)
        assert got.shape == expected.shape
        assert (got - expected).abs().max() <= 1e-10 * expected.abs().max(), length


# (n_fft, hop, win_length, window name, center, normalized); without centring, a window that is
# not zero at its ends (torch.istft refuses an overlap-added envelope with zeros)
ISTFT_CASES = [
    (128, 32, 128, "hann", True, False),
    (128, 32, 100, "hann", True, False),
    (64, 16, 64, "hamming", True, True),
    (63, 16, 50, "hann", True, False),
    (32, 8, 32, None, False, False),
    (64, 16, 64, "hamming", False, False),
]


@pytest.mark.parametrize("case", ISTFT_CASES, ids=str)
def test_istft_pairs_match_torch(case):
    n_fft, hop, win, name, center, normalized = case
    window = window_of(name, win)
    table = runtime.dft_table(n_fft, n_fft // 2 + 1, True, torch.float64)
    for length in LENGTHS:
        x = signal(2, length, seed=length)
        spectrum = torch.stft(
            x, n_fft, hop, win, window, center=center, normalized=normalized, return_complex=True
        )
        spectrum = spectrum * (1 + 0.5 * torch.rand(spectrum.shape, dtype=torch.float64))
        for out_length in (None, length, length - 7, length + 5):
            expected = torch.istft(
                spectrum,
                n_fft,
                hop,
                win,
                window,
                center=center,
                normalized=normalized,
                length=out_length,
            )
            got = runtime.istft_pairs(
                torch.view_as_real(spectrum),
                window,
                table,
                hop,
                win,
                center,
                normalized,
                out_length,
            )
            assert got.shape == expected.shape, (length, out_length)
            error = (got - expected).abs().max() / expected.abs().max()
            assert error <= 1e-10, (length, out_length, float(error))


class ComplexOps(nn.Module):
    """Complex arithmetic and layout as separators write it, around an STFT and its inverse."""

    def __init__(self):
        super().__init__()
        self.n_fft, self.hop = 64, 16
        self.register_buffer("window", torch.hann_window(64))
        self.mask = nn.Conv2d(2, 4, 1)

    def forward(self, x):
        T = x.shape[-1]
        spec = torch.stft(x, self.n_fft, self.hop, window=self.window, return_complex=True)
        z = spec.transpose(-1, -2).unsqueeze(1)  # B, 1, L, F
        features = torch.cat([z.real, z.imag], dim=1)
        m = self.mask(features)  # B, 4, L, F
        pairs = m.view(m.shape[0], 2, 2, m.shape[2], -1).permute(0, 1, 3, 4, 2)
        mask = torch.view_as_complex(pairs.contiguous())
        other = torch.complex(m[:, :2], m[:, 2:])
        est = z * mask + 0.5 * other - z / (other + 2) + z.conj() * 0.1
        est = est / (2 - 1j) + m[:, 2:] * 1j - (1 + 0.5j) * z  # Python complex numbers
        est = nn.functional.pad(est, (1, 0, 0, 2))[:, :, :-2, 1:] + est  # a complex zero pad
        est = est * est.abs() / (1 + est.abs()) + torch.angle(est) - 1
        first, second = est.unbind(dim=1)
        est = torch.stack([first, second], dim=1).flatten(0, 1)  # B*2, L, F
        est = est[:, :, :].transpose(1, 2).reshape(-1, spec.shape[-2], spec.shape[-1])
        wav = torch.istft(est, self.n_fft, self.hop, window=self.window, length=T)
        return torch.view_as_real(spec).mean() + wav.view(x.shape[0], 2, -1)


def test_complex_ops_lower_to_real_pairs_exactly():
    """In float64: what is checked is the lowering's arithmetic, not float32 rounding."""
    model = ComplexOps().double().eval()
    graph_module = fx.symbolic_trace(model)
    x = signal(2, 1003)
    lowered, failures = export._lower(graph_module, x)
    assert not failures, failures
    assert lowered is not graph_module
    with torch.no_grad():
        for length in (1003, 2000, 777):
            x = signal(2, length, seed=length)
            expected, got = model(x), lowered(x)
            assert (got - expected).abs().max() <= 1e-9 * expected.abs().max(), length
    # nothing complex is left for the exporters
    torch.fx.passes.shape_prop.ShapeProp(lowered).propagate(x)
    assert not [n.name for n in lowered.graph.nodes if complex_values(n)]


class ComplexExp(nn.Module):
    def forward(self, x):
        spec = torch.stft(x, 32, 8, window=torch.ones(32), return_complex=True)
        return torch.istft(torch.exp(spec * 0.01), 32, 8, window=torch.ones(32))


def test_a_complex_op_without_a_lowering_is_named():
    """An op met with complex values that has no (real, imaginary) form fails the lowering
    with its name, and the graph is left as it is (the exporters then say why they fail)."""
    graph_module = fx.symbolic_trace(ComplexExp())
    lowered, failures = export._lower(graph_module, signal(1, 800, dtype=torch.float32))
    assert lowered is graph_module
    assert len(failures) == 1 and "exp of complex values" in failures[0], failures


class FrontEnd(nn.Module):
    """An STFT without centring, its window made in forward, masks on magnitudes."""

    sample_rate = 8000

    def __init__(self):
        super().__init__()
        self.n_fft, self.hop, self.win = 128, 48, 128
        self.net = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 2, 1))

    def forward(self, x):
        window = torch.hamming_window(self.win, device=x.device)
        spec = torch.stft(
            x, self.n_fft, self.hop, self.win, window, center=False, return_complex=True
        )
        masks = torch.sigmoid(self.net(spec.abs().unsqueeze(1)))  # B, 2, F, L
        est = spec.unsqueeze(1) * masks
        B, S, F, L = est.shape
        wav = torch.istft(
            est.reshape(B * S, F, L), self.n_fft, self.hop, self.win, window, center=False
        )
        return wav.view(B, S, -1)


def test_uncentred_stft_model_exports_with_dynamic_time(tmp_path):
    torch.manual_seed(0)
    model = FrontEnd().eval()
    example = signal(1, 8000, dtype=torch.float32)
    slim = sepfx.compile(model, budget=0.5, example_input=example, progress=False)
    result = sepfx.export_onnx(slim, tmp_path / "m.onnx", example)
    assert result.dynamic_time and result.dynamic_batch and not result.notes, result.notes
    assert all(e <= 1e-4 for e in result.errors.values()), result.errors


class BandFeatures(nn.Module):
    """Band-split style: the (real, imaginary) spectrum of each frame flattened into features
    (``[B, L, F * 2]``) for a Linear, an LSTM over time, a Linear back to a complex mask."""

    def __init__(self, n_fft=64, hop=16, width=24):
        super().__init__()
        self.n_fft, self.hop = n_fft, hop
        bins = n_fft // 2 + 1
        self.project = nn.Linear(2 * bins, width)
        self.rnn = nn.LSTM(width, width, batch_first=True)
        self.mask = nn.Linear(width, 2 * bins)

    def forward(self, x):
        window = torch.hann_window(self.n_fft, device=x.device)
        spec = torch.stft(x, self.n_fft, self.hop, window=window, return_complex=True)
        B, F, L = spec.shape
        features = torch.view_as_real(spec).permute(0, 2, 1, 3).reshape(B, L, F * 2)
        h, _ = self.rnn(torch.tanh(self.project(features)))
        mask = self.mask(h).view(B, L, F, 2).permute(0, 2, 1, 3).contiguous()
        est = spec * torch.view_as_complex(mask)
        return torch.istft(est, self.n_fft, self.hop, window=window, length=x.shape[-1])


def test_frequency_merged_into_features_stays_frozen():
    """Frequency bins flattened with the (real, imaginary) pair into a Linear's features are
    still the STFT's bins: those feature axes are frozen (the reason names the STFT), and the
    hidden width around the LSTM is what is pruned, exactly."""
    torch.manual_seed(0)
    model = BandFeatures().eval()
    analysis = sepfx.analyze(model, signal(1, 4000, dtype=torch.float32))
    frozen = {p: f.reason for f in analysis.channels.frozen for p in f.parameters}
    for parameter in ("project in", "mask out"):
        reason = frozen.get(parameter, "")
        assert "frequency bins of" in reason and "STFT are not channels" in reason, frozen
    members = {m for g in analysis.groups for m in g.members}
    assert {"project out", "rnn hidden", "mask in"} <= members, members
    keep = analysis.keep_ratio(0.5, importance="random", seed=1)
    gated, slim = analysis.gated(keep), analysis.slim(keep)
    with torch.no_grad():
        for length in (4000, 4321):
            x = signal(2, length, dtype=torch.float32, seed=length)
            expected = gated(x)
            assert (slim(x) - expected).abs().max() <= 1e-5 * expected.abs().max()
