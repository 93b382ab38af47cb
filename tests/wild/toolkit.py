"""Separators composed the way speech toolkits compose them (issue 28, item 4): an enhancement
model that calls ``encoder(speech, ilens)``, ``separator(feature, flens)`` and ``decoder(...)``
per speaker, each module written in the toolkit's habits, not for torch.fx. Every model maps
``wav[B, T]`` to ``[B, n_src, T]`` at 8 kHz and is tiny.

| pattern in ``forward``                                                     | model |
|----------------------------------------------------------------------------|-------|
| ``if is_complex(input): feature = abs(input)``, ``x.is_floating_point()``, ``x.dtype`` tests | DtypeTasNet (its separator) |
| ``masks.unbind(dim=1)`` into a list of speakers, ``[input * m for m in masks]`` | DtypeTasNet, DualPathNet |
| ``rest = ...; if rest > 0: pad = torch.zeros(B, N, rest); torch.cat([input, pad], 2)`` (eager glue: the branch makes a shell) and ``torch.zeros(B, N, stride)`` either side | DualPathNet (``pad_segment``) |
| ``name = type(self.skim.seg_lstms[0]).__name__; if name == ...``, ``isinstance(m, ...)`` | SkiMNet (its separator) |
| ``(h, c)`` tuples through segment and memory LSTMs, ``view(B, S, d * H)`` of a state | SkiMNet (``SegLSTM``, ``MemLSTM``) |
| gated attention units (``einsum``, rotary pairs, offset-scale heads unbound), a scaled sinusoidal embedding added to the stream, FSMN depthwise memory, ``F.layer_norm`` in an ``nn.LayerNorm`` subclass, ``InstanceNorm2d`` | FlashNet (its separator) |
| encoder layers ``forward(x, mask, cache=None) -> (x, mask)`` with a bool mask; attention ``forward(q, k, v, mask, expand_kv=False)`` with ``if expand_kv:``, heads by ``view(n, -1, self.h, self.d_k)``, ``masked_fill(mask, torch.finfo(scores.dtype).min)``; a sinusoidal table extended in ``forward`` when the input is longer (a branch on the length: eager code); frames cut with ``x[:, : flens.max()]`` | MaskedTransformerNet (its separator) |
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd import Variable


def is_complex(c):
    """The toolkit's helper: a complex spectrum or a real feature."""
    return torch.is_complex(c)


# ------------------------------------------------------------------------------------------
# a toolkit's encoder and decoder (``fs`` optional, as the toolkit has it)
# ------------------------------------------------------------------------------------------
class ConvEncoder(nn.Module):
    def __init__(self, channel=32, kernel_size=16, stride=8):
        super().__init__()
        self.conv1d = nn.Conv1d(1, channel, kernel_size, stride=stride, bias=False)
        self.stride = stride
        self.kernel_size = kernel_size
        self._output_dim = channel

    @property
    def output_dim(self):
        return self._output_dim

    def forward(self, input, ilens, fs=None):
        assert input.dim() == 2, "Currently only support single channel input"
        input = torch.unsqueeze(input, 1)
        feature = F.relu(self.conv1d(input))
        feature = feature.transpose(1, 2)  # B, L, N
        flens = torch.div(ilens - self.kernel_size, self.stride, rounding_mode="floor") + 1
        return feature, flens


class ConvDecoder(nn.Module):
    def __init__(self, channel=32, kernel_size=16, stride=8):
        super().__init__()
        self.convtrans1d = nn.ConvTranspose1d(channel, 1, kernel_size, stride=stride, bias=False)

    def forward(self, input, ilens, fs=None):
        input = input.transpose(1, 2)
        wav = self.convtrans1d(input)
        wav = wav.squeeze(1)
        return wav, ilens


