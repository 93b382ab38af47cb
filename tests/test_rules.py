"""Every op rule, one small model each: the groups it must find and exactness of gated vs slim.

The zoo covers the common paths; these cover the rest of the registry (grouped convs, GRU,
batch norm, grouped GroupNorm, split/chunk/slicing, attention with batch_first=False, Conv2d,
shared PReLU into a cat, a module called at several places, view with literal sizes)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import sepfx


class Grouped(nn.Module):
    """A general grouped conv (groups=4 of 16) between two 1x1 convs: whole conv groups prune."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv1d(1, 16, 3, padding=1)
        self.g = nn.Conv1d(16, 24, 3, padding=1, groups=4)
        self.norm = nn.GroupNorm(4, 24)  # 4 norm groups of 6 channels: prunes whole groups
        self.b = nn.Conv1d(24, 2, 1)

    def forward(self, x):
        return self.b(self.norm(self.g(torch.relu(self.a(x.unsqueeze(1))))))


class Recurrent(nn.Module):
    def __init__(self, cell=nn.GRU, bidirectional=True, layers=2):
        super().__init__()
        self.enc = nn.Conv1d(1, 12, 4, stride=2)
        self.bn = nn.BatchNorm1d(12)
        self.rnn = cell(12, 10, num_layers=layers, batch_first=True, bidirectional=bidirectional)
        self.out = nn.Linear(10 * (2 if bidirectional else 1), 12)
        self.dec = nn.ConvTranspose1d(12, 2, 4, stride=2)

    def forward(self, x):
        h = self.bn(self.enc(x.unsqueeze(1)))
        y, _ = self.rnn(h.transpose(1, 2))
        y = self.out(y).transpose(1, 2) + h
        return self.dec(y)


class SplitCatSlice(nn.Module):
    """chunk and split with offsets, a literal slice, a shared PReLU feeding a cat, a view with
    literal sizes (n_src x C), a module called at two places."""

    def __init__(self):
        super().__init__()
        self.enc = nn.Conv1d(1, 16, 4, stride=2)
        self.act = nn.PReLU()  # one shared weight
        self.proj = nn.Conv1d(8, 8, 1)  # called twice
        self.per_channel = nn.PReLU(24)
        self.mask = nn.Conv1d(24, 2 * 12, 1)
        self.dec = nn.ConvTranspose1d(12, 1, 4, stride=2)

    def forward(self, x):
        h = self.enc(x.unsqueeze(1))
        a, b = h.chunk(2, dim=1)
        c, d = torch.split(h, [4, 12], dim=1)
        z = torch.cat([self.act(self.proj(a)), self.proj(b), d[:, 4:12]], dim=1)  # 8 + 8 + 8
        z = self.per_channel(z)
        m = self.mask(z).view(x.shape[0], 2, 12, -1).sigmoid()
        feats = h[:, :12].unsqueeze(1) * m + c.mean(dim=1, keepdim=True).unsqueeze(1)
        out = self.dec(feats.reshape(x.shape[0] * 2, 12, -1))
        return out.view(x.shape[0], 2, -1)


class Attention(nn.Module):
    """nn.MultiheadAttention with batch_first=False fed [T, B, C], a LayerNorm, a custom cLN with
    its own parameters, and a Conv2d."""

    def __init__(self):
        super().__init__()
        self.enc = nn.Conv1d(1, 16, 4, stride=2)
        self.attn = nn.MultiheadAttention(16, 4, batch_first=False)
        self.ln = nn.LayerNorm(16)
        self.gamma = nn.Parameter(torch.rand(16) + 0.5)
        self.beta = nn.Parameter(torch.randn(16) * 0.1)
        self.conv2d = nn.Conv2d(16, 16, (1, 3), padding=(0, 1))
        self.dec = nn.ConvTranspose1d(16, 2, 4, stride=2)

    def forward(self, x):
        h = self.enc(x.unsqueeze(1))  # [B, C, T]
        t = h.permute(2, 0, 1)  # [T, B, C]
        a, _ = self.attn(t, t, t)
        t = self.ln(t + a)
        mean = t.mean(dim=-1, keepdim=True)
        var = t.var(dim=-1, keepdim=True, unbiased=False)
        t = (t - mean) / torch.sqrt(var + 1e-5) * self.gamma + self.beta
        h = t.permute(1, 2, 0).unsqueeze(2)  # [B, C, 1, T]
        h = self.conv2d(h).squeeze(2)
        return self.dec(h)


def _keep_sets(analysis, rng, count):
    sets = [{g.index: np.array([0]) for g in analysis.groups}]
    for _ in range(count):
        sets.append(
            {
                g.index: np.sort(rng.choice(g.size, rng.integers(1, g.size + 1), replace=False))
                for g in analysis.groups
            }
        )
    return sets


def _group_sizes(analysis, member):
    return [g.size for g in analysis.groups if any(member in m for m in g.members)]


CASES = {
    "grouped": (Grouped, lambda a: _group_sizes(a, "g out") == [4]),
    "gru": (Recurrent, lambda a: _group_sizes(a, "rnn hidden") == [10]),
    "lstm": (lambda: Recurrent(nn.LSTM, True, 1), lambda a: _group_sizes(a, "rnn hidden") == [10]),
    "split_cat": (SplitCatSlice, lambda a: len(a.groups) >= 3),
    "attention": (Attention, lambda a: _group_sizes(a, "attn heads") == [4]),
}


