"""Issue 28, item 4: patterns of toolkits' separators (``tests/wild/toolkit.py``), each checked
where it used to fail. ``tests/wild/test_wild.py`` runs its whole battery (compile at 0.4,
gated == slim, ONNX, the caller's model untouched) on the same models; these tests pin what each
pattern must keep prunable."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sepfx
from passes import capture as capture_pass
from passes import runtime
from sepfx.errors import SlimError

from . import toolkit

# batch 1 and 2, and a length that is a multiple of no stride or segment size
SHAPES = [(1, 8000), (2, 8000), (2, 8037)]


@pytest.fixture(scope="module")
def analysed():
    cache = {}

    def get(name):
        if name not in cache:
            model = toolkit.build(name)
            cache[name] = (model, sepfx.analyze(model))
        return cache[name]

    return get


def wav(batch, length, seed=0):
    return torch.randn(batch, length, generator=torch.Generator().manual_seed(seed))


def frozen_parameters(analysis) -> dict[str, str]:
    return {p: f.reason for f in analysis.channels.frozen for p in f.parameters}


def assert_exact_at_half(analysis):
    """Hard-gated == slim (in float64) keeping half of every group, at every shape."""
    keep = analysis.keep_ratio(0.5, importance="random", seed=3)
    gated = analysis.gated(keep)
    slim = analysis.slim(keep)
    gated, slim = copy.deepcopy(gated).double(), slim.double()
    with torch.no_grad():
        for b, t in SHAPES:
            x = wav(b, t, seed=b * t).double()
            expected, got = gated(x), slim(x)
            assert got.shape == (b, 2, t)
            error = float((expected - got).abs().max() / expected.abs().max())
            assert error <= 1e-9, (b, t, error)


def test_dtype_test_is_not_data(analysed):
    """``if is_complex(input)``, ``feature.is_floating_point()``, ``feature.dtype == ...`` read
    metadata, not values: the separator traces (no eager shell), and each test is a stated
    assumption."""
    model, analysis = analysed("dtype_tasnet")
    assert not analysis.capture.shells, analysis.capture.shells
    assumptions = " ".join(analysis.capture.assumptions)
    for wanted in ("torch.is_complex(c)", "feature.is_floating_point()", "feature.dtype"):
        assert wanted in assumptions, analysis.capture.assumptions


def test_data_test_still_makes_a_shell():
    """A test of tensor values (``if x.abs().max() > 1``) is data: never fixed while tracing."""

    class Clip(nn.Module):
        def forward(self, x):
            if x.abs().max() > 1:
                x = x / x.abs().max()
            return x

    class Model(nn.Module):
        sample_rate = 8000

        def __init__(self):
            super().__init__()
            self.clip = Clip()
            self.conv = nn.Conv1d(1, 8, 4, stride=2)
            self.out = nn.ConvTranspose1d(8, 1, 4, stride=2)

        def forward(self, x):
            return self.out(torch.relu(self.conv(self.clip(x).unsqueeze(1))))

    torch.manual_seed(0)
    analysis = sepfx.analyze(Model().eval(), wav(1, 800))
    assert "clip" in analysis.capture.shells, analysis.capture.shells
    assert "tensor data" in analysis.capture.shells["clip"]


@pytest.mark.parametrize("name", ["dtype_tasnet", "dual_path"])
def test_unbound_masks_keep_the_encoder_prunable(analysed, name):
    """``masks.unbind(dim)`` into speakers: the encoder/mask channel axis stays one prunable
    group with the mask convolution's channels, and >= 85% of the MACs are prunable."""
    model, analysis = analysed(name)
    frozen = frozen_parameters(analysis)
    assert "encoder.conv1d out" not in frozen, frozen["encoder.conv1d out"]
    mask = (
        "separator.mask_conv1x1 out" if name == "dtype_tasnet" else "separator.dprnn.output.1 out"
    )
    groups = [g for g in analysis.groups if "encoder.conv1d out" in g.members]
    assert groups and mask in groups[0].members, [g.members for g in analysis.groups]
    assert any(n.target == "unbind" for n in analysis.capture.graph_module.graph.nodes)
    assert analysis.report().prunable_macs_share >= 0.85
    assert_exact_at_half(analysis)