class EnhancementModel(nn.Module):
    """encoder -> separator -> decoder per speaker -> padded to the mixture's length."""

    sample_rate = 8000
    n_src = 2

    def __init__(self, separator, channel=32):
        super().__init__()
        self.encoder = ConvEncoder(channel)
        self.separator = separator
        self.decoder = ConvDecoder(channel)

    def forward(self, speech_mix):
        speech_lengths = torch.full((speech_mix.shape[0],), speech_mix.shape[1], dtype=torch.long)
        feature_mix, flens = self.encoder(speech_mix, speech_lengths)
        feature_pre, flens, others = self.separator(feature_mix, flens)
        speech_pre = [self.decoder(ps, speech_lengths)[0] for ps in feature_pre]
        speech_pre = [F.pad(ps, (0, speech_mix.shape[1] - ps.shape[1])) for ps in speech_pre]
        return torch.stack(speech_pre, dim=1)


# ------------------------------------------------------------------------------------------
# 1. a TCN separator that tests its input's dtype and unbinds its masks
# ------------------------------------------------------------------------------------------
class TemporalBlock(nn.Module):
    def __init__(self, channels, hidden, dilation):
        super().__init__()
        self.conv1x1 = nn.Conv1d(channels, hidden, 1, bias=False)
        self.prelu = nn.PReLU()
        self.norm = nn.GroupNorm(1, hidden, eps=1e-8)
        self.dsconv = nn.Conv1d(
            hidden, hidden, 3, padding=dilation, dilation=dilation, groups=hidden, bias=False
        )
        self.pointwise = nn.Conv1d(hidden, channels, 1, bias=False)

    def forward(self, x):
        y = self.norm(self.prelu(self.conv1x1(x)))
        return x + self.pointwise(self.dsconv(y))


class TCNSeparator(nn.Module):
    def __init__(self, input_dim=32, num_spk=2, bottleneck=16, hidden=32, blocks=3):
        super().__init__()
        self._num_spk = num_spk
        self.layer_norm = nn.GroupNorm(1, input_dim, eps=1e-8)
        self.bottleneck_conv1x1 = nn.Conv1d(input_dim, bottleneck, 1, bias=False)
        self.network = nn.Sequential(
            *[TemporalBlock(bottleneck, hidden, 2**i) for i in range(blocks)]
        )
        self.mask_conv1x1 = nn.Conv1d(bottleneck, num_spk * input_dim, 1, bias=False)

    @property
    def num_spk(self):
        return self._num_spk

    def forward(self, input, ilens, additional=None):
        # the toolkit's separators take complex spectra as well as real features
        if is_complex(input):
            feature = abs(input)
        else:
            feature = input
        if not feature.is_floating_point():
            raise TypeError(f"a floating-point feature is expected, got {feature.dtype}")
        if feature.dtype == torch.float16:
            feature = feature.float()
        B, L, N = feature.shape
        feature = feature.transpose(1, 2)  # B, N, L
        score = self.mask_conv1x1(self.network(self.bottleneck_conv1x1(self.layer_norm(feature))))
        masks = torch.relu(score.view(B, self.num_spk, N, L))
        masks = masks.transpose(2, 3)  # B, num_spk, L, N
        masks = masks.unbind(dim=1)  # List[B, L, N]
        masked = [input * m for m in masks]
        others = dict(zip([f"mask_spk{i + 1}" for i in range(len(masks))], masks))
        return masked, ilens, others


def dtype_tasnet():
    return EnhancementModel(TCNSeparator())


# ------------------------------------------------------------------------------------------
# 2. a dual-path separator whose chunking pads with zeros made in eager glue
# ------------------------------------------------------------------------------------------
def pad_segment(input, segment_size):
    """input: [B, N, T]; pads so that 50%-overlapping segments cover it (the toolkit's code)."""
    batch_size, dim, seq_len = input.shape
    segment_stride = segment_size // 2
    rest = segment_size - (segment_stride + seq_len % segment_size) % segment_size
    if rest > 0:
        pad = Variable(torch.zeros(batch_size, dim, rest)).type(input.type())
        input = torch.cat([input, pad], 2)
    pad_aux = Variable(torch.zeros(batch_size, dim, segment_stride)).type(input.type())
    input = torch.cat([pad_aux, input, pad_aux], 2)
    return input, rest


