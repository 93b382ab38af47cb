"""Issue 10, section 2: every pattern of ``tests/wild/patterns.py`` stays inside the traced graph
and stays prunable: the parameter axes around it are in a channel group with a MAC share, none
of them frozen, no opaque leaf, and the hard-gated model equals the slim one (and the dense one
when everything is kept) at 8000 and 12345 samples, batch 1 and 2."""

from __future__ import annotations

import operator

import numpy as np
import pytest
import torch

import sepfx
from passes import trace as trace_pass
from sepfx.errors import TraceError

from . import patterns

SHAPES = [(b, t) for t in (8000, 12345) for b in (1, 2)]
TOL = 1e-5
TRACED = [n for n in patterns.MODELS if n not in patterns.NEEDS_SHELLS]


def inputs():
    return [
        torch.randn(b, t, generator=torch.Generator().manual_seed(10 + i))
        for i, (b, t) in enumerate(SHAPES)
    ]


def relative_error(expected, got) -> float:
    assert expected.shape == got.shape, f"shape {tuple(got.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(got).all(), "non-finite output"
    return float((expected - got).abs().max() / expected.abs().max().clamp_min(1e-30))


def keep_sets(analysis, count=3, seed=0):
    rng = np.random.default_rng(seed)
    sets = [{g.index: [0] for g in analysis.groups}]
    for _ in range(count):
        sets.append(
            {
                g.index: sorted(
                    rng.choice(g.size, int(rng.integers(1, g.size + 1)), replace=False).tolist()
                )
                for g in analysis.groups
            }
        )
    return sets


def eager_parts(analysis) -> dict[str, str]:
    """Modules that run eagerly (shells, or opaque leaves before capture by parts)."""
    capture = getattr(analysis, "capture", None)
    return dict(capture.shells) if capture is not None else dict(analysis.traced.leaves)


def assert_prunable(name, analysis, shells_allowed=False):
    """Every parameter axis of PRUNABLE[name] is in a group with a MAC share, none frozen, and
    (unless ``shells_allowed``) every module traced."""
    fallbacks = eager_parts(analysis)
    assert shells_allowed or not fallbacks, f"{name}: parts not traced {fallbacks}"
    problems = []
    for member in patterns.PRUNABLE[name]:
        groups = [g for g in analysis.groups if member in g.members]
        if not groups:
            problems.append(f"{member!r} is in no group")
        elif not analysis.cost.shares[groups[0].index] > 0:
            problems.append(f"{member!r}: its group has no MAC share")
        for f in analysis.channels.frozen:
            if member in f.parameters:
                problems.append(f"{member!r} frozen by {f.label}: {f.reason}")
    groups = "\n".join(g.describe() + f" {g.members}" for g in analysis.groups)
    assert not problems, f"{name}:\n" + "\n".join(problems) + f"\ngroups:\n{groups}"


def assert_exact(name, model, analysis):
    xs = inputs()
    failures = []
    with torch.no_grad():
        gated = analysis.gated()
        for x in xs:
            err = relative_error(model(x), gated(x))
            if not err <= TOL:
                failures.append(f"all kept, input {list(x.shape)}: gated != eager ({err:.3g})")
        for keep in keep_sets(analysis):
            gated, slim = analysis.gated(keep), analysis.slim(keep)
            for x in xs:
                err = relative_error(gated(x), slim(x))
                if not err <= TOL:
                    failures.append(
                        f"keep {keep}, input {list(x.shape)}: gated != slim ({err:.3g})"
                    )
    assert not failures, f"{name}:\n" + "\n".join(failures)


@pytest.mark.parametrize("name", TRACED)
def test_pattern_stays_in_the_graph_and_prunable(name):
    model = patterns.build(name)
    analysis = sepfx.analyze(model)
    assert_prunable(name, analysis)
    assert_exact(name, model, analysis)


@pytest.mark.parametrize("name", patterns.NEEDS_SHELLS)
def test_length_dependent_control_flow_fails_cleanly(name):
    """The trace raises, or falls back, or holds at every check input: never a wrong graph."""
    model = patterns.build(name)
    example = torch.randn(1, 8000, generator=torch.Generator().manual_seed(0))
    try:
        traced = trace_pass.trace(model, example)
    except TraceError:
        return
    gm = traced.graph_module
    with torch.no_grad():
        for x in inputs():
            assert relative_error(model(x), gm(x)) <= TOL, (name, traced.leaves)


@pytest.mark.parametrize("name", patterns.NEEDS_SHELLS)
def test_length_dependent_control_flow_prunable(name):
    """The module with the branch runs as an eager shell; its layers stay prunable, exactly."""
    model = patterns.build(name)
    analysis = sepfx.analyze(model)
    assert analysis.capture.shells, "a length- or batch-dependent branch cannot be one graph"
    assert_prunable(name, analysis, shells_allowed=True)
    assert_exact(name, model, analysis)


