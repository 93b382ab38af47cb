"""A dual-path separator whose overlap-add reads its chunk size from the tensor it folds
(``B, N, K, S = x.shape``, then ``F.fold(..., kernel_size=(K, 1), stride=(K // 2, 1))``), as
the chunking helpers of one published toolkit write it: the fold's kernel size is a traced
value. Its export crashed with ``TypeError: unsupported operand type(s) for //: 'int' and
'Node'`` in the fold lowering, and its channels were frozen ("channels folded with kernel
positions sepfx cannot follow"). It must compile exactly at budget 0.4 with its channels
prunable, and export with a dynamic batch and length."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import fx

import sepfx
from passes import export as export_pass
from passes import runtime

BUDGET = 0.4
TOL = 1e-5
ONNX_TOL = 1e-4
SHAPES = [(b, t) for t in (8000, 12345, 16001) for b in (1, 2)]


def split_feature(x, segment_size):
    """[B, N, T] -> [B, N, K, S]: half-overlapping chunks of K frames."""
    batch, dim, _ = x.shape
    stride = segment_size // 2
    chunks = F.unfold(
        x.unsqueeze(-1),
        kernel_size=(segment_size, 1),
        padding=(segment_size, 0),
        stride=(stride, 1),
    )
    return chunks.reshape(batch, dim, segment_size, chunks.shape[-1])


def merge_feature(x, length):
    """[B, N, K, S] -> [B, N, length]: overlap-add of the chunks, K read from the tensor."""
    batch, dim, segment_size, n_chunks = x.shape
    stride = segment_size // 2
    x = x.reshape(batch, dim * segment_size, n_chunks)
    x = F.fold(
        x,
        output_size=(length, 1),
        kernel_size=(segment_size, 1),
        padding=(segment_size, 0),
        stride=(stride, 1),
    )
    return x.squeeze(-1)


class DualPathBlock(nn.Module):
    """An intra-chunk BLSTM and an inter-chunk linear layer, each with a residual."""

    def __init__(self, channels, hidden):
        super().__init__()
        self.intra = nn.LSTM(channels, hidden, batch_first=True, bidirectional=True)
        self.intra_proj = nn.Linear(2 * hidden, channels)
        self.inter = nn.Linear(channels, channels)
        self.norm = nn.GroupNorm(1, channels)

    def forward(self, x):  # [B, N, K, S]
        batch, dim, chunk, n_chunks = x.shape
        rows = x.permute(0, 3, 2, 1).reshape(batch * n_chunks, chunk, dim)
        rows = self.intra_proj(self.intra(rows)[0])
        x = x + rows.reshape(batch, n_chunks, chunk, dim).permute(0, 3, 2, 1)
        x = x + torch.relu(self.inter(x.permute(0, 2, 3, 1))).permute(0, 3, 1, 2)
        return self.norm(x)


class FoldSeparator(nn.Module):
    """encoder -> bottleneck -> dual-path blocks on chunks -> masks for two speakers -> decoder;
    the overlap-add reads the chunk size back from the chunks."""

    sample_rate = 8000
    n_src = 2
    merge = staticmethod(merge_feature)

    def __init__(self, basis=32, channels=16, hidden=8, chunk_size=24):
        super().__init__()
        self.chunk_size = chunk_size
        self.encoder = nn.Conv1d(1, basis, 16, stride=8, bias=False)
        self.bottleneck = nn.Conv1d(basis, channels, 1)
        self.blocks = nn.ModuleList([DualPathBlock(channels, hidden) for _ in range(2)])
        self.mask = nn.Conv1d(channels, self.n_src * basis, 1)
        self.decoder = nn.ConvTranspose1d(basis, 1, 16, stride=8, bias=False)

    def forward(self, wav):  # [B, T]
        w = torch.relu(self.encoder(wav.unsqueeze(1)))
        x = self.bottleneck(w)
        frames = x.shape[-1]
        chunks = split_feature(x, self.chunk_size)
        for block in self.blocks:
            chunks = block(chunks)
        x = self.merge(chunks, frames)
        masks = torch.sigmoid(self.mask(torch.relu(x)))
        masks = masks.reshape(x.shape[0], self.n_src, -1, frames)
        sources = self.decoder((masks * w.unsqueeze(1)).flatten(0, 1))
        return sources.reshape(wav.shape[0], self.n_src, -1)[..., : wav.shape[-1]]


def build(seed: int = 0) -> FoldSeparator:
    torch.manual_seed(seed)
    return FoldSeparator().eval()


def inputs():
    return [
        torch.randn(b, t, generator=torch.Generator().manual_seed(20 + i))
        for i, (b, t) in enumerate(SHAPES)
    ]


def relative_error(expected, got) -> float:
    assert expected.shape == got.shape, f"shape {tuple(got.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(got).all(), "non-finite output"
    return float((expected - got).abs().max() / expected.abs().max().clamp_min(1e-30))


@pytest.fixture(scope="module")
def analysis():
    return sepfx.analyze(build())


@pytest.fixture(scope="module")
def compiled():
    return sepfx.compile(build(), BUDGET)


def test_fold_kernel_is_a_traced_value(analysis):
    """The premise: the fold's kernel size is a graph node, not a literal."""
    folds = [n for n in analysis.capture.graph_module.graph.nodes if n.target is F.fold]
    assert folds, "the model has no F.fold node"
    kernel = folds[0].kwargs.get(
        "kernel_size", folds[0].args[2] if len(folds[0].args) > 2 else None
    )
    assert isinstance(kernel[0], fx.Node), kernel


