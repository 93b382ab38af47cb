"""Compile time and peak memory: sepfx's trace + channel analysis + cost model + slim per zoo
model, beside Torch-Pruning's dependency-graph build on the same model. Each measurement runs in
a fresh subprocess so that peak memory (ru_maxrss) is its own.

    python benchmarks/compile_time.py [--config small] [--smoke]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine, markdown_table, plot, write  # noqa: E402

_CHILD = r"""
import json, resource, sys, time, torch
torch.set_num_threads(1)
from sepfx.models import build
name, config, tool = sys.argv[1:4]
torch.manual_seed(0)
model = build(name, config).eval()
x = torch.randn(1, model.sample_rate)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
out = {}
try:
    if tool == "sepfx":
        import sepfx
        analysis = sepfx.analyze(model, x)
        mid = time.perf_counter()
        analysis.slim(analysis.keep_ratio(0.5))
        out["analyze_s"] = mid - start
        out["slim_s"] = time.perf_counter() - mid
        out["groups"] = len(analysis.groups)
    else:
        import torch_pruning as tp
        dg = tp.DependencyGraph().build_dependency(model, example_inputs=x)
        out["groups"] = len(list(dg.get_all_groups()))
    out["total_s"] = time.perf_counter() - start
    out["ok"] = True
except Exception as error:
    out["ok"] = False
    out["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
out["rss_before_mb"] = base / 1024
print(json.dumps(out))
"""


def measure(name: str, config: str, tool: str) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, name, config, tool],
        capture_output=True,
        text=True,
        timeout=900,
    )
    try:
        result = json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        result = {"ok": False, "error": (proc.stderr.strip().splitlines() or ["?"])[-1][:200]}
    return {"model": name, "tool": tool, **result}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--models",
        nargs="+",
        default=["conv_tasnet", "dprnn", "sudormrf", "tdanet", "sepformer", "afrcnn"],
    )
    parser.add_argument("--config", default="small")
    parser.add_argument("--smoke", action="store_true", help="tiny conv_tasnet only")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.smoke:
        args.models, args.config = ["conv_tasnet"], "tiny"
    rows = []
    for name in args.models:
        for tool in ("sepfx", "torch-pruning"):
            rows.append(measure(name, args.config, tool))
            print(rows[-1])
    name = "compile_time_smoke" if args.smoke else "compile_time"
    columns = [
        "model",
        "tool",
        "ok",
        "total_s",
        "analyze_s",
        "slim_s",
        "groups",
        "peak_rss_mb",
        "error",
    ]
    write(
        name,
        {"machine": machine(), "config": args.config, "rows": rows},
        markdown_table(rows, columns),
        args.out,
    )
    ok = [r for r in rows if r.get("ok")]
    series = {}
    for tool in ("sepfx", "torch-pruning"):
        pts = [
            (i, r["total_s"])
            for i, m in enumerate(args.models)
            for r in ok
            if r["model"] == m and r["tool"] == tool
        ]
        if pts:
            series[tool] = ([p[0] for p in pts], [p[1] for p in pts])
    plot(
        args.out / f"{name}.png",
        series,
        "model (" + ", ".join(args.models) + ")",
        "seconds",
        f"Graph analysis time ({args.config} configs)",
    )
    print(f"wrote {args.out / (name + '.md')}")


if __name__ == "__main__":
    main()