def test_report_names_the_branches_seen():
    """``if T % n: pad`` pads at the other check lengths but not at 8000: the report says so."""
    analysis = sepfx.analyze(patterns.build("if_mod"))
    notes = [n for n in analysis.report().notes if "another branch" in n]
    assert notes and all("only there [pad]" in n for n in notes), analysis.report().notes


def test_in_place_overlap_add_is_not_dropped():
    """``result.index_add_(...)`` whose value is unused survives dead-code elimination: the
    graph computes what the model computes, not zeros."""
    model = patterns.build("overlap_add")
    example = torch.randn(1, 8000, generator=torch.Generator().manual_seed(0))
    gm = trace_pass.trace(model, example).graph_module
    assert any(n.target == "index_add_" for n in gm.graph.nodes), gm.code
    with torch.no_grad():
        assert relative_error(model(example), gm(example)) <= TOL


def test_sliced_size_unpacks():
    """``channels, frames = x.size()[-2:]`` is read as two sizes (it used to crash the analysis):
    ``channels`` the channel axis, ``frames`` a dynamic size."""
    analysis = sepfx.analyze(patterns.build("rank_constants"))
    channels = analysis.channels
    sliced = [
        n
        for n in channels.graph_module.graph.nodes
        if n.target is operator.getitem
        and isinstance(n.args[1], slice)
        and isinstance(channels.size_reads.get(n.name), dict)
    ]
    assert sliced, channels.graph_module.code
    unpacked = [channels.size_reads.get(u.name) for u in sliced[0].users]
    assert len(unpacked) == 2 and unpacked[1] is None, unpacked
    assert channels.axes[unpacked[0]].size == patterns.C


def test_literal_channel_count_of_a_factory_is_rewritten():
    """``torch.zeros(B, self.channels, 4)``, ``torch.ones(1, C, 1)``: the slim graph holds the
    kept count where the literal was."""
    analysis = sepfx.analyze(patterns.build("literal_channels"))
    keep = analysis.keep_ratio(0.5, importance="first")
    slim = analysis.slim(keep)
    literals = [n.args for n in slim.graph.nodes if n.target in (torch.zeros, torch.ones)]
    assert literals and all(8 in args and 16 not in args for args in literals), literals


def test_functional_conv_groups_rewritten():
    """A depthwise ``F.conv1d(..., groups=C)`` on a parameter: the slim graph's ``groups`` is
    the kept count and the parameter is sliced."""
    analysis = sepfx.analyze(patterns.build("functional_conv"))
    keep = analysis.keep_ratio(0.5, importance="first")
    slim = analysis.slim(keep)
    shapes = {k: tuple(v.shape) for k, v in slim.named_parameters()}
    assert shapes["filters"][0] == 8 and shapes["depthwise"][0] == 8, shapes
    groups = [
        n.kwargs.get("groups")
        for n in slim.graph.nodes
        if n.target is torch.nn.functional.conv1d and n.kwargs.get("groups", 1) != 1
    ]
    assert 8 in groups, groups


def test_glue_reading_a_channel_count_freezes_that_group_only():
    """Pruning the group behind ``self.width`` breaks the eager glue (sepfx cannot rewrite an
    attribute): the analysis finds it by bisection and freezes that group, with the reason;
    the other group stays prunable, and compile meets the budget with it, exactly."""
    torch.manual_seed(1)
    model = patterns.AttributeWidth().eval()
    example = torch.randn(1, 800)
    analysis = sepfx.analyze(model, example)
    assert not [g for g in analysis.groups if "mid out" in g.members]
    frozen = [f for f in analysis.channels.frozen if "mid out" in f.parameters]
    assert frozen and all("eager code reads its channel count" in f.reason for f in frozen)
    assert [g for g in analysis.groups if "enc out" in g.members]
    slim = sepfx.compile(model, budget=0.6, example_input=example, multiple=1)
    assert slim.sepfx_report.macs_ratio <= 0.6
    with torch.no_grad():
        for x in inputs():
            assert slim(x).shape == model(x).shape


def test_an_lstm_given_a_packed_sequence_is_frozen_and_its_macs_counted():
    """FlopCounterMode sees nothing inside ``torch.lstm``: its closed form is counted, so the
    budget is a fraction of MACs that include the LSTM's."""
    model = patterns.build("packed_lstm")
    analysis = sepfx.analyze(model)
    frames = 8000 // 8 - 1  # the encoder's output length at the reference input [1, 8000]
    lstm = frames * sum(p.numel() for p in model.lstm.parameters() if p.dim() == 2)
    report = sepfx.prune(model, analysis.keep_all()).sepfx_report
    assert report.dense_macs >= lstm
    assert "lstm" in report.shells and "PackedSequence" in report.shells["lstm"]
