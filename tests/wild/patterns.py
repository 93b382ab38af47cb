"""One small model per pattern of issue 10, section 2 ("keep more inside the graphs"): code seen
in published separation models, each wrapped in the same tiny encoder / inner conv / decoder
sandwich so that the channels it touches can be pruned, or not.

Every model maps ``wav[B, T]`` to ``[B, 1, T']`` (``sample_rate = 8000``). ``PRUNABLE[name]``
lists the parameter axes (as the analysis labels them) that must end up in a channel group with
a MAC share, none of them frozen. ``NEEDS_SHELLS`` are the models whose Python control flow
depends on the input's length or batch: tracing them must fail cleanly (or fall back), and
they become prunable with eager shells (capture by parts).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd import Variable

C = 16  # channels of the sandwich


class Sandwich(nn.Module):
    """encoder (Conv1d 1 -> C, stride 8) -> ``glue`` -> inner (Conv1d C -> C) -> ReLU ->
    decoder (ConvTranspose1d C -> 1). Subclasses write ``glue``."""

    sample_rate = 8000
    n_src = 1

    def __init__(self):
        super().__init__()
        self.encoder = nn.Conv1d(1, C, 16, stride=8, bias=False)
        self.inner = nn.Conv1d(C, C, 3, padding=1)
        self.decoder = nn.ConvTranspose1d(C, 1, 16, stride=8, bias=False)

    def glue(self, w):
        return w

    def forward(self, wav):
        w = torch.relu(self.encoder(wav.unsqueeze(1)))
        w = self.glue(w)
        return self.decoder(torch.relu(self.inner(w)))


# ------------------------------------------------------------------------------------------
# 1. tensor factories with shape-derived sizes
# ------------------------------------------------------------------------------------------
class ZerosVarargs(Sandwich):
    """``torch.zeros(B, N, gap)``: a zero buffer concatenated along time, sizes read from x."""

    def glue(self, w):
        B, N, L = w.shape
        gap = 4
        pad = torch.zeros(B, N, gap, dtype=w.dtype, device=w.device)
        return torch.cat([pad, w, pad], 2)[..., gap : gap + L]


class ZerosFromList(Sandwich):
    """``torch.zeros(list(x.shape[:-1]) + [pad])``."""

    def glue(self, w):
        pad = torch.zeros(list(w.shape[:-1]) + [3]).type(w.type())
        return torch.cat([w, pad], -1)[:, :, : w.shape[-1]]


class NewZeros(Sandwich):
    """``x.new_zeros(...)``: varargs, a tuple, and the whole shape."""

    def glue(self, w):
        B, N, L = w.size()
        head = w.new_zeros(B, N, 2)
        tail = w.new_zeros((w.shape[0], w.shape[1], 5))
        same = w.new_ones(w.shape)
        return torch.cat([head, w * same, tail], dim=2)[..., 2 : 2 + L]


class LegacyWrappers(Sandwich):
    """``Variable(torch.zeros(...))`` and ``.type(x.type())``, as pre-0.4 code has them."""

    def glue(self, w):
        pad = Variable(torch.zeros(w.size(0), w.size(1), 4)).type(w.type())
        also = torch.autograd.Variable(torch.ones(w.size(0), w.size(1), 1)).type(w.type())
        return torch.cat([w * also, pad], 2)[..., : w.size(2)]


class LiteralChannels(Sandwich):
    """A factory whose channel count is a literal (or a module attribute): the slim model must
    be given the kept count; and the sizes of a tuple shape concatenated with a tuple."""

    def __init__(self):
        super().__init__()
        self.channels = C

    def glue(self, w):
        pad = torch.zeros(w.shape[0], self.channels, 4)
        scale = torch.ones(1, C, 1) * 0.5
        tail = torch.full(w.shape[:2] + (2,), 0.25)
        return (torch.cat([w, pad, tail], 2) * scale + scale)[..., : w.shape[-1]]


# ------------------------------------------------------------------------------------------
# 2. the rank as a constant; unpacking a sliced size
# ------------------------------------------------------------------------------------------
class RankNorm(nn.Module):
    """A global layer norm written rank-agnostic in every way people do it."""

    def __init__(self, channels, eps=1e-8):
        super().__init__()
        self.eps = eps
        self.gamma = nn.Parameter(torch.ones(channels))
        self.beta = nn.Parameter(torch.zeros(channels))

    def forward(self, x):
        assert x.dim() == 3 and x.ndim == len(x.shape) == len(torch.tensor(x.shape))
        dims = list(range(1, len(x.shape)))
        mean = x.mean(dim=dims, keepdim=True)
        var = ((x - mean) ** 2).mean(dim=dims, keepdim=True)
        view = [1, -1] + [1] * (x.ndim - 2)
        return (x - mean) / torch.sqrt(var + self.eps) * self.gamma.view(view) + self.beta.view(
            view
        )


class RankConstants(Sandwich):
    """``len(x.shape)``, ``x.ndim``, ``x.dim()``, ``len(torch.tensor(x.shape))``,
    ``list(range(1, len(x.shape)))``; ``frames, flen = x.size()[-2:]``."""

    def __init__(self):
        super().__init__()
        self.norm = RankNorm(C)

    def glue(self, w):
        channels, frames = w.size()[-2:]
        w = w.reshape(-1, channels, frames)
        return self.norm(w)


# ------------------------------------------------------------------------------------------
# 4. in-place ops
# ------------------------------------------------------------------------------------------
def overlap_and_add(signal, frame_step):
    """Conv-TasNet's overlap-add, as published: [..., frames, frame_length] -> [..., T]."""
    outer_dimensions = signal.size()[:-2]
    frames, frame_length = signal.size()[-2:]
    subframe_length = math.gcd(frame_length, frame_step)
    subframe_step = frame_step // subframe_length
    subframes_per_frame = frame_length // subframe_length
    output_size = frame_step * (frames - 1) + frame_length
    output_subframes = output_size // subframe_length
    subframe_signal = signal.view(*outer_dimensions, -1, subframe_length)
    frame = torch.arange(0, output_subframes).unfold(0, subframes_per_frame, subframe_step)
    frame = signal.new_tensor(frame).long()
    frame = frame.contiguous().view(-1)
    result = signal.new_zeros(*outer_dimensions, output_subframes, subframe_length)
    result.index_add_(-2, frame, subframe_signal)
    result = result.view(*outer_dimensions, -1)
    return result


