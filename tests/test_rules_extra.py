"""Op rules that had no test of their own: matmul, softmax, stack, amax; and the gated graph of
a module called at several places (one gate per channel group, at every call site).

Each model is tiny; each test asserts the groups or frozen axes the rule must produce and that
the hard-gated model at the original width computes what the slim model computes."""

from __future__ import annotations

import operator

import numpy as np
import pytest
import torch
from torch import fx, nn

import sepfx
from conftest import max_relative_error


def _analyze(model_class):
    torch.manual_seed(0)
    model = model_class().eval()
    return model, sepfx.analyze(model, torch.randn(2, 400))


def _groups_with(analysis, member: str):
    return [g for g in analysis.groups if any(m.startswith(member) for m in g.members)]


def _assert_gated_equals_slim(analysis, count: int = 6, tol: float = 1e-5):
    """Hard-gated ≡ slim for one-unit-per-group, everything kept and random keep sets, at two
    batch sizes and lengths."""
    assert analysis.groups, "no channel group: nothing to check"
    rng = np.random.default_rng(0)
    sets = [{g.index: [0] for g in analysis.groups}, analysis.keep_all()]
    sets += [
        {
            g.index: sorted(
                rng.choice(g.size, int(rng.integers(1, g.size + 1)), replace=False).tolist()
            )
            for g in analysis.groups
        }
        for _ in range(count)
    ]
    inputs = [
        torch.randn(2, 400, generator=torch.Generator().manual_seed(1)),
        torch.randn(3, 437, generator=torch.Generator().manual_seed(2)),
    ]
    with torch.no_grad():
        for keep in sets:
            gated, slim = analysis.gated(keep), analysis.slim(keep)
            for x in inputs:
                error = max_relative_error(gated(x), slim(x))
                assert error <= tol, (keep, list(x.shape), error)


def _frozen_with(analysis, reason: str):
    return [f for f in analysis.channels.frozen if reason in f.reason]


# -- matmul ----------------------------------------------------------------------------------
class Matmul(nn.Module):
    """Attention-like: q^T k contracts the q/k channel axis (one group across both convs); the
    values are mixed along time by ``v @ weights`` (a contraction over a dynamic axis), which
    leaves v's channel axis free; torch.bmm and the @ operator both appear."""

    def __init__(self):
        super().__init__()
        self.enc = nn.Conv1d(1, 8, 16, stride=8)  # a short time axis: [T, T] scores stay small
        self.q = nn.Conv1d(8, 6, 1)
        self.k = nn.Conv1d(8, 6, 1)
        self.v = nn.Conv1d(8, 5, 1)
        self.dec = nn.ConvTranspose1d(5, 1, 16, stride=8)

    def forward(self, x):
        h = torch.relu(self.enc(x.unsqueeze(1)))  # [B, 8, T]
        scores = torch.bmm(self.q(h).transpose(1, 2), self.k(h))  # [B, T, T], over q/k channels
        weights = torch.softmax(scores / 4.0, dim=-1)
        mixed = self.v(h) @ weights  # [B, 5, T]: contracts time
        return self.dec(mixed).squeeze(1)


def test_matmul_couples_the_contracted_axes():
    _, analysis = _analyze(Matmul)
    qk = _groups_with(analysis, "q out")
    assert len(qk) == 1 and qk[0].size == 6, [g.describe() for g in analysis.groups]
    assert any(m.startswith("k out") for m in qk[0].members), qk[0].members
    values = _groups_with(analysis, "v out")
    assert len(values) == 1 and values[0].size == 5 and values[0] is not qk[0]
    assert any(m.startswith("dec in") for m in values[0].members), values[0].members
    encoder = _groups_with(analysis, "enc out")
    assert len(encoder) == 1 and encoder[0].size == 8
    assert len(analysis.groups) == 3, [g.describe() for g in analysis.groups]
    # the MACs of the matmuls scale with the kept q/k channels
    flat_all = analysis.channels.keep_vector(analysis.keep_all())
    keep = analysis.keep_all()
    keep[qk[0].index] = np.array([0, 1, 2])
    assert analysis.cost.macs(analysis.channels.keep_vector(keep)) < analysis.cost.macs(flat_all)
    _assert_gated_equals_slim(analysis)


