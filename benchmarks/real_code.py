"""Real separation code as its authors published it: every separation model of Asteroid 0.7.0
that builds here (small configs, random weights), compiled unedited by sepfx at budget 0.4,
data-free, and exported to ONNX. Writes benchmarks/results/real_code.{json,md}.

    pip install --no-deps -c constraints.txt asteroid asteroid-filterbanks
    python benchmarks/real_code.py

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


def measure(name: str, budget: float, tmp: Path) -> dict:
    import asteroid.models

    import sepfx

    torch.manual_seed(0)
    model = getattr(asteroid.models, name)(**CONFIGS[name]).eval()
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
    row["export"] = f"{result.exporter}, dynamic {' and '.join(axes) or 'nothing'}"
    row["onnx_error"] = max(result.errors.values())
    row["note"] = "; ".join(result.notes)[:160]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=0.4)
    parser.add_argument("--models", nargs="+", default=list(CONFIGS))
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    tmp = Path(__file__).resolve().parent / "results" / "_onnx"
    tmp.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in args.models:
        rows.append(measure(name, args.budget, tmp))
        print(rows[-1], flush=True)
    for path in tmp.glob("*.onnx"):
        path.unlink()
    tmp.rmdir()
    payload = {"machine": machine(), "budget": args.budget, "rows": rows}
    print(f"wrote {write('real_code', payload, markdown_table(rows, COLUMNS))}")


if __name__ == "__main__":
    main()