def split_feature(input, segment_size):
    """[B, N, T] -> [B, N, segment_size, n_segments] (two interleaved halves, stride 1/2)."""
    input, rest = pad_segment(input, segment_size)
    batch_size, dim, seq_len = input.shape
    segment_stride = segment_size // 2
    segments1 = input[:, :, :-segment_stride].contiguous().view(batch_size, dim, -1, segment_size)
    segments2 = input[:, :, segment_stride:].contiguous().view(batch_size, dim, -1, segment_size)
    segments = torch.cat([segments1, segments2], 3).view(batch_size, dim, -1, segment_size)
    return segments.transpose(2, 3).contiguous(), rest


def merge_feature(input, rest):
    """Overlap-add of ``split_feature``'s segments back to [B, N, T]."""
    batch_size, dim, segment_size, _ = input.shape
    segment_stride = segment_size // 2
    input = input.transpose(2, 3).contiguous().view(batch_size, dim, -1, segment_size * 2)
    input1 = (
        input[:, :, :, :segment_size].contiguous().view(batch_size, dim, -1)[:, :, segment_stride:]
    )
    input2 = (
        input[:, :, :, segment_size:].contiguous().view(batch_size, dim, -1)[:, :, :-segment_stride]
    )
    output = input1 + input2
    if rest > 0:
        output = output[:, :, :-rest]
    return output.contiguous()


class SingleRNN(nn.Module):
    def __init__(self, input_size, hidden_size):
        super().__init__()
        self.rnn = nn.LSTM(input_size, hidden_size, batch_first=True, bidirectional=True)
        self.proj = nn.Linear(hidden_size * 2, input_size)

    def forward(self, input):
        output, _ = self.rnn(input)
        return self.proj(output)


class DPRNN(nn.Module):
    """Row (intra-segment) then column (inter-segment) RNNs with residuals and group norms."""

    def __init__(self, input_size, hidden_size, output_size, num_layers=1):
        super().__init__()
        self.row_rnn = nn.ModuleList(
            [SingleRNN(input_size, hidden_size) for _ in range(num_layers)]
        )
        self.col_rnn = nn.ModuleList(
            [SingleRNN(input_size, hidden_size) for _ in range(num_layers)]
        )
        self.row_norm = nn.ModuleList(
            [nn.GroupNorm(1, input_size, eps=1e-8) for _ in range(num_layers)]
        )
        self.col_norm = nn.ModuleList(
            [nn.GroupNorm(1, input_size, eps=1e-8) for _ in range(num_layers)]
        )
        self.output = nn.Sequential(nn.PReLU(), nn.Conv2d(input_size, output_size, 1))

    def forward(self, input):
        batch_size, _, dim1, dim2 = input.shape
        output = input
        for i in range(len(self.row_rnn)):
            row_input = output.permute(0, 3, 2, 1).contiguous().view(batch_size * dim2, dim1, -1)
            row_output = self.row_rnn[i](row_input)
            row_output = row_output.view(batch_size, dim2, dim1, -1).permute(0, 3, 2, 1)
            output = output + self.row_norm[i](row_output.contiguous())
            col_input = output.permute(0, 2, 3, 1).contiguous().view(batch_size * dim1, dim2, -1)
            col_output = self.col_rnn[i](col_input)
            col_output = col_output.view(batch_size, dim1, dim2, -1).permute(0, 3, 1, 2)
            output = output + self.col_norm[i](col_output.contiguous())
        return self.output(output)


class DPRNNSeparator(nn.Module):
    def __init__(self, input_dim=32, num_spk=2, hidden=16, segment_size=20):
        super().__init__()
        self._num_spk = num_spk
        self.segment_size = segment_size
        self.dprnn = DPRNN(input_dim, hidden, input_dim * num_spk)

    @property
    def num_spk(self):
        return self._num_spk

    def forward(self, input, ilens, additional=None):
        feature = input
        B, T, N = feature.shape
        feature = feature.transpose(1, 2)  # B, N, T
        segmented, rest = split_feature(feature, segment_size=self.segment_size)
        processed = self.dprnn(segmented)  # B, N*num_spk, L, n_segments
        processed = merge_feature(processed, rest)  # B, N*num_spk, T
        processed = processed.transpose(1, 2)  # B, T, N*num_spk
        processed = processed.view(B, T, N, self.num_spk)
        masks = torch.sigmoid(processed).unbind(dim=3)
        masked = [input * m for m in masks]
        return masked, ilens, dict(zip(["mask_spk1", "mask_spk2"], masks))


