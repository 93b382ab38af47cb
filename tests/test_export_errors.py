"""Nothing but a sepfx error leaves ``export_onnx``, and an ``ExportError`` says, for each
exporter tried, the real reason it failed (not an empty string, not the dynamo exporter's
opening line "This is step 1/3")."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import sepfx
from passes import export as export_pass
from passes.rules.layout import UnfoldRule
from sepfx.errors import ExportError, describe_error

pytest.importorskip("onnxruntime")


def _slim_unfold_fold():
    from wild import patterns

    model = patterns.build("unfold_fold")
    keep_half = {g.index: list(range(0, g.size, 2)) for g in sepfx.analyze(model).groups}
    return sepfx.prune(model, keep_half)


def test_a_failing_lowering_is_named_and_the_graph_exported_as_it_is(tmp_path, monkeypatch):
    """The fold lowering raises: export goes on without it, and what it says names the rule,
    the node and the injected reason, whether or not an exporter took the unlowered graph."""
    slim = _slim_unfold_fold()

    def broken(self, node, graph_module):
        raise RuntimeError("injected lowering failure")

    monkeypatch.setattr(UnfoldRule, "lower", broken)
    try:
        result = sepfx.export_onnx(slim, tmp_path / "m.onnx")
    except ExportError as error:
        text = str(error)
    else:
        text = "\n".join(result.notes)
        assert all(e <= 1e-4 for e in result.errors.values()), result.errors
    assert "UnfoldRule at node " in text and "injected lowering failure" in text, text


class Scale(nn.Module):
    def forward(self, x):
        return 2 * x


def test_exporter_failures_without_a_message_are_described(tmp_path, monkeypatch):
    def silent(*args, **kwargs):
        raise RuntimeError()

    monkeypatch.setattr(export_pass, "_export", silent)
    with pytest.raises(ExportError) as caught:
        sepfx.export_onnx(Scale(), tmp_path / "m.onnx", torch.randn(1, 100))
    lines = str(caught.value).splitlines()
    # the first line (all the command line prints) names each exporter and its reason
    assert "torchscript: RuntimeError (with no message)" in lines[0], lines[0]
    assert "dynamo: RuntimeError (with no message)" in lines[0], lines[0]
    tries = [line.strip() for line in lines[1:]]
    assert tries and all(not t.endswith(":") for t in tries), tries
    assert {t.split(" ", 1)[0] for t in tries} == {"torchscript", "dynamo"}, tries


def test_a_failure_outside_the_exporters_is_an_export_error(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise KeyError("injected")

    monkeypatch.setattr(export_pass, "_variants", broken)
    with pytest.raises(
        ExportError, match=r"Scale failed outside the exporters: KeyError: 'injected'"
    ):
        sepfx.export_onnx(Scale(), tmp_path / "m.onnx", torch.randn(1, 100))


def test_a_model_that_fails_on_the_example_is_an_export_error(tmp_path):
    conv = nn.Conv1d(1, 4, 3)  # takes [B, 1, T], not [B, T, 1] nor [B, 1, 1, T]
    with pytest.raises(ExportError, match=r"fails on example_input of shape \[1, 1, 1, 100\]"):
        sepfx.export_onnx(conv, tmp_path / "m.onnx", torch.randn(1, 1, 1, 100))


class DataDependentBranch(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # a branch on tensor values: torch.export cannot follow it
            return 2 * x
        return -x


def test_dynamo_reason_is_its_exception_summary_not_its_preamble(tmp_path):
    with pytest.raises(Exception) as caught:
        export_pass._export(
            DataDependentBranch(),
            torch.randn(2, 100),
            str(tmp_path / "m.onnx"),
            "dynamo",
            True,
            True,
            17,
        )
    assert "This is step 1/3" in str(caught.value)  # the preamble the reason must skip
    why = describe_error(caught.value)
    assert why.startswith("GuardOnDataDependentSymNode: Could not guard on data-dependent"), why
    assert "raised by" in why and "if x.sum() > 0" in why, why
    assert "step 1/3" not in why


def test_torchscript_reason_names_the_missing_op(tmp_path):
    class Fold2d(nn.Module):
        def forward(self, x):  # a 2-D fold: no lowering, and no Col2Im before opset 18
            return torch.nn.functional.fold(x, (6, 6), kernel_size=(3, 3))

    with pytest.raises(Exception) as caught:
        export_pass._export(
            Fold2d(),
            torch.randn(2, 18, 16),
            str(tmp_path / "m.onnx"),
            "torchscript",
            True,
            False,
            17,
        )
    why = describe_error(caught.value)
    assert why.startswith("UnsupportedOperatorError: ") and "aten::col2im" in why, why
