"""A model's run recorded at several shapes made shape-generic (``passes.generalize``), and the
export it gives to models whose eager code computes on complex values: a dynamic batch and
time axis, where before the file took the example's shape only."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sepfx
from passes.generalize import ShapeError, generic_recorded_run
from tests.conftest import max_relative_error, wav

HOP = 8


class MaskedSpectrum(nn.Module):
    """Eager glue in the toolkits' way: pad to a multiple of 16 when the length is not one,
    a complex STFT, per-item frame counts read as Python ints (``tolist``) to mask padded
    frames, a complex gain, the inverse STFT trimmed or padded back to the input's length."""

    def __init__(self) -> None:
        super().__init__()
        self.gain = nn.Conv1d(17, 17, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length = x.shape
        rest = length % 16
        if rest:
            x = F.pad(x, (0, 16 - rest))
        window = torch.hann_window(32)
        spec = torch.stft(x, 32, HOP, window=window, return_complex=True)  # B, F, L
        counts = torch.full((batch,), x.shape[-1] // HOP + 1).tolist()
        frames = torch.arange(2 * spec.shape[-1] + 1)[: spec.shape[-1]]
        keep = frames.unsqueeze(0) < spec.real.new(counts).unsqueeze(-1)  # the legacy ``new``
        gain = torch.sigmoid(self.gain(spec.abs())) * keep.unsqueeze(1)
        items = gain.transpose(1, 2).reshape(batch * spec.shape[-1], -1)  # frames as items
        gain = items.reshape(batch, spec.shape[-1], -1).transpose(1, 2)
        y = torch.istft(spec * gain * (1 + 0.5j), 32, HOP, window=window)
        y = y[:, :length]
        return F.pad(y, (0, length - y.shape[-1]))


class LengthConstant(MaskedSpectrum):
    """As above, with a weighting made by numpy from the length: a constant of the recorded
    run that no shape expression gives."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ramp = torch.from_numpy(np.linspace(0.5, 1.0, x.shape[-1], dtype=np.float32))
        return super().forward(x * ramp)


@pytest.fixture(scope="module")
def model() -> nn.Module:
    torch.manual_seed(0)
    return MaskedSpectrum().eval()


def test_generic_recorded_run_computes_the_model_at_other_shapes(model):
    """Recorded at three lengths and two batch sizes, the run's frame counts, pad amounts, slice
    bounds and per-item lists follow the input: the graph equals the model at shapes it was
    not recorded at, lengths that need no pad among them."""
    inputs = [wav(2, 8009), wav(2, 12037), wav(2, 16033), wav(3, 8009)]
    graph = generic_recorded_run(model, inputs)
    sizes = [n for n in graph.graph.nodes if n.op == "call_method" and n.target == "size"]
    assert sizes, "no integer was written as a size"
    with torch.no_grad():
        for b, t in [(1, 8000), (2, 12345), (4, 16001), (2, 4096), (1, 5003)]:
            x = wav(b, t, seed=3)
            error = max_relative_error(model(x), graph(x))
            assert error <= 1e-5, (b, t, error)


def test_recordings_that_run_other_ops_or_make_other_constants_are_refused(model):
    with pytest.raises(ShapeError, match="other ops"):
        generic_recorded_run(model, [wav(1, 8009), wav(1, 8000)])  # the pad branch differs
    with pytest.raises(ShapeError):
        generic_recorded_run(LengthConstant().eval(), [wav(1, 8009), wav(1, 12037)])


def test_complex_eager_code_exports_with_dynamic_batch_and_time(model, tmp_path):
    """No exporter traces the complex glue: ``export_onnx`` exports the generalized recorded
    run, says so, and ONNX Runtime agrees with PyTorch at lengths and batch sizes it never
    saw, with no fixed axis."""
    ort = pytest.importorskip("onnxruntime")
    path = tmp_path / "m.onnx"
    result = sepfx.export_onnx(model, path, wav(1, 8000))
    print(f"\nexporter {result.exporter}, notes {result.notes}")
    assert result.recorded and result.dynamic_time and result.dynamic_batch, result.notes
    assert any("several lengths and batch sizes" in n for n in result.notes), result.notes
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert all(isinstance(d, str) for d in session.get_inputs()[0].shape)
    for b, t in [(2, 8000), (2, 12345), (2, 16001), (1, 4096)]:
        x = wav(b, t, seed=5)
        with torch.no_grad():
            expected = model(x)
        got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
        assert max_relative_error(expected, got) <= 1e-4, (b, t)


def test_a_length_made_constant_falls_back_to_the_fixed_recorded_run(tmp_path):
    """A constant made from the length (numpy) cannot be generalized: the file is the run
    recorded at the example's shape, and the result says so."""
    torch.manual_seed(0)
    result = sepfx.export_onnx(LengthConstant().eval(), tmp_path / "m.onnx", wav(1, 8000))
    assert result.recorded and not result.dynamic_time and not result.dynamic_batch
    assert any("example's batch size 1 and length 8000" in n for n in result.notes)


class WholeSegments(nn.Module):
    """Segmentation as dual-path code writes it: ``rest = k - T % k`` (a whole segment of
    zeros where T is a multiple already), segments of ``k``, the pad cut off again by
    ``[..., :-rest]``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rest = 20 - x.shape[-1] % 20
        padded = F.pad(x, (0, rest))
        segments = padded.reshape(x.shape[0], -1, 20)
        mixed = (segments - segments.mean(dim=1, keepdim=True)).reshape(x.shape[0], -1)
        return mixed[..., :-rest]


def test_a_pad_of_a_whole_segment_at_multiples_is_told_from_none_by_the_checks():
    """Recordings at prime lengths cannot tell ``(-T) % k`` (0 at multiples) from ``k - T % k``
    (``k`` there): checked at a multiple of ``k``, the generalized run takes the reading that
    computes what the model computes."""
    model = WholeSegments()
    inputs = [wav(1, 8009), wav(1, 12037), wav(1, 16033)]
    at_multiples = [wav(1, 8000), wav(1, 8020)]
    graph = generic_recorded_run(model, inputs, at_multiples)
    with torch.no_grad():
        for t in (8000, 8020, 8013, 12345):
            x = wav(1, t, seed=4)
            assert max_relative_error(model(x), graph(x)) <= 1e-6, t
        unchecked = generic_recorded_run(model, inputs)  # the first reading: wrong at multiples
        assert unchecked(wav(1, 8000)).shape != model(wav(1, 8000)).shape
