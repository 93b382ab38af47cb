"""Latency of a dense model beside its slim versions: PyTorch eager and ONNX Runtime on CPU (and
CUDA when present), and on a GPU (``cuda_medians``: CUDA events, eager or CUDA-graph replay,
fp32/bf16/fp16; ``cuda_kernel_profile``: where the GPU time goes). This module is the one place
that times runtimes. Dense and slim run interleaved so that a noisy, shared machine slows both
alike: read the speed-up, a ratio, rather than the absolute times.

Used by ``python -m sepfx bench``, the demo and ``benchmarks/latency.py``.
"""

from __future__ import annotations

import copy
import os
import tempfile
import time

import numpy as np
import torch

COLUMNS = [
    "model",
    "budget",
    "seconds",
    "runtime",
    "dense_ms",
    "slim_ms",
    "macs_ratio",
    "speedup",
    "speedup_over_mac_ratio",
]


def paired_medians(fns: list, runs: int, warmup: int = 2) -> list[float]:
    """Median seconds of each callable, run interleaved (a, b, a, b, ...)."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(runs):
        for i, fn in enumerate(fns):
            start = time.perf_counter()
            fn()
            times[i].append(time.perf_counter() - start)
    return [float(np.median(t)) for t in times]


def ort_session(path: str, threads: int = 1, cuda: bool = False, profile_prefix: str | None = None):
    """An ONNX Runtime session; with ``profile_prefix`` it writes ORT's per-node profile
    there (``session.end_profiling()`` returns the file)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    if profile_prefix is not None:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    providers = ["CUDAExecutionProvider"] if cuda else ["CPUExecutionProvider"]
    return ort.InferenceSession(path, options, providers=providers)


def ort_medians(
    paths: list[str], x: np.ndarray, threads: int = 1, runs: int = 20, cuda: bool = False
) -> list[float]:
    """Median ONNX Runtime latency (seconds) of each model on the input ``x``, interleaved."""
    sessions = [ort_session(p, threads, cuda) for p in paths]
    feeds = [{s.get_inputs()[0].name: x} for s in sessions]
    return paired_medians([lambda s=s, f=f: s.run(None, f) for s, f in zip(sessions, feeds)], runs)


PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _runner(model: torch.nn.Module, x: torch.Tensor, graphs: bool):
    """A callable that runs ``model`` on ``x`` and returns its output: the eager call, or the
    replay of a CUDA graph captured from it (static input buffer ``x``; warmed up on a side
    stream first, as ``torch.cuda.graphs`` asks)."""
    if not graphs:
        return lambda: model(x)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            model(x)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        output = model(x)

    def replay():
        graph.replay()
        return output  # the graph's static output buffer, rewritten by each replay

    return replay


def cuda_medians(
    models: list,
    x: torch.Tensor,
    runs: int,
    graphs: bool = False,
    precision: str = "fp32",
    *,
    device: str = "cuda",
    warmup: int = 5,
) -> list[float]:
    """Median seconds of each model on ``x`` on a GPU, the models run interleaved (a, b, a, b,
    ...) after ``warmup`` rounds, each call timed by CUDA events, ``cudnn.benchmark`` on.

    ``precision`` "bf16"/"fp16" runs a copy of each model and the input cast to that dtype
    (``.to(dtype)``, no autocast: no cast kernels, and a CUDA graph captures it as it is).
    ``graphs=True`` times the replay of a CUDA graph captured from each model
    (``torch.cuda.CUDAGraph`` over a static input buffer). The caller's models are not touched
    (copies are moved). ``device="cpu"`` times the same copies with ``time.perf_counter`` (no
    graphs): the benchmark's dry run, not a CUDA figure."""
    import copy

    from sepfx.errors import InputError

    if precision not in PRECISIONS:
        raise InputError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if runs < 1:
        raise InputError(f"runs must be >= 1, got {runs}")
    on_cuda = torch.device(device).type == "cuda"
    if on_cuda and not torch.cuda.is_available():
        raise InputError("cuda_medians: no CUDA device here (device='cpu' times on the CPU)")
    if graphs and not on_cuda:
        raise InputError("cuda_medians: CUDA graphs need a CUDA device")
    dtype = PRECISIONS[precision]
    copies = [copy.deepcopy(m).eval().to(device=device, dtype=dtype) for m in models]
    x = x.to(device=device, dtype=dtype)
    previous = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        with torch.inference_mode():
            fns = [_runner(m, x, graphs) for m in copies]
            if not on_cuda:
                return paired_medians(fns, runs, warmup)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

            def timed(fn) -> float:
                start.record()
                fn()
                end.record()
                end.synchronize()
                return start.elapsed_time(end) / 1000

            for _ in range(warmup):
                for fn in fns:
                    timed(fn)
            times = [[timed(fn) for fn in fns] for _ in range(runs)]
    finally:
        torch.backends.cudnn.benchmark = previous
    return [float(np.median([t[i] for t in times])) for i in range(len(fns))]