def dual_path_net():
    return EnhancementModel(DPRNNSeparator())


# ------------------------------------------------------------------------------------------
# 3. a segment-memory LSTM separator (SkiM-like) whose wrapper dispatches on its blocks' class
# ------------------------------------------------------------------------------------------
class ChannelLayerNorm(nn.Module):
    """cLN over [B, N, T]: statistics per frame over the channels."""

    def __init__(self, channels, eps=1e-8):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(1, channels, 1))
        self.beta = nn.Parameter(torch.zeros(1, channels, 1))
        self.eps = eps

    def forward(self, y):
        mean = torch.mean(y, dim=1, keepdim=True)
        var = torch.var(y, dim=1, keepdim=True, unbiased=False)
        return self.gamma * (y - mean) / torch.pow(var + self.eps, 0.5) + self.beta


class SegLSTM(nn.Module):
    """One LSTM over each segment, carrying ``(h, c)`` in and out (None on the first block)."""

    def __init__(self, input_size, hidden_size, bidirectional=True):
        super().__init__()
        self.hidden_size = hidden_size
        self.num_direction = int(bidirectional) + 1
        self.lstm = nn.LSTM(
            input_size, hidden_size, 1, batch_first=True, bidirectional=bidirectional
        )
        self.proj = nn.Linear(hidden_size * self.num_direction, input_size)
        self.norm = ChannelLayerNorm(input_size)

    def forward(self, input, hc):
        B, T, H = input.shape
        if hc is None:
            d = self.num_direction
            h = torch.zeros(d, B, self.hidden_size).to(input.device)
            c = torch.zeros(d, B, self.hidden_size).to(input.device)
        else:
            h, c = hc
        output, (h, c) = self.lstm(input, (h, c))
        output = self.proj(output.contiguous().view(-1, output.shape[2])).view(input.shape)
        output = input + self.norm(output.transpose(1, 2)).transpose(1, 2)
        return output, (h, c)


class MemLSTM(nn.Module):
    """An LSTM across segments over the segment LSTMs' last ``(h, c)``: [d, B*S, H] each."""

    def __init__(self, hidden_size, bidirectional=True):
        super().__init__()
        self.input_size = (int(bidirectional) + 1) * hidden_size
        self.h_net = SingleRNN(self.input_size, hidden_size)
        self.c_net = SingleRNN(self.input_size, hidden_size)
        self.h_norm = ChannelLayerNorm(self.input_size)
        self.c_norm = ChannelLayerNorm(self.input_size)

    def forward(self, hc, S):
        h, c = hc
        d, BS, H = h.shape
        B = BS // S
        h = h.transpose(1, 0).contiguous().view(B, S, d * H)
        c = c.transpose(1, 0).contiguous().view(B, S, d * H)
        h = h + self.h_norm(self.h_net(h).transpose(1, 2)).transpose(1, 2)
        c = c + self.c_norm(self.c_net(c).transpose(1, 2)).transpose(1, 2)
        h = h.view(B * S, d, H).transpose(1, 0).contiguous()
        c = c.view(B * S, d, H).transpose(1, 0).contiguous()
        return (h, c)


class SkiM(nn.Module):
    def __init__(self, input_size, hidden_size, output_size, segment_size=20, num_blocks=2):
        super().__init__()
        self.segment_size = segment_size
        self.num_blocks = num_blocks
        self.seg_lstms = nn.ModuleList(
            [SegLSTM(input_size, hidden_size) for _ in range(num_blocks)]
        )
        self.mem_lstms = nn.ModuleList([MemLSTM(hidden_size) for _ in range(num_blocks - 1)])
        self.output_fc = nn.Sequential(nn.PReLU(), nn.Conv1d(input_size, output_size, 1))

    def _padfeature(self, input):
        B, T, D = input.shape
        rest = self.segment_size - T % self.segment_size
        if rest > 0:
            input = F.pad(input, (0, 0, 0, rest))
        return input, rest

    def forward(self, input):
        B, T, D = input.shape
        input, rest = self._padfeature(input=input)
        input = input.view(B, -1, self.segment_size, D)
        B, S, K, D = input.shape
        output = input.view(B * S, K, D).contiguous()
        hc = None
        for i in range(self.num_blocks):
            output, hc = self.seg_lstms[i](output, hc)
            if i < self.num_blocks - 1:
                hc = self.mem_lstms[i](hc, S)
        output = output.view(B, S * K, D)[:, :T, :]
        return self.output_fc(output.transpose(1, 2)).transpose(1, 2)


