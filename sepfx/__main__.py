"""Command line: ``python -m sepfx compile|bench|demo|separate ...``. Errors are one line, not a
traceback."""

from __future__ import annotations

import argparse
import sys


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, like every other sepfx error
        print(f"sepfx: error: {message} (see python -m sepfx --help)", file=sys.stderr)
        sys.exit(2)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="python -m sepfx",
        description="Prune speech-separation networks with a torch.fx compiler pass.",
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    comp = sub.add_parser(
        "compile",
        help="prune a model, print the report, write ONNX",
        description="Prune a model, print its report and write an ONNX file.",
    )
    _model_arguments(comp)
    size = comp.add_mutually_exclusive_group()
    size.add_argument(
        "--budget",
        type=float,
        default=None,
        help="MACs of the slim model as a fraction of the dense model's (default: 0.4)",
    )
    size.add_argument(
        "--ratio",
        type=float,
        default=None,
        help="instead of a budget: keep this fraction of every channel group",
    )
    _latency_arguments(comp)
    comp.add_argument(
        "--threads",
        type=int,
        default=1,
        help="with --latency on a CPU target: threads it runs with (default: 1)",
    )
    comp.add_argument(
        "--importance",
        default="magnitude",
        choices=["magnitude", "first", "random"],
        help="with --ratio: which units to keep (default: weight magnitude)",
    )
    comp.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    comp.add_argument("--out", default="slim.onnx", help="ONNX file to write (default: slim.onnx)")
    bench = sub.add_parser(
        "bench",
        help="latency of a model beside its slim versions",
        description="Compile a model at each budget (data-free) and time dense "
        "vs slim on random input: PyTorch eager and ONNX Runtime "
        "on CPU, and CUDA when present. Runs are interleaved and "
        "the median is reported; read the speed-up, not the "
        "absolute times, on a busy machine.",
    )
    _model_arguments(bench)
    bench.add_argument(
        "--budget",
        type=float,
        nargs="+",
        default=None,
        help="one or more MAC budgets (default: 0.4 without --latency)",
    )
    bench.add_argument(
        "--latency",
        type=float,
        nargs="+",
        default=[],
        help="also compile under these latency budgets on --target (timed at the first "
        "--seconds and --threads), then time them as the MAC-budget rows",
    )
    bench.add_argument(
        "--target",
        default="ort-cpu",
        choices=["ort-cpu", "torch-cpu"],
        help="with --latency: where the compile times the slim model (default: ort-cpu; "
        "with --device cuda, cuda)",
    )
    bench.add_argument(
        "--seconds",
        type=float,
        nargs="+",
        default=[4.0],
        help="input lengths in seconds (default: 4)",
    )
    bench.add_argument(
        "--threads", type=int, nargs="+", default=[1], help="CPU thread counts (default: 1)"
    )
    bench.add_argument("--runs", type=int, default=20, help="timed runs per model (default: 20)")
    bench.add_argument("--json", default=None, help="also write the rows to this JSON file")
    demo = sub.add_parser(
        "demo",
        help="the bundled Conv-TasNet on the bundled mixtures, compiled and measured",
        description="Compile the bundled Conv-TasNet at a budget on half of "
        "the committed test mixtures and measure it on the other "
        "half: MACs, params, latency, SI-SNRi before/after.",
    )
    demo.add_argument(
        "--budget", type=float, default=None, help="MACs budget (default: 0.4 without --latency)"
    )
    _latency_arguments(demo)
    demo.add_argument(
        "--gates",
        choices=["magnitude", "learned"],
        default="magnitude",
        help="keep the channels of largest weights (data-free, default: measured better "
        "after the demo's short fine-tune, see README) or learn the gates on the tune "
        "mixtures (SepPrune)",
    )
    demo.add_argument(
        "--steps", type=int, default=100, help="gate-learning steps with --gates learned"
    )
    demo.add_argument("--finetune-steps", type=int, default=250, help="default 250")
    demo.add_argument(
        "--no-distill",
        action="store_true",
        help="fine-tune on the clean sources instead of distilling from the dense "
        "model (measured worse: see README)",
    )
    demo.add_argument("--out", default="slim.onnx")
    sep = sub.add_parser(
        "separate",
        help="separate a WAV file with an ONNX model",
        description="Run an exported model on a mono WAV file and write one "
        "WAV per source next to it (or in --out-dir).",
    )
    sep.add_argument("model", help="an .onnx file written by sepfx")
    sep.add_argument("mixture", help="a mono 16-bit WAV file")
    sep.add_argument("--out-dir", default=None)
    sep.add_argument(
        "--sample-rate",
        type=int,
        default=8000,
        help="the model's sample rate; the input is resampled to it (default 8000)",
    )
    return parser