class OverlapAdd(Sandwich):
    """Frames made by a 1x1 conv ([B, C*4, L] -> [B, C, L, 4]), put back together with
    ``result.index_add_(-2, frame, chunk)`` whose value is never used."""

    def __init__(self):
        super().__init__()
        self.frames = nn.Conv1d(C, C * 4, 1)

    def glue(self, w):
        B, _, L = w.shape
        frames = self.frames(w).view(B, C, 4, L).transpose(2, 3).contiguous()
        return overlap_and_add(frames, 2)


class SetItemPad(Sandwich):
    """``padded[..., :T] = x`` on a fresh buffer, a literal channel slice assigned, constants
    written into some channels and into all."""

    def glue(self, w):
        B, N, L = w.shape
        padded = w.new_zeros(B, N, L + 6)
        padded[..., :L] = w
        padded[:, 0:4, L : L + 2] = w[:, 0:4, :2]
        padded[:, 4:8, L + 2 : L + 4] = 1.0  # a constant written into literal channels
        padded[..., L + 4 :] = 0.5  # and into every channel
        return padded


class MaskedFillCopy(Sandwich):
    """``masked_fill_`` with a non-zero value (written into every channel), ``copy_`` into a
    fresh buffer, ``mul_``: the values returned are never used."""

    def glue(self, w):
        quiet = w.abs().mean(1, keepdim=True) < 0.05
        w = w * 1.0
        w.masked_fill_(quiet, 0.5)
        out = torch.empty_like(w)
        out.copy_(w)
        out.mul_(2.0)
        out.add_(0.1)
        return out


