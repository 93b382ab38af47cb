"""Where the time goes in ONNX Runtime, dense vs slim: ORT's own per-node profile summed by kind
of node (pointwise conv, depthwise conv, norm, elementwise, shape and layout, ...), with each
kind's share of the dense run and how much of its time and of its MACs the slim model keeps.
A kind whose time shrinks less than the MACs is where the speed-up falls short of the MAC cut.
The unprofiled speed-up is also measured with the kept counts rounded to other multiples
(``--multiples``: 1 is no rounding), since SIMD-width channel counts are a common remedy.

    python benchmarks/ort_profile.py                   # conv_tasnet small, budget 0.4, 1 s and 4 s
    python benchmarks/ort_profile.py --smoke           # tiny, one length: what CI runs
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine, markdown_table, write  # noqa: E402

import sepfx  # noqa: E402
from sepfx.bench import PROFILE_COLUMNS, ort_medians, ort_op_profile, profile_rows  # noqa: E402
from sepfx.models import build  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="conv_tasnet")
    parser.add_argument("--config", default="small")
    parser.add_argument("--budget", type=float, default=0.4)
    parser.add_argument("--seconds", nargs="+", type=float, default=[1, 4])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument(
        "--multiples",
        nargs="+",
        type=int,
        default=[8, 1, 16],
        help="kept-count roundings to time; the first is profiled (compile's default: 8)",
    )
    parser.add_argument("--smoke", action="store_true", help="tiny config, 1 s, 3 runs")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.smoke:
        args.config, args.seconds, args.runs, args.multiples = "tiny", [1], 3, [8, 1]
    torch.manual_seed(0)
    model = build(args.model, args.config).eval()
    analysis = sepfx.analyze(model)
    slims = {
        m: sepfx.compile(model, budget=args.budget, multiple=m, progress=False)  # data-free
        for m in args.multiples
    }
    rows, summary = [], []
    with tempfile.TemporaryDirectory() as tmp:
        dense_path = os.path.join(tmp, "dense.onnx")
        sepfx.export_onnx(analysis.slim(analysis.keep_all()), dense_path)
        paths = {m: os.path.join(tmp, f"slim{m}.onnx") for m in slims}
        for m, slim in slims.items():
            sepfx.export_onnx(slim, paths[m])
        profiled = args.multiples[0]
        for seconds in args.seconds:
            x = torch.randn(1, int(model.sample_rate * seconds)).numpy()
            dense, slimmed = ort_op_profile(
                [dense_path, paths[profiled]], x, args.threads, args.runs
            )
            for row in profile_rows(dense, slimmed):
                rows.append({"model": args.model, "seconds": seconds, **row})
            times = ort_medians([dense_path, *paths.values()], x, args.threads, args.runs)
            for (m, slim), t_slim in zip(slims.items(), times[1:]):
                macs_ratio = slim.sepfx_report.macs_ratio
                summary.append(
                    {
                        "model": args.model,
                        "seconds": seconds,
                        "multiple": m,
                        "dense_ms": 1000 * times[0],
                        "slim_ms": 1000 * t_slim,
                        "macs_ratio": macs_ratio,
                        "speedup": times[0] / t_slim,
                        "speedup_over_mac_ratio": times[0] / t_slim * macs_ratio,
                    }
                )
            print(markdown_table([r for r in rows if r["seconds"] == seconds], PROFILE_COLUMNS))
    kept = {m: [[g.size, g.kept] for g in slim.sepfx_report.groups] for m, slim in slims.items()}
    name = "ort_profile_smoke" if args.smoke else f"ort_profile_{args.model}"
    table = (
        "Unprofiled (paired medians; `multiple`: kept counts rounded to multiples of it):\n\n"
        + markdown_table(summary, list(summary[0]))
        + f"\n\nProfiled (multiple {profiled}), by kind of node (ORT's profiler slows each node "
        "a little):\n\n" + markdown_table(rows, ["seconds"] + PROFILE_COLUMNS)
    )
    payload = {
        "machine": machine(),
        "config": args.config,
        "budget": args.budget,
        "threads": args.threads,
        "runs": args.runs,
        "kept": kept,
        "summary": summary,
        "rows": rows,
    }
    write(name, payload, table, args.out)
    print(f"wrote {args.out / (name + '.md')}")


if __name__ == "__main__":
    main()
