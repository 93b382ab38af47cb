"""Latency budgets (``sepfx.compile(latency=...)``, ``sepfx.latency``, ``passes.cost.fit_latency``).

Timing is noisy on this shared machine, so most tests replace ``LatencyMeter`` with a fake whose
slim / dense "time" is a known linear function of the cost features (a constant plus weights
on matrix-product MACs, channel-linear MACs and activation elements): the fit must recover it,
the search must meet the request within its window, and the cache must make a second compile
measure nothing. One test times for real on ONNX Runtime and asserts only what timing noise
cannot change (a slim, exact model that reports what it measured).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import sepfx
import sepfx.latency
from passes.cost import LATENCY_FEATURES, fit_latency
from sepfx.budget import floor_counts, project
from sepfx.errors import InputError
from conftest import build_seeded, random_keep, wav

# the fake target's time: constant, then one weight per LATENCY_FEATURES entry
TRUE_COEFFICIENTS = (0.12, 0.35, 0.25, 0.08, 0.2)


def true_ratio(analysis, keep, coefficients=TRUE_COEFFICIENTS) -> float:
    """The fake target's slim / dense time of ``keep``: exactly linear in the features."""
    features = analysis.cost.latency_features()
    flat = analysis.channels.keep_vector(keep)
    ones = np.ones(analysis.channels.num_units)

    def value(v):
        return coefficients[0] + sum(c * f.value(v) for c, f in zip(coefficients[1:], features))

    return value(flat) / value(ones)


class FakeMeter:
    """Stands in for ``sepfx.latency.LatencyMeter``: no export, no clock."""

    timed = 0  # keep sets timed, over every instance
    coefficients = TRUE_COEFFICIENTS
    exported = None  # no ONNX files

    def __init__(self, analysis, target, x, workdir):
        self.analysis = analysis

    def ratios(self, keeps, runs):
        FakeMeter.timed += len(keeps)
        out = []
        for keep in keeps:
            ratio = true_ratio(self.analysis, keep, FakeMeter.coefficients)
            out.append((ratio, 0.01, 0.01 * ratio))
        return out