def test_matmul_slim_model_is_narrower():
    _, analysis = _analyze(Matmul)
    keep = analysis.keep_all()
    keep[_groups_with(analysis, "q out")[0].index] = np.array([1, 4])
    slim = analysis.slim(keep)
    assert slim.q.out_channels == 2 and slim.k.out_channels == 2


# -- softmax ---------------------------------------------------------------------------------
class SoftmaxOverChannels(nn.Module):
    """A mask normalised over its 4 channels (the softmax axis must stay whole) and a softmax
    over time (channels map through it)."""

    def __init__(self):
        super().__init__()
        self.enc = nn.Conv1d(1, 8, 3, padding=1)
        self.mask = nn.Conv1d(8, 4, 1)
        self.normalise = nn.Softmax(dim=1)
        self.values = nn.Conv1d(8, 4, 1)
        self.dec = nn.Conv1d(8, 1, 1)

    def forward(self, x):
        h = torch.relu(self.enc(x.unsqueeze(1)))  # [B, 8, T]
        h = h * torch.softmax(h, dim=-1)  # over time: the channel axis passes through
        mixed = (self.values(h) * self.normalise(self.mask(h))).sum(dim=1, keepdim=True)
        return self.dec(h) + mixed


def test_softmax_axis_is_frozen_and_reported():
    _, analysis = _analyze(SoftmaxOverChannels)
    frozen = _frozen_with(analysis, "softmax")
    assert frozen, [f.reason for f in analysis.channels.frozen]
    kept_whole = {p.split()[0] + " " + p.split()[1] for f in frozen for p in f.parameters}
    assert {"mask out", "values out"} <= kept_whole, kept_whole
    members = [m for g in analysis.groups for m in g.members]
    assert not any(m.startswith(("mask out", "values out")) for m in members), members
    # the channels of the softmax over time are still prunable
    encoder = _groups_with(analysis, "enc out")
    assert len(encoder) == 1 and encoder[0].size == 8
    assert len(analysis.groups) == 1, [g.describe() for g in analysis.groups]
    report = analysis.report()
    assert any(
        "softmax" in row.reason and any(p.startswith("mask out") for p in row.parameters)
        for row in report.frozen
    ), report.frozen
    assert "softmax" in str(report)
    _assert_gated_equals_slim(analysis)


# -- stack -----------------------------------------------------------------------------------
class Stack(nn.Module):
    """Two branches stacked on a new axis: the stacked axis is frozen, the branches' channel
    axes become one group."""

    def __init__(self):
        super().__init__()
        self.enc = nn.Conv1d(1, 8, 3, padding=1)
        self.a = nn.Conv1d(8, 6, 1)
        self.b = nn.Conv1d(8, 6, 3, padding=1)
        self.dec = nn.Conv1d(6, 1, 1)

    def forward(self, x):
        h = torch.relu(self.enc(x.unsqueeze(1)))
        stacked = torch.stack([self.a(h), torch.tanh(self.b(h))], dim=1)  # [B, 2, 6, T]
        weights = torch.tensor([0.25, 0.75]).view(1, 2, 1, 1)
        return self.dec((stacked * weights).sum(dim=1))


def test_stack_couples_stacked_tensors_and_freezes_the_new_axis():
    _, analysis = _analyze(Stack)
    branches = _groups_with(analysis, "a out")
    assert len(branches) == 1 and branches[0].size == 6, [g.describe() for g in analysis.groups]
    assert any(m.startswith("b out") for m in branches[0].members)
    assert any(m.startswith("dec in") for m in branches[0].members)
    assert len(analysis.groups) == 2, [g.describe() for g in analysis.groups]
    assert _frozen_with(analysis, "stacked axis"), [f.reason for f in analysis.channels.frozen]
    _assert_gated_equals_slim(analysis)


