"""Command line: ``python -m sepfx compile MODEL ...``. Errors are one line, not a traceback."""
from __future__ import annotations

import argparse
import sys


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m sepfx",
        description="Prune speech-separation networks with a torch.fx compiler pass.")
    sub = parser.add_subparsers(dest="command", required=True)
    comp = sub.add_parser("compile", help="prune a model, print the report, write ONNX",
                          description="Prune a model, print its report and write an ONNX file.")
    comp.add_argument("model", help="a zoo model name (conv_tasnet, dprnn, sudormrf, tdanet, "
                                    "sepformer)")
    comp.add_argument("--config", default="tiny", help="zoo config (default: tiny)")
    size = comp.add_mutually_exclusive_group()
    size.add_argument("--budget", type=float, default=None,
                      help="MACs of the slim model as a fraction of the dense model's "
                           "(default: 0.4)")
    size.add_argument("--ratio", type=float, default=None,
                      help="instead of a budget: keep this fraction of every channel group")
    comp.add_argument("--importance", default="magnitude", choices=["magnitude", "first", "random"],
                      help="with --ratio: which units to keep (default: weight magnitude)")
    comp.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    comp.add_argument("--out", default="slim.onnx", help="ONNX file to write (default: slim.onnx)")
    return parser


def _compile(args) -> int:
    import torch

    import sepfx
    from sepfx.models import build

    torch.manual_seed(args.seed)
    model = build(args.model, args.config).eval()
    if args.ratio is not None:
        analysis = sepfx.analyze(model)
        slim = analysis.slim(analysis.keep_ratio(args.ratio, args.importance, seed=args.seed))
    else:
        budget = 0.4 if args.budget is None else args.budget
        slim = sepfx.compile(model, budget=budget, seed=args.seed)
    print(slim.sepfx_report)
    result = sepfx.export_onnx(slim, args.out)
    worst = max(result.errors.values())
    print(f"wrote {result.path} ({result.exporter} exporter, dynamic time axis: "
          f"{result.dynamic_time}); ONNX Runtime vs PyTorch max relative error {worst:.1e}")
    for note in result.notes:
        print(f"note: {note}")
    return 0


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        return {"compile": _compile}[args.command](args)
    except Exception as error:  # one clear line for people; tracebacks are for bug reports
        from sepfx.errors import SepfxError

        kind = "error" if isinstance(error, (SepfxError, ValueError, FileNotFoundError)) \
            else f"unexpected {type(error).__name__}"
        print(f"sepfx: {kind}: {str(error).splitlines()[0] if str(error) else ''}",
              file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