@pytest.fixture
def fake_meter(monkeypatch, tmp_path):
    monkeypatch.setattr(sepfx.latency, "LatencyMeter", FakeMeter)
    monkeypatch.setenv("SEPFX_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(FakeMeter, "timed", 0)
    monkeypatch.setattr(FakeMeter, "coefficients", TRUE_COEFFICIENTS)
    return FakeMeter


def test_features_are_one_on_the_dense_model(zoo):
    analysis = zoo("conv_tasnet").analysis
    features = analysis.cost.latency_features()
    assert len(features) == len(LATENCY_FEATURES)
    ones = np.ones(analysis.channels.num_units)
    nonempty = [f for f in features if f.terms]
    assert len(nonempty) >= 2, "conv_tasnet has both matrix and channel-linear work"
    for feature in nonempty:
        assert feature.value(ones) == pytest.approx(1.0)
    # narrower keeps cost less in every feature
    rng = np.random.default_rng(0)
    flat = analysis.channels.keep_vector(random_keep(analysis, rng))
    assert all(f.value(flat) <= 1.0 + 1e-12 for f in nonempty)
    assert any(f.value(flat) < 0.99 for f in nonempty)


@pytest.mark.parametrize("name", ["conv_tasnet", "sudormrf", "dprnn"])
def test_fit_latency_predicts_a_linear_target(zoo, name):
    """Fitted to 10 random keep sets of a time that is linear in the features, the fit
    predicts 10 other keep sets to 1e-6 and the dense model as exactly 1."""
    analysis = zoo(name).analysis
    rng = np.random.default_rng(1)
    keeps = [random_keep(analysis, rng) for _ in range(20)]
    samples = [(analysis.channels.keep_vector(k), true_ratio(analysis, k)) for k in keeps[:10]]
    fitted, coefficients = fit_latency(analysis.cost.latency_features(), samples)
    assert (coefficients >= 0).all()
    assert fitted.value(np.ones(analysis.channels.num_units)) == pytest.approx(1.0, abs=1e-6)
    for keep in keeps[10:]:
        predicted = fitted.value(analysis.channels.keep_vector(keep)) / fitted.dense
        assert predicted == pytest.approx(true_ratio(analysis, keep), abs=1e-6)


def test_fit_latency_keeps_coefficients_nonnegative(zoo):
    """Times that fall as channels are added (noise) must not give a negative weight: the fit
    stays a cost that never grows when a channel goes."""
    analysis = zoo("conv_tasnet").analysis
    rng = np.random.default_rng(2)
    samples = []
    for _ in range(12):
        keep = random_keep(analysis, rng)
        flat = analysis.channels.keep_vector(keep)
        samples.append((flat, 1.2 - 0.5 * analysis.cost.macs(flat) / analysis.cost.dense_macs))
    _, coefficients = fit_latency(analysis.cost.latency_features(), samples)
    assert (coefficients >= 0).all(), coefficients


@pytest.mark.parametrize("budget", [None, 0.35])
def test_project_holds_a_latency_limit(zoo, budget):
    analysis = zoo("tdanet").analysis
    cost = analysis.cost
    rng = np.random.default_rng(3)
    keeps = [random_keep(analysis, rng) for _ in range(10)]
    samples = [(analysis.channels.keep_vector(k), true_ratio(analysis, k)) for k in keeps]
    fitted, _ = fit_latency(cost.latency_features(), samples)
    probability = rng.uniform(size=analysis.channels.num_units)
    probability[0] = 1.0
    keep = project(cost, probability, budget, multiple=1, latency=(fitted, 0.5 * fitted.dense))
    flat = analysis.channels.keep_vector(keep)
    ratio = fitted.value(flat) / fitted.dense
    macs = cost.macs(flat) / cost.dense_macs
    assert ratio <= 0.5 + 1e-9
    if budget is not None:
        assert macs <= budget + 1e-9
    # cut no further than the tighter limit asks
    assert ratio >= 0.45 or (budget is not None and macs >= budget - 0.05), (ratio, macs)
    # within each group the most probable units are the ones kept
    for group in analysis.groups:
        kept = set(int(i) for i in keep[group.index])
        p = probability[group.units]
        if 0 < len(kept) < group.size:
            assert min(p[list(kept)]) >= max(np.delete(p, list(kept))) - 1e-12


def test_compile_meets_a_latency_request(fake_meter, tmp_path):
    model = build_seeded("conv_tasnet")
    before_state = {k: v.clone() for k, v in model.state_dict().items()}
    slim = sepfx.compile(model, latency=0.5, progress=False)
    report = slim.sepfx_report
    row = report.latency
    assert row is not None
    assert 0.5 * (1 - sepfx.latency.WINDOW) <= row.measured <= 0.5
    assert row.predicted == pytest.approx(row.measured, abs=1e-3), "the target is linear"
    assert row.measurements == fake_meter.timed > 0
    assert row.cache is not None and (tmp_path / "cache").exists()
    assert "latency on ONNX Runtime, 1 CPU thread" in str(report) and "asked 50%" in str(report)
    assert any(g.time_share is not None for g in report.groups)
    # the caller's model untouched; the slim model runs at batch 1 and 2 and an odd length
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before_state[name]), name
    for x in (wav(1, 8000 + 37), wav(2, 8000 + 37, seed=2)):
        with torch.no_grad():
            out = slim(x)
        assert out.shape == model(x).shape
        assert torch.isfinite(out).all()
    assert sum(p.numel() for p in slim.parameters()) < sum(p.numel() for p in model.parameters())
    # the same architecture again: every time comes from the cache
    before = fake_meter.timed
    again = sepfx.compile(model, latency=0.5, progress=False)
    assert fake_meter.timed == before
    assert again.sepfx_report.latency.measurements == 0
    assert again.sepfx_report.latency.measured == row.measured


def test_same_architecture_reuses_the_table(fake_meter):
    """Other weights, same structure: the probes and the fit come from the cache; only the
    candidates for the new ranking are timed."""
    sepfx.compile(build_seeded("conv_tasnet"), latency=0.5, progress=False)
    first = fake_meter.timed
    other = sepfx.compile(build_seeded("conv_tasnet", seed=5), latency=0.5, progress=False)
    row = other.sepfx_report.latency
    assert row.measurements == fake_meter.timed - first
    assert row.measurements <= sepfx.latency.ATTEMPTS < first
    assert 0.5 * (1 - sepfx.latency.WINDOW) <= row.measured <= 0.5


def test_latency_and_budget_both_hold(fake_meter):
    model = build_seeded("sudormrf")
    slim = sepfx.compile(model, budget=0.3, latency=0.8, progress=False)
    report = slim.sepfx_report
    assert report.macs_ratio <= 0.3 + 1e-9
    assert report.latency.measured <= 0.8


def test_compile_without_cache_leaves_no_table(fake_meter, tmp_path):
    slim = sepfx.compile(build_seeded("conv_tasnet"), latency=0.6, cache=False, progress=False)
    assert slim.sepfx_report.latency.cache is None
    assert not (tmp_path / "cache").exists()