# -- amax ------------------------------------------------------------------------------------
class Amax(nn.Module):
    """A maximum over channels (frozen: removing a channel changes it) and one over time
    (channels map through)."""

    def __init__(self):
        super().__init__()
        self.enc = nn.Conv1d(1, 8, 3, padding=1)
        self.mid = nn.Conv1d(8, 12, 1)
        self.dec = nn.Conv1d(12, 1, 1)

    def forward(self, x):
        h = torch.relu(self.enc(x.unsqueeze(1)))  # [B, 8, T]
        peak = h.amax(dim=1, keepdim=True)  # [B, 1, T]: over channels
        g = torch.relu(self.mid(h))
        g = g - torch.amax(g, dim=-1, keepdim=True)  # over time
        return self.dec(g * torch.sigmoid(peak))


def test_amax_freezes_the_reduced_axis():
    _, analysis = _analyze(Amax)
    frozen = _frozen_with(analysis, "maximum")
    assert any(p.startswith("enc out") for f in frozen for p in f.parameters), [
        (f.label, f.reason, f.parameters) for f in analysis.channels.frozen
    ]
    members = [m for g in analysis.groups for m in g.members]
    assert not any(m.startswith("enc out") for m in members), members
    middle = _groups_with(analysis, "mid out")
    assert len(middle) == 1 and middle[0].size == 12
    assert len(analysis.groups) == 1, [g.describe() for g in analysis.groups]
    _assert_gated_equals_slim(analysis)


# -- one gate per group, at every call site of a shared module --------------------------------
class SharedBlock(nn.Module):
    """A residual block called at three places (weight sharing, as in TDANet / A-FRCNN)."""

    def __init__(self):
        super().__init__()
        self.enc = nn.Conv1d(1, 8, 3, padding=1)
        self.block = nn.Sequential(nn.Conv1d(8, 12, 1), nn.PReLU(12), nn.Conv1d(12, 8, 1))
        self.dec = nn.Conv1d(8, 1, 1)

    def forward(self, x):
        h = self.enc(x.unsqueeze(1))
        for _ in range(3):
            h = h + self.block(h)
        return self.dec(h)


def _group_of_units(analysis, units: np.ndarray):
    """The one group all ``units`` (flat unit indices, none 0) belong to."""
    assert units.size and (units > 0).all(), units
    owners = {
        g.index
        for g in analysis.groups
        for u in units.tolist()
        if g.offset <= u < g.offset + g.size
    }
    assert len(owners) == 1, owners
    return owners.pop()


