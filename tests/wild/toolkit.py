"""Separators composed the way speech toolkits compose them (issue 28, item 4): an enhancement
model that calls ``encoder(speech, ilens)``, ``separator(feature, flens)`` and ``decoder(...)``
per speaker, each module written in the toolkit's habits, not for torch.fx. Every model maps
``wav[B, T]`` to ``[B, n_src, T]`` at 8 kHz and is tiny.

| pattern in ``forward``                                                     | model |
|----------------------------------------------------------------------------|-------|
| ``if is_complex(input): feature = abs(input)``, ``x.is_floating_point()``, ``x.dtype`` tests | DtypeTasNet (its separator) |
| ``masks.unbind(dim=1)`` into a list of speakers, ``[input * m for m in masks]`` | DtypeTasNet, DualPathNet |
| ``rest = ...; if rest > 0: pad = torch.zeros(B, N, rest); torch.cat([input, pad], 2)`` (eager glue: the branch makes a shell) and ``torch.zeros(B, N, stride)`` either side | DualPathNet (``pad_segment``) |
| ``name = type(self.seg_model[0]).__name__; if name == ...``, ``isinstance(m, ...)`` | ClassDispatchNet |
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


MODELS = {"dtype_tasnet": dtype_tasnet, "dual_path": dual_path_net}


def build(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return MODELS[name]().eval()