class SkiMSeparator(nn.Module):
    def __init__(self, input_dim=32, num_spk=2, hidden=16, segment_size=20):
        super().__init__()
        self._num_spk = num_spk
        self.skim = SkiM(input_dim, hidden, input_dim * num_spk, segment_size)

    @property
    def num_spk(self):
        return self._num_spk

    def forward(self, input, ilens, additional=None):
        # the toolkit's check of which segment model it was configured with
        name = type(self.skim.seg_lstms[0]).__name__
        if name == "SegLSTM":
            causal = not self.skim.seg_lstms[0].lstm.bidirectional
        else:
            raise ValueError("Unsupported segment model class")
        if not isinstance(self.skim.mem_lstms[0], MemLSTM) or causal:
            raise ValueError("Unsupported memory model")
        B, T, N = input.shape
        processed = self.skim(input)  # B, T, N*num_spk
        masks = torch.sigmoid(processed.view(B, T, N, self.num_spk)).unbind(dim=3)
        masked = [input * m for m in masks]
        return masked, ilens, dict(zip(["mask_spk1", "mask_spk2"], masks))


def skim_net():
    return EnhancementModel(SkiMSeparator())


# ------------------------------------------------------------------------------------------
# 4. a FLASH-style transformer separator (gated attention units, rotary embeddings, a scaled
#    sinusoidal position embedding added to the stream, FSMN memory, a LayerNorm subclass
#    calling F.layer_norm, InstanceNorm2d)
# ------------------------------------------------------------------------------------------
class LayerNormalization(nn.LayerNorm):
    def forward(self, x):
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)


class ScaledSinuEmbedding(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1))
        inv_freq = 1.0 / (10000 ** (torch.arange(0, dim, 2).float() / dim))
        self.register_buffer("inv_freq", inv_freq)

    def forward(self, x):
        n, device = x.shape[1], x.device
        t = torch.arange(n, device=device).type_as(self.inv_freq)
        sinu = torch.einsum("i , j -> i j", t, self.inv_freq)
        emb = torch.cat((sinu.sin(), sinu.cos()), dim=-1)
        return emb * self.scale


def rotate_half(x):
    """Interleaved pairs (x1, x2) -> (-x2, x1), as rotary embeddings write it."""
    x = x.view(*x.shape[:-1], -1, 2)
    x1, x2 = x.unbind(dim=-1)
    return torch.stack((-x2, x1), dim=-1).flatten(-2)