def test_shared_module_has_one_gate_per_group_at_every_call_site():
    _, analysis = _analyze(SharedBlock)
    channels = analysis.channels
    # two groups: the residual stream (8) and the block's hidden channels (12)
    assert sorted(g.size for g in analysis.groups) == [8, 12], [
        g.describe() for g in analysis.groups
    ]
    hidden = _groups_with(analysis, "block.0 out")
    assert len(hidden) == 1 and hidden[0].size == 12
    stream = _groups_with(analysis, "enc out")
    assert len(stream) == 1 and stream[0].size == 8

    # every axis of the shared modules belongs to exactly one group
    for qualname in ("block.0", "block.1", "block.2"):
        for name, key in channels.module_axes[qualname].items():
            _group_of_units(channels, channels.axis_units(key))
    assert (
        _group_of_units(channels, channels.axis_units(channels.module_axes["block.0"]["out"]))
        == hidden[0].index
    )
    assert (
        _group_of_units(channels, channels.axis_units(channels.module_axes["block.2"]["out"]))
        == stream[0].index
    )

    graph_module = analysis.channels.graph_module
    calls = [n for n in graph_module.graph.nodes if n.op == "call_module" and n.target == "block.0"]
    assert len(calls) == 3
    # each call site's output is gated by the same group, unit for unit
    site_units = [channels.axis_units(channels.value_axes[(n.name, ())][1]) for n in calls]
    for units in site_units:
        assert np.array_equal(units, site_units[0])
        assert _group_of_units(channels, units) == hidden[0].index

    keep = analysis.keep_all()
    keep[hidden[0].index] = np.array([0, 5, 7])
    gated = analysis.gated(keep)
    assert isinstance(gated, fx.GraphModule)
    nodes = list(gated.graph.nodes)
    # one gate bank, read once
    banks = [n for n in nodes if n.op == "call_module" and n.target == "sepfx_gates"]
    assert len(banks) == 1
    # one index per gated axis, each read once
    index_targets = [
        n.target
        for n in nodes
        if n.op == "get_attr" and str(n.target).startswith("sepfx_gates.axis")
    ]
    assert len(index_targets) == len(set(index_targets))
    bank = gated.get_submodule("sepfx_gates")
    assert set(index_targets) == {f"sepfx_gates.{name}" for name in bank.axis_names.values()}
    # the gated axes are the prunable channel axes of the graph's values: the encoder output,
    # and at each of the three call sites the outputs of block.0, block.1, block.2 and the add
    prunable_values = {
        axis
        for dims in channels.value_axes.values()
        for axis in dims.values()
        if channels.axis_units(axis).any()
    }
    assert set(bank.axis_names) == prunable_values
    assert len(index_targets) == len(prunable_values) == 1 + 3 * 4
    # the index of each gated axis points into exactly one group, and every group is gated
    gated_groups = set()
    for key, name in bank.axis_names.items():
        units = getattr(bank, name).numpy()
        assert np.array_equal(units, channels.axis_units(key))
        gated_groups.add(_group_of_units(channels, units))
    assert gated_groups == {g.index for g in analysis.groups}
    # every call site of the shared block's hidden layer is gated
    gate_calls = [
        n
        for n in nodes
        if n.op == "call_function" and getattr(n.target, "__name__", "") == "apply_gate"
    ]
    assert len(gate_calls) == len(prunable_values)  # one gate application per gated value
    reads = [n for n in nodes if n.op == "call_function" and n.target is operator.getitem]
    assert len(reads) == len(index_targets)  # each axis's gates gathered once
    gated_inputs = {
        a.target
        for n in gate_calls
        for a in n.args[:1]
        if isinstance(a, fx.Node) and a.op == "call_module"
    }
    assert "block.0" in gated_inputs and "block.1" in gated_inputs
    assert (
        sum(
            1
            for n in gate_calls
            if isinstance(n.args[0], fx.Node)
            and n.args[0].op == "call_module"
            and n.args[0].target == "block.0"
        )
        == 3
    )
    _assert_gated_equals_slim(analysis)


# -- a convolution whose kernel spans a static axis ------------------------------------------
class SpannedChannelMask(nn.Module):
    """The plain form: the spanning Conv2d's output positions are the encoder's channels."""

    def __init__(self):
        super().__init__()
        self.enc = nn.Conv1d(1, 12, 16, stride=8)
        self.bottleneck = nn.Conv1d(12, 9, 1)
        self.mask = nn.Conv2d(1, 2, kernel_size=(10, 3), padding=(6, 1))  # 9 -> 12 positions
        self.dec = nn.ConvTranspose1d(12, 1, 16, stride=8)

    def forward(self, x):
        e = torch.relu(self.enc(x.unsqueeze(1)))  # [B, 12, T]
        m = torch.sigmoid(self.mask(self.bottleneck(e).unsqueeze(1)))  # [B, 2, 12, T]
        masked = m * e.unsqueeze(1)
        b, n, c, t = masked.shape
        return self.dec(masked.reshape(b * n, c, t)).view(b, n, -1)


def test_spanning_convolution_prunes_its_positions_like_a_linear():
    _, analysis = _analyze(SpannedChannelMask)
    encoder = _groups_with(analysis, "enc out")
    assert len(encoder) == 1 and encoder[0].size == 12, [g.describe() for g in analysis.groups]
    assert "mask span2_out" in encoder[0].members and "dec in" in encoder[0].members
    bottleneck = _groups_with(analysis, "bottleneck out")
    assert len(bottleneck) == 1 and bottleneck[0].size == 9
    assert "mask span2_in" in bottleneck[0].members
    # only the two mask outputs (speakers, folded into the batch) are kept whole
    assert {p for f in analysis.channels.frozen for p in f.parameters} == {"mask out"}
    _assert_gated_equals_slim(analysis)
    keep = {g.index: list(range(0, g.size, 2)) for g in analysis.groups}
    slim = analysis.slim(keep)
    lowered = [m for m in slim.modules() if type(m).__name__ == "SpannedConv"]
    assert len(lowered) == 1, "the pruned spanning conv is folded into its channels"


