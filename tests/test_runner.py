"""sepfx.runner: an ONNX file that fixes the length (or the batch) still separates a recording of
any length, by overlap-added chunks whose speaker order is aligned; `sepfx separate` uses it."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sepfx
from sepfx import runner
from sepfx.data import read_wav
from test_cli import sepfx_cli, write_mixture


class FakeSession:
    """An ONNX Runtime session's surface over a numpy function, with fixed axes."""

    def __init__(self, function, batch, length):
        self.function = function
        self.shape = [batch if batch else "batch", length if length else "time"]
        self.calls: list[tuple[int, ...]] = []

    def get_inputs(self):
        return [type("Input", (), {"name": "mixture", "shape": self.shape})()]

    def run(self, names, feeds):
        x = feeds["mixture"]
        for axis, size in enumerate(self.shape):
            assert isinstance(size, str) or x.shape[axis] == size, (x.shape, self.shape)
        self.calls.append(x.shape)
        return [self.function(x)]


def pointwise_swapping(x: np.ndarray) -> np.ndarray:
    """Two sources computed sample by sample, in an order that depends on the chunk: what a
    separator does across separate runs."""
    sources = np.stack([0.3 * x, 0.7 * np.tanh(x)], 1)
    swap = x.sum(-1) > 0  # per row
    sources[swap] = sources[swap][:, ::-1]
    return sources


@pytest.mark.parametrize("total", [1, 999, 1000, 1001, 3333, 10000])
@pytest.mark.parametrize("batch", [None, 1, 3])
def test_overlap_add_of_aligned_chunks_is_exact_for_a_pointwise_model(total, batch):
    x = np.random.default_rng(total).standard_normal(total).astype(np.float32)
    session = FakeSession(pointwise_swapping, batch, 1000)
    got = runner.separate(session, x)
    expected = np.stack([0.3 * x, 0.7 * np.tanh(x)])
    if np.abs(got[0] - expected[0]).max() > np.abs(got[0] - expected[1]).max():
        expected = expected[::-1]  # the first chunk's order is the one kept
    assert got.shape == (2, total) and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, atol=1e-6)
    assert all(shape[-1] == 1000 for shape in session.calls)


def test_dynamic_time_runs_once():
    x = np.random.default_rng(0).standard_normal(12345).astype(np.float32)
    session = FakeSession(lambda m: np.stack([m, -m], 1), None, None)
    np.testing.assert_array_equal(runner.separate(session, x), np.stack([x, -x]))
    assert session.calls == [(1, 12345)]


class PadIfRemainder(nn.Module):
    """Pads to a multiple of 40 only when the length is not one (``if T % k``), and a global
    norm sees the pad: neither branch traced holds at every length, so the export is at a fixed
    length."""

    def __init__(self):
        super().__init__()
        self.encoder = nn.Conv1d(1, 16, 16, stride=8, padding=8)
        self.mask = nn.Conv1d(16, 32, 1)
        self.decoder = nn.ConvTranspose1d(16, 1, 16, stride=8, padding=8)

    def forward(self, mix):
        length = mix.shape[-1]
        x = mix.unsqueeze(1)
        if length % 40:
            x = F.pad(x, (0, 40 - length % 40))
        w = torch.relu(self.encoder(x))
        normed = (w - w.mean((1, 2), keepdim=True)) / w.std((1, 2), keepdim=True)
        masks = torch.sigmoid(self.mask(normed)).view(mix.shape[0], 2, 16, -1)
        out = self.decoder((masks * w.unsqueeze(1)).view(-1, 16, w.shape[-1]))
        return out.view(mix.shape[0], 2, -1)[..., :length]


def test_fixed_length_export_separates_any_length(tmp_path):
    torch.manual_seed(0)
    model = PadIfRemainder().eval()
    path = tmp_path / "fixed.onnx"
    result = sepfx.export_onnx(model, path, torch.randn(1, 4000))
    assert not result.dynamic_time
    assert any("fixed length 4000" in n and "sepfx separate" in n for n in result.notes), result
    dims = [
        d.dim_param or d.dim_value
        for d in onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim
    ]
    assert dims[-1] == 4000
    mixture = tmp_path / "mix.wav"
    pcm = write_mixture(mixture, 10001)
    proc = sepfx_cli("separate", path, mixture, timeout=120)
    assert proc.returncode == 0, proc.stderr
    # chunks of 4000 samples with less context than the whole recording: close, not equal
    x = torch.from_numpy(pcm.astype(np.float32) / 32768.0)[None]
    with torch.no_grad():
        expected = model(x)[0].numpy()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    direct = runner.separate(session, x[0].numpy())
    if np.abs(direct[::-1] - expected).sum() < np.abs(direct - expected).sum():
        direct = direct[::-1]  # the first chunk's speaker order
    errors = np.abs(direct - expected).max(1) / np.abs(expected).max(1)
    print(f"chunked vs whole-recording PyTorch: max relative error per source {errors}")
    assert errors.max() < 0.1, errors
    for i in (1, 2):
        samples, rate = read_wav(tmp_path / f"mix_s{i}.wav")
        assert rate == 8000 and samples.shape == (10001,) and np.abs(samples).max() > 0