class RotaryEmbedding(nn.Module):
    def __init__(self, dim, theta=10000):
        super().__init__()
        freqs = 1.0 / (theta ** (torch.arange(0, dim, 2)[: dim // 2].float() / dim))
        self.register_buffer("freqs", freqs)

    def rotate_queries_or_keys(self, t):
        seq_len = t.shape[-2]
        positions = torch.arange(seq_len, device=t.device, dtype=t.dtype)
        freqs = torch.einsum("i , j -> i j", positions, self.freqs)
        freqs = freqs.repeat_interleave(2, dim=-1)
        return t * freqs.cos() + rotate_half(t) * freqs.sin()


class OffsetScale(nn.Module):
    def __init__(self, dim, heads=1):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(heads, dim))
        self.beta = nn.Parameter(torch.zeros(heads, dim))
        nn.init.normal_(self.gamma, std=0.02)

    def forward(self, x):
        out = torch.einsum("... d, h d -> ... h d", x, self.gamma) + self.beta
        return out.unbind(dim=-2)


class FSMN(nn.Module):
    """Memory over time: a depthwise convolution, added back."""

    def __init__(self, dim, kernel_size=7):
        super().__init__()
        self.conv = nn.Conv1d(
            dim, dim, kernel_size, padding=(kernel_size - 1) // 2, groups=dim, bias=False
        )

    def forward(self, x):
        return x + self.conv(x.transpose(1, 2)).transpose(1, 2)


class GatedAttentionUnit(nn.Module):
    def __init__(self, dim, query_key_dim=16, expansion_factor=2.0, rotary_pos_emb=None):
        super().__init__()
        hidden_dim = int(dim * expansion_factor)
        self.rotary_pos_emb = rotary_pos_emb
        self.to_hidden = nn.Sequential(
            LayerNormalization(dim), nn.Linear(dim, hidden_dim * 2), nn.SiLU()
        )
        self.to_qk = nn.Sequential(
            LayerNormalization(dim), nn.Linear(dim, query_key_dim), nn.SiLU()
        )
        self.qk_offset_scale = OffsetScale(query_key_dim, heads=4)
        self.fsmn = FSMN(hidden_dim)
        self.to_out = nn.Sequential(LayerNormalization(hidden_dim), nn.Linear(hidden_dim, dim))

    def forward(self, x):
        v, u = self.to_hidden(x).chunk(2, dim=-1)
        qk = self.to_qk(x)
        quad_q, lin_q, quad_k, lin_k = self.qk_offset_scale(qk)
        if self.rotary_pos_emb is not None:
            quad_q, lin_q, quad_k, lin_k = map(
                self.rotary_pos_emb.rotate_queries_or_keys, (quad_q, lin_q, quad_k, lin_k)
            )
        n = x.shape[-2]
        sim = torch.einsum("b i d, b j d -> b i j", quad_q, quad_k) / n
        attn = F.relu(sim) ** 2
        att_v = torch.einsum("b i j, b j d -> b i d", attn, v)
        att_u = torch.einsum("b i j, b j d -> b i d", attn, u)
        lin_kv = torch.einsum("b n d, b n e -> b d e", lin_k, v) / n
        att_v = att_v + torch.einsum("b n d, b d e -> b n e", lin_q, lin_kv)
        lin_ku = torch.einsum("b n d, b n e -> b d e", lin_k, u) / n
        att_u = att_u + torch.einsum("b n d, b d e -> b n e", lin_q, lin_ku)
        out = self.fsmn((att_u * v) * torch.sigmoid(att_v * u))
        return x + self.to_out(out)


class FlashSeparator(nn.Module):
    def __init__(self, input_dim=32, num_spk=2, dim=32, depth=2):
        super().__init__()
        self._num_spk = num_spk
        self.norm = nn.InstanceNorm2d(input_dim, affine=True)
        self.in_proj = nn.Conv1d(input_dim, dim, 1)
        self.pos_enc = ScaledSinuEmbedding(dim)
        rotary = RotaryEmbedding(min(32, 16))
        self.layers = nn.ModuleList(
            [GatedAttentionUnit(dim, rotary_pos_emb=rotary) for _ in range(depth)]
        )
        self.out_proj = nn.Conv1d(dim, input_dim * num_spk, 1)

    @property
    def num_spk(self):
        return self._num_spk

    def forward(self, input, ilens, additional=None):
        B, T, N = input.shape
        x = self.norm(input.transpose(1, 2).unsqueeze(-1)).squeeze(-1)  # B, N, T
        x = self.in_proj(x).transpose(1, 2)  # B, T, D
        x = x + self.pos_enc(x)
        for layer in self.layers:
            x = layer(x)
        masks = torch.relu(self.out_proj(x.transpose(1, 2)))  # B, N*num_spk, T
        masks = masks.view(B, self.num_spk, N, T).transpose(2, 3).unbind(dim=1)
        masked = [input * m for m in masks]
        return masked, ilens, dict(zip(["mask_spk1", "mask_spk2"], masks))


def flash_net():
    return EnhancementModel(FlashSeparator())


# ------------------------------------------------------------------------------------------
# 5. a transformer separator with padding masks, as speech toolkits write one
# ------------------------------------------------------------------------------------------
class SinusoidalTable(nn.Module):
    """Scaled input plus a sinusoidal position table, extended when the input is longer than
    what the table holds (not a buffer: rebuilt on demand)."""

    def __init__(self, dim, max_len=4096):
        super().__init__()
        self.dim = dim
        self.table = None
        self.extend(max_len)

    def extend(self, length):
        if self.table is not None and self.table.size(1) >= length:
            return
        position = torch.arange(length, dtype=torch.float32)[:, None]
        rate = torch.exp(torch.arange(0, self.dim, 2, dtype=torch.float32) * -(9.21 / self.dim))
        table = torch.zeros(length, self.dim)
        table[:, 0::2] = torch.sin(position * rate)
        table[:, 1::2] = torch.cos(position * rate)
        self.table = table[None]

    def forward(self, x):
        self.extend(x.size(1))
        return x * self.dim**0.5 + self.table[:, : x.size(1)]


class HeadedAttention(nn.Module):
    def __init__(self, heads, dim):
        super().__init__()
        self.h, self.d_k = heads, dim // heads
        self.linear_q, self.linear_k = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.linear_v, self.linear_out = nn.Linear(dim, dim), nn.Linear(dim, dim)

    def forward(self, query, key, value, mask, expand_kv=False):
        n = query.size(0)
        if expand_kv:  # one key/value set shared by the batch
            key, value = key[:1].expand(n, -1, -1), value[:1].expand(n, -1, -1)
        q = self.linear_q(query).view(n, -1, self.h, self.d_k).transpose(1, 2)
        k = self.linear_k(key).view(n, -1, self.h, self.d_k).transpose(1, 2)
        v = self.linear_v(value).view(n, -1, self.h, self.d_k).transpose(1, 2)
        scores = q @ k.transpose(-2, -1) / self.d_k**0.5
        blocked = mask.unsqueeze(1).eq(0)
        scores = scores.masked_fill(blocked, torch.finfo(scores.dtype).min)
        weights = torch.softmax(scores, dim=-1).masked_fill(blocked, 0.0)
        x = (weights @ v).transpose(1, 2).contiguous().view(n, -1, self.h * self.d_k)
        return self.linear_out(x)


class MaskedEncoderLayer(nn.Module):
    def __init__(self, dim, heads, hidden):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.self_attn = HeadedAttention(heads, dim)
        self.feed_forward = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, dim))

    def forward(self, x, mask, cache=None):
        y = self.norm1(x)
        if cache is not None:  # streaming: only the newest frame attends
            y = y[:, -1:]
        x = x + self.self_attn(y, y, y, mask)
        x = x + self.feed_forward(self.norm2(x))
        return x, mask


