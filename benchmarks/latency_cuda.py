"""Latency of dense vs slim models on a GPU: PyTorch eager and CUDA-graph replay, fp32 and a
16-bit precision, batch 1/4/16, 1 s and 4 s, budgets 0.6/0.4/0.25, the zoo's `small` and
`paper` configs, with Torch-Pruning at equal MACs beside sepfx when torch_pruning imports, and
a kernel profile (torch.profiler) of dense vs slim Conv-TasNet (paper, budget 0.4).

    python benchmarks/latency_cuda.py OUTDIR              # on a GPU machine (see benchmarks/gpu)
    python benchmarks/latency_cuda.py OUTDIR --dry-run    # the whole script on the CPU, tiny

Writes OUTDIR/latency_cuda.{json,md,png}, again after every model so that a run stopped early
keeps what it measured. Rows keep `sepfx bench`'s columns plus batch, config, precision (and
runtime "cuda" for eager, "graph" for a CUDA-graph replay). Work is done most important first
(the rows issue 25 accepts on, then the whole grid model by model) and stops starting new cells
after --time-limit seconds; cells not reached are listed in the JSON ("not_reached"). Slim
models are compiled data-free on the CPU (which channels are kept does not change the time).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, markdown_table, write  # noqa: E402

import sepfx  # noqa: E402
from sepfx.bench import COLUMNS, cuda_kernel_profile, cuda_medians, latency_row  # noqa: E402
from sepfx.models import ZOO, build  # noqa: E402

NAME = "latency_cuda"
EXTRA_COLUMNS = ["batch", "config", "precision", "tp_ms", "tp_macs_ratio", "dry_run", "note"]
TABLE_COLUMNS = [
    "model",
    "config",
    "budget",
    "batch",
    "seconds",
    "precision",
    "runtime",
    "dense_ms",
    "slim_ms",
    "macs_ratio",
    "speedup",
    "speedup_over_mac_ratio",
    "tp_ms",
    "tp_macs_ratio",
    "note",
]
PROFILE_MODEL, PROFILE_BUDGET = "conv_tasnet", 0.4


def gpu_facts() -> dict:
    """GPU name, driver, torch's CUDA and cuDNN versions (None where absent)."""
    facts: dict = {
        "gpu": None,
        "driver": None,
        "torch_cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
    }
    if torch.cuda.is_available():
        facts["gpu"] = torch.cuda.get_device_name(0)
        try:
            query = ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]
            facts["driver"] = (
                subprocess.run(query, capture_output=True, text=True, timeout=20)
                .stdout.split("\n")[0]
                .strip()
            )
        except (OSError, subprocess.SubprocessError):
            pass
    return facts


class Models:
    """Dense models (seed 0), their slim versions and Torch-Pruning versions, made on first use
    and kept for the cells that follow."""

    def __init__(self, allocation: str, multiple: int, torch_pruning: bool):
        self.allocation, self.multiple = allocation, multiple
        self.dense: dict = {}
        self.slim: dict = {}
        self.tp: dict = {}
        self.tp_error: str | None = None
        self.tp_search: dict = {}
        if torch_pruning:
            try:
                import torch_pruning  # noqa: F401
            except ImportError:
                self.tp_error = "torch_pruning is not installed: no Torch-Pruning column"
        else:
            self.tp_error = "Torch-Pruning not asked for (--no-torch-pruning)"

    def dense_model(self, name, config):
        if (name, config) not in self.dense:
            torch.manual_seed(0)
            self.dense[name, config] = build(name, config).eval()
        return self.dense[name, config]

    def slim_model(self, name, config, budget):
        if (name, config, budget) not in self.slim:
            self.slim[name, config, budget] = sepfx.compile(
                self.dense_model(name, config),
                budget=budget,
                allocation=self.allocation,
                multiple=self.multiple,
                progress=False,
            )
        return self.slim[name, config, budget]

    def tp_model(self, name, config, budget):
        """Torch-Pruning (magnitude, uniform ratio) at the slim model's MAC ratio, or None."""
        if self.tp_error is not None:
            return None
        key = (name, config, budget)
        if key not in self.tp:
            try:
                from quality import TorchPruningSearch, macs_of

                dense = self.dense_model(name, config)
                if (name, config) not in self.tp_search:
                    mixture = torch.randn(2, 8000)
                    sources = torch.randn(2, dense.n_src, 8000)
                    self.tp_search[name, config] = TorchPruningSearch(
                        dense, (mixture, sources), macs_of(dense), tolerance=0.01
                    )
                target = self.slim_model(name, config, budget).sepfx_report.macs_ratio
                found = self.tp_search[name, config].search("tp-magnitude", target)
                self.tp[key] = (found["model"].eval(), found["macs_ratio"], None)
            except Exception as error:  # Torch-Pruning's failure is a result, not a crash
                self.tp[key] = (None, None, f"Torch-Pruning failed: {_one_line(error)}")
        return self.tp[key]


def _one_line(error: BaseException) -> str:
    return f"{type(error).__name__}: {(str(error).splitlines() or [''])[0][:160]}"


