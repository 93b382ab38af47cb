"""Latency of dense vs slim models: PyTorch eager and ONNX Runtime, CPU (1 thread and all) and
CUDA when present, at 1 s, 4 s and 16 s inputs. Reports the speed-up and speed-up / MAC ratio
(1.0 means the slim model is as much faster as it is smaller).

    python benchmarks/latency.py                       # small zoo configs, budgets 0.6/0.4/0.25
    python benchmarks/latency.py --smoke               # tiny, one length: what CI runs
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine, markdown_table, plot, write  # noqa: E402

from sepfx.bench import COLUMNS, compare  # noqa: E402
from sepfx.models import build  # noqa: E402


def run(models, config, budgets, seconds, threads_list, runs) -> list[dict]:
    rows = []
    for name in models:
        torch.manual_seed(0)
        rows += compare(
            build(name, config), budgets, seconds, threads_list, runs, name=name, progress=True
        )
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--models", nargs="+", default=["conv_tasnet", "sudormrf", "tdanet", "dprnn", "sepformer"]
    )
    parser.add_argument("--config", default="small")
    parser.add_argument("--budgets", nargs="+", type=float, default=[0.6, 0.4, 0.25])
    parser.add_argument("--seconds", nargs="+", type=float, default=[1, 4, 16])
    parser.add_argument("--threads", nargs="+", type=int, default=[1, os.cpu_count()])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--smoke", action="store_true", help="tiny configs, one length, 3 runs")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument(
        "--name",
        default="latency",
        help="results file name (one file per model when models are run apart)",
    )
    args = parser.parse_args(argv)
    if args.smoke:
        args.models, args.config, args.budgets = ["conv_tasnet"], "tiny", [0.4]
        args.seconds, args.threads, args.runs = [1], [1], 3
    rows = run(
        args.models, args.config, args.budgets, args.seconds, sorted(set(args.threads)), args.runs
    )
    name = "latency_smoke" if args.smoke else args.name
    write(
        name,
        {"machine": machine(), "config": args.config, "runs": args.runs, "rows": rows},
        markdown_table(rows, COLUMNS),
        args.out,
    )
    series = {}
    for r in rows:
        if r["seconds"] == max(args.seconds):
            key = f"{r['model']} {r['runtime']}"
            series.setdefault(key, ([], []))
            series[key][0].append(1 / r["macs_ratio"])
            series[key][1].append(r["speedup"])
    plot(
        args.out / f"{name}.png",
        series,
        "MAC reduction (dense MACs / slim MACs)",
        "measured speed-up",
        f"Speed-up vs MAC reduction ({max(args.seconds):g} s input)",
        diagonal=True,
    )
    print(f"wrote {args.out / (name + '.md')}")


if __name__ == "__main__":
    main()