class MaskedTransformerSeparator(nn.Module):
    def __init__(self, input_dim=32, dim=32, heads=4, hidden=64, layers=2, num_spk=2):
        super().__init__()
        self.num_spk = num_spk
        self.embed = nn.Sequential(nn.Linear(input_dim, dim), SinusoidalTable(dim))
        self.layers = nn.ModuleList(MaskedEncoderLayer(dim, heads, hidden) for _ in range(layers))
        self.linear = nn.Linear(dim, input_dim * num_spk)

    def forward(self, input, ilens, additional=None):
        frames = torch.arange(input.size(1), device=input.device)
        mask = (frames[None] < ilens[:, None])[:, None]  # B, 1, L: True at real frames
        x = self.embed(input[:, : ilens.max()])
        for layer in self.layers:
            x, mask = layer(x, mask)
        B, L, N = input.shape
        masks = torch.sigmoid(self.linear(x)).view(B, L, self.num_spk, N)
        masked = [input * m for m in masks.unbind(dim=2)]
        return masked, ilens, {}


def masked_transformer_net():
    return EnhancementModel(MaskedTransformerSeparator())


MODELS = {
    "dtype_tasnet": dtype_tasnet,
    "dual_path": dual_path_net,
    "skim": skim_net,
    "flash": flash_net,
    "masked_transformer": masked_transformer_net,
}


def build(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return MODELS[name]().eval()