def cells(args) -> list[tuple]:
    """Every (model, config, budget, batch, seconds, precision, mode), most important first:
    the rows issue 25 accepts on, then the whole grid, model by model."""
    grid = [
        (m, c, b, n, s, p, mode)
        for c in args.configs
        for m in args.models
        for b in args.budgets
        for n in args.batches
        for s in args.seconds
        for p in args.precisions
        for mode in args.modes
    ]
    config, budget, longest = args.configs[0], 0.4, max(args.seconds)
    first = [
        (PROFILE_MODEL, config, budget, max(args.batches), longest, "fp32", "eager"),
        *[(m, c, budget, 1, longest, "fp32", "graph") for c in args.configs for m in args.models],
    ]
    first = [cell for cell in first if cell in grid]
    return first + [cell for cell in grid if cell not in first]


def measure(cell, models: Models, args) -> dict:
    name, config, budget, batch, seconds, precision, mode = cell
    extra = {"batch": batch, "config": config, "precision": precision, "dry_run": args.dry_run}
    runtime = "graph" if mode == "graph" else "cuda"
    empty = {c: None for c in COLUMNS} | {"model": name, "budget": budget, "seconds": seconds}
    try:
        dense = models.dense_model(name, config)
        slim = models.slim_model(name, config, budget)
        report = slim.sepfx_report
        if mode == "graph" and args.device == "cpu":
            row = empty | {"runtime": runtime, "macs_ratio": report.macs_ratio}
            return row | extra | {"note": "CUDA graphs need a GPU: not run in the dry run"}
        tp_model, tp_macs_ratio, tp_note = models.tp_model(name, config, budget) or (None,) * 3
        timed = [dense, slim] + ([tp_model] if tp_model is not None else [])
        x = torch.randn(batch, int(dense.sample_rate * seconds))
        times = cuda_medians(
            timed, x, args.runs, graphs=mode == "graph", precision=precision, device=args.device
        )
        row = latency_row(name, budget, seconds, runtime, times[0], times[1], report)
        tp_ms = 1000 * times[2] if len(times) > 2 else None
        note = tp_note or ("" if tp_model is not None else None)
        return row | extra | {"tp_ms": tp_ms, "tp_macs_ratio": tp_macs_ratio, "note": note}
    except Exception as error:  # one failed cell is a result; the run goes on
        traceback.print_exc()
        return empty | {"runtime": runtime} | extra | {"note": f"failed: {_one_line(error)}"}
    finally:
        if args.device == "cuda":
            torch.cuda.empty_cache()


def kernel_profile(models: Models, args) -> dict | None:
    config = args.configs[0]
    try:
        dense = models.dense_model(PROFILE_MODEL, config)
        slim = models.slim_model(PROFILE_MODEL, config, PROFILE_BUDGET)
        x = torch.randn(max(args.batches), int(dense.sample_rate * max(args.seconds)))
        x = x.to(args.device)
        runs = 2 if args.dry_run else 5
        return {
            "model": PROFILE_MODEL,
            "config": config,
            "budget": PROFILE_BUDGET,
            "batch": x.shape[0],
            "seconds": max(args.seconds),
            "macs_ratio": slim.sepfx_report.macs_ratio,
            "dense": cuda_kernel_profile(dense, x, runs),
            "slim": cuda_kernel_profile(slim, x, runs),
        }
    except Exception as error:
        traceback.print_exc()
        return {"error": _one_line(error)}


def profile_table(profile: dict, top: int = 15) -> str:
    """The most costly kernels of the dense run beside the slim run's, and the totals."""
    if "error" in profile:
        return f"Kernel profile failed: {profile['error']}\n"
    dense = {k["kernel"]: k for k in profile["dense"]["kernels"]}
    slim = {k["kernel"]: k for k in profile["slim"]["kernels"]}
    rows = [
        {
            "kernel": "all kernels",
            "dense_launches": profile["dense"]["launches"],
            "slim_launches": profile["slim"]["launches"],
            "dense_ms": profile["dense"]["ms"],
            "slim_ms": profile["slim"]["ms"],
        }
    ]
    names = sorted(set(dense) | set(slim), key=lambda k: -dense.get(k, {"ms": 0})["ms"])
    for kernel in names[:top]:
        d, s = dense.get(kernel, {}), slim.get(kernel, {})
        rows.append(
            {
                "kernel": kernel[:90].replace("|", "/"),
                "dense_launches": d.get("launches"),
                "slim_launches": s.get("launches"),
                "dense_ms": d.get("ms"),
                "slim_ms": s.get("ms"),
            }
        )
    columns = ["kernel", "dense_launches", "slim_launches", "dense_ms", "slim_ms"]
    return (
        f"Kernel profile ({profile['dense']['device']}, ms and launches per run): "
        f"{profile['model']} {profile['config']}, budget {profile['budget']} "
        f"(MACs {100 * profile['macs_ratio']:.1f}%), batch {profile['batch']}, "
        f"{profile['seconds']:g} s, fp32 eager\n\n" + markdown_table(rows, columns) + "\n"
    )


