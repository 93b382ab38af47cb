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
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine, markdown_table, paired_medians, plot, write  # noqa: E402

import sepfx  # noqa: E402
from sepfx.models import build  # noqa: E402


def _ort_session(path: str, threads: int, cuda: bool):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    providers = ["CUDAExecutionProvider"] if cuda else ["CPUExecutionProvider"]
    return ort.InferenceSession(path, options, providers=providers)


def run(models, config, budgets, seconds, threads_list, runs, out_dir: Path) -> list[dict]:
    rows = []
    tmp = tempfile.mkdtemp()
    for name in models:
        torch.manual_seed(0)
        dense = build(name, config).eval()
        analysis = sepfx.analyze(dense)
        dense_graph = analysis.slim(analysis.keep_all())
        dense_onnx = os.path.join(tmp, f"{name}-dense.onnx")
        sepfx.export_onnx(dense_graph, dense_onnx)
        for budget in budgets:
            slim = sepfx.compile(dense, budget=budget, progress=False)
            report = slim.sepfx_report
            slim_onnx = os.path.join(tmp, f"{name}-{budget}.onnx")
            sepfx.export_onnx(slim, slim_onnx)
            mac_ratio = report.dense_macs / report.macs
            for sec in seconds:
                x = torch.randn(1, int(dense.sample_rate * sec))
                for threads in threads_list:
                    torch.set_num_threads(threads)
                    with torch.inference_mode():
                        t_dense, t_slim = paired_medians([lambda: dense(x), lambda: slim(x)], runs)
                    rows.append(_row(name, budget, sec, f"torch cpu x{threads}", t_dense, t_slim,
                                     mac_ratio, report))
                    a, b = _ort_session(dense_onnx, threads, False), _ort_session(slim_onnx, threads, False)
                    feed = {"mixture": x.numpy()}
                    t_dense, t_slim = paired_medians(
                        [lambda: a.run(None, feed), lambda: b.run(None, feed)], runs)
                    rows.append(_row(name, budget, sec, f"ort cpu x{threads}", t_dense, t_slim,
                                     mac_ratio, report))
                if torch.cuda.is_available():
                    rows += _cuda_rows(name, dense, slim, budget, sec, x, runs, mac_ratio, report,
                                       dense_onnx, slim_onnx)
                print(rows[-1])
    return rows


def _cuda_rows(name, dense, slim, budget, sec, x, runs, mac_ratio, report, dense_onnx, slim_onnx):
    rows = []
    dense_c, slim_c, xc = dense.cuda(), slim.cuda(), x.cuda()

    def timed(model):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        model(xc)
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1000

    with torch.inference_mode():
        for _ in range(5):
            timed(dense_c), timed(slim_c)
        pairs = [(timed(dense_c), timed(slim_c)) for _ in range(runs)]
    t_dense, t_slim = float(np.median([p[0] for p in pairs])), float(np.median([p[1] for p in pairs]))
    rows.append(_row(name, budget, sec, "torch cuda", t_dense, t_slim, mac_ratio, report))
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        a, b = _ort_session(dense_onnx, 1, True), _ort_session(slim_onnx, 1, True)
        feed = {"mixture": x.numpy()}
        t_dense, t_slim = paired_medians([lambda: a.run(None, feed), lambda: b.run(None, feed)], runs)
        rows.append(_row(name, budget, sec, "ort cuda", t_dense, t_slim, mac_ratio, report))
    dense.cpu(), slim.cpu()
    return rows


def _row(name, budget, sec, runtime, t_dense, t_slim, mac_ratio, report):
    speedup = t_dense / t_slim
    return {"model": name, "budget": budget, "seconds": sec, "runtime": runtime,
            "dense_ms": 1000 * t_dense, "slim_ms": 1000 * t_slim,
            "macs_ratio": report.macs_ratio, "speedup": speedup,
            "speedup_over_mac_ratio": speedup / mac_ratio}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["conv_tasnet", "sudormrf", "tdanet", "dprnn", "sepformer"])
    parser.add_argument("--config", default="small")
    parser.add_argument("--budgets", nargs="+", type=float, default=[0.6, 0.4, 0.25])
    parser.add_argument("--seconds", nargs="+", type=float, default=[1, 4, 16])
    parser.add_argument("--threads", nargs="+", type=int, default=[1, os.cpu_count()])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--smoke", action="store_true", help="tiny configs, one length, 3 runs")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.smoke:
        args.models, args.config, args.budgets = ["conv_tasnet"], "tiny", [0.4]
        args.seconds, args.threads, args.runs = [1], [1], 3
    rows = run(args.models, args.config, args.budgets, args.seconds, sorted(set(args.threads)),
               args.runs, args.out)
    columns = ["model", "budget", "seconds", "runtime", "dense_ms", "slim_ms", "macs_ratio",
               "speedup", "speedup_over_mac_ratio"]
    name = "latency_smoke" if args.smoke else "latency"
    write(name, {"machine": machine(), "config": args.config, "runs": args.runs, "rows": rows},
          markdown_table(rows, columns), args.out)
    series = {}
    for r in rows:
        if r["seconds"] == max(args.seconds):
            key = f"{r['model']} {r['runtime']}"
            series.setdefault(key, ([], []))
            series[key][0].append(1 / r["macs_ratio"])
            series[key][1].append(r["speedup"])
    plot(args.out / f"{name}.png", series, "MAC reduction (dense MACs / slim MACs)",
         "measured speed-up", f"Speed-up vs MAC reduction ({max(args.seconds):g} s input)",
         diagonal=True)
    print(f"wrote {args.out / (name + '.md')}")


if __name__ == "__main__":
    main()
