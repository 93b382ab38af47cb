"""A-FRCNN (sepfx.models.afrcnn): its one weight-shared block gets one gate per channel group at
all of its call sites, and the acceptance checks of issue 14 for it: data-free
``compile(budget=0.4)`` lands in [0.38, 0.40] of the dense MACs, at least 90% of the dense MACs
are prunable, ONNX Runtime matches PyTorch at several lengths with a dynamic time axis, and the
caller's model is untouched."""

from __future__ import annotations

import collections

import numpy as np
import pytest
import torch
from torch import fx

import sepfx
from sepfx.learnable_gates import LearnableGates

from conftest import build_seeded, wav

BLOCK = "separator.block."


@pytest.fixture(scope="module")
def entry(zoo):
    return zoo("afrcnn")


def _groups_of(analysis, units: np.ndarray) -> set[int]:
    """The groups ``units`` (flat unit indices, none 0) belong to."""
    assert units.size and (units > 0).all(), units
    return {
        g.index
        for g in analysis.groups
        for u in units.tolist()
        if g.offset <= u < g.offset + g.size
    }


def _group_of(analysis, units: np.ndarray) -> int:
    """The one group every one of ``units`` belongs to."""
    owners = _groups_of(analysis, units)
    assert len(owners) == 1, owners
    return owners.pop()


def test_shared_block_has_one_gate_per_group_at_every_call_site(entry):
    model, analysis = entry.model, entry.analysis
    channels = analysis.channels
    iters = model.separator.iters
    assert iters >= 3
    # the block is one set of modules, called once per iteration in the captured graph
    calls = collections.defaultdict(list)
    for node in channels.graph_module.graph.nodes:
        if node.op == "call_module" and str(node.target).startswith(BLOCK):
            calls[node.target].append(node)
    block_convs = [
        q
        for q, m in model.named_modules()
        if q.startswith(BLOCK) and isinstance(m, torch.nn.Conv1d)
    ]
    assert block_convs and set(block_convs) <= set(calls)
    assert all(len(sites) == iters for sites in calls.values()), {
        target: len(sites) for target, sites in calls.items()
    }

    # the learnable gates: one logit per unit of each group, not one per call site
    sizes = [g.size for g in analysis.groups]
    assert channels.num_units == 1 + sum(sizes)
    bank = LearnableGates(channels, generator=torch.Generator().manual_seed(0))
    assert bank.alpha.numel() == 1 + sum(sizes)
    # every group but the encoder's (shared with the masks and the decoder) has channels in
    # the block: the residual stream (block input and output), the hidden channels of the
    # bottom-up path, the four lateral fusions and the top-down fusion
    block_groups = set().union(
        *(
            _groups_of(channels, channels.axis_units(key))
            for qualname in block_convs
            for key in channels.module_axes[qualname].values()
            if channels.axis_units(key).any()
        )
    )
    assert len(block_groups) == len(analysis.groups) - 1

    gated = analysis.gated(analysis.keep_all(), bank=bank)
    assert isinstance(gated, fx.GraphModule)  # A-FRCNN traces whole
    nodes = list(gated.graph.nodes)
    # one gate bank, called once; each gated axis reads its units from it once
    assert sum(1 for n in nodes if n.op == "call_module" and n.target == "sepfx_gates") == 1
    index_targets = [
        n.target
        for n in nodes
        if n.op == "get_attr" and str(n.target).startswith("sepfx_gates.axis")
    ]
    assert len(index_targets) == len(set(index_targets))
    # every gate applied to the output of a block module, at every call site
    indices = {
        f"sepfx_gates.{name}": getattr(bank, name).numpy() for name in bank.axis_names.values()
    }
    masks_of = collections.defaultdict(list)  # block module -> the units gating each site
    for node in nodes:
        if node.op != "call_function" or getattr(node.target, "__name__", "") != "apply_gate":
            continue
        value, mask = node.args[0], node.args[1]
        while value.op == "call_function" and value.target is node.target:  # gated twice
            value = value.args[0]
        if value.op == "call_module" and str(value.target).startswith(BLOCK):
            index = mask.args[1]  # getitem(flat gates, index buffer)
            masks_of[value.target].append(tuple(indices[index.target].tolist()))
    assert set(block_convs) <= set(masks_of)
    for target, masks in masks_of.items():
        assert len(masks) == iters, (target, len(masks))
        assert len(set(masks)) == 1, f"{target}: its call sites are gated by different units"
    # distinct gate masks on the block's module outputs: one per block group, although the
    # block runs ``iters`` times
    distinct = {masks[0] for masks in masks_of.values()}
    assert len(distinct) == len(block_groups)
    assert {_group_of(channels, np.array(m)) for m in distinct} == block_groups
    for m in distinct:  # each is its group, whole and in order
        group = analysis.groups[_group_of(channels, np.array(m))]
        assert m == tuple(range(group.offset, group.offset + group.size))

    # across the whole gated graph, every index is made of whole groups: splitting each into
    # its groups' runs gives exactly one run per group
    runs = set()
    for units in indices.values():
        for group in _groups_of(channels, units):
            g = analysis.groups[group]
            mine = units[(units >= g.offset) & (units < g.offset + g.size)]
            size = g.size
            assert mine.size % size == 0
            for start in range(0, mine.size, size):
                runs.add(tuple(mine[start : start + size].tolist()))
    assert len(runs) == len(analysis.groups)


def test_compile_meets_the_budget_data_free_and_exports(entry, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    model = build_seeded("afrcnn")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    slim = sepfx.compile(model, budget=0.4, progress=False)
    # the caller's model is untouched
    assert model.training is False
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    report = slim.sepfx_report
    print(f"\nafrcnn tiny: {report}")
    assert 0.38 <= report.macs_ratio <= 0.40, report.macs_ratio
    assert report.prunable_macs_share >= 0.90, report.prunable_macs_share
    assert entry.analysis.cost.dense_macs > 0

    path = tmp_path / "afrcnn.onnx"
    result = sepfx.export_onnx(slim, path)
    assert result.dynamic_time, result.notes
    assert result.errors and all(e <= 1e-4 for e in result.errors.values()), result.errors
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    slim.eval()
    for length in (8000, 12345, 16001):
        x = wav(2, length, seed=length)
        with torch.no_grad():
            expected = slim(x).numpy()
        got = session.run(None, {input_name: x.numpy()})[0]
        assert got.shape == expected.shape == (2, 2, length)
        error = float(np.abs(expected - got).max() / np.abs(expected).max())
        print(f"  ONNX Runtime at [2, {length}]: relative error {error:.2e}")
        assert error <= 1e-4, (length, error)