def _latency_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--latency",
        type=float,
        default=None,
        help="time of the slim model on --target as a fraction of the dense model's, measured "
        "there (with --budget both hold); the timings are cached in ~/.cache/sepfx",
    )
    parser.add_argument(
        "--target",
        default="ort-cpu",
        choices=["ort-cpu", "torch-cpu", "cuda"],
        help="with --latency: where the slim model will run (default: ort-cpu, ONNX Runtime)",
    )


def _model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "model",
        help="a zoo model name (conv_tasnet, dprnn, sudormrf, tdanet, "
        "sepformer, afrcnn): its bundled checkpoint if there is "
        "one; or a "
        "file written by sepfx.save",
    )
    parser.add_argument(
        "--config",
        default=None,
        help="build the zoo model untrained with this config (tiny, small, paper) "
        "instead of loading its checkpoint",
    )
    parser.add_argument(
        "--device",
        default=None,
        help="run sepfx on the model moved to this torch device, e.g. cuda (default: cpu)",
    )


def _bench(args) -> int:
    import json
    from pathlib import Path

    import torch

    from sepfx.bench import compare, format_table

    device = args.device or "cpu"
    model = _model(args.model, args.config, device)
    budgets = [0.4] if args.budget is None and not args.latency else args.budget or []
    rows = compare(
        model,
        budgets,
        args.seconds,
        args.threads,
        args.runs,
        name=args.model,
        # cpu: PyTorch and ONNX Runtime on the CPU (CUDA rows too where a GPU is present);
        # cuda: the GPU only, eager and CUDA-graph replay
        device="cuda" if torch.device(device).type == "cuda" else "cpu",
        latencies=args.latency,
        target=args.target,
    )
    print(format_table(rows))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(rows, indent=2))
        print(f"wrote {args.json}")
    return 0


def _demo(args) -> int:
    from sepfx import demo

    result = demo.run(
        0.4 if args.budget is None and args.latency is None else args.budget,
        args.steps,
        args.finetune_steps,
        args.out,
        distill=not args.no_distill,
        gates=args.gates,
        latency=args.latency,
        target=args.target,
    )
    print(demo.summary(result))
    return 0


def _separate(args) -> int:
    from pathlib import Path

    import numpy as np
    import onnxruntime as ort

    from sepfx import runner
    from sepfx.data import read_wav, resample, write_wav
    from sepfx.errors import InputError

    for path in (args.model, args.mixture):
        if not Path(path).is_file():
            raise InputError(f"no such file: {path}")
    samples, rate = read_wav(args.mixture)
    x = samples.astype(np.float32) / 32768.0
    if rate != args.sample_rate:
        x = resample(x, rate, args.sample_rate).astype(np.float32)
    options = ort.SessionOptions()
    options.log_severity_level = 4  # a refused input is reported below as one line
    session = ort.InferenceSession(args.model, options, providers=["CPUExecutionProvider"])
    try:
        # a file exported at a fixed length runs on overlap-added chunks (sepfx.runner)
        sources = runner.separate(session, x)
        failure = None if sources.size else "it gave an empty output"
    except Exception as error:  # noqa: BLE001  (too short? see below; else raised as is)
        failure = error
    if failure is not None:
        minimum = _minimum_length(session)
        if minimum is not None and len(x) < minimum:
            raise InputError(
                f"{args.mixture} is too short: {len(x)} samples at {args.sample_rate} Hz, and "
                f"this model's minimum input length is {minimum} samples "
                f"({1000 * minimum / args.sample_rate:.1f} ms); give a longer recording or pad "
                f"it with silence to at least {minimum} samples"
            )
        if isinstance(failure, Exception):
            raise failure
        raise InputError(f"{args.model} gave an empty output for {args.mixture}")
    out_dir = Path(args.out_dir) if args.out_dir else Path(args.mixture).parent
    out_dir.mkdir(parents=True, exist_ok=True)
    peak = max(float(np.abs(sources).max()), 1e-9)
    scale = min(1.0, 0.99 / peak)  # avoid clipping, same gain for every source
    for i, source in enumerate(sources, 1):
        target = out_dir / f"{Path(args.mixture).stem}_s{i}.wav"
        write_wav(target, np.round(source * scale * 32767).astype(np.int16), args.sample_rate)
        print(f"wrote {target}")
    return 0


