"""Real separation code as its authors published it: every separation model of Asteroid 0.7.0
that builds here, and ESPnet 202511's separators (small configs, random weights), compiled
unedited by sepfx at budget 0.4, data-free, and exported to ONNX. Writes
benchmarks/results/real_code.{json,md} (Asteroid) or real_code_espnet.{json,md}.

    pip install --no-deps -c constraints.txt asteroid asteroid-filterbanks
    python benchmarks/real_code.py
    pip install --no-deps espnet==202511 torch_complex typeguard && pip install librosa
    python benchmarks/real_code.py --toolkit espnet

ESPnet's own ESPnetEnhancementModel imports torchaudio, which cannot be installed beside this
torch: its separators are composed as that class's forward composes them (encoder ->
separator -> decoder, every utterance at full length), in ``EspnetEnhance`` below.

Per model: parameters, dense MACs (FlopCounterMode plus the LSTM/GRU closed form, 1 s at its
sample rate), which modules run as eager shells, the share of MACs in prunable groups, the
compiled MAC ratio, compile time, and how the ONNX export went (exporter, dynamic axes, the
worst ONNX Runtime vs PyTorch relative error at lengths that are multiples of no stride).
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, markdown_table, write  # noqa: E402

CONFIGS = {  # the test-bed's configs (tests/test_asteroid.py), plus DCUNet
    "ConvTasNet": dict(
        n_src=2, n_blocks=3, n_repeats=2, bn_chan=32, hid_chan=64, skip_chan=32, n_filters=64
    ),
    "DPRNNTasNet": dict(n_src=2, n_repeats=2, bn_chan=32, hid_size=32, chunk_size=50, n_filters=64),
    "SuDORMRFNet": dict(n_src=2, bn_chan=32, num_blocks=2, upsampling_depth=3, n_filters=64),
    "SuDORMRFImprovedNet": dict(
        n_src=2, bn_chan=32, num_blocks=2, upsampling_depth=3, n_filters=64
    ),
    "DPTNet": dict(n_src=2, n_repeats=1, n_filters=64, ff_hid=64, chunk_size=50),
    "LSTMTasNet": dict(n_src=2, hid_size=32, n_layers=2, n_filters=64),
    "DeMask": dict(hidden_dims=(128,)),
    "DCUNet": dict(architecture="DCUNet-10", n_src=2, fix_length_mode="pad"),
}


class EspnetEnhance(torch.nn.Module):
    """encoder -> separator -> decoder, as ESPnetEnhancementModel.forward_enhance and its
    decoder run them, for a batch of full-length mixtures [B, T] -> [B, n_src, T]."""

    def __init__(self, encoder, separator, decoder):
        super().__init__()
        self.encoder, self.separator, self.decoder = encoder, separator, decoder

    def forward(self, speech_mix):
        # every utterance at full length (sizes kept as shape arithmetic for the exporters)
        lengths = torch.ones(speech_mix.shape[0], dtype=torch.long) * speech_mix.shape[1]
        feats, flens = self.encoder(speech_mix, lengths)
        masked, flens, _ = self.separator(feats, flens)
        return torch.stack([self.decoder(m, lengths)[0] for m in masked], 1)


def espnet_model(name: str) -> torch.nn.Module:
    from espnet2.enh.decoder.conv_decoder import ConvDecoder
    from espnet2.enh.decoder.null_decoder import NullDecoder
    from espnet2.enh.decoder.stft_decoder import STFTDecoder
    from espnet2.enh.encoder.conv_encoder import ConvEncoder
    from espnet2.enh.encoder.null_encoder import NullEncoder
    from espnet2.enh.encoder.stft_encoder import STFTEncoder
    from espnet2.enh.separator import (
        bsrnn_separator,
        conformer_separator,
        dc_crn_separator,
        dccrn_separator,
        dprnn_separator,
        dptnet_separator,
        rnn_separator,
        skim_separator,
        tcn_separator,
        tfgridnet_separator,
        tfgridnetv2_separator,
        transformer_separator,
    )

    stft = dict(n_fft=128, hop_length=64, default_fs=8000)  # 65 frequency bins
    conv = dict(channel=64, kernel_size=16, stride=8)
    grid = dict(n_srcs=2, n_fft=128, stride=64, n_layers=2, lstm_hidden_units=32)
    grid.update(attn_n_head=2, attn_approx_qk_dim=64, emb_dim=16)
    attention = dict(num_spk=2, adim=32, aheads=2, layers=2, linear_units=64)
    separators = {  # (encoder kind, separator)
        "TFGridNet": ("none", lambda: tfgridnet_separator.TFGridNet(input_dim=65, **grid)),
        "TFGridNetV2": ("none", lambda: tfgridnetv2_separator.TFGridNetV2(input_dim=65, **grid)),
        "DC_CRN": (
            "stft",
            lambda: dc_crn_separator.DC_CRNSeparator(
                input_dim=65,
                num_spk=2,
                input_channels=[2, 8, 16, 16],
                enc_layers=3,
                glstm_groups=2,
                glstm_layers=1,
            ),
        ),
        "DCCRN": (
            "stft",
            lambda: dccrn_separator.DCCRNSeparator(
                input_dim=65, num_spk=2, kernel_num=[8, 16, 16], rnn_units=32
            ),
        ),
        "BSRNN": (
            "stft",
            lambda: bsrnn_separator.BSRNNSeparator(
                input_dim=65,
                num_spk=2,
                num_channels=16,
                num_layers=2,
                target_fs=8000,
                subbands=[(i, min(i + 7, 64)) for i in range(0, 65, 8)],  # [start, end]
            ),
        ),
        "SkiM": (
            "stft",
            lambda: skim_separator.SkiMSeparator(
                input_dim=65, num_spk=2, unit=32, layer=2, segment_size=20, causal=False
            ),
        ),
        "DPRNN": (
            "stft",
            lambda: dprnn_separator.DPRNNSeparator(
                input_dim=65, num_spk=2, unit=32, segment_size=20, layer=2
            ),
        ),
        "RNN": (
            "stft",
            lambda: rnn_separator.RNNSeparator(input_dim=65, num_spk=2, layer=2, unit=32),
        ),
        "Conformer": (
            "stft",
            lambda: conformer_separator.ConformerSeparator(input_dim=65, **attention),
        ),
        "Transformer": (
            "stft",
            lambda: transformer_separator.TransformerSeparator(input_dim=65, **attention),
        ),
        "TCN": (
            "conv",
            lambda: tcn_separator.TCNSeparator(
                input_dim=64, num_spk=2, layer=3, stack=2, bottleneck_dim=32, hidden_dim=64
            ),
        ),
        "DPTNet": (
            "conv",
            lambda: dptnet_separator.DPTNetSeparator(
                input_dim=64, num_spk=2, unit=32, att_heads=2, layer=2, segment_size=20
            ),
        ),
    }
    kind, separator = separators[name]
    encoder, decoder = {
        "none": (NullEncoder, NullDecoder),
        "stft": (lambda: STFTEncoder(**stft), lambda: STFTDecoder(**stft)),
        "conv": (lambda: ConvEncoder(**conv), lambda: ConvDecoder(**conv)),
    }[kind]
    return EspnetEnhance(encoder(), separator(), decoder())


ESPNET = [
    "TFGridNet",
    "TFGridNetV2",
    "DC_CRN",
    "DCCRN",
    "BSRNN",
    "SkiM",
    "DPRNN",
    "RNN",
    "Conformer",
    "Transformer",
    "TCN",
    "DPTNet",
]
COLUMNS = [
    "model",
    "params",
    "dense_macs",
    "shells",
    "prunable",
    "macs_ratio",
    "compile_s",
    "export",
    "onnx_error",
    "note",
]


def measure(name: str, budget: float, tmp: Path, toolkit: str = "asteroid") -> dict:
    import sepfx

    torch.manual_seed(0)
    try:
        if toolkit == "espnet":
            model = espnet_model(name).eval()
        else:
            import asteroid.models

            model = getattr(asteroid.models, name)(**CONFIGS[name]).eval()
    except Exception as error:  # a config this toolkit version refuses: say so, go on
        return {"model": name, "note": f"does not build: {type(error).__name__}: {error}"[:160]}
    rate = int(getattr(model, "sample_rate", 8000) or 8000)
    x = torch.randn(1, rate, generator=torch.Generator().manual_seed(0))
    row: dict = {"model": name, "params": sum(p.numel() for p in model.parameters())}
    start = time.perf_counter()
    try:
        slim = sepfx.compile(model, budget=budget, example_input=x, progress=False)
    except sepfx.errors.SepfxError as error:
        row["note"] = f"{type(error).__name__}: {str(error)[:160]}"
        return row
    report = slim.sepfx_report
    row.update(
        compile_s=time.perf_counter() - start,
        dense_macs=report.dense_macs,
        shells=", ".join(p or "(root)" for p in report.shells) or "none",
        prunable=report.prunable_macs_share,
        macs_ratio=report.macs_ratio,
    )
    try:
        result = sepfx.export_onnx(slim, tmp / f"{name}.onnx")
    except sepfx.errors.ExportError as error:
        row["export"] = "refused"
        row["note"] = str(error).splitlines()[1].strip()[:160]
        return row
    axes = [
        a
        for a, dynamic in (("batch", result.dynamic_batch), ("time", result.dynamic_time))
        if dynamic
    ]
    row["export"] = f"{result.exporter}, " + (
        f"dynamic {' and '.join(axes)}" if axes else "fixed batch and length"
    )
    if result.recorded:  # generalized over several shapes where an axis is dynamic
        row["export"] += " (its recorded run" + (", generalized)" if axes else ")")
    row["onnx_error"] = max(result.errors.values())
    row["note"] = "; ".join(result.notes)[:160]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=0.4)
    parser.add_argument("--toolkit", choices=["asteroid", "espnet"], default="asteroid")
    parser.add_argument("--models", nargs="+", help="default: every model of the toolkit")
    args = parser.parse_args()
    models = args.models or (ESPNET if args.toolkit == "espnet" else list(CONFIGS))
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    tmp = Path(__file__).resolve().parent / "results" / "_onnx"
    tmp.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in models:
        rows.append(measure(name, args.budget, tmp, args.toolkit))
        print(rows[-1], flush=True)
    for path in tmp.glob("*.onnx"):
        path.unlink()
    tmp.rmdir()
    payload = {"machine": machine(), "budget": args.budget, "toolkit": args.toolkit, "rows": rows}
    stem = "real_code" if args.toolkit == "asteroid" else f"real_code_{args.toolkit}"
    print(f"wrote {write(stem, payload, markdown_table(rows, COLUMNS))}")


if __name__ == "__main__":
    main()
