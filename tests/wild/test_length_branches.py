"""Models whose forward branches on the input's length (tests/wild/length_branches.py): compiled
unedited, slim == gated at three lengths, and exported with a dynamic batch and time axis that
ONNX Runtime runs at 8000, 12345 and 16001 samples, batch 2, as PyTorch does."""

from __future__ import annotations

import onnx
import onnxruntime as ort
import pytest
import torch

import sepfx

from . import length_branches as models

SHAPES = [(1, 8000), (2, 12345), (2, 16001)]
TOL = 1e-5
ONNX_TOL = 1e-4


def wav(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, length, generator=torch.Generator().manual_seed(seed))


def relative_error(expected, got) -> float:
    expected, got = torch.as_tensor(expected), torch.as_tensor(got)
    assert expected.shape == got.shape, f"shape {tuple(got.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(got).all(), "non-finite output"
    return float((expected - got).abs().max() / expected.abs().max().clamp_min(1e-30))


@pytest.mark.parametrize("name", list(models.MODELS))
def test_length_branch_exports_with_dynamic_batch_and_time(name, tmp_path):
    model = models.build(name)
    analysis = sepfx.analyze(model, wav(1, 8000))
    keep = analysis.keep_ratio(0.5)
    gated, slim = analysis.gated(keep), analysis.slim(keep)
    with torch.no_grad():
        for b, t in SHAPES:
            x = wav(b, t, seed=t)
            assert model(x).shape == (b, 2, t)
            assert relative_error(gated(x), slim(x)) <= TOL, (name, b, t)
    path = tmp_path / "slim.onnx"
    result = sepfx.export_onnx(slim, path)
    assert result.dynamic_batch and result.dynamic_time, result
    if name == "trim_or_pad":  # at 8000 the else side (a slice) runs, which holds there only
        assert any("traced at the prime length 8009" in note for note in result.notes), result
    dims = [
        d.dim_param or d.dim_value
        for d in onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim
    ]
    assert all(isinstance(d, str) for d in dims), dims  # no fixed axis
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for length in (8000, 12345, 16001, 8008):
        x = wav(2, length, seed=length + 1)
        with torch.no_grad():
            expected = slim(x)
        got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
        assert relative_error(expected, got) <= ONNX_TOL, (name, length)