def cuda_kernel_profile(model: torch.nn.Module, x: torch.Tensor, runs: int = 5) -> dict:
    """Where a model's GPU time goes, by ``torch.profiler``: per kernel name, the number of
    launches and milliseconds per run (the most costly first), and the totals. On a CPU input
    (the dry run) the same table is made of the CPU operators' self times. The model is run on
    a copy, on ``x``'s device, after two warm-up runs."""
    import copy

    from torch.profiler import ProfilerActivity, profile

    on_cuda = x.device.type == "cuda"
    model = copy.deepcopy(model).eval().to(x.device)
    # CPU activity too on a GPU: kernels are attributed to the ops that launched them
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_cuda else [])
    with torch.inference_mode():
        for _ in range(2):
            model(x)
        if on_cuda:
            torch.cuda.synchronize()
        with profile(activities=activities) as prof:
            for _ in range(runs):
                model(x)
            if on_cuda:
                torch.cuda.synchronize()
    kernels = []
    for event in prof.key_averages():
        if on_cuda:
            if event.device_type != torch.autograd.DeviceType.CUDA:
                continue
            microseconds = getattr(event, "self_device_time_total", None)
            if microseconds is None:  # older torch
                microseconds = event.self_cuda_time_total
        else:
            microseconds = event.self_cpu_time_total
        if microseconds <= 0:
            continue
        kernels.append(
            {"kernel": event.key, "launches": event.count / runs, "ms": microseconds / 1000 / runs}
        )
    kernels.sort(key=lambda k: -k["ms"])
    return {
        "device": "cuda" if on_cuda else "cpu",
        "runs": runs,
        "launches": sum(k["launches"] for k in kernels),
        "ms": sum(k["ms"] for k in kernels),
        "kernels": kernels,
    }