# ------------------------------------------------------------------------------------------
# 5. op rules
# ------------------------------------------------------------------------------------------
class FunctionalConv(nn.Module):
    """A filterbank as a parameter through ``F.conv1d``, a depthwise ``F.conv1d`` with a literal
    ``groups=``, a buffer through ``F.conv2d``, a decoder subclassing ``ConvTranspose1d``
    (``super().forward``) and a transposed conv through ``F.conv_transpose1d``."""

    sample_rate = 8000
    n_src = 1

    def __init__(self):
        super().__init__()
        self.filters = nn.Parameter(torch.randn(C, 1, 16) * 0.3)
        self.depthwise = nn.Parameter(torch.randn(C, 1, 3) * 0.5)
        self.register_buffer("mix", torch.randn(C, C, 1, 3) * 0.3)
        self.mix_bias = nn.Parameter(torch.randn(C) * 0.1)
        self.grouped = nn.Parameter(torch.randn(C, C // 4, 1) * 0.3)
        self.up = Decoder(C, C, 4, stride=2, padding=1)
        self.dec_filters = nn.Parameter(torch.randn(C, 1, 16) * 0.3)

    def forward(self, wav):
        w = torch.relu(F.conv1d(wav.unsqueeze(1), self.filters, stride=8))
        w = F.conv1d(w, self.depthwise, padding=1, groups=C)
        w = F.conv2d(w.unsqueeze(-2), self.mix, self.mix_bias, padding=(0, 1)).squeeze(-2)
        w = torch.relu(F.conv1d(w, self.grouped, groups=4))
        w = torch.relu(self.up(w))
        return F.conv_transpose1d(w, self.dec_filters, stride=8)


class Decoder(nn.ConvTranspose1d):
    """asteroid-style: a built-in layer subclassed, its forward the parent's."""

    def forward(self, x):
        return super().forward(x)


class UnfoldFold(Sandwich):
    """DPRNN-style chunking: ``F.unfold`` of the unsqueezed [B, N, T, 1] into [B, N*K, S]
    chunks, a Linear across N inside each chunk, ``F.fold`` back (overlap-add)."""

    K, S = 32, 8  # more kernel positions than channels: C must stay the prunable factor

    def __init__(self):
        super().__init__()
        self.intra = nn.Linear(C, C)

    def glue(self, w):
        B, N, L = w.shape
        K, S = self.K, self.S
        chunks = F.unfold(w.unsqueeze(-1), kernel_size=(K, 1), padding=(K, 0), stride=(S, 1))
        n_chunks = chunks.shape[-1]
        chunks = chunks.reshape(B, N, K, n_chunks).permute(0, 3, 2, 1)  # [B, S, K, N]
        chunks = torch.relu(self.intra(chunks)).permute(0, 3, 2, 1)  # [B, N, K, S]
        chunks = chunks.reshape(B, N * K, n_chunks)
        out = F.fold(chunks, (L, 1), kernel_size=(K, 1), padding=(K, 0), stride=(S, 1))
        return out.squeeze(-1)


class ChannelLayerNorm(nn.LayerNorm):
    """cLN as a LayerNorm subclass calling ``super().forward`` on [B, T, C]."""

    def forward(self, x):
        return super().forward(x.transpose(1, 2)).transpose(1, 2)


class FunctionalLayerNorm(Sandwich):
    """``F.layer_norm`` three ways: a LayerNorm subclass, direct with parameters, and without
    (``elementwise_affine=False``)."""

    def __init__(self):
        super().__init__()
        self.cln = ChannelLayerNorm(C)
        self.plain = ChannelLayerNorm(C, elementwise_affine=False)
        self.gamma = nn.Parameter(torch.rand(C) + 0.5)
        self.beta = nn.Parameter(torch.randn(C) * 0.1)

    def glue(self, w):
        w = self.cln(w)
        w = self.plain(w * 2.0)
        t = F.layer_norm(w.transpose(1, 2), (C,), self.gamma, self.beta, 1e-5)
        return t.transpose(1, 2)


class InstanceNorms(Sandwich):
    """InstanceNorm1d with and without affine, and InstanceNorm2d on [B, C, T, 1]."""

    def __init__(self):
        super().__init__()
        self.affine = nn.InstanceNorm1d(C, affine=True)
        self.plain = nn.InstanceNorm1d(C)
        self.two_d = nn.InstanceNorm2d(C, affine=True)
        with torch.no_grad():
            self.affine.weight.uniform_(0.5, 1.5)
            self.two_d.bias.normal_(0, 0.1)

    def glue(self, w):
        w = self.plain(self.affine(w))
        return self.two_d(w.unsqueeze(-1)).squeeze(-1)


class Einsum(Sandwich):
    """``torch.einsum``: a channel mix with a parameter, a per-channel scale, and an
    attention-like product contracting channels and time."""

    def __init__(self):
        super().__init__()
        self.mix = nn.Parameter(torch.randn(C, C) * 0.3)
        self.scale = nn.Parameter(torch.rand(C) + 0.5)

    def glue(self, w):
        w = torch.einsum("bct,dc->bdt", w, self.mix)
        w = torch.einsum("bct,c->bct", w, self.scale)
        energy = torch.einsum("bct,bcs->bts", w, w) / w.shape[-1]  # [B, T, T]
        return w + torch.einsum("bts,bcs->bct", energy.softmax(-1), w)


class Stack(Sandwich):
    """``torch.stack`` of two branches along a new speaker axis, then summed."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv1d(C, C, 1)
        self.b = nn.Conv1d(C, C, 1)

    def glue(self, w):
        both = torch.stack([self.a(w), self.b(w)], dim=1)  # [B, 2, C, L]
        return torch.relu(both).sum(1) + torch.stack([w, w], -1).mean(-1)


class Rotary(Sandwich):
    """Rotary-embedding style indexing: ``colons = [slice(None)] * x.ndim;
    colons[d] = slice(a, b); x[tuple(colons)]``, rotating halves of the channel axis."""

    def __init__(self):
        super().__init__()
        self.register_buffer("cos", torch.cos(torch.arange(C // 2).repeat(2) * 0.3))
        self.register_buffer("sin", torch.sin(torch.arange(C // 2).repeat(2) * 0.3))

    @staticmethod
    def rotate_half(x, dim):
        half = x.shape[dim] // 2
        colons = [slice(None)] * x.ndim
        colons[dim] = slice(0, half)
        first = x[tuple(colons)]
        colons[dim] = slice(half, None)
        second = x[tuple(colons)]
        return torch.cat([-second, first], dim=dim)

    def glue(self, w):
        return w * self.cos[:, None] + self.rotate_half(w, 1) * self.sin[:, None]


# ------------------------------------------------------------------------------------------
# 3. control flow on values that vary with the input (eager shells)
# ------------------------------------------------------------------------------------------
class PadBlock(nn.Module):
    """The encoder, behind padding that branches on the waveform's length."""

    def __init__(self, mode, n=8):
        super().__init__()
        self.mode, self.n = mode, n
        self.conv = nn.Conv1d(1, C, 16, stride=8, bias=False)

    def forward(self, x):
        T = x.shape[-1]
        n = self.n
        if self.mode == "if_mod":
            if T % n:
                x = F.pad(x, (0, n - T % n))
        elif self.mode == "res":
            res = 1 if T % n else 0
            x = F.pad(x, (0, res * (n - T % n)))
        elif self.mode == "rest":
            rest = n - (T % n)
            if rest > 0:
                x = F.pad(x, (0, rest))
        elif self.mode == "int_lcm":
            lcm = abs(n * 6) // math.gcd(n, 6)
            rest = int(x.shape[-1]) % lcm
            if rest:
                x = F.pad(x, (0, lcm - rest))
        elif self.mode == "origin":
            T_est = (T // n) * n
            if T > T_est:
                x = F.pad(x, (0, n - T + T_est))
            else:
                x = x[..., :T_est]
        return torch.relu(self.conv(x))


class BranchOnLength(Sandwich):
    def __init__(self, mode):
        super().__init__()
        del self.encoder
        self.block = PadBlock(mode)

    def forward(self, wav):
        w = self.block(wav.unsqueeze(1))
        return self.decoder(torch.relu(self.inner(w)))


class SqueezeDecoder(nn.Module):
    """``if torch.squeeze(x).dim() == 1`` in a decoder (true at batch 1 only), as in a published
    Conv-TasNet decoder that squeezes its [B, 1, T] output."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Conv1d(C, 1, 1)

    def forward(self, x):
        x = self.proj(x)
        if torch.squeeze(x).dim() == 1:
            x = torch.squeeze(x, dim=1)
        else:
            x = torch.squeeze(x)
        return x


class BranchOnBatch(Sandwich):
    def __init__(self):
        super().__init__()
        del self.decoder
        self.head = SqueezeDecoder()

    def forward(self, wav):
        w = torch.relu(self.inner(torch.relu(self.encoder(wav.unsqueeze(1)))))
        return self.head(w).unsqueeze(1)


class AttributeWidth(nn.Module):
    """Eager glue (the root pads by the length, so it is a shell) that reads a channel count
    from an attribute, ``h.reshape(B, self.width, -1)``: sepfx cannot rewrite it, so pruning the
    group behind ``width`` breaks the slim model, and ``compile`` must keep that group whole
    and say so. Not in ``MODELS``: that group is not prunable."""

    sample_rate = 8000

    def __init__(self):
        super().__init__()
        self.enc = nn.Conv1d(1, 8, 16, stride=8)
        self.mid = nn.Conv1d(8, 6, 1)
        self.width = 6
        self.post = nn.Conv1d(6, 8, 1)
        self.dec = nn.ConvTranspose1d(8, 1, 16, stride=8)

    def forward(self, x):
        if x.shape[-1] % 8:
            x = F.pad(x, (0, 8 - x.shape[-1] % 8))
        e = torch.relu(self.enc(x.unsqueeze(1)))
        h = self.mid(e)
        h = h.reshape(h.shape[0], self.width, -1)
        return self.dec(e * torch.sigmoid(self.post(h)))


# ------------------------------------------------------------------------------------------
# found in a toolkit's separators (ESPnet 202511), run unedited
# ------------------------------------------------------------------------------------------
class SequentialSlice(Sandwich):
    """``self.net[:2](w)``: slicing a Sequential makes a new one in the forward, not installed
    as a submodule (its children are)."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Conv1d(C, C, 1), nn.PReLU(), nn.Conv1d(C, C, 1))

    def glue(self, w):
        head, tail = self.net[:2], self.net[2:]
        return w + tail(head(w))


class DeviceTest(Sandwich):
    """``if x.is_cuda or torch.backends.mkl.is_available():`` and a dtype test: metadata,
    the same at every batch size and length."""

    def glue(self, w):
        w = w.view(w.shape[0], w.shape[1], -1)  # computed from sizes that vary with the input
        if w.is_cuda or torch.backends.mkl.is_available() or w.dtype == torch.float64:
            return w * 2.0
        return w * 3.0


class ViewAfterNorm(Sandwich):
    """``nn.LayerNorm`` over channels of a transposed [B, T, C] view, then ``.view`` of its
    output: F.layer_norm returns a contiguous tensor, which the view relies on."""

    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(C)

    def glue(self, w):
        b, c, t = w.shape
        h = self.norm(w.transpose(1, 2))  # [B, T, C] from a non-contiguous view
        return h.view(b * t, c).view(b, t, c).transpose(1, 2)  # (B, T merged: not channels)


class SharedActivation(Sandwich):
    """One activation module installed in two blocks (``activation = nn.ReLU()`` passed to
    every layer): ``named_modules()`` lists it once, the graph calls it at both paths. The
    root branches on the length, so the blocks are parts of an eager shell."""

    def __init__(self):
        super().__init__()
        act = nn.PReLU()
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Conv1d(C, 2 * C, 1), act, nn.Conv1d(2 * C, C, 1)) for _ in range(2)
        )

    def glue(self, w):
        for block in self.blocks:
            w = w + block(w)
        if w.shape[-1] % 3:  # a branch on the length: the root runs eagerly
            w = w * 2.0
        return w


class PackedLSTM(Sandwich):
    """An LSTM given a PackedSequence (``pack_padded_sequence`` of full lengths), as recurrent
    separators of one toolkit run it: a graph cannot take the packed sequence, so the LSTM runs
    as written, its channels frozen and its MACs counted."""

    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(C, 8, batch_first=True, bidirectional=True)
        self.proj = nn.Linear(16, C)

    def glue(self, w):
        lengths = torch.full((w.shape[0],), w.shape[-1], dtype=torch.long)
        packed = nn.utils.rnn.pack_padded_sequence(w.transpose(1, 2), lengths, batch_first=True)
        out, _ = self.lstm(packed)
        out, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True)
        return w + self.proj(out).transpose(1, 2)


