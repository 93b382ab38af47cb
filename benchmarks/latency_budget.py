"""Latency budgets on ONNX Runtime: does ``compile(model, latency=r)`` give a model that runs at
r x the dense model's time, measured apart from the compile?

For each model, input length and request: compile with an empty latency cache (the first
compile's seconds), compile again (the cached compile's seconds), then time the exported dense
and slim models side by side in a fresh Python process (ONNX Runtime, 1 thread, the medians
of ``--repeats`` rounds of ``--runs`` interleaved runs, the median of those reported).

    python benchmarks/latency_budget.py                   # bundled checkpoints, 1 s and 4 s
    python benchmarks/latency_budget.py --smoke           # tiny Conv-TasNet, 1 s: seconds
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine, markdown_table, write  # noqa: E402

import sepfx  # noqa: E402
from sepfx.models import build, pretrained, pretrained_names  # noqa: E402

COLUMNS = [
    "model",
    "seconds",
    "requested",
    "measured",
    "compile_measured",
    "predicted",
    "within_5pct",
    "macs_ratio",
    "dense_ms",
    "slim_ms",
    "compile_s",
    "cached_compile_s",
    "timed_keep_sets",
]

# times two ONNX files in this fresh process: argv = dense, slim, length, threads, runs, repeats
_TIMER = """
import json, sys
import numpy as np
from sepfx.bench import ort_medians
dense, slim, length, threads, runs, repeats = sys.argv[1:7]
x = np.random.default_rng(0).standard_normal((1, int(length))).astype(np.float32)
rounds = [ort_medians([dense, slim], x, int(threads), int(runs)) for _ in range(int(repeats))]
print(json.dumps(rounds))
"""


def time_apart(dense: str, slim: str, length: int, runs: int, repeats: int) -> list:
    """[(dense s, slim s)] per round, timed in a new process."""
    out = subprocess.run(
        [sys.executable, "-c", _TIMER, dense, slim, str(length), "1", str(runs), str(repeats)],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def model_of(name: str, config: str | None) -> torch.nn.Module:
    if config is None and name in pretrained_names():
        return pretrained(name)
    torch.manual_seed(0)
    return build(name, config or "tiny").eval()


def export(model, path: str, x: torch.Tensor, rate: int) -> None:
    """Checked at a 1 s slice (ONNX Runtime's float32 reductions drift past the check's
    tolerance on long inputs); at the whole input where the file's length is fixed."""
    if not sepfx.export_onnx(model, path, x[..., :rate]).dynamic_time:
        sepfx.export_onnx(model, path, x)


def run_one(name, config, seconds, request, runs, repeats, workdir) -> dict:
    model = model_of(name, config)
    rate = int(getattr(model, "sample_rate", 8000) or 8000)
    x = torch.randn(1, int(rate * seconds), generator=torch.Generator().manual_seed(0))
    os.environ["SEPFX_CACHE_DIR"] = tempfile.mkdtemp(dir=workdir)  # empty: the first compile
    start = time.perf_counter()
    slim = sepfx.compile(model, latency=request, example_input=x, progress=True)
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    again = sepfx.compile(model, latency=request, example_input=x, progress=False)
    cached_s = time.perf_counter() - start
    row = slim.sepfx_report.latency
    assert again.sepfx_report.latency.measurements == 0, "the cached compile timed again"
    dense_path = os.path.join(workdir, f"{name}-{seconds}-{request}-dense.onnx")
    slim_path = os.path.join(workdir, f"{name}-{seconds}-{request}-slim.onnx")
    analysis = sepfx.analyze(model, x[..., :rate])
    export(analysis.slim(analysis.keep_all()), dense_path, x, rate)
    export(slim, slim_path, x, rate)
    rounds = time_apart(dense_path, slim_path, x.shape[-1], runs, repeats)
    dense_ms = 1e3 * float(np.median([r[0] for r in rounds]))
    slim_ms = 1e3 * float(np.median([r[1] for r in rounds]))
    ratios = [r[1] / r[0] for r in rounds]
    measured = float(np.median(ratios))
    return {
        "model": name,
        "seconds": seconds,
        "requested": request,
        "measured": measured,
        "measured_rounds": ratios,
        "compile_measured": row.measured,
        "predicted": row.predicted,
        "within_5pct": bool(abs(measured - request) <= 0.05 * request),
        "macs_ratio": slim.sepfx_report.macs_ratio,
        "dense_ms": dense_ms,
        "slim_ms": slim_ms,
        "compile_s": compile_s,
        "cached_compile_s": cached_s,
        "timed_keep_sets": row.measurements,
        "kept": [g.kept for g in sorted(slim.sepfx_report.groups, key=lambda g: g.index)],
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["conv_tasnet", "sudormrf", "tdanet"])
    parser.add_argument("--config", default=None, help="zoo config (default: bundled checkpoint)")
    parser.add_argument("--seconds", nargs="+", type=float, default=[4.0, 1.0])
    parser.add_argument("--latency", nargs="+", type=float, default=[0.5])
    parser.add_argument(
        "--extra",
        nargs="*",
        default=["conv_tasnet:0.33"],
        help="more model:latency pairs, at every length",
    )
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--smoke", action="store_true", help="tiny Conv-TasNet, 1 s, few runs")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.smoke:
        args.models, args.config, args.seconds, args.latency = ["conv_tasnet"], "tiny", [1.0], [0.6]
        args.extra, args.runs, args.repeats = [], 5, 2
    torch.set_num_threads(1)
    jobs = [(m, r) for m in args.models for r in args.latency]
    jobs += [(m, float(r)) for m, r in (e.split(":") for e in args.extra)]
    rows = []
    name = "latency_budget_smoke" if args.smoke else "latency_budget"
    with tempfile.TemporaryDirectory() as workdir:
        for seconds in args.seconds:
            for model_name, request in jobs:
                print(f"== {model_name} {seconds:g} s latency {request}", flush=True)
                rows.append(
                    run_one(
                        model_name, args.config, seconds, request, args.runs, args.repeats, workdir
                    )
                )
                print(markdown_table(rows[-1:], COLUMNS), flush=True)
                write(  # after every row: a long run that stops keeps what it measured
                    name,
                    {
                        "machine": machine(),
                        "config": args.config or "bundled",
                        "runs": args.runs,
                        "repeats": args.repeats,
                        "rows": rows,
                    },
                    markdown_table(rows, COLUMNS),
                    args.out,
                )


if __name__ == "__main__":
    main()
