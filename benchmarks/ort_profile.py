"""Where the time goes in ONNX Runtime, dense vs slim: ORT's own per-node profile summed by kind
of node (pointwise conv, depthwise conv, norm, elementwise, shape and layout, ...), with each
kind's share of the dense run and how much of its time and of its MACs the slim model keeps.
A kind whose time shrinks less than the MACs is where the speed-up falls short of the MAC cut.
Each width allocation (``--allocations``: "uniform", the same fraction of every group,
and compile's default "latency", which spends the MACs where they write the fewest activation
elements) is profiled; the unprofiled speed-up is also measured with the kept counts rounded to other
multiples (``--multiples``: 1 is no rounding), and single 1x1 convolutions are timed at the dense and
kept channel counts and one channel off them (``--gemm``): whether channel counts that suit the
SIMD width run faster per MAC. The model is the bundled checkpoint where one exists for
``--config`` (the latency widths depend on what the trained weights are sensitive to), else
randomly initialised (``--smoke``, or ``--random``).

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
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine, markdown_table, write  # noqa: E402

import sepfx  # noqa: E402
from sepfx.bench import (  # noqa: E402
    PROFILE_COLUMNS,
    latency_row,
    ort_medians,
    ort_op_profile,
    ort_session,
    paired_medians,
    profile_rows,
)
from sepfx.budget import ALLOCATIONS  # noqa: E402
from sepfx.models import build, pretrained, pretrained_names  # noqa: E402


def pointwise_timings(shapes, frames: int, threads: int, runs: int, tmp: str) -> list[dict]:
    """Median ONNX Runtime time of one 1x1 Conv1d per (out, in) channel shape on ``frames``
    frames, run interleaved, and its picoseconds per MAC."""
    sessions, feeds = [], []
    for out_channels, in_channels in shapes:
        path = os.path.join(tmp, f"pointwise_{out_channels}_{in_channels}.onnx")
        example = torch.randn(1, in_channels, frames)
        sepfx.export_onnx(nn.Conv1d(in_channels, out_channels, 1), path, example)
        sessions.append(ort_session(path, threads))
        feeds.append({sessions[-1].get_inputs()[0].name: example.numpy()})
    times = paired_medians([lambda s=s, f=f: s.run(None, f) for s, f in zip(sessions, feeds)], runs)
    return [
        {
            "out_channels": o,
            "in_channels": i,
            "frames": frames,
            "us": 1e6 * t,
            "ps_per_mac": 1e12 * t / (o * i * frames),
        }
        for (o, i), t in zip(shapes, times)
    ]


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
    parser.add_argument(
        "--allocations",
        nargs="+",
        choices=list(ALLOCATIONS),
        default=["uniform", "latency"],
        help="width allocations to profile and time (compile's default: latency)",
    )
    parser.add_argument(
        "--gemm",
        nargs="+",
        type=int,
        default=[64, 128, 40, 80, 39, 79, 41, 81, 48, 96, 32, 64],
        help="channel counts C, D, ...: 1x1 convs D->C and C->D are timed for each pair",
    )
    parser.add_argument(
        "--random", action="store_true", help="random weights even where a checkpoint exists"
    )
    parser.add_argument("--smoke", action="store_true", help="tiny config, 1 s, 3 runs")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.smoke:
        args.config, args.seconds, args.runs, args.multiples = "tiny", [1], 3, [8, 1]
        args.gemm = [16, 32, 15, 31]
    torch.manual_seed(0)
    model, weights = build(args.model, args.config).eval(), "random"
    if not args.random and args.model in pretrained_names():
        bundled = pretrained(args.model)
        if bundled.sepfx_card["config"] == args.config:
            model, weights = bundled, "bundled checkpoint"
    analysis = sepfx.analyze(model)
    slims = {  # data-free; keyed (allocation, multiple)
        (a, m): sepfx.compile(model, budget=args.budget, multiple=m, allocation=a, progress=False)
        for a in args.allocations
        for m in args.multiples
    }
    rows, summary = [], []
    with tempfile.TemporaryDirectory() as tmp:
        dense_path = os.path.join(tmp, "dense.onnx")
        sepfx.export_onnx(analysis.slim(analysis.keep_all()), dense_path)
        paths = {key: os.path.join(tmp, "slim_{}_{}.onnx".format(*key)) for key in slims}
        for key, slim in slims.items():
            sepfx.export_onnx(slim, paths[key])
        profiled = args.multiples[0]
        for seconds in args.seconds:
            x = torch.randn(1, int(model.sample_rate * seconds)).numpy()
            for allocation in args.allocations:
                dense, slimmed = ort_op_profile(
                    [dense_path, paths[allocation, profiled]], x, args.threads, args.runs
                )
                for row in profile_rows(dense, slimmed):
                    rows.append(
                        {"model": args.model, "allocation": allocation, "seconds": seconds, **row}
                    )
            times = ort_medians([dense_path, *paths.values()], x, args.threads, args.runs)
            runtime = f"ort cpu x{args.threads}"
            for ((a, m), slim), t_slim in zip(slims.items(), times[1:]):
                row = latency_row(
                    args.model, args.budget, seconds, runtime, times[0], t_slim, slim.sepfx_report
                )
                summary.append({"allocation": a, "multiple": m, **row})
            print(markdown_table([r for r in rows if r["seconds"] == seconds], PROFILE_COLUMNS))
        pairs = list(zip(args.gemm[::2], args.gemm[1::2]))
        shapes = [shape for c, d in pairs for shape in ((c, d), (d, c))]
        frames = int(model.sample_rate * args.seconds[-1]) // 8  # the encoder's stride
        gemm = pointwise_timings(shapes, frames, args.threads, max(args.runs, 50), tmp)
    kept = {
        f"{a} x{m}": [[g.size, g.kept] for g in slim.sepfx_report.groups]
        for (a, m), slim in slims.items()
    }
    name = "ort_profile_smoke" if args.smoke else f"ort_profile_{args.model}"
    table = (
        f"{args.model} `{args.config}` ({weights}), budget {args.budget}, "
        f"{args.threads} thread(s).\n\n"
        "Unprofiled (paired medians; `allocation`: how wide each group stays; `multiple`: kept "
        "counts rounded to multiples of it):\n\n"
        + markdown_table(summary, list(summary[0]))
        + f"\n\nProfiled (multiple {profiled}), by kind of node, means over the runs "
        "(ORT's profiler slows each node a little):\n\n"
        + markdown_table(rows, ["allocation", "seconds"] + PROFILE_COLUMNS)
        + f"\n\nOne 1x1 convolution (out <- in channels), {frames} frames:\n\n"
        + markdown_table(gemm, list(gemm[0]))
    )
    payload = {
        "machine": machine(),
        "config": args.config,
        "weights": weights,
        "budget": args.budget,
        "threads": args.threads,
        "runs": args.runs,
        "kept": kept,
        "summary": summary,
        "rows": rows,
        "pointwise": gemm,
    }
    write(name, payload, table, args.out)
    print(f"wrote {args.out / (name + '.md')}")


if __name__ == "__main__":
    main()