MODELS = {
    "zeros_varargs": ZerosVarargs,
    "zeros_from_list": ZerosFromList,
    "new_zeros": NewZeros,
    "legacy_wrappers": LegacyWrappers,
    "literal_channels": LiteralChannels,
    "rank_constants": RankConstants,
    "overlap_add": OverlapAdd,
    "setitem_pad": SetItemPad,
    "masked_fill_copy": MaskedFillCopy,
    "functional_conv": FunctionalConv,
    "unfold_fold": UnfoldFold,
    "functional_layer_norm": FunctionalLayerNorm,
    "instance_norms": InstanceNorms,
    "einsum": Einsum,
    "stack": Stack,
    "rotary": Rotary,
    "if_mod": lambda: BranchOnLength("if_mod"),
    "res_flag": lambda: BranchOnLength("res"),
    "rest_positive": lambda: BranchOnLength("rest"),
    "origin_vs_estimate": lambda: BranchOnLength("origin"),
    "int_lcm": lambda: BranchOnLength("int_lcm"),
    "squeeze_dim": BranchOnBatch,
    "sequential_slice": SequentialSlice,
    "device_test": DeviceTest,
    "view_after_norm": ViewAfterNorm,
    "shared_activation": SharedActivation,
    "packed_lstm": PackedLSTM,
}

