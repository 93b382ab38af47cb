"""No pass mutates its inputs (issue 12): the channel analysis, the cost model, gate insertion,
the slim rewrite and the export each leave what they were given as it was, on a traced zoo model
and on a model captured with an eager shell."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import sepfx
from passes.channels import analyze_channels
from passes.cost import cost_model
from passes.gates import gated_model
from passes.slim import slim_model
from tests.conftest import build_seeded
from tests.wild import patterns


def _state(module: torch.nn.Module) -> dict:
    """What a pass must not change in a module: code, parameters and buffers, modes, classes."""
    return {
        "code": module.code if isinstance(module, torch.fx.GraphModule) else None,
        "tensors": {k: v.detach().clone() for k, v in module.state_dict().items()},
        "modes": {name: m.training for name, m in module.named_modules()},
        "classes": {name: type(m) for name, m in module.named_modules()},
    }


def _same(before: dict, after: dict) -> bool:
    return (
        before["code"] == after["code"]
        and before["modes"] == after["modes"]
        and before["classes"] == after["classes"]
        and before["tensors"].keys() == after["tensors"].keys()
        and all(torch.equal(before["tensors"][k], after["tensors"][k]) for k in before["tensors"])
    )


def _groups(analysis) -> list[dict]:
    """Every attribute of every channel group (arrays as bytes)."""
    return [
        {
            k: {a: p.tobytes() for a, p in v.items()} if k == "positions" else copy.deepcopy(v)
            for k, v in vars(g).items()
        }
        for g in analysis.groups
    ]


def _meta_keys(gm: torch.fx.GraphModule) -> dict[str, tuple]:
    return {n.name: tuple(sorted(n.meta)) for n in gm.graph.nodes}


@pytest.fixture(scope="module", params=["conv_tasnet", "shell"])
def captured(request):
    if request.param == "shell":
        model = patterns.build("if_mod")
    else:
        model = build_seeded(request.param)
    return sepfx.analyze(model, torch.randn(1, 8000, generator=torch.Generator().manual_seed(0)))


def test_channel_analysis_and_cost_model_leave_their_inputs(captured):
    gm = captured.capture.graph_module
    before, meta = _state(gm), _meta_keys(gm)
    channels = analyze_channels(
        gm, captured.example_input, summarised=not captured.capture.traced_whole
    )
    groups = _groups(channels)
    cost_model(channels)
    assert _same(before, _state(gm))
    assert _meta_keys(gm) == meta, "a pass left node.meta keys behind"
    assert _groups(channels) == groups, "the cost model changed the channel groups"


def test_gate_insertion_and_slim_leave_the_capture(captured):
    root, gm = captured.capture.root, captured.capture.graph_module
    before_root, before_gm = _state(root), _state(gm)
    rng = np.random.default_rng(0)
    keep = {
        g.index: np.sort(rng.choice(g.size, max(1, g.size // 2), replace=False))
        for g in captured.groups
    }
    gated_model(captured.capture, captured.channels, captured.channels.keep_vector(keep))(
        captured.example_input
    )
    slim_model(captured.capture, captured.channels, keep)(captured.example_input)
    assert _same(before_root, _state(root))
    assert _same(before_gm, _state(gm))


def test_export_leaves_the_model_in_its_mode_and_state(captured, tmp_path):
    keep = {g.index: list(range(max(1, g.size // 2))) for g in captured.groups}
    slim = captured.slim(keep)
    slim.train()  # a model being fine-tuned: export must not switch it to eval
    before = _state(slim)
    attributes = {k: v for k, v in vars(slim).items() if k.startswith("sepfx_")}
    sepfx.export_onnx(slim, tmp_path / "slim.onnx")
    assert slim.training
    assert _same(before, _state(slim))
    assert {
        k: v for k, v in vars(slim).items() if k.startswith("sepfx_")
    }.keys() == attributes.keys()


def test_report_of_a_keep_set_does_not_change_the_analysis(captured):
    groups, frozen = _groups(captured), copy.deepcopy(captured.channels.frozen)
    keep = {g.index: [0] for g in captured.groups}
    captured.report(keep)
    captured.slim(keep)
    assert _groups(captured) == groups
    assert captured.channels.frozen == frozen