def test_spanning_convolution_exports(tmp_path):
    _, analysis = _analyze(SpannedChannelMask)
    keep = {g.index: list(range(0, g.size, 2)) for g in analysis.groups}
    result = sepfx.export_onnx(analysis.slim(keep), tmp_path / "m.onnx")
    assert result.dynamic_batch and result.dynamic_time, result
    assert all(error <= 1e-4 for error in result.errors.values()), result.errors


def test_sliding_convolution_over_a_static_axis_stays_frozen():
    torch.manual_seed(0)
    model = SpannedChannelMask().eval()
    model.mask = nn.Conv2d(1, 2, kernel_size=(3, 3), padding=(2, 1))  # 9 -> 11 positions: slides
    model.enc = nn.Conv1d(1, 11, 16, stride=8)
    model.bottleneck = nn.Conv1d(11, 9, 1)
    model.dec = nn.ConvTranspose1d(11, 1, 16, stride=8)
    analysis = sepfx.analyze(model, torch.randn(2, 400))
    assert _frozen_with(analysis, "a convolution slides along this axis")
    assert not _groups_with(analysis, "bottleneck out"), [g.describe() for g in analysis.groups]
    assert not _groups_with(analysis, "enc out")
    assert not any("span" in m for g in analysis.groups for m in g.members)


# -- recurrent layers, traced or called by an eager shell ------------------------------------
class Recurrent(nn.Module):
    """A 2-layer bidirectional recurrent layer between an encoder and a mask; ``shell`` pads
    by the length at the top level first, so that the model runs as an eager shell and the
    layer is called from recorded glue (a leaf part called with its default ``hx=None``)."""

    def __init__(self, kind: str, shell: bool, initial_state: bool = False):
        super().__init__()
        self.shell, self.initial_state = shell, initial_state
        self.enc = nn.Conv1d(1, 16, 16, stride=8)
        self.rnn = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}[kind](
            16, 12, num_layers=2, batch_first=True, bidirectional=True
        )
        self.proj = nn.Linear(24, 16)
        self.dec = nn.ConvTranspose1d(16, 1, 16, stride=8)

    def forward(self, x):
        if self.shell and x.shape[-1] % 8:
            x = torch.nn.functional.pad(x, (0, 8 - x.shape[-1] % 8))
        e = self.enc(x.unsqueeze(1))
        if self.initial_state:
            state = torch.zeros(4, e.shape[0], 12)
            h, _ = self.rnn(
                e.transpose(1, 2), (state, state) if isinstance(self.rnn, nn.LSTM) else state
            )
        else:
            h, _ = self.rnn(e.transpose(1, 2))
        return self.dec(e * torch.sigmoid(self.proj(h).transpose(1, 2)))


def _recurrent_macs(kind: str, steps: int) -> float:
    """The closed form: gates x hidden x (input + hidden) per step, per direction and layer."""
    gates = {"lstm": 4, "gru": 3, "rnn": 1}[kind]
    return 2 * steps * gates * 12 * ((16 + 12) + (24 + 12))


@pytest.mark.parametrize("shell", [False, True], ids=["traced", "shell"])
@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn"])
def test_recurrent_layer_prunes_and_counts_its_closed_form(kind, shell):
    torch.manual_seed(0)
    model = Recurrent(kind, shell).eval()
    analysis = sepfx.analyze(model, torch.randn(1, 8000))
    assert bool(analysis.capture.shells) == shell
    steps = (8000 - 16) // 8 + 1
    rnn_nodes = [
        n.name
        for n in analysis.capture.graph_module.graph.nodes
        if n.op == "call_module" and n.target == "rnn"
    ]
    assert len(rnn_nodes) == 1
    assert analysis.cost.node_macs[rnn_nodes[0]] == _recurrent_macs(kind, steps)
    hidden = _groups_with(analysis, "rnn hidden")
    assert len(hidden) == 1 and hidden[0].size == 12
    assert not [f for f in analysis.channels.frozen if f.parameters], analysis.channels.frozen
    _assert_gated_equals_slim(analysis, count=3)