def test_unreachable_latency_says_what_can_be_reached(fake_meter):
    fake_meter.coefficients = (3.0, 0.35, 0.25, 0.08, 0.2)  # most of the time never shrinks
    with pytest.raises(InputError, match=r"cannot be reached.*ask for latency >= 0\.\d\d"):
        sepfx.compile(build_seeded("conv_tasnet"), latency=0.5, progress=False)


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"latency": 1.5}, "latency must be in (0, 1)"),
        ({"latency": 0}, "latency must be in (0, 1)"),
        ({"latency": True}, "latency must be a number"),
        ({"latency": "0.5"}, "latency must be a number"),
        ({"latency": 0.5, "target": "tpu"}, "target must be one of"),
        ({"latency": 0.5, "threads": 0}, "threads must be a positive integer"),
        ({"latency": 0.5, "graphs": True}, "graphs=True (CUDA graphs) needs target='cuda'"),
    ],
)
def test_bad_latency_arguments(kwargs, words):
    with pytest.raises(InputError) as error:
        sepfx.compile(build_seeded("conv_tasnet"), progress=False, **kwargs)
    assert words in str(error.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without a GPU")
def test_cuda_target_without_a_gpu():
    with pytest.raises(InputError, match="needs a GPU"):
        sepfx.compile(build_seeded("conv_tasnet"), latency=0.5, target="cuda", progress=False)


def test_floor_counts_are_what_the_search_stops_at(fake_meter):
    """The unreachable error is raised at the narrowest keep set, never above it."""
    model = build_seeded("conv_tasnet")
    analysis = sepfx.analyze(model)
    floor = floor_counts(analysis.cost, 1, 8)
    keep = {g.index: np.arange(k) for g, k in zip(analysis.groups, floor)}
    lowest = true_ratio(analysis, keep)
    slim = sepfx.compile(model, latency=min(0.99, lowest + 0.1), progress=False)
    assert slim.sepfx_report.latency.measured <= min(0.99, lowest + 0.1)


def test_real_onnx_runtime_timing(tmp_path, monkeypatch):
    """Timed for real (ONNX Runtime, 1 thread): whatever the noise, the slim model is exact,
    narrower than the dense one, and its report states what was measured on which target."""
    monkeypatch.setenv("SEPFX_CACHE_DIR", str(tmp_path))
    model = build_seeded("conv_tasnet")
    try:
        slim = sepfx.compile(model, latency=0.7, progress=False)
    except sepfx.errors.SlimError as error:  # a machine too busy to time: said so, not wrong
        assert "too busy" in str(error)
        return
    row = slim.sepfx_report.latency
    assert row.target == "ONNX Runtime, 1 CPU thread"
    assert row.measured <= 0.7
    assert row.dense_ms > 0 and row.slim_ms > 0
    assert row.measurements >= 1 and row.table_size >= row.measurements
    assert sum(p.numel() for p in slim.parameters()) < sum(p.numel() for p in model.parameters())
    # the file export_onnx writes is made by the exporter whose files were timed
    assert slim.sepfx_exporter in ("torchscript", "dynamo")
    assert sepfx.export_onnx(slim, tmp_path / "slim.onnx").exporter == slim.sepfx_exporter


def test_export_tries_the_timed_exporter_first(zoo, tmp_path):
    analysis = zoo("conv_tasnet").analysis
    slim = analysis.slim(analysis.keep_all())
    assert sepfx.export_onnx(slim, tmp_path / "a.onnx").exporter == "torchscript"
    slim.sepfx_exporter = "dynamo"  # as a latency compile timed with dynamo's files sets it
    assert sepfx.export_onnx(slim, tmp_path / "b.onnx").exporter == "dynamo"
    result = sepfx.export_onnx(slim, tmp_path / "c.onnx", exporter="torchscript")
    assert result.exporter == "torchscript"
    with pytest.raises(InputError, match="exporter must be one of torchscript, dynamo"):
        sepfx.export_onnx(slim, tmp_path / "d.onnx", exporter="tflite")


def test_budget_defaults_to_0_4_without_a_latency():
    report = sepfx.compile(build_seeded("conv_tasnet"), progress=False).sepfx_report
    assert report.latency is None
    assert 0.38 <= report.macs_ratio <= 0.4


def test_gates_learn_under_the_fitted_latency(fake_meter):
    """With data, the gates learn with the fitted latency as the constrained cost, and the
    slim model still meets the measured request."""
    generator = torch.Generator().manual_seed(0)
    batches = [
        (torch.randn(2, 4000, generator=generator), torch.randn(2, 2, 4000, generator=generator))
        for _ in range(4)
    ]
    slim = sepfx.compile(
        build_seeded("conv_tasnet"), latency=0.6, data=batches, steps=20, progress=False
    )
    report = slim.sepfx_report
    assert 0.6 * (1 - sepfx.latency.WINDOW) <= report.latency.measured <= 0.6
    assert any("expected latency (fitted)" in note for note in report.notes)
    history = slim.sepfx_gate_history
    assert len(history.expected_macs_ratio) == 20
    # the constrained cost was the fitted latency: it ends near the request
    assert abs(history.expected_macs_ratio[-1] - 0.6) < 0.15


def test_time_that_no_fit_can_cut_ends_at_the_narrowest_widths(fake_meter):
    """Where the fitted latency sees nothing left to cut (here the time never shrinks), the
    search times the narrowest widths and names what can be reached, instead of timing the
    same keep set until it gives up."""
    fake_meter.coefficients = (1.0, 0.0, 0.0, 0.0, 0.0)
    with pytest.raises(InputError, match=r"cannot be reached.*ask for latency >= 1\.00"):
        sepfx.compile(build_seeded("sudormrf"), latency=0.7, progress=False)
    assert fake_meter.timed <= sepfx.latency.PROBES + 2


def test_same_weights_and_request_reuse_the_checked_answer(fake_meter, monkeypatch):
    """Compiled again with the same weights, input and request, a data-free latency compile
    returns the stored keep set without the sensitivity ranking, the timing or the check; a
    changed weight or input value computes its answer anew (never a stale one)."""
    import copy

    import sepfx.learn

    calls = {"ranking": 0, "check": 0}

    def counted(name, function):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return function(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(
        sepfx.learn,
        "sensitivity_probability",
        counted("ranking", sepfx.learn.sensitivity_probability),
    )
    monkeypatch.setattr(sepfx.learn, "failing_groups", counted("check", sepfx.learn.failing_groups))

    def kept(slim):
        return [(g.index, g.kept) for g in slim.sepfx_report.groups]

    model = build_seeded("conv_tasnet")
    x = wav(1, 8000)
    first = sepfx.compile(model, latency=0.5, example_input=x, progress=False)
    assert calls == {"ranking": 1, "check": 1}
    timed = fake_meter.timed
    again = sepfx.compile(model, latency=0.5, example_input=x, progress=False)
    assert calls == {"ranking": 1, "check": 1} and fake_meter.timed == timed
    assert kept(again) == kept(first)
    assert again.sepfx_report.notes == first.sepfx_report.notes
    assert again.sepfx_report.latency.measured == first.sepfx_report.latency.measured
    assert again.sepfx_report.latency.measurements == 0
    for a, b in zip(again.state_dict().values(), first.state_dict().values()):
        assert torch.equal(a, b)
    # another request is another answer
    sepfx.compile(model, latency=0.6, example_input=x, progress=False)
    assert calls == {"ranking": 2, "check": 2}
    # one weight changed by a little: ranked and checked anew
    changed = copy.deepcopy(model)
    with torch.no_grad():
        next(changed.parameters()).view(-1)[0] += 1e-3
    sepfx.compile(changed, latency=0.5, example_input=x, progress=False)
    assert calls == {"ranking": 3, "check": 3}
    # the same shape of input with other values: ranked and checked anew
    sepfx.compile(model, latency=0.5, example_input=wav(1, 8000, seed=9), progress=False)
    assert calls == {"ranking": 4, "check": 4}
    # and the first model again: still the stored answer
    sepfx.compile(model, latency=0.5, example_input=x, progress=False)
    assert calls == {"ranking": 4, "check": 4}


def test_a_change_to_sepfx_code_is_a_new_answer(fake_meter, monkeypatch):
    """The stored answer is keyed by sepfx's own source too: code that ranks or checks
    differently must not reuse an answer made by other code."""
    model = build_seeded("conv_tasnet")
    analysis = sepfx.analyze(model)
    search = sepfx.latency.LatencySearch(analysis, sepfx.latency.Target(), analysis.example_input)
    key = search.answer_key(0.5, None)
    assert search.answer_key(0.5, None) == key
    assert search.answer_key(0.5, 0.4) != key and search.answer_key(0.6, None) != key
    monkeypatch.setattr(sepfx.latency, "code_digest", lambda: "other code")
    assert search.answer_key(0.5, None) != key