def _on(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """``model`` where it is already on ``device``, else a copy there (the caller's stays put)."""
    from sepfx.core import model_device

    here = model_device(model)
    if here.type == device.type and (device.index is None or here.index == device.index):
        return model
    return copy.deepcopy(model).to(device)


def latency_row(name, budget, seconds, runtime, t_dense, t_slim, report) -> dict:
    """One row of ``COLUMNS`` from the dense and slim seconds and the slim model's report;
    ``budget`` is a MAC budget, or ("latency", r) for a model compiled under a latency budget."""
    speedup = t_dense / t_slim
    latency = budget[1] if isinstance(budget, tuple) else None
    return {
        "model": name,
        "budget": None if latency is not None else budget,
        "latency": latency,
        "seconds": seconds,
        "runtime": runtime,
        "dense_ms": 1000 * t_dense,
        "slim_ms": 1000 * t_slim,
        "macs_ratio": report.macs_ratio,
        "speedup": speedup,
        "speedup_over_mac_ratio": speedup * report.macs_ratio,
    }


def compare(
    model: torch.nn.Module,
    budgets: list[float],
    seconds: list[float],
    threads: list[int],
    runs: int = 20,
    name: str | None = None,
    progress: bool = False,
    device: str = "cpu",
    latencies: list[float] = (),  # type: ignore[assignment]
    target: str = "ort-cpu",
) -> list[dict]:
    """Compile ``model`` at each budget (data-free: which channels are kept does not change the
    time) and time dense vs slim on random inputs of each length: one row per budget, length,
    runtime and thread count. ``speedup_over_mac_ratio`` is 1.0 when the slim model is as much
    faster as it is smaller. ``latencies``: also compile under each latency budget on
    ``target`` (at the first thread count, on the first length's input) and time those slim
    models the same way, beside the dense model, apart from the compile's own timing.
    ``device="cuda"`` times on the GPU only (``cuda_medians``, fp32): runtime "cuda" (eager)
    and "graph" (CUDA-graph replay), no thread counts."""
    import sepfx
    from sepfx.errors import InputError
    from sepfx.latency import check_latency
    from sepfx.learn import check_budget

    requests: list = [check_budget(b) for b in budgets]
    requests += [("latency", check_latency(r)) for r in latencies]
    if not requests or not seconds or not threads or runs < 1:
        raise InputError(
            "bench needs at least one budget or latency, length and thread count, and runs >= 1"
        )
    if any(s <= 0 for s in seconds) or any(t < 1 for t in threads):
        raise InputError("bench: input lengths must be > 0 seconds and thread counts >= 1")
    if device not in ("cpu", "cuda"):
        raise InputError(f"bench: device must be 'cpu' or 'cuda', got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise InputError("bench --device cuda: no CUDA device here (torch.cuda.is_available())")
    if device == "cuda":
        return _compare_cuda(model.eval(), requests, seconds, runs, name, progress)
    name = name or type(model).__name__
    model = model.eval()
    sample_rate = getattr(model, "sample_rate", 8000)
    previous_threads = torch.get_num_threads()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        analysis = sepfx.analyze(model)
        dense_onnx = os.path.join(tmp, "dense.onnx")
        sepfx.export_onnx(analysis.slim(analysis.keep_all()), dense_onnx)
        for budget in requests:
            slim = _compiled(model, budget, target, threads[0], seconds[0], progress)
            report = slim.sepfx_report
            slim_onnx = os.path.join(tmp, f"slim-{budget}.onnx")
            sepfx.export_onnx(slim, slim_onnx)
            for sec in seconds:
                x = torch.randn(1, int(sample_rate * sec))
                # CPU rows time CPU copies of a model that lives elsewhere
                dense_cpu, slim_cpu = (
                    _on(model, torch.device("cpu")),
                    _on(slim, torch.device("cpu")),
                )
                try:
                    for n in threads:
                        torch.set_num_threads(n)
                        with torch.inference_mode():
                            t = paired_medians([lambda: dense_cpu(x), lambda: slim_cpu(x)], runs)
                        rows.append(
                            latency_row(name, budget, sec, f"torch cpu x{n}", t[0], t[1], report)
                        )
                        t = ort_medians([dense_onnx, slim_onnx], x.numpy(), n, runs)
                        rows.append(
                            latency_row(name, budget, sec, f"ort cpu x{n}", t[0], t[1], report)
                        )
                finally:
                    torch.set_num_threads(previous_threads)
                if torch.cuda.is_available():
                    t = cuda_medians([model, slim], x, runs)
                    rows.append(latency_row(name, budget, sec, "torch cuda", t[0], t[1], report))
                    import onnxruntime as ort

                    if "CUDAExecutionProvider" in ort.get_available_providers():
                        t = ort_medians([dense_onnx, slim_onnx], x.numpy(), 1, runs, cuda=True)
                        rows.append(latency_row(name, budget, sec, "ort cuda", t[0], t[1], report))
                if progress:
                    print(format_table(rows[-1:], header=False), flush=True)
    return rows


def _compiled(model, request, target, threads, seconds, progress):
    """``model`` compiled at a MAC budget, or at ("latency", r) on ``target`` at an input of
    ``seconds``."""
    import sepfx

    if not isinstance(request, tuple):
        return sepfx.compile(model, budget=request, progress=progress)
    from sepfx.core import model_device

    sample_rate = getattr(model, "sample_rate", 8000) or 8000
    x = torch.randn(1, int(sample_rate * seconds), device=model_device(model))
    return sepfx.compile(
        model,
        latency=request[1],
        target=target,
        threads=threads,
        example_input=x,
        progress=progress,
    )


def _compare_cuda(model, requests, seconds, runs, name, progress) -> list[dict]:
    name = name or type(model).__name__
    sample_rate = getattr(model, "sample_rate", 8000)
    rows = []
    for budget in requests:
        slim = _compiled(model, budget, "cuda", 1, seconds[0], progress)
        for sec in seconds:
            x = torch.randn(1, int(sample_rate * sec))
            for runtime, graphs in (("cuda", False), ("graph", True)):
                t = cuda_medians([model, slim], x, runs, graphs=graphs)
                rows.append(latency_row(name, budget, sec, runtime, t[0], t[1], slim.sepfx_report))
                if progress:
                    print(format_table(rows[-1:], header=False), flush=True)
    return rows


def format_table(rows: list[dict], header: bool = True) -> str:
    """Fixed-width text table of ``compare`` rows, for a terminal."""
    lines = (
        [
            f"{'model':<12} {'budget':>6} {'len s':>6} {'runtime':<13} {'dense ms':>9} "
            f"{'slim ms':>9} {'MACs':>6} {'speed-up':>8} {'/MAC ratio':>10}"
        ]
        if header
        else []
    )
    lines += [
        f"{r['model']:<12} {_request(r):>6} {r['seconds']:>6g} {r['runtime']:<13} "
        f"{r['dense_ms']:>9.2f} {r['slim_ms']:>9.2f} {100 * r['macs_ratio']:>5.1f}% "
        f"{r['speedup']:>7.2f}x {r['speedup_over_mac_ratio']:>10.2f}"
        for r in rows
    ]
    return "\n".join(lines)


def _request(row: dict) -> str:
    """The budget column: a MAC budget ("0.40"), or a latency budget ("t0.50")."""
    if row.get("latency") is not None:
        return f"t{row['latency']:.2f}"
    return f"{row['budget']:.2f}"


# ONNX Runtime node types by the kind of work they do; convolutions are split by their weight's
# shape in ``_node_kind``. What is not listed is "other".
_KINDS = {
    "matmul": {"MatMul", "Gemm", "FusedMatMul", "FusedGemm"},
    "conv transpose": {"ConvTranspose"},
    "recurrent": {"LSTM", "GRU", "RNN"},
    "norm": {
        "InstanceNormalization",
        "LayerNormalization",
        "SimplifiedLayerNormalization",
        "SkipLayerNormalization",
        "BatchNormalization",
        "GroupNorm",
    },
    "elementwise": {
        *("Add", "Sub", "Mul", "Div", "Pow", "Sqrt", "Exp", "Log", "Neg", "Abs", "Erf"),
        *("Relu", "LeakyRelu", "PRelu", "Sigmoid", "Tanh", "Gelu", "FastGelu", "Clip"),
        *("Where", "Equal", "Less", "Greater", "Not", "And", "Cast", "BiasGelu", "QuickGelu"),
    },
    "reduce and softmax": {"ReduceMean", "ReduceSum", "ReduceMax", "Softmax", "LogSoftmax"},
    "shape and layout": {
        *("Shape", "Reshape", "Transpose", "Concat", "Split", "Slice", "Gather", "Pad"),
        *("Unsqueeze", "Squeeze", "Expand", "Tile", "ConstantOfShape", "Range", "Identity"),
        *("Flatten", "ScatterND", "GatherElements"),
    },
}
_KIND_OF = {op: kind for kind, ops in _KINDS.items() for op in ops}


def _node_kind_and_macs(args: dict) -> tuple[str, int]:
    """The kind of one profiled node (``args`` of an ORT profile event) and its multiply-adds
    where they follow from the shapes it ran on (convolutions and matmuls; 0 otherwise)."""
    op = args["op_name"]
    shapes = [next(iter(s.values())) for s in args.get("input_type_shape", [])]
    outputs = [next(iter(s.values())) for s in args.get("output_type_shape", [])]
    if op in ("Conv", "FusedConv") and len(shapes) >= 2 and outputs:
        weight, out = shapes[1], outputs[0]
        macs = out[0] * int(np.prod(out[2:])) * int(np.prod(weight))
        if weight[1] == 1 and shapes[0][1] > 1:  # one input channel per group: depthwise
            return "depthwise conv", macs
        return ("pointwise conv" if int(np.prod(weight[2:])) == 1 else "conv"), macs
    if op in _KINDS["matmul"] and len(shapes) >= 2 and outputs:
        return "matmul", int(np.prod(outputs[0])) * shapes[0][-1]
    return _KIND_OF.get(op, "other"), 0


def ort_op_profile(
    paths: list[str], x: np.ndarray, threads: int = 1, runs: int = 20
) -> list[dict[str, dict]]:
    """ONNX Runtime's own profile of each model on ``x``, the models run interleaved: for each
    kind of node (pointwise conv, depthwise conv, norm, elementwise, ...) the mean kernel
    milliseconds per run (means, so that the kinds add up to the run), the node count and the
    MACs; ``"between kernels"`` is the session's own
    work between them and ``"run"`` the whole run. Profiling slows each node a little: read the
    shares and ratios, and time a model with ``ort_medians``."""
    import json
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        sessions = [
            ort_session(path, threads, profile_prefix=os.path.join(tmp, f"model{i}"))
            for i, path in enumerate(paths)
        ]
        feeds = [{s.get_inputs()[0].name: x} for s in sessions]
        paired_medians([lambda s=s, f=f: s.run(None, f) for s, f in zip(sessions, feeds)], runs)
        profiles = []
        for session in sessions:
            events = json.loads(Path(session.end_profiling()).read_text())
            spans = [e for e in events if e.get("cat") == "Session" and e["name"] == "model_run"]
            spans = spans[-runs:]  # the timed runs, not the warm-up
            per_run: list[dict[str, float]] = [dict() for _ in spans]
            kinds: dict[str, dict] = {}
            for e in events:
                if e.get("cat") != "Node" or not e["name"].endswith("_kernel_time"):
                    continue
                for i, span in enumerate(spans):
                    if span["ts"] <= e["ts"] <= span["ts"] + span["dur"]:
                        kind, macs = _node_kind_and_macs(e["args"])
                        per_run[i][kind] = per_run[i].get(kind, 0.0) + e["dur"] / 1000
                        if i == 0:
                            row = kinds.setdefault(kind, {"nodes": 0, "macs": 0})
                            row["nodes"] += 1
                            row["macs"] += macs
                        break
            for kind, row in kinds.items():
                row["ms"] = float(np.mean([r.get(kind, 0.0) for r in per_run]))
            gaps = [s["dur"] / 1000 - sum(r.values()) for s, r in zip(spans, per_run)]
            kinds["between kernels"] = {"nodes": 0, "macs": 0, "ms": float(np.mean(gaps))}
            kinds["run"] = {
                "nodes": sum(r["nodes"] for r in kinds.values()),
                "macs": sum(r["macs"] for r in kinds.values()),
                "ms": float(np.mean([s["dur"] / 1000 for s in spans])),
            }
            profiles.append(kinds)
    return profiles


PROFILE_COLUMNS = [
    "kind",
    "nodes",
    "dense_ms",
    "slim_ms",
    "dense_share",
    "time_ratio",
    "macs_ratio",
]


def profile_rows(dense: dict[str, dict], slim: dict[str, dict]) -> list[dict]:
    """One row per kind of node, the most costly first, from two ``ort_op_profile`` results:
    what share of the dense run each kind takes and how much of its time and MACs the slim
    model keeps (``time_ratio`` above ``macs_ratio``: that kind shrinks less than its MACs)."""
    total = dense["run"]["ms"]
    rows = []
    for kind in sorted(set(dense) | set(slim), key=lambda k: -dense.get(k, {}).get("ms", 0)):
        d = dense.get(kind, {"nodes": 0, "macs": 0, "ms": 0.0})
        s = slim.get(kind, {"nodes": 0, "macs": 0, "ms": 0.0})
        rows.append(
            {
                "kind": kind,
                "nodes": d["nodes"],
                "dense_ms": d["ms"],
                "slim_ms": s["ms"],
                "dense_share": d["ms"] / total,
                "time_ratio": s["ms"] / d["ms"] if d["ms"] else None,
                "macs_ratio": s["macs"] / d["macs"] if d["macs"] else None,
            }
        )
    return rows