def test_zero_pad_made_in_eager_glue_follows_the_kept_width(analysed):
    """``pad_segment``'s ``Variable(torch.zeros(B, N, rest)).type(x.type())`` runs in an eager
    shell (it branches on ``rest > 0``): the zeros are recorded as a factory (not a constant of
    the glue, although ``Variable`` hands back another tensor object), their channel axis is
    the stream's, and the slim model sizes them from the kept width."""
    model, analysis = analysed("dual_path")
    assert "separator" in analysis.capture.shells and "rest > 0" in analysis.capture.shells[""]
    nodes = list(analysis.capture.graph_module.graph.nodes)
    assert [n for n in nodes if n.target is torch.zeros], "the zeros were not recorded"
    assert not [n for n in nodes if n.op == "get_attr" and "constant" in str(n.target)]
    assert "separator.dprnn.row_norm.0 channels" not in frozen_parameters(analysis)
    assert_exact_at_half(analysis)


def test_class_dispatch_sees_the_original_classes(analysed):
    """SkiM's wrapper checks ``type(self.skim.seg_lstms[0]).__name__ == "SegLSTM"`` and
    ``isinstance(self.skim.mem_lstms[0], MemLSTM)`` before it runs: the gated and slim models
    put graph parts in those places, dressed as the modules they replace (class, name,
    attributes), so the caller's forward runs; the slim model pickles and copies."""
    model, analysis = analysed("skim")
    keep = analysis.keep_ratio(0.5, importance="random", seed=3)
    gated, slim = analysis.gated(keep), analysis.slim(keep)
    for built in (gated, slim):
        skim = built.separator.skim
        assert type(skim.seg_lstms[0]).__name__ == "SegLSTM"
        assert isinstance(skim.seg_lstms[1], toolkit.SegLSTM)
        assert isinstance(skim.mem_lstms[0], toolkit.MemLSTM)
        assert skim.seg_lstms[0].num_direction == 2  # its attributes are there
        assert type(skim) is toolkit.SkiM  # an eager shell: its own class, unchanged
    assert type(model.separator.skim.seg_lstms[0]) is toolkit.SegLSTM  # the caller's model
    x = wav(2, 8037, seed=5)
    with torch.no_grad():
        expected, got = gated(x), slim(x)
        error = float((expected - got).abs().max() / expected.abs().max())
        assert error <= 1e-5, error
        again = pickle.loads(pickle.dumps(slim))
        assert type(again.separator.skim.seg_lstms[0]).__name__ == "SegLSTM"
        assert torch.equal(again(x), got)
        assert torch.equal(copy.deepcopy(slim)(x), got)


def test_tuple_states_through_parts(analysed):
    """``(h, c)`` tuples handed from one LSTM block to the next (``hc = None`` on the first,
    a traced ``if hc is None``) and ``S`` passed as a number: no raw ``AttributeError`` from a
    rule; an LSTM fed an initial state keeps its hidden units prunable; the slim parts take
    ``S`` at every length (not the reference run's value)."""
    model, analysis = analysed("skim")
    # ``hc`` is None at every call of the first block: traced as None, not a shell
    assert "separator.skim.seg_lstms.0" in analysis.capture.parts, analysis.capture.shells
    members = {m for g in analysis.groups for m in g.members}
    assert "separator.skim.mem_lstms.0.h_net.rnn hidden" in members, members
    assert "encoder.conv1d out" in members, members  # through view(input.shape)
    # ``view(B, S, d * H)`` of a bidirectional state: d is kept whole, H is the segment LSTM's
    # hidden group, which the memory LSTM's input joins
    seg_hidden = [
        g for g in analysis.groups if "separator.skim.seg_lstms.0.lstm hidden" in g.members
    ]
    assert seg_hidden and "separator.skim.mem_lstms.0.h_net.rnn input" in seg_hidden[0].members
    assert analysis.report().prunable_macs_share >= 0.85
    keep = analysis.keep_ratio(0.5, importance="random", seed=3)
    slim, gated = analysis.slim(keep), analysis.gated(keep)
    with torch.no_grad():
        for b, t in SHAPES:
            x = wav(b, t, seed=t)
            expected = gated(x)
            error = float((expected - slim(x)).abs().max() / expected.abs().max())
            assert error <= 1e-5, (b, t, error)


def test_check_runs_the_callers_forward(monkeypatch):
    """Were the parts not dressed, SkiM's wrapper would raise at its class check in every
    rebuilt model: sepfx's own check runs them through the caller's forward and says so,
    instead of skipping inputs the dense model "does not take"."""
    monkeypatch.setattr(runtime, "dressed", lambda module, call: call)
    with pytest.raises(SlimError, match="Unsupported segment model class"):
        sepfx.analyze(toolkit.build("skim"))