def test_channels_through_the_fold_are_prunable(analysis):
    report = analysis.report()
    assert report.prunable_macs_share >= 0.85, (
        f"{report.prunable_macs_share:.3f} prunable\n{report}"
    )
    frozen = [f for f in analysis.channels.frozen if f.parameters]
    assert not frozen, [(f.label, f.reason, f.parameters) for f in frozen]


def test_gated_equals_slim(analysis):
    rng = np.random.default_rng(3)
    keep_sets = [{g.index: [0] for g in analysis.groups}]
    for _ in range(3):
        keep_sets.append(
            {
                g.index: sorted(rng.choice(g.size, int(rng.integers(1, g.size + 1)), False))
                for g in analysis.groups
            }
        )
    model = build()
    failures = []
    with torch.no_grad():
        gated = analysis.gated()
        for x in inputs():
            err = relative_error(model(x), gated(x))
            if not err <= TOL:
                failures.append(f"all kept, {list(x.shape)}: gated != eager ({err:.3g})")
        for keep in keep_sets:
            gated, slim = analysis.gated(keep), analysis.slim(keep)
            for x in inputs():
                err = relative_error(gated(x), slim(x))
                if not err <= TOL:
                    failures.append(f"{list(x.shape)}: gated != slim ({err:.3g})")
    assert not failures, "\n".join(failures)


def test_compile_meets_budget(compiled):
    report = compiled.sepfx_report
    assert BUDGET - 0.02 <= report.macs_ratio <= BUDGET, f"{report.macs_ratio:.4f}\n{report}"


def test_export_with_dynamic_batch_and_length(compiled, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    path = tmp_path / "fold.onnx"
    result = sepfx.export_onnx(compiled, path)
    assert result.dynamic_time and result.dynamic_batch, result.notes
    # the fast exporter works: the kernel size, fixed at every input, is a constant there
    assert result.exporter == "torchscript", result
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for x in inputs():
        with torch.no_grad():
            expected = compiled(x)
        got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
        err = relative_error(expected, got)
        assert err <= ONNX_TOL, f"ONNX Runtime differs at {list(x.shape)}: {err:.3g}"


def test_fold_with_a_traced_kernel_lowers_without_node_metadata():
    """A GraphModule sepfx did not make (no recorded values): the kernel size stays a node, and
    the lowering computes the channel count in the graph, from the input's size."""

    class Merge(nn.Module):
        def forward(self, x):  # [B, N, K, S]
            return merge_feature(x, 40)

    graph = fx.symbolic_trace(Merge())
    x = torch.randn(2, 3, 8, 13)
    lowered, failures = export_pass._lower(graph, x)
    assert not failures, failures
    targets = [n.target for n in lowered.graph.nodes]
    assert runtime.fold_1d in targets and F.fold not in targets, lowered.code
    torch.testing.assert_close(lowered(x), graph(x))
    # and at another chunk size, which a constant channel count would get wrong
    y = torch.randn(1, 3, 6, 16)
    torch.testing.assert_close(lowered(y), graph(y))


def merge_feature_last_axis(x, length):
    """[B, N, K, S] -> [B, N, length] as another toolkit's dual-path transformer writes it:
    windows along the fold's second axis (kernel ``(1, K)``, output ``(1, length)``), divided
    by the fold of ones (how many windows cover each frame)."""
    batch, dim, segment_size, n_chunks = x.shape
    seq = x.reshape(batch, dim * segment_size, n_chunks)
    options = dict(
        output_size=(1, length),
        kernel_size=(1, segment_size),
        padding=(0, segment_size),
        stride=(1, segment_size // 2),
    )
    x = F.fold(seq, **options)
    x /= F.fold(torch.ones_like(seq), **options)
    return x.reshape(batch, dim, length)


class FoldLastAxisSeparator(FoldSeparator):
    merge = staticmethod(merge_feature_last_axis)


def test_fold_along_the_second_axis_exports_with_dynamic_length(tmp_path):
    """Col2Im is not in opset 17 and cannot keep a dynamic length: a fold whose windows run
    along its second axis is lowered too, and ONNX Runtime agrees at every length."""
    ort = pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model = FoldLastAxisSeparator().eval()
    slim = sepfx.compile(model, BUDGET, progress=False)
    assert slim.sepfx_report.prunable_macs_share >= 0.85
    path = tmp_path / "fold.onnx"
    result = sepfx.export_onnx(slim, path)
    assert result.dynamic_time and result.dynamic_batch, result.notes
    onnx = pytest.importorskip("onnx")
    ops = {node.op_type for node in onnx.load(str(path)).graph.node}
    assert result.exporter == "torchscript" and "Col2Im" not in ops, (result.exporter, ops)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for x in inputs():
        with torch.no_grad():
            expected = slim(x)
        got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
        assert relative_error(expected, got) <= ONNX_TOL, list(x.shape)
