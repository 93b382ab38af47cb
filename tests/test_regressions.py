"""Regression tests for confirmed defects (issue 11): each test builds the smallest model that
showed the defect and checks the fix; plus one clear error for each of three bad inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import sepfx
from conftest import max_relative_error, wav
from passes import rules
from passes.slim import check_keep
from sepfx.errors import ExportError, InputError, KeepSetError, SlimError

torch.set_num_threads(1)


def _inputs(dtype=torch.float32):
    """Batch 1 at the reference length, batch 2 at a length that is a multiple of no stride."""
    return [wav(1, 8000, seed=3, dtype=dtype), wav(2, 8037, seed=4, dtype=dtype)]


def _assert_gated_equals_slim(analysis, keep, tol=1e-5):
    gated, slim = analysis.gated(keep), analysis.slim(keep)
    with torch.no_grad():
        for x in _inputs(analysis.example_input.dtype):
            expected, got = gated(x), slim(x)
            assert torch.isfinite(expected).all()
            err = max_relative_error(expected, got)
            assert err <= tol, (list(x.shape), err)


# --------------------------------------------------------------------------------------------
# 1. a standard deviation over the channel axis: n - 1 divisor, NaN with one channel kept
# --------------------------------------------------------------------------------------------


class StdNormalised(nn.Module):
    def __init__(self, correction: int = 1):
        super().__init__()
        self.enc = nn.Conv1d(1, 16, 16, stride=8)
        self.head = nn.Conv1d(16, 2, 1)
        self.correction = correction

    def forward(self, x):
        e = torch.relu(self.enc(x.unsqueeze(1)))
        e = (
            e / (e.std(dim=1, keepdim=True, correction=self.correction) + 1e-5)
            if self.correction != 1
            else e / (e.std(dim=1, keepdim=True) + 1e-5)
        )
        return self.head(e)  # [B, 2, T']


@pytest.fixture(scope="module")
def std_model():
    torch.manual_seed(0)
    return StdNormalised().eval()


@pytest.fixture(scope="module")
def std_analysis(std_model):
    return sepfx.analyze(std_model, torch.randn(1, 8000))


def _finite_everywhere(model):
    with torch.no_grad():
        return all(bool(torch.isfinite(model(x)).all()) for x in _inputs())


def test_std_over_channels_sets_min_size(std_analysis):
    (group,) = std_analysis.groups
    assert group.size == 16 and group.min_size == 2


@pytest.mark.parametrize("correction,expected", [(0, 1), (2, 3)])
def test_min_size_follows_the_correction(correction, expected):
    torch.manual_seed(0)
    analysis = sepfx.analyze(StdNormalised(correction).eval(), torch.randn(1, 8000))
    assert [g.min_size for g in analysis.groups] == [expected]


def test_one_unit_keep_set_is_refused(std_analysis):
    with pytest.raises(KeepSetError, match="at least 2"):
        check_keep(std_analysis.channels, {0: [3]})
    with pytest.raises(KeepSetError, match="at least 2"):
        std_analysis.slim({0: [3]})
    # two units: finite, and the hard-gated model is the slim model (in float64: two nearly
    # equal channels make e / std ill-conditioned, float32 rounding of the convolutions
    # differs by ~1e-4 of the output scale there)
    keep = {0: [3, 11]}
    assert _finite_everywhere(std_analysis.slim(keep))
    torch.manual_seed(0)
    model64 = StdNormalised().double().eval()
    analysis64 = sepfx.analyze(model64, torch.randn(1, 8000, dtype=torch.float64))
    _assert_gated_equals_slim(analysis64, keep, tol=1e-10)


def test_keep_ratio_and_prune_keep_two(std_model, std_analysis):
    assert len(std_analysis.keep_ratio(0.05)[0]) == 2
    slim = sepfx.prune(std_model, ratio=0.05, example_input=torch.randn(1, 8000))
    assert slim.sepfx_report.groups[0].kept == 2
    assert _finite_everywhere(slim)


def test_compile_keeps_two_and_names_the_reachable_budget(std_model):
    # one channel of 16 would be 1/16 of the MACs; two are the floor: 0.125
    with pytest.raises(InputError, match=r"budget >= 0\.13"):
        sepfx.compile(std_model, budget=0.1, example_input=torch.randn(1, 8000), progress=False)
    slim = sepfx.compile(std_model, budget=0.15, example_input=torch.randn(1, 8000), progress=False)
    assert slim.sepfx_report.groups[0].kept == 2
    assert _finite_everywhere(slim)


def test_budget_projection_and_gates_honour_min_size(std_analysis):
    from sepfx.budget import floor_counts, project
    from sepfx.learnable_gates import LearnableGates

    cost = std_analysis.cost
    assert floor_counts(cost, 1, 8) == [2]
    probability = np.linspace(1, 0, std_analysis.channels.num_units)
    keep = project(cost, probability, 0.13, multiple=1)
    assert len(keep[0]) == 2
    # gates all closed: the final deterministic keep set still keeps min_size units
    closed = np.full(std_analysis.channels.num_units, -20.0, dtype=np.float32)
    bank = LearnableGates(std_analysis.channels, init=closed)
    flat = bank.deterministic_keep()
    assert flat[1:].sum() == 2


@pytest.mark.filterwarnings(r"ignore:std\(\)\W+degrees of freedom:UserWarning")
def test_non_finite_output_is_refused_naming_the_group(std_model, monkeypatch):
    """Without the min_size constraint (as if an op's rule missed it), compile and prune refuse
    the NaN model and name the group responsible."""
    import passes.channels
    from sepfx.checks import check_slim

    monkeypatch.setattr(passes.channels, "_min_sizes", lambda *args: None)
    example = torch.randn(1, 8000)
    analysis = sepfx.analyze(std_model, example)
    assert analysis.groups[0].min_size == 1
    keep = {0: [5]}
    with pytest.raises(SlimError, match=r"NaN or inf .*group 0 \(16 units\)"):
        check_slim(analysis, keep, analysis.slim(keep))
    check_slim(analysis, {0: [5, 6]}, analysis.slim({0: [5, 6]}))  # finite: no error
    with pytest.raises(SlimError, match="group 0"):
        sepfx.prune(std_model, ratio=0.05, example_input=example)
    with pytest.raises(SlimError, match="group 0"):
        sepfx.compile(std_model, budget=0.1, example_input=example, progress=False)


# --------------------------------------------------------------------------------------------
# 2. a view of a slimmed tensor that is viewable at batch 1 only
# --------------------------------------------------------------------------------------------


class MaskView(nn.Module):
    """A 16-channel mask from a Linear over the transposed channel axis, viewed as 2 sources x
    8 channels, times the encoding, folded into the batch with a view."""

    def __init__(self):
        super().__init__()
        self.enc = nn.Conv1d(1, 8, 16, stride=8, bias=False)
        self.mask = nn.Linear(8, 16)
        self.dec = nn.ConvTranspose1d(8, 1, 16, stride=8, bias=False)

    def forward(self, x):
        batch = x.shape[0]
        e = torch.relu(self.enc(x.unsqueeze(1)))  # [B, 8, T]
        frames = e.shape[-1]
        m = torch.sigmoid(self.mask(e.transpose(1, 2))).transpose(1, 2)  # [B, 16, T], strided
        m = m.view(batch, 2, 8, frames)
        y = (e.unsqueeze(1) * m).view(batch * 2, 8, frames)
        return self.dec(y).view(batch, 2, -1)


@pytest.fixture(scope="module")
def view_analysis():
    torch.manual_seed(0)
    model = MaskView().eval()
    with torch.no_grad():
        assert model(wav(2, 8037)).shape[0] == 2  # the dense model runs at batch 2
    return sepfx.analyze(model, torch.randn(1, 8000))


def test_view_of_slimmed_tensor_runs_at_batch_2(view_analysis):
    assert view_analysis.groups
    single = {g.index: [g.size - 1] for g in view_analysis.groups}
    half = {g.index: list(range(0, g.size, 2)) for g in view_analysis.groups}
    for keep in (single, half):
        _assert_gated_equals_slim(view_analysis, keep)
    # the two views of pruned tensors became reshapes; the last one (of the unpruned decoder
    # output) stays a view
    slim = view_analysis.slim(single)
    assert [
        n.target
        for n in slim.graph.nodes
        if n.op == "call_method" and n.target in ("view", "reshape")
    ] == ["reshape", "reshape", "view"], slim.code


def test_slim_check_runs_at_batch_2(view_analysis, monkeypatch):
    """With views left as they were, the slim pass itself refuses the model (at batch 2)."""
    rewrite = rules.ReshapeRule.rewrite

    def keep_views(self, node, s):
        was_view = node.op == "call_method" and node.target == "view"
        rewrite(self, node, s)
        if was_view:
            node.target = "view"

    monkeypatch.setattr(rules.ReshapeRule, "rewrite", keep_views)
    with pytest.raises(SlimError, match=r"does not run at input \[2, "):
        view_analysis.slim({g.index: [0] for g in view_analysis.groups})


# --------------------------------------------------------------------------------------------
# 3. LayerNorm over the channel axis after a transpose, with and without parameters
# --------------------------------------------------------------------------------------------


class ChannelLayerNorm(nn.Module):
    def __init__(self, affine: bool):
        super().__init__()
        self.enc = nn.Conv1d(1, 16, 16, stride=8)
        self.norm = nn.LayerNorm(16, elementwise_affine=affine)
        self.head = nn.Conv1d(16, 2, 1)

    def forward(self, x):
        e = torch.relu(self.enc(x.unsqueeze(1)))
        e = self.norm(e.transpose(1, 2)).transpose(1, 2)
        return self.head(e)


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no_affine"])
def test_layer_norm_over_channels_slims(affine):
    torch.manual_seed(0)
    model = ChannelLayerNorm(affine).eval()
    if affine:  # not the identity affine: slicing must pick the kept entries
        with torch.no_grad():
            model.norm.weight.uniform_(0.5, 1.5)
            model.norm.bias.uniform_(-0.5, 0.5)
    analysis = sepfx.analyze(model, torch.randn(1, 8000))
    (group,) = analysis.groups
    assert "norm dim0" in group.members
    rng = np.random.default_rng(0)
    for keep in ({0: [7]}, {0: sorted(rng.choice(16, 5, replace=False).tolist())}):
        _assert_gated_equals_slim(analysis, keep)
        slim = analysis.slim(keep)
        assert tuple(slim.norm.normalized_shape) == (len(keep[0]),)
        if affine:
            assert torch.equal(slim.norm.weight, model.norm.weight[keep[0]])
    # the gates act: one unit kept changes the output
    with torch.no_grad():
        x = wav(1, 8000)
        assert max_relative_error(analysis.gated()(x), analysis.gated({0: [7]})(x)) > 1e-2


# --------------------------------------------------------------------------------------------
# 4. bad inputs: one clear error each
# --------------------------------------------------------------------------------------------


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = nn.Conv1d(1, 16, 16, stride=8)
        self.dec = nn.ConvTranspose1d(16, 2, 16, stride=8)

    def forward(self, x):
        return self.dec(torch.relu(self.enc(x.unsqueeze(1))))


def test_float64_export_says_float32(tmp_path):
    torch.manual_seed(0)
    model = Tiny().double().eval()
    slim = sepfx.prune(model, ratio=0.5, example_input=torch.randn(1, 800, dtype=torch.float64))
    with pytest.raises(ExportError, match=r"needs a float32 model.*float64.*model\.float\(\)"):
        sepfx.export_onnx(slim, tmp_path / "slim.onnx")
    assert not (tmp_path / "slim.onnx").exists()
    result = sepfx.export_onnx(slim.float(), tmp_path / "slim.onnx")  # what the message says
    assert max(result.errors.values()) <= 1e-4


@pytest.mark.parametrize("entry", ["analyze", "compile", "prune"])
def test_integer_example_input_says_floating_point(entry):
    torch.manual_seed(0)
    model = Tiny().eval()
    example = (torch.randn(1, 800) * 3000).to(torch.int16)
    call = {
        "analyze": lambda: sepfx.analyze(model, example),
        "compile": lambda: sepfx.compile(model, 0.5, example_input=example, progress=False),
        "prune": lambda: sepfx.prune(model, ratio=0.5, example_input=example),
    }[entry]
    with pytest.raises(InputError, match=r"int16.*floating-point waveform"):
        call()


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory):
    torch.manual_seed(0)
    slim = sepfx.prune(Tiny().eval(), ratio=0.5, example_input=torch.randn(1, 800))
    path = tmp_path_factory.mktemp("onnx") / "tiny.onnx"
    sepfx.export_onnx(slim, path)
    return path


@pytest.mark.parametrize("samples", [0, 5])
def test_separate_too_short_names_the_minimum_length(tiny_onnx, tmp_path, samples):
    from test_cli import assert_one_line_error, sepfx_cli, write_mixture

    mixture = tmp_path / "short.wav"
    write_mixture(mixture, samples)
    proc = sepfx_cli("separate", tiny_onnx, mixture, timeout=60)
    # the first conv's kernel is 16 samples: shorter inputs cannot run
    assert_one_line_error(
        proc, "too short", f"{samples} samples", "minimum input length is 16 samples"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["short.wav"]
    write_mixture(mixture, 16)
    assert sepfx_cli("separate", tiny_onnx, mixture, timeout=60).returncode == 0


class _PowerInEagerCode(nn.Module):
    """``h ** 2`` and ``2 ** h`` in eager code (a branch on values makes the root a shell)."""

    def __init__(self):
        super().__init__()
        self.encoder = nn.Conv1d(1, 16, 16, stride=8)
        self.inner = nn.Conv1d(16, 16, 1)
        self.decoder = nn.ConvTranspose1d(16, 1, 16, stride=8)

    def forward(self, wav):
        h = self.encoder(wav[:, None])
        if h.abs().sum().item() > 0:
            h = h**2 + 2 ** torch.tanh(h)
        return self.decoder(self.inner(h))[:, 0]


def test_powers_in_eager_code_are_recorded_as_the_methods_they_are():
    """``Tensor.__pow__`` is a wrapper of ``pow`` under another name: recorded as a call of the
    ``pow`` method (not of the wrapper, which has no rule and whose name the analysis graph's
    code cannot import), so the encoder's channels stay prunable across it."""
    torch.manual_seed(0)
    analysis = sepfx.analyze(_PowerInEagerCode().eval())
    assert "" in analysis.capture.shells
    methods = [n.target for n in analysis.capture.graph_module.graph.nodes]
    assert "pow" in methods and "__rpow__" in methods, methods
    frozen = [f.label for f in analysis.channels.frozen]
    assert not any(label.startswith(("encoder", "inner")) for label in frozen), frozen


class _Flagged(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(16, 16, 1)

    def forward(self, x, double=False, mode="plain"):
        y = self.conv(x)
        if double:
            y = y * 2
        return y if mode == "plain" else -y


class _CallsFlagged(nn.Module):
    """Eager code (a branch on values) calling a module whose flags it never passes, and
    cutting frames with a tensor bound (``x[..., : lengths.max()]``)."""

    def __init__(self):
        super().__init__()
        self.encoder = nn.Conv1d(1, 16, 16, stride=8)
        self.inner = _Flagged()
        self.decoder = nn.ConvTranspose1d(16, 1, 16, stride=8)

    def forward(self, wav):
        h = self.encoder(wav[:, None])
        if h.abs().sum().item() > 0:
            h = torch.relu(h)
        frames = torch.full((wav.shape[0],), h.shape[-1], dtype=torch.long)
        return self.decoder(self.inner(h[..., : frames.max()]))[:, 0]


def test_flags_never_passed_stay_constants_while_tracing():
    """``double=False`` and ``mode="plain"``, the same at every call: traced as those values
    (``if double:`` cannot be asked of a placeholder), so the module is a graph, not eager
    code, and the graph checks at run time that it gets them."""
    torch.manual_seed(0)
    model = _CallsFlagged().eval()
    analysis = sepfx.analyze(model)
    assert set(analysis.capture.shells) == {""}, analysis.capture.shells
    inner = analysis.capture.parts["inner"].graph_module
    x = torch.randn(1, 16, 20)
    assert torch.equal(inner(x), model.inner(x))
    with pytest.raises(Exception, match="specialized"):
        inner(x, True)


def test_recorded_run_maps_tensor_slice_bounds_to_nodes():
    """The whole run recorded as one graph (``passes.capture.recorded_run``, the last export
    try) records a slice bound computed from a tensor as a node, not a literal tensor that the
    graph's code cannot name, and computes what the model computes."""
    from passes.capture import recorded_run

    torch.manual_seed(0)
    model = _CallsFlagged().eval()
    x = wav(1, 4000, seed=3)
    recorded = recorded_run(model, x)
    with torch.no_grad():
        assert torch.allclose(recorded(x), model(x), rtol=1e-6, atol=1e-7)