_SANDWICH = ["encoder out", "inner in"]
PRUNABLE = {
    "zeros_varargs": _SANDWICH,
    "zeros_from_list": _SANDWICH,
    "new_zeros": _SANDWICH,
    "legacy_wrappers": _SANDWICH,
    "literal_channels": _SANDWICH,
    "rank_constants": _SANDWICH + ["norm.gamma dim 0"],
    "overlap_add": _SANDWICH + ["frames out"],
    "setitem_pad": _SANDWICH,
    "masked_fill_copy": _SANDWICH,
    "functional_conv": [
        "filters dim 0",
        "mix dim 0",
        "mix dim 1",
        "grouped dim 0",
        "up.weight dim 0",
        "up.weight dim 1",
        "dec_filters dim 0",
    ],
    "unfold_fold": _SANDWICH + ["intra in", "intra out"],
    "functional_layer_norm": _SANDWICH + ["cln.weight dim 0", "gamma dim 0"],
    "instance_norms": _SANDWICH + ["affine channels", "two_d channels"],
    "einsum": _SANDWICH + ["mix dim 0", "mix dim 1", "scale dim 0"],
    "stack": _SANDWICH + ["a out", "b out"],
    "rotary": _SANDWICH + ["cos dim 0"],
    "if_mod": ["block.conv out", "inner in"],
    "res_flag": ["block.conv out", "inner in"],
    "rest_positive": ["block.conv out", "inner in"],
    "origin_vs_estimate": ["block.conv out", "inner in"],
    "int_lcm": ["block.conv out", "inner in"],
    "squeeze_dim": ["encoder out", "inner in", "inner out", "head.proj in"],
    "sequential_slice": _SANDWICH + ["net.0 in", "net.0 out", "net.2 out"],
    "device_test": _SANDWICH,
    "view_after_norm": _SANDWICH + ["norm dim0"],
    "shared_activation": _SANDWICH + ["blocks.0.0 out", "blocks.1.0 out", "blocks.1.2 in"],
    "packed_lstm": ["inner out", "decoder in"],
}
# ``rest = n - T % n; if rest > 0`` is true at every length (the pad is computed from the
# length in the graph): it traces, and is tested with the traced patterns
# ``rest_positive`` (``rest = n - T % n; if rest > 0``) is always true, but no trace can know
# that: a branch on a length-derived value is taken as varying, so its module is a shell.
NEEDS_SHELLS = [
    "if_mod",
    "res_flag",
    "rest_positive",
    "origin_vs_estimate",
    "int_lcm",
    "squeeze_dim",
    "shared_activation",
    "packed_lstm",
]


def build(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return MODELS[name]().eval()