def plot(path: Path, rows: list[dict]) -> None:
    """Speed-up against MAC reduction, one colour per runtime and precision."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot written")
        return
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    series: dict[str, tuple[list, list]] = {}
    for r in rows:
        if r["speedup"] is not None:
            x, y = series.setdefault(f"{r['runtime']} {r['precision']}", ([], []))
            x.append(1 / r["macs_ratio"])
            y.append(r["speedup"])
    for label, (x, y) in sorted(series.items()):
        ax.scatter(x, y, s=12, label=label)
    top = max([max(x) for x, _ in series.values()] + [1.0])
    ax.plot([1, top], [1, top], color="grey", linestyle=":", label="speed-up = MAC reduction")
    ax.axhline(1.0, color="red", linewidth=0.8, label="as fast as dense")
    ax.set_xlabel("MAC reduction (dense MACs / slim MACs)")
    ax.set_ylabel("measured speed-up")
    ax.set_title("Dense vs slim on " + (rows[0].get("gpu") or "the GPU") if rows else "")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def save(out: Path, args, models, rows, profile, not_reached, started) -> None:
    facts = machine() | gpu_facts()
    payload = {
        "machine": facts,
        "dry_run": args.dry_run,
        "device": args.device,
        "runs": args.runs,
        "allocation": args.allocation,
        "multiple": args.multiple,
        "torch_pruning": models.tp_error or "tp-magnitude at the slim model's MAC ratio",
        "precision_note": "bf16/fp16: model and input cast (.to(dtype)), no autocast",
        "elapsed_s": time.time() - started,
        "rows": rows,
        "kernel_profile": profile,
        "not_reached": [list(c) for c in not_reached],
    }
    head = (
        f"GPU {facts['gpu']} · driver {facts['driver']} · torch {facts['torch']} · CUDA "
        f"{facts['torch_cuda']} · cuDNN {facts['cudnn']} · {args.runs} paired runs, medians of "
        f"CUDA events · slim: data-free, allocation {args.allocation}, multiple {args.multiple}"
        + (" · **DRY RUN on the CPU: times are not CUDA figures**" if args.dry_run else "")
        + (f" · {len(not_reached)} cells not reached (time limit)" if not_reached else "")
        + "\n\n"
    )
    table = head + markdown_table(rows, TABLE_COLUMNS) + "\n\n"
    table += profile_table(profile) if profile else "Kernel profile not reached.\n"
    write(NAME, payload, table, out)
    plot(out / f"{NAME}.png", [r | {"gpu": facts["gpu"]} for r in rows])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="folder for latency_cuda.{json,md,png}")
    parser.add_argument("--dry-run", action="store_true", help="on the CPU, tiny and short")
    parser.add_argument("--models", nargs="+", default=list(ZOO), choices=list(ZOO))
    parser.add_argument("--configs", nargs="+", default=["paper", "small"])
    parser.add_argument("--budgets", nargs="+", type=float, default=[0.6, 0.4, 0.25])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 4, 16])
    parser.add_argument("--seconds", nargs="+", type=float, default=[1.0, 4.0])
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    parser.add_argument(
        "--modes", nargs="+", default=["eager", "graph"], choices=["eager", "graph"]
    )
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--allocation", default="uniform", choices=["uniform", "latency"])
    parser.add_argument("--multiple", type=int, default=8, help="kept counts rounded to this")
    parser.add_argument("--no-torch-pruning", action="store_true")
    parser.add_argument(
        "--time-limit", type=float, default=420.0, help="seconds; no new cell starts after it"
    )
    args = parser.parse_args(argv)
    args.device = "cuda"
    if args.dry_run:
        args.device, args.models, args.configs = "cpu", ["conv_tasnet", "dprnn"], ["tiny"]
        args.budgets, args.batches, args.seconds, args.runs = [0.4], [1, 2], [0.25], 2
    elif not torch.cuda.is_available():
        parser.error("no CUDA device here: run on a GPU machine, or pass --dry-run")
    started = time.time()
    models = Models(args.allocation, args.multiple, not args.no_torch_pruning)
    todo = cells(args)
    rows: list[dict] = []
    profile = None
    for i, cell in enumerate(todo):
        if time.time() - started > args.time_limit:
            print(f"time limit reached: {len(todo) - i} cells not reached", flush=True)
            save(args.out, args, models, rows, profile, todo[i:], started)
            return 0
        row = measure(cell, models, args)
        rows.append({c: row.get(c) for c in COLUMNS + EXTRA_COLUMNS})  # the same keys, in order
        r = rows[-1]
        print(
            f"[{time.time() - started:6.0f}s] {' '.join(map(str, cell))}: dense "
            f"{r['dense_ms']} ms, slim {r['slim_ms']} ms, {r['note'] or ''}",
            flush=True,
        )
        if profile is None and cell[0] == PROFILE_MODEL and cell[1] == args.configs[0]:
            profile = kernel_profile(models, args)  # after the first rows: they come first
        if i + 1 == len(todo) or todo[i + 1][:2] != cell[:2]:
            save(args.out, args, models, rows, profile, todo[i + 1 :], started)
    save(args.out, args, models, rows, profile, [], started)
    print(json.dumps({"rows": len(rows), "elapsed_s": round(time.time() - started)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