def test_flash_transformer_is_prunable(analysed):
    """Gated attention units (einsum, rotary pairs, offset-scale heads unbound), a scaled
    sinusoidal embedding added to the stream, FSMN depthwise memory, F.layer_norm through an
    nn.LayerNorm subclass and InstanceNorm2d: the stream, the gated hidden units and the
    encoder stay prunable (>= 85% of the MACs), exact at half of every group."""
    model, analysis = analysed("flash")
    members = {m for g in analysis.groups for m in g.members}
    for wanted in (
        "encoder.conv1d out",
        "separator.in_proj out",
        "separator.layers.0.to_hidden.1 out",
        "separator.layers.0.fsmn.conv out",
    ):
        assert wanted in members, sorted(members)
    assert analysis.report().prunable_macs_share >= 0.85
    assert_exact_at_half(analysis)


def test_tracing_leaves_no_change_on_a_module():
    """A forward that stores on its modules (``self.stft.n_fft = self.n_fft * fs // ...``
    while an optional ``fs`` is given, a counter) stores proxies or traced values while it is
    traced: every module is as it was afterwards, so the eager runs that follow are the
    model's; an optional argument the caller did not pass is traced as None."""

    class Frontend(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv1d(1, 8, 16, stride=8)
            self.n_fft, self.default_fs, self.calls = 16, 8000, 0

        def forward(self, x, fs=None):
            self.calls += 1
            if fs is not None:
                self.conv.n_fft = self.n_fft * fs // self.default_fs
            self.frames = x.shape[-1] // 8
            return torch.relu(self.conv(x.unsqueeze(1)))

    class Model(nn.Module):
        sample_rate = 8000

        def __init__(self):
            super().__init__()
            self.front = Frontend()
            self.back = nn.ConvTranspose1d(8, 1, 16, stride=8)

        def forward(self, x):
            length = x.shape[-1]
            if length % 8:  # an eager shell: ``front`` is traced as a part of its own
                x = F.pad(x, (0, 8 - length % 8))
            return self.back(self.front(x))[..., :length]

    torch.manual_seed(0)
    analysis = sepfx.analyze(Model().eval(), wav(1, 803))
    assert "front" in analysis.capture.parts, analysis.capture.shells  # fs traced as None
    assert analysis.report().prunable_macs_share >= 0.85

    # traced with ``fs`` given at every call, the forward stores ``n_fft`` on the conv
    model = Model().eval()
    model.forward = lambda x: model.back(model.front(x, fs=16000))
    calls = capture_pass._record_calls(model, ["front"], [wav(1, 800), wav(2, 1000)])["front"]
    before = {m: dict(vars(m)) for m in model.front.modules()}
    assert model.front.conv.n_fft == 32 and model.front.calls == 2
    part, why, _ = capture_pass._trace_part("front", model.front, calls)
    assert part is not None, why
    for m, attributes in before.items():
        assert vars(m) == attributes, m  # n_fft, calls, frames: the eager runs' values


def test_masked_transformer_layers_trace(analysed):
    """Encoder layers returning ``(x, bool mask)``, attention taking ``expand_kv=False`` (never
    passed) and reading ``torch.finfo(scores.dtype)``: each layer is a graph (only the
    embedding, which extends its table on long inputs, and its callers run as eager code, whose
    ``x[:, : flens.max()]`` is recorded with the bound as a value), so the attention heads'
    width and the feed-forward units stay prunable, exactly. (The residual width is frozen by
    the position table, a constant of the eager code, as in the toolkit's models.)"""
    model, analysis = analysed("masked_transformer")
    assert set(analysis.capture.shells) == {"", "separator", "separator.embed", "separator.embed.1"}
    frozen = frozen_parameters(analysis)
    layers = {p: r for p, r in frozen.items() if p.startswith("separator.layers")}
    assert all("a constant tensor made in eager code" in r for r in layers.values()), layers
    for i in range(2):
        for prunable in ("self_attn.linear_q out", "self_attn.linear_v out", "feed_forward.0 out"):
            assert f"separator.layers.{i}.{prunable}" not in frozen, frozen
            label = f"separator.layers.{i}.{prunable}"
            assert any(label in g.members for g in analysis.groups), label
    assert_exact_at_half(analysis)
