"""Issue 28, item 4a: STFT-domain separators (``tests/wild/tf_domain.py``) compile exactly at
0.4 of their MACs with their time-frequency channels prunable and their frequency axis never
treated as channels, and export to ONNX with a dynamic batch and time axis: where complex values
cross eager code, as their run recorded at several shapes with its sizes generalized."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

import sepfx

from . import tf_domain
from .test_wild import (
    BUDGET,
    ONNX_TOL,
    TOL,
    describe,
    max_relative_error,
    random_keep,
    synthetic_batches,
    take_snapshot,
    snapshot_differences,
    wav,
)

NAMES = list(tf_domain.MODELS)
TRACED = ["gridnet_like", "crn_like"]  # the others run eager code (complex values in it)
# batch 1 and 2; lengths that are multiples of no hop (8037, 5003) and 8000
SHAPES = [(b, t) for t in (8000, 8037, 5003) for b in (1, 2)]
ORT_SHAPES = [(2, 8000), (2, 12345), (2, 16001), (1, 5003)]


class Case:
    def __init__(self, name: str) -> None:
        self.model = tf_domain.build(name)
        self.before = take_snapshot(self.model)
        self.analysis = sepfx.analyze(self.model)
        self.slim = sepfx.compile(
            self.model, budget=BUDGET, data=synthetic_batches(), steps=10, progress=False
        )


@pytest.fixture(scope="module")
def cases():
    made: dict[str, Case] = {}

    def get(name: str) -> Case:
        if name not in made:
            made[name] = Case(name)
        return made[name]

    return get


@pytest.mark.parametrize("name", NAMES)
def test_model_contract(name):
    """[B, T] -> [B, n_src, T] at 8 kHz, at every length; it really goes through an STFT."""
    model = tf_domain.build(name)
    assert model.sample_rate == 8000 and model.n_src == 2
    with torch.no_grad():
        for b, t in SHAPES:
            assert model(wav(b, t, seed=1)).shape == (b, 2, t)


@pytest.mark.parametrize("name", TRACED)
def test_traces_whole_and_compiles_within_budget(cases, name):
    """The whole model traces (no eager shell: the STFT wrapper's ``fs=None`` is traced as
    None), lands in [0.38, 0.40] of the dense MACs with >= 85% of them prunable."""
    case = cases(name)
    assert not case.analysis.capture.shells, case.analysis.capture.shells
    report = case.slim.sepfx_report
    print(f"\n{report}")
    assert BUDGET - 0.02 <= report.macs_ratio <= BUDGET, report.macs_ratio
    assert report.prunable_macs_share >= 0.85, report.prunable_macs_share
    with torch.no_grad():
        for b, t in SHAPES:
            assert case.slim(wav(b, t, seed=2)).shape == (b, 2, t)


@pytest.mark.parametrize("name", NAMES)
def test_gated_equals_slim(cases, name):
    """Hard-gated == slim for random keep sets (one keeping a single unit per group), and
    gated keeping all == the eager model, at every shape."""
    analysis = cases(name).analysis
    rng = np.random.default_rng(7)
    keep_sets = [("single", random_keep(analysis, rng, single=True))]
    keep_sets += [(f"random{i}", random_keep(analysis, rng)) for i in range(3)]
    failures = []
    with torch.no_grad():
        for label, keep in keep_sets:
            gated, slim = copy.deepcopy(analysis.gated(keep)), analysis.slim(keep)
            for b, t in SHAPES:
                x = wav(b, t, seed=b + t)
                err = max_relative_error(gated(x), slim(x))
                if not err <= TOL:
                    failures.append(f"{label} {describe(keep)} [{b}, {t}]: {err:.3g}")
        everything = analysis.gated()
        for b, t in SHAPES:
            x = wav(b, t, seed=3)
            err = max_relative_error(cases(name).model(x), everything(x))
            if not err <= TOL:
                failures.append(f"keep all vs eager [{b}, {t}]: {err:.3g}")
    assert not failures, "\n".join(failures)


def _shapes_by_module(model: nn.Module, x: torch.Tensor) -> dict[str, list[tuple[int, ...]]]:
    """Input and output shapes of every conv, LSTM, Linear and norm (by module path)."""
    kinds = (nn.Conv2d, nn.ConvTranspose2d, nn.LSTM, nn.Linear, nn.BatchNorm2d, nn.GroupNorm)
    seen: dict[str, list[tuple[int, ...]]] = {}
    handles = []
    for path, module in model.named_modules():
        if isinstance(module, kinds):

            def hook(module, args, out, path=path):
                out = out[0] if isinstance(out, tuple) else out
                seen.setdefault(path, []).extend([tuple(args[0].shape), tuple(out.shape)])

            handles.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(x)
    finally:
        for handle in handles:
            handle.remove()
    return seen


@pytest.mark.parametrize("name", NAMES)
def test_frequency_is_not_a_channel_axis(cases, name):
    """The STFT's frequency axis (and its window) are frozen with the reason; in the compiled
    model every TF-domain layer sees the dense model's frequency (and time) sizes: only its
    channel axis (dim 1 of a conv or norm, the feature axis of an LSTM or Linear) is slimmed,
    and some are."""
    case = cases(name)
    reasons = [f.reason for f in case.analysis.channels.frozen]
    assert any("frequency bins of an STFT are not channels" in r for r in reasons), reasons
    x = wav(1, 8037, seed=4)
    dense, slim = _shapes_by_module(case.model, x), _shapes_by_module(case.slim, x)
    assert dense.keys() == slim.keys(), (dense.keys(), slim.keys())
    narrowed = 0
    for path, shapes in dense.items():
        module = case.model.get_submodule(path)
        channel = -1 if isinstance(module, (nn.LSTM, nn.Linear)) else 1
        for d, s in zip(shapes, slim[path]):
            keep = [i for i in range(len(d)) if i != channel % len(d)]
            assert [d[i] for i in keep] == [s[i] for i in keep], (path, d, s)
            narrowed += d[channel] != s[channel]
    assert narrowed, "no channel axis was slimmed"


@pytest.mark.parametrize("name", NAMES)
def test_export_onnx_dynamic_batch_and_time(cases, name, tmp_path):
    """``export_onnx`` makes a file with a dynamic batch and time axis (no fixed axis) that
    ONNX Runtime runs as PyTorch does at lengths the exporter never saw. Where complex values
    cross eager code (which no exporter traces), the file is the model's run recorded at
    several shapes, its sizes generalized (``passes.generalize``), and the result says so."""
    ort = pytest.importorskip("onnxruntime")
    slim = cases(name).slim
    path = tmp_path / "m.onnx"
    result = sepfx.export_onnx(slim, path)
    print(f"\n{name}: exporter {result.exporter}, errors {result.errors}, notes {result.notes}")
    assert result.dynamic_time and result.dynamic_batch, result.notes
    if name in TRACED:
        assert not result.notes, result.notes  # no lowering skipped, nothing fixed
    else:
        assert result.recorded, result
        assert [n for n in result.notes if "recorded at several lengths" in n], result.notes
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    assert all(isinstance(d, str) for d in session.get_inputs()[0].shape)  # no fixed axis
    assert all(isinstance(d, str) for d in session.get_outputs()[0].shape[::2])
    errors = {}
    for b, t in ORT_SHAPES:
        x = wav(b, t, seed=50)
        with torch.no_grad():
            expected = slim(x)
        got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
        errors[(b, t)] = max_relative_error(expected, got)
    print(f"{name}: ONNX Runtime max relative error {errors}")
    assert all(e <= ONNX_TOL for e in errors.values()), errors


def test_stft_wrapper_with_optional_fs_traces(cases):
    """The toolkit's STFT encoder (``forward(input, ilens, fs=None)``, which would store
    ``self.stft.n_fft = self.n_fft * fs // self.default_fs``; ``torch.stft(input.float(),
    **stft_kwargs)``; a window made in ``forward``) is traced, not left to eager code: ``fs``
    is None at every call, the dtype test is an assumption, and the model's attributes are as
    they were."""
    case = cases("crn_like")
    capture = case.analysis.capture
    assert not capture.shells, capture.shells
    assert any("input.dtype in" in a for a in capture.assumptions), capture.assumptions
    targets = [n.target for n in capture.graph_module.graph.nodes]
    assert torch.stft in targets and torch.istft in targets and torch.hann_window in targets
    assert case.model.encoder.stft.n_fft == 128 and case.model.encoder.stft.hop_length == 32
    problems = snapshot_differences(case.model, case.before)
    assert not problems, problems


def test_complex_values_in_eager_code_compile(cases):
    """The STFT layer reads frame counts as Python ints, so it and the encoder calling it run
    as eager code, and the complex spectrum is made there (``torch.complex``) and handed to the
    separator's graph and on to the decoder's: the model still compiles to the budget with its
    channels prunable, and the slim model runs at every shape."""
    case = cases("masked_crn_like")
    shells = case.analysis.capture.shells
    assert {"encoder", "encoder.stft"} <= set(shells), shells
    assert "separator" not in shells and "decoder" not in shells, shells
    report = case.slim.sepfx_report
    assert BUDGET - 0.02 <= report.macs_ratio <= BUDGET, report.macs_ratio
    assert report.prunable_macs_share >= 0.85, report.prunable_macs_share
    with torch.no_grad():
        for b, t in SHAPES:
            assert case.slim(wav(b, t, seed=2)).shape == (b, 2, t)