@pytest.mark.parametrize("name", list(CASES))
def test_rule_groups_and_exactness(name):
    make, expected_groups = CASES[name]
    torch.manual_seed(0)
    model = make().eval()
    x = torch.randn(2, 400)
    analysis = sepfx.analyze(model, x)
    assert expected_groups(analysis), [g.describe() for g in analysis.groups]
    with torch.no_grad():
        assert torch.allclose(analysis.gated()(x), model(x), atol=1e-5, rtol=1e-4)
    rng = np.random.default_rng(0)
    other = torch.randn(3, 437)
    for keep in _keep_sets(analysis, rng, 8):
        gated, slim = analysis.gated(keep), analysis.slim(keep)
        with torch.no_grad():
            for inp in (x, other):
                expected, got = gated(inp), slim(inp)
                scale = expected.abs().max()
                assert float((expected - got).abs().max()) <= 1e-5 * float(scale), (name, keep)


def test_grouped_conv_prunes_whole_groups():
    torch.manual_seed(0)
    analysis = sepfx.analyze(Grouped().eval(), torch.randn(1, 400))
    keep = analysis.keep_all()
    group = next(g for g in analysis.groups if any("g out" in m for m in g.members))
    keep[group.index] = np.array([1, 3])
    slim = analysis.slim(keep)
    assert slim.g.groups == 2 and slim.g.in_channels == 8 and slim.g.out_channels == 12
    assert slim.norm.num_groups == 2 and slim.norm.num_channels == 12


def test_recurrent_slim_is_smaller_recurrent_layer():
    torch.manual_seed(0)
    analysis = sepfx.analyze(Recurrent().eval(), torch.randn(1, 400))
    keep = analysis.keep_ratio(0.5, "first")
    slim = analysis.slim(keep)
    assert isinstance(slim.rnn, nn.GRU) and slim.rnn.hidden_size == 5
    assert slim.out.in_features == 10


def test_attention_slim_drops_whole_heads():
    torch.manual_seed(0)
    analysis = sepfx.analyze(Attention().eval(), torch.randn(1, 400))
    keep = analysis.keep_all()
    heads = next(g for g in analysis.groups if any("attn heads" in m for m in g.members))
    keep[heads.index] = np.array([0, 2])
    slim = analysis.slim(keep)
    assert slim.attn.num_heads == 2 and slim.attn.head_dim == 4


class Unruly(nn.Module):
    """cumsum along the channel axis has no rule: that axis must be frozen."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv1d(1, 8, 3, padding=1)
        self.b = nn.Conv1d(8, 8, 1)
        self.c = nn.Conv1d(8, 8, 1)
        self.d = nn.Conv1d(8, 1, 1)

    def forward(self, x):
        h = torch.relu(self.b(self.a(x.unsqueeze(1))))
        h = torch.cumsum(h, dim=1)
        return self.d(torch.relu(self.c(h)))


def test_op_without_rule_freezes_its_axes_only():
    torch.manual_seed(0)
    analysis = sepfx.analyze(Unruly().eval(), torch.randn(1, 400))
    frozen = [f for f in analysis.channels.frozen if "cumsum" in f.reason]
    assert frozen, [f.reason for f in analysis.channels.frozen]
    assert any("b out" in p for f in frozen for p in f.parameters)
    members = [m for g in analysis.groups for m in g.members]
    assert "b out" not in members and any("a out" in m for m in members)
    keep = analysis.keep_ratio(0.5, "random")
    with torch.no_grad():
        x = torch.randn(2, 400)
        assert torch.allclose(analysis.gated(keep)(x), analysis.slim(keep)(x), atol=1e-6)


class DataDependentGate(nn.Module):
    """Untraceable (Python control flow on tensor values) but channel-wise: certifiable."""

    def forward(self, x):
        if x.abs().max() > 100:
            return x
        return torch.tanh(x) * 2


class DataDependentMix(nn.Module):
    """Untraceable and mixes channels (flips them): must stay frozen."""

    def forward(self, x):
        if x.abs().max() > 100:
            return x
        return x.flip(1)


class WithLeaves(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv1d(1, 8, 3, padding=1)
        self.gate = DataDependentGate()
        self.b = nn.Conv1d(8, 8, 1)
        self.mix = DataDependentMix()
        self.c = nn.Conv1d(8, 1, 1)

    def forward(self, x):
        h = self.gate(self.a(x.unsqueeze(1)))
        return self.c(self.mix(self.b(h)))


def test_untraceable_modules_run_eagerly_and_are_read_from_recorded_runs():
    """Control flow on tensor values: the modules (and the root that calls them) run eagerly.
    A maximum over channels decides a branch, so pruning could flip it: those channels are
    frozen; so are the ones a flip over channels mixes. The gated model still equals the slim
    one."""
    torch.manual_seed(0)
    analysis = sepfx.analyze(WithLeaves().eval(), torch.randn(1, 400))
    assert set(analysis.capture.shells) == {"", "gate", "mix"}
    frozen = analysis.channels.frozen
    assert any("b out" in p for f in frozen for p in f.parameters if "flip" in f.reason), frozen
    assert any("a out" in p for f in frozen for p in f.parameters if "max" in f.reason), frozen
    keep = analysis.keep_ratio(0.5, "random")
    with torch.no_grad():
        x = torch.randn(2, 400)
        assert torch.allclose(analysis.gated(keep)(x), analysis.slim(keep)(x), atol=1e-6)