@pytest.mark.parametrize("shell", [False, True], ids=["traced", "shell"])
@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn"])
def test_recurrent_layer_with_an_initial_state_prunes_its_hidden_units(kind, shell):
    """``rnn(x, (h0, c0))`` / ``rnn(x, h0)``: the states' hidden axis is the layer's hidden
    group; the gated model gates the given state, so a pruned unit starts at 0 as a removed
    one, and the count is the closed form. Where eager code makes the state
    (``torch.zeros(4, B, 12)``, a literal sepfx cannot rewrite there), the slim check finds it
    and keeps the hidden units whole, saying why."""
    torch.manual_seed(0)
    model = Recurrent(kind, shell=shell, initial_state=True).eval()
    analysis = sepfx.analyze(model, torch.randn(1, 8000))
    assert not _frozen_with(analysis, "initial state")
    if shell:
        assert not _groups_with(analysis, "rnn hidden")
        assert _frozen_with(analysis, "eager code reads its channel count")
    else:
        assert _groups_with(analysis, "rnn hidden"), [g.describe() for g in analysis.groups]
    rnn_nodes = [
        n.name
        for n in analysis.capture.graph_module.graph.nodes
        if n.op == "call_module" and n.target == "rnn"
    ]
    assert analysis.cost.node_macs[rnn_nodes[0]] == _recurrent_macs(kind, (8000 - 16) // 8 + 1)
    _assert_gated_equals_slim(analysis, count=3)


class ShellAttention(nn.Module):
    """Self-attention ``mha(e, e, e)`` called from eager glue (the root pads by the length):
    one value in three arguments of a leaf part, and an unused attention-weights output."""

    def __init__(self):
        super().__init__()
        self.enc = nn.Conv1d(1, 16, 16, stride=8)
        self.mha = nn.MultiheadAttention(16, 4, batch_first=True)
        self.dec = nn.ConvTranspose1d(16, 1, 16, stride=8)

    def forward(self, x):
        if x.shape[-1] % 8:
            x = torch.nn.functional.pad(x, (0, 8 - x.shape[-1] % 8))
        e = self.enc(x.unsqueeze(1)).transpose(1, 2)
        h, _ = self.mha(e, e, e)
        return self.dec((e + h).transpose(1, 2))


def test_attention_called_from_eager_glue_prunes_heads():
    _, analysis = _analyze(ShellAttention)
    assert analysis.capture.shells
    heads = _groups_with(analysis, "mha heads")
    assert len(heads) == 1 and heads[0].size == 4, [g.describe() for g in analysis.groups]
    _assert_gated_equals_slim(analysis)


# -- repeat, complex views, functional batch norm, cat of a tuple ----------------------------
class Spectral(nn.Module):
    """DeMask/DCUNet-style ops around an encoder: a magnitude mask repeated over the (real,
    imaginary) halves (``repeat(1, 2, 1)``), a functional batch norm with the module's own
    statistics, a complex view and its parts, and ``torch.cat`` of a tuple node."""

    def __init__(self):
        super().__init__()
        self.enc = nn.Conv1d(1, 16, 16, stride=8)  # [real(8); imag(8)] halves
        self.mask = nn.Conv1d(16, 8, 1)
        self.norm = nn.BatchNorm1d(8)
        self.norm.running_mean.uniform_(-0.5, 0.5)
        self.norm.running_var.uniform_(0.5, 1.5)
        self.dec = nn.ConvTranspose1d(16, 1, 16, stride=8)

    def forward(self, x):
        e = self.enc(x.unsqueeze(1))
        m = self.mask(e)
        m = torch.nn.functional.batch_norm(
            m,
            self.norm.running_mean,
            self.norm.running_var,
            self.norm.weight,
            self.norm.bias,
            False,
            0.1,
            1e-5,
        )
        masked = e * torch.sigmoid(m).repeat(1, 2, 1)
        z = torch.view_as_complex(torch.stack(masked.chunk(2, dim=1), dim=-1).contiguous())
        parts = torch.cat((z.real, z.imag), dim=1)
        return self.dec(torch.cat(parts.chunk(2, dim=1), dim=1))


def test_repeat_complex_views_and_functional_batch_norm_prune_exactly():
    _, analysis = _analyze(Spectral)
    members = {m for g in analysis.groups for m in g.members}
    assert "mask out" in members and "norm.running_mean dim 0" in members, members
    encoder = _groups_with(analysis, "enc out")
    # a channel c of each half lives with c of the other half (repeat, complex view)
    assert len(encoder) == 1 and encoder[0].size == 8, [g.describe() for g in analysis.groups]
    assert not [f for f in analysis.channels.frozen if f.parameters], analysis.channels.frozen
    _assert_gated_equals_slim(analysis)


# -- found by typing: dict outputs, softmax without a dim ------------------------------------
class DictOutput(nn.Module):
    """Per-speaker outputs by name: the whole model traces (it used to fall back to a shell,
    the graph check comparing two dicts of tensors with ==)."""

    def __init__(self, implicit_softmax: bool = False):
        super().__init__()
        self.enc = nn.Conv1d(1, 8, 16, stride=8)
        self.mask = nn.Conv1d(8, 16, 1)
        self.dec = nn.ConvTranspose1d(8, 1, 16, stride=8)
        self.softmax = nn.Softmax() if implicit_softmax else None

    def forward(self, x):
        e = torch.relu(self.enc(x.unsqueeze(1)))
        m = self.mask(e)
        if self.softmax is not None:
            m = self.softmax(m)
        a, b = torch.sigmoid(m).chunk(2, dim=1)
        return {"s1": self.dec(e * a).squeeze(1), "s2": self.dec(e * b).squeeze(1)}


def test_dict_output_traces_whole_and_prunes():
    _, analysis = _analyze(DictOutput)
    assert analysis.capture.traced_whole, analysis.capture.shells
    assert _groups_with(analysis, "enc out")
    keep = {g.index: list(range(g.size // 2)) for g in analysis.groups}
    x = torch.randn(2, 437)
    with torch.no_grad():
        gated, slim = analysis.gated(keep)(x), analysis.slim(keep)(x)
    assert gated.keys() == slim.keys() == {"s1", "s2"}
    assert all(max_relative_error(gated[k], slim[k]) <= 1e-5 for k in gated)


def test_softmax_without_a_dim_is_frozen_not_a_crash():
    torch.manual_seed(0)
    model = DictOutput(implicit_softmax=True).eval()
    analysis = sepfx.analyze(model, torch.randn(2, 400))
    assert _frozen_with(analysis, "softmax without an explicit dim")


class _ExpandedGate(nn.Module):
    """A per-frame gate [B, 1, L] broadcast over the channels with ``expand_as``, and a per-
    channel mask [B, C, L] expanded onto a tensor of its own shape."""

    def __init__(self):
        super().__init__()
        self.encoder = nn.Conv1d(1, 16, 16, stride=8)
        self.gate = nn.Conv1d(16, 1, 1)
        self.mask = nn.Conv1d(16, 16, 1)
        self.decoder = nn.ConvTranspose1d(16, 1, 16, stride=8)

    def forward(self, wav):
        h = torch.relu(self.encoder(wav[:, None]))
        g = torch.sigmoid(self.gate(h)).expand_as(h)
        m = torch.sigmoid(self.mask(h)).expand_as(h)
        return self.decoder(h * g * m)[:, 0]


def test_expand_as_broadcasts_like_arithmetic():
    """``expand_as`` couples what it expands with its target as broadcasting arithmetic does:
    the channels stay one prunable group (no axis frozen), and hard-gated ≡ slim."""
    _, analysis = _analyze(_ExpandedGate)
    frozen = [f.reason for f in analysis.channels.frozen]
    assert not any("expand_as" in reason for reason in frozen), frozen
    groups = _groups_with(analysis, "encoder")
    assert len(groups) == 1 and groups[0].size == 16, analysis.groups
    assert any(m.startswith("mask") for m in groups[0].members), groups[0].members
    _assert_gated_equals_slim(analysis)