def _minimum_length(session, limit: int = 1 << 22) -> int | None:
    """The shortest input (samples) an ONNX model runs on with a non-empty output, found by
    probing silence of growing length, then bisecting. None if no length up to ``limit`` runs,
    and for a fixed time axis (any recording runs there, in chunks padded to that length)."""
    import numpy as np

    info = session.get_inputs()[0]
    if isinstance(info.shape[-1], int):
        return None
    batch = info.shape[0] if isinstance(info.shape[0], int) else 1
    dtype = np.float64 if info.type == "tensor(double)" else np.float32

    def runs(length: int) -> bool:
        try:
            out = session.run(None, {info.name: np.zeros((batch, length), dtype=dtype)})
        except Exception:  # noqa: BLE001  (ONNX Runtime refuses this length)
            return False
        return all(o.size for o in out)

    high = 1
    while not runs(high):
        high *= 2
        if high > limit:
            return None
    low = high // 2  # fails (or 0); high runs
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (low, mid) if runs(mid) else (mid, high)
    return high


def _model(name: str, config: str | None, device: str = "cpu"):
    """A zoo name (its bundled checkpoint unless --config is given) or a file from sepfx.save."""
    from pathlib import Path

    import torch

    import sepfx
    from sepfx.models import ZOO, build, pretrained, pretrained_names

    try:
        where = torch.device(device)
    except RuntimeError as error:
        raise sepfx.errors.InputError(
            f"--device {device!r} is not a torch device: give cpu, cuda or cuda:N ({error})"
        ) from error
    if where.type == "cuda" and not torch.cuda.is_available():
        raise sepfx.errors.InputError(
            f"--device {device}: no CUDA device here (torch.cuda.is_available() is False); "
            "leave --device out to run on the CPU"
        )
    if name in ZOO:
        if config is None and name in pretrained_names():
            return pretrained(name).to(device)
        return build(name, config or "tiny").eval().to(device)
    if Path(name).is_file():
        return sepfx.load(name, map_location=device)
    raise sepfx.errors.InputError(
        f"{name!r} is neither a zoo model ({', '.join(sorted(ZOO))}) "
        "nor a file written by sepfx.save"
    )


def _compile(args) -> int:
    import torch

    import sepfx

    torch.manual_seed(args.seed)
    model = _model(args.model, args.config, args.device or "cpu")
    if args.ratio is not None:
        if args.latency is not None:
            raise sepfx.errors.InputError("give --ratio or --latency, not both")
        analysis = sepfx.analyze(model)
        slim = analysis.slim(analysis.keep_ratio(args.ratio, args.importance, seed=args.seed))
    else:
        slim = sepfx.compile(
            model,
            budget=args.budget,
            seed=args.seed,
            latency=args.latency,
            target=args.target,
            threads=args.threads,
        )
    print(slim.sepfx_report)
    result = sepfx.export_onnx(slim, args.out)
    worst = max(result.errors.values())
    print(
        f"wrote {result.path} ({result.exporter} exporter, dynamic time axis: "
        f"{result.dynamic_time}); ONNX Runtime vs PyTorch max relative error {worst:.1e}"
    )
    for note in result.notes:
        print(f"note: {note}")
    return 0


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        return {"compile": _compile, "bench": _bench, "demo": _demo, "separate": _separate}[
            args.command
        ](args)
    except Exception as error:  # one clear line for people; tracebacks are for bug reports
        import wave

        from sepfx.errors import SepfxError

        expected = isinstance(error, (SepfxError, ValueError, OSError, wave.Error)) or type(
            error
        ).__module__.startswith("onnxruntime")  # e.g. not an ONNX file
        kind = "error" if expected else f"unexpected {type(error).__name__}"
        print(f"sepfx: {kind}: {str(error).splitlines()[0] if str(error) else ''}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
