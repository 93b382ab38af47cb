"""Regression tests for the defects the random-architecture soak found (issue 11,
``tests/random_models.py``, ``benchmarks/soak.py``): each test holds the minimised model, written
out by hand, and asserts what sepfx should do. A test of a defect still open is marked
``xfail(strict=True)`` (a fix turns it into an XPASS error, and the mark is removed then): of
the six found so far, 1-5 are fixed and 6 (the ONNX export of a length branch) is open."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sepfx
from conftest import max_relative_error, random_keep, wav
from sepfx.errors import KeepSetError

torch.set_num_threads(1)


def _close(expected: torch.Tensor, got: torch.Tensor, tol: float = 1e-5) -> float:
    error = max_relative_error(expected, got)
    assert error <= tol, error
    return error


def _one_per_group(analysis) -> dict[int, list[int]]:
    """Keep the last unit of every group (at least its min_size units)."""
    return {g.index: list(range(g.size - max(1, g.min_size), g.size)) for g in analysis.groups}


def _assert_gated_equals_slim(analysis, keep, inputs):
    gated, slim = analysis.gated(keep), analysis.slim(keep)
    with torch.no_grad():
        for x in inputs:
            _close(gated(x), slim(x))


def _pad_to_even(wav: torch.Tensor) -> torch.Tensor:
    """Python control flow on the input's length: the caller becomes an eager shell (sepfx's
    check inputs take both sides of the branch)."""
    if wav.shape[-1] % 2:
        wav = F.pad(wav, (0, 1))
    return wav


# --------------------------------------------------------------------------------------------
# 1. a branch on the length, taken the same way at every check input, is baked into the trace
# --------------------------------------------------------------------------------------------


class PadToMultiple(nn.Module):
    """The encoding padded to a multiple of 4 frames only when it is not one, a strided conv,
    then back to the encoder's rate (a U-Net's down/up path)."""

    def __init__(self):
        super().__init__()
        self.encoder = nn.Conv1d(1, 6, 8, stride=4, bias=False)
        self.down = nn.Conv1d(6, 6, 4, stride=4)
        self.decoder = nn.ConvTranspose1d(6, 1, 8, stride=4, bias=False)

    def forward(self, wav):
        e = self.encoder(wav.unsqueeze(1))
        padded = e
        rest = e.shape[-1] % 4
        if rest:
            padded = F.pad(e, (0, 4 - rest))
        d = F.interpolate(self.down(padded), size=e.shape[-1])
        return self.decoder(d)


def test_length_branch_is_not_baked_into_the_trace():
    torch.manual_seed(0)
    model = PadToMultiple().eval()
    analysis = sepfx.analyze(model, wav(1, 299))  # 73 frames: padded by 3
    gated = analysis.gated(analysis.keep_all())
    with torch.no_grad():
        for length in (299, 301, 454):  # 73, 74 and 112 frames: 112 is a multiple of 4
            x = wav(2, length, seed=length)
            _close(model(x), gated(x))


# --------------------------------------------------------------------------------------------
# 2. an eager shell passing one tensor to two arguments of a part (attention's key and value)
# --------------------------------------------------------------------------------------------


class ShellAttention(nn.Module):
    def __init__(self, cross: bool):
        super().__init__()
        self.cross = cross
        self.encoder = nn.Conv1d(1, 4, 16, stride=8, bias=False)
        self.attention = nn.MultiheadAttention(4, 1, batch_first=True)
        self.decoder = nn.ConvTranspose1d(4, 1, 16, stride=8, bias=False)

    def forward(self, wav):
        e = self.encoder(_pad_to_even(wav).unsqueeze(1))
        q = e.transpose(1, 2)
        kv = torch.tanh(q) if self.cross else q
        y, _ = self.attention(q, kv, kv, need_weights=False)
        return self.decoder(y.transpose(1, 2))


@pytest.mark.parametrize("cross", [False, True], ids=["self", "cross"])
def test_shell_passing_one_tensor_twice_to_a_part(cross):
    """Was: passes.capture.site_graph named a part's placeholders after the analysis values
    they receive, so one value given to two arguments (attention's key and value) made two
    placeholders of one name and the gated and slim parts failed to compile (SyntaxError:
    duplicate argument). Fixed in 024bde9."""
    torch.manual_seed(0)
    model = ShellAttention(cross).eval()
    analysis = sepfx.analyze(model, wav(1, 400))
    assert not analysis.capture.traced_whole
    inputs = [wav(1, 400), wav(2, 401, seed=2)]
    gated = analysis.gated(analysis.keep_all())
    with torch.no_grad():
        for x in inputs:
            _close(model(x), gated(x))
    _assert_gated_equals_slim(analysis, _one_per_group(analysis), inputs)


# --------------------------------------------------------------------------------------------
# 3. a literal one-channel slice: a valid keep set gives a slim model that does not run
# --------------------------------------------------------------------------------------------


class OneChannelSlice(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Conv1d(1, 4, 16, stride=8, bias=False)
        self.conv = nn.Conv1d(4, 6, 3, padding=1)
        self.decoder = nn.ConvTranspose1d(1, 1, 16, stride=8)

    def forward(self, wav):
        e = self.conv(self.encoder(wav.unsqueeze(1)))
        return self.decoder(e[:, 2:3])  # a two-channel slice [:, 2:4] is fine


def test_one_channel_slice_keeps_its_channel():
    torch.manual_seed(0)
    analysis = sepfx.analyze(OneChannelSlice().eval(), wav(1, 400))
    conv_out = next(g for g in analysis.groups if "conv out" in g.members)
    # every keep set of the groups is either refused up front, or slims exactly
    keep = {g.index: list(range(g.size)) for g in analysis.groups}
    keep[conv_out.index] = [0, 1, 3]  # not channel 2, the one the slice reads
    try:
        slim = analysis.slim(keep)
    except KeepSetError:
        return
    gated = analysis.gated(keep)
    with torch.no_grad():
        for x in (wav(1, 400), wav(2, 537, seed=2)):
            _close(gated(x), slim(x))
    del slim


# --------------------------------------------------------------------------------------------
# 4. literal channel sizes in an eager shell's own code: pruned, not frozen
# --------------------------------------------------------------------------------------------


class ShellMaskView(nn.Module):
    """A mask per source on the encoding, viewed [B, 2, 4, T] with the literal channel count
    (as Conv-TasNet's masker does), in a forward that cannot be traced."""

    def __init__(self):
        super().__init__()
        self.encoder = nn.Conv1d(1, 4, 16, stride=8, bias=False)
        self.mask = nn.Conv1d(4, 8, 1)
        self.decoder = nn.ConvTranspose1d(4, 1, 16, stride=8, bias=False)

    def forward(self, wav):
        e = self.encoder(_pad_to_even(wav).unsqueeze(1))
        m = torch.sigmoid(self.mask(e)).view(e.shape[0], 2, 4, -1)
        y = self.decoder((e.unsqueeze(1) * m).view(-1, 4, e.shape[-1]))
        return y.view(e.shape[0], 2, -1)


class ShellSlice(nn.Module):
    """A literal channel slice in a forward that cannot be traced."""

    def __init__(self):
        super().__init__()
        self.encoder = nn.Conv1d(1, 4, 8, stride=4, bias=False)
        self.linear = nn.Linear(4, 16, bias=False)
        self.conv = nn.Conv1d(13, 1, 3, padding=1)
        self.decoder = nn.ConvTranspose1d(1, 1, 8, stride=4, bias=False)

    def forward(self, wav):
        e = self.encoder(_pad_to_even(wav).unsqueeze(1))
        h = self.linear(e.transpose(1, 2)).transpose(1, 2)
        return self.decoder(self.conv(h[:, 0:13]))


class ShellSliceMean(nn.Module):
    """A literal channel slice averaged in a forward that cannot be traced: the slim model
    runs, and computes something else (the slice reads other channels, or none: NaN)."""

    def __init__(self):
        super().__init__()
        self.encoder = nn.Conv1d(1, 4, 8, stride=4, bias=False)
        self.linear = nn.Linear(4, 16, bias=False)
        self.decoder = nn.ConvTranspose1d(4, 1, 8, stride=4, bias=False)

    def forward(self, wav):
        e = self.encoder(_pad_to_even(wav).unsqueeze(1))
        h = self.linear(e.transpose(1, 2)).transpose(1, 2)
        return self.decoder(e + h[:, 10:15].mean(dim=(1, 2), keepdim=True))


class ShellSplit(nn.Module):
    """Literal split sizes in a forward that cannot be traced."""

    def __init__(self):
        super().__init__()
        self.encoder = nn.Conv1d(1, 4, 8, stride=4, bias=False)
        self.conv = nn.Conv1d(4, 12, 1, bias=False)
        self.decoder = nn.ConvTranspose1d(10, 1, 8, stride=4, bias=False)

    def forward(self, wav):
        e = self.encoder(_pad_to_even(wav).unsqueeze(1))
        wide, narrow = self.conv(e).split([10, 2], dim=1)
        return self.decoder(wide * narrow.mean(dim=1, keepdim=True))


class ShellFold(nn.Module):
    """The channels folded into the batch with a literal size, a layer per channel, unfolded."""

    def __init__(self):
        super().__init__()
        self.encoder = nn.Conv1d(1, 4, 8, stride=4, bias=False)
        self.per_channel = nn.Conv1d(1, 1, 3, padding=1)
        self.decoder = nn.ConvTranspose1d(4, 1, 8, stride=4, bias=False)

    def forward(self, wav):
        e = self.encoder(_pad_to_even(wav).unsqueeze(1))
        batch = e.shape[0]
        folded = self.per_channel(e.reshape(batch * 4, 1, -1))
        return self.decoder(folded.reshape(batch, 4, -1))


class ShellChunk(nn.Module):
    """Four chunks of a concatenation, unpacked, in a forward that cannot be traced (a chunk
    boundary falls inside the attention's output)."""

    def __init__(self):
        super().__init__()
        self.encoder = nn.Conv1d(1, 4, 16, stride=8, bias=False)
        self.keys = nn.Conv1d(4, 2, 2, stride=2)
        self.conv = nn.Conv1d(4, 4, 3, padding=1, bias=False)
        self.attention = nn.MultiheadAttention(4, 1, batch_first=True, kdim=2, vdim=2)
        self.decoder = nn.ConvTranspose1d(3, 1, 16, stride=8, bias=False)

    def forward(self, wav):
        e = self.encoder(_pad_to_even(wav).unsqueeze(1))
        h = self.conv(e)
        kv = self.keys(e).transpose(1, 2)
        a, _ = self.attention(h.transpose(1, 2), kv, kv, need_weights=False)
        first, _, _, _ = torch.cat([h, a.transpose(1, 2), h], dim=1).chunk(4, dim=1)
        return self.decoder(first)


@pytest.mark.parametrize(
    "model_class",
    [ShellMaskView, ShellSlice, ShellSliceMean, ShellSplit, ShellFold, ShellChunk],
    ids=["view", "slice", "slice_mean", "split", "reshape", "chunk"],
)
def test_shell_literal_channel_sizes_are_frozen(model_class):
    torch.manual_seed(0)
    analysis = sepfx.analyze(model_class().eval(), wav(1, 400))
    assert not analysis.capture.traced_whole
    inputs = [wav(1, 400), wav(2, 401)]
    _assert_gated_equals_slim(analysis, _one_per_group(analysis), inputs)
    for seed in range(10):
        keep = random_keep(analysis, np.random.default_rng(seed))
        _assert_gated_equals_slim(analysis, keep, inputs)


# --------------------------------------------------------------------------------------------
# 5. an eager shell handing a chunk to a traced part: the slim pass crashes
# --------------------------------------------------------------------------------------------


class GlobalLayerNorm(nn.Module):
    """gLN as Conv-TasNet writes it (traced as a part of its own inside the shell)."""

    def __init__(self, channels, eps=1e-8):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(1, channels, 1))
        self.beta = nn.Parameter(torch.zeros(1, channels, 1))
        self.eps = eps

    def forward(self, x):
        mean = x.mean(dim=(1, 2), keepdim=True)
        var = ((x - mean) ** 2).mean(dim=(1, 2), keepdim=True)
        return self.gamma * (x - mean) / torch.sqrt(var + self.eps) + self.beta


class ShellChunkNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Conv1d(1, 4, 8, stride=4, bias=False)
        self.norm = GlobalLayerNorm(2)
        self.decoder = nn.ConvTranspose1d(2, 1, 8, stride=4, bias=False)

    def forward(self, wav):
        e = self.encoder(_pad_to_even(wav).unsqueeze(1))
        first, second = e.chunk(2, dim=1)
        return self.decoder(self.norm(second))


def test_shell_chunk_into_a_traced_part_slims():
    torch.manual_seed(0)
    analysis = sepfx.analyze(ShellChunkNorm().eval(), wav(1, 400))
    assert not analysis.capture.traced_whole
    _assert_gated_equals_slim(analysis, _one_per_group(analysis), [wav(1, 400), wav(2, 401)])


# --------------------------------------------------------------------------------------------
# 6. the same length-derived branch in an eager shell is baked into the ONNX export
# --------------------------------------------------------------------------------------------


def test_export_of_a_length_branch_holds_at_every_length(tmp_path):
    import onnxruntime as ort

    torch.manual_seed(0)
    model = PadToMultiple().eval()  # an eager shell since the fix of test 1
    slim = sepfx.prune(model, ratio=0.5, example_input=wav(1, 367))  # 90 frames: padded by 2
    result = sepfx.export_onnx(slim, tmp_path / "slim.onnx")
    if not result.dynamic_time:
        return  # exported at the fixed length, and the result says so: fine
    session = ort.InferenceSession(str(tmp_path / "slim.onnx"), providers=["CPUExecutionProvider"])
    for length in (367, 454, 741):  # 90, 112 and 184 frames: 112 and 184 are multiples of 4
        x = wav(1, length, seed=length)
        with torch.no_grad():
            expected = slim(x)
        got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
        assert max_relative_error(expected, torch.from_numpy(got)) <= 1e-4, length
