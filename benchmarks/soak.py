"""The long random-architecture soak (issue 11): generate models with ``tests/random_models.py``,
run every check on each, and write what failed, by kind, and why axes were frozen.

    python benchmarks/soak.py --models 500 --seed 0 [--quiet] [--minimise] [--smoke]

Writes ``benchmarks/results/soak.json`` (every model's failures, the failing specs, totals) and
``benchmarks/results/soak.md`` (the tables). Partial results are written every 25 models, so a
long run can be looked at while it goes. ``--minimise`` shrinks the first model of each silent or
crash kind with the delta-debugger and stores the minimal model's source.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import io
import sys
import time
import warnings
from pathlib import Path

import torch

from sepfx.progress import progress_bar

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))
from common import RESULTS, machine, markdown_table, write  # noqa: E402
import random_models  # noqa: E402

SEVERITIES = ("silent", "crash", "loud", "note")
MEANING = {
    "silent": "a wrong model handed out without an error",
    "crash": "an exception that is not a sepfx error",
    "loud": "a sepfx error (fine when the message is clear)",
    "note": "not a failure",
}


def _quietly(call, *args, **kwargs):
    """``call(...)`` with warnings and stderr (tracebacks torch prints itself) silenced."""
    with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        return call(*args, **kwargs)


def soak(
    models: int,
    seed: int,
    onnx_every: int,
    max_nodes: int,
    minimise: bool,
    quiet: bool,
    out_dir: Path,
) -> dict:
    start = time.perf_counter()
    records = []
    by_kind: dict[str, dict] = {}
    frozen_axes = collections.Counter()
    frozen_models = collections.Counter()
    cases: dict[str, dict] = {}
    bar = progress_bar(range(seed, seed + models), desc="soak", unit="model", disable=quiet)
    for n, model_seed in enumerate(bar, 1):
        try:
            spec = _quietly(random_models.generate, model_seed, max_nodes)
        except RuntimeError as error:  # the generator found no valid model for this seed
            records.append({"seed": model_seed, "generator_error": str(error)})
            continue
        outcome = _quietly(
            random_models.check, spec, onnx=onnx_every > 0 and model_seed % onnx_every == 0
        )
        kinds = collections.Counter(outcome.kinds())
        records.append(
            {
                "seed": model_seed,
                "seconds": round(outcome.seconds, 3),
                "checks": outcome.checks,
                "nodes": len(spec["nodes"]),
                "ops": [r["op"] for r in spec["nodes"]],
                "groups": outcome.groups,
                "traced": outcome.traced,
                "onnx": outcome.onnx,
                "latency": outcome.latency,
                "failures": dict(kinds),
            }
        )
        for failure in outcome.failures:
            entry = by_kind.setdefault(
                failure.kind,
                {"models": [], "occurrences": 0, "example": failure.detail.splitlines()[0]},
            )
            entry["occurrences"] += 1
            if model_seed not in entry["models"]:
                entry["models"].append(model_seed)
            if failure.severity in ("silent", "crash") and failure.kind not in cases:
                cases[failure.kind] = {"seed": model_seed, "detail": failure.detail, "spec": spec}
        reasons = [random_models.normalised_reason(r) for _, r in outcome.frozen]
        frozen_axes.update(reasons)
        frozen_models.update(set(reasons))
        bar.set_postfix(defects=sum(1 for r in records if _defects(r)))
        if n % 25 == 0:
            _write(
                records, by_kind, frozen_axes, frozen_models, cases, start, out_dir, partial=True
            )
    bar.close()
    if minimise:
        done: dict[int, str] = {}  # seed -> the kind its model was minimised for
        for kind, case in progress_bar(sorted(cases.items()), desc="minimising", disable=quiet):
            if case["seed"] in done:  # one model, several kinds: minimised once
                case["minimised_as"] = done[case["seed"]]
                continue
            done[case["seed"]] = kind
            try:
                small = _quietly(random_models.minimise, case["spec"], kind, seconds=300)
                case["minimal_spec"] = small
                case["minimal_source"] = random_models.regression_source(small)
            except Exception as error:  # the failure did not reproduce: keep the full spec
                case["minimise_error"] = f"{type(error).__name__}: {error}"
    return _write(records, by_kind, frozen_axes, frozen_models, cases, start, out_dir)


def _defects(record: dict) -> list[str]:
    return [k for k in record.get("failures", {}) if k.split(":")[0] in ("silent", "crash")]


def _write(
    records, by_kind, frozen_axes, frozen_models, cases, start, out_dir: Path, partial: bool = False
) -> dict:
    checked = [r for r in records if "failures" in r]
    severity_models = {
        s: sum(1 for r in checked if any(k.startswith(s + ":") for k in r["failures"]))
        for s in SEVERITIES
    }
    totals = {
        "models": len(checked),
        "generator_errors": len(records) - len(checked),
        "checks": sum(r["checks"] for r in checked),
        "seconds": round(time.perf_counter() - start, 1),
        "traced": sum(1 for r in checked if r["traced"]),
        "eager_shells": sum(1 for r in checked if r["traced"] is False),
        "onnx_checked": sum(1 for r in checked if r["onnx"]),
        "latency_compiled": sum(1 for r in checked if r.get("latency") is not None),
        "models_with": severity_models,
        "partial": partial,
    }
    kinds = {
        k: {
            "severity": k.split(":")[0],
            "models": len(v["models"]),
            "occurrences": v["occurrences"],
            "seeds": v["models"][:30],
            "example": v["example"],
        }
        for k, v in sorted(
            by_kind.items(),
            key=lambda kv: (SEVERITIES.index(kv[0].split(":")[0]), -len(kv[1]["models"])),
        )
    }
    payload = {
        "machine": machine(),
        "sepfx": _version(),
        "totals": totals,
        "failures_by_kind": kinds,
        "frozen_reasons": {
            r: {"axes": n, "models": frozen_models[r]} for r, n in frozen_axes.most_common()
        },
        "cases": cases,
        "models": records,
    }
    write(
        "soak",
        payload,
        _table(totals, kinds, frozen_axes, frozen_models, checked, cases, payload["sepfx"]),
        out_dir,
    )
    return payload


def _version() -> str:
    """The sepfx checked: its commit (and whether passes/ or sepfx/ differ from it) and, when it
    is not this checkout's, where it was imported from."""
    import subprocess

    import sepfx

    root = HERE.parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=root,
            text=True,
            capture_output=True,
            timeout=30,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "passes", "sepfx"],
            cwd=root,
            text=True,
            capture_output=True,
            timeout=30,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit, dirty = "unknown", ""
    where = Path(sepfx.__file__).resolve().parent.parent
    text = commit + (" with local changes" if dirty else "")
    return text if where == root else f"{text} (sepfx imported from {where})"


def _table(totals, kinds, frozen_axes, frozen_models, checked, cases, version) -> str:
    lines = [
        f"sepfx {version}.",
        "",
        f"{totals['models']} random models (tests/random_models.py), {totals['checks']} checks, "
        f"{totals['seconds']:.0f} s; {totals['traced']} traced whole, {totals['eager_shells']} "
        f"with eager shells; ONNX Runtime parity on {totals['onnx_checked']}."
        + (" **Partial: still running.**" if totals["partial"] else ""),
        "",
        "Models with at least one failure of each severity:",
        "",
        markdown_table(
            [
                {"severity": s, "models": totals["models_with"][s], "meaning": MEANING[s]}
                for s in SEVERITIES
            ],
            ["severity", "models", "meaning"],
        ),
        "",
        "## Failures by kind",
        "",
        markdown_table(
            [
                {
                    "kind": k,
                    "models": v["models"],
                    "occurrences": v["occurrences"],
                    "first seeds": " ".join(map(str, v["seeds"][:8])),
                    "example": v["example"][:140].replace("|", "\\|"),
                }
                for k, v in kinds.items()
            ],
            ["kind", "models", "occurrences", "first seeds", "example"],
        ),
        "",
        "## Frozen axes by reason",
        "",
        markdown_table(
            [
                {"reason": r.replace("|", "\\|"), "axes": n, "models": frozen_models[r]}
                for r, n in frozen_axes.most_common()
            ],
            ["reason", "axes", "models"],
        ),
        "",
        "## Slowest models",
        "",
        markdown_table(
            sorted(checked, key=lambda r: -r["seconds"])[:10],
            ["seed", "seconds", "checks", "nodes", "groups", "traced"],
        ),
    ]
    minimal = {k: c for k, c in cases.items() if "minimal_source" in c}
    if minimal:
        lines += [
            "",
            "## Minimal models",
            "",
            "The first model of each silent or crash kind, shrunk by the delta-debugger "
            "while it still fails with that kind.",
            "",
        ]
        for kind, case in minimal.items():
            also = [k for k, c in cases.items() if c.get("minimised_as") == kind]
            lines += [f"### {kind} (seed {case['seed']})", ""]
            if also:
                lines += [f"The same model also showed: {', '.join(also)}.", ""]
            lines += ["```python", case["minimal_source"].strip(), "```", ""]
    lines += [
        "",
        "Replay a model: `python tests/random_models.py --seed SEED`; shrink it: "
        "`python tests/random_models.py --seed SEED --minimise KIND`.",
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0, help="the first model's seed")
    parser.add_argument(
        "--onnx-every",
        type=int,
        default=5,
        help="ONNX Runtime parity on the seeds that are multiples of this (0: none)",
    )
    parser.add_argument("--max-nodes", type=int, default=12)
    parser.add_argument(
        "--minimise",
        action="store_true",
        help="shrink the first model of each silent or crash kind",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar, no summary")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="a quick run of 6 models (one with ONNX), for the tests",
    )
    args = parser.parse_args(argv)
    if args.smoke:
        args.models, args.onnx_every, args.minimise = 6, 6, False
    torch.set_num_threads(1)
    payload = soak(
        args.models, args.seed, args.onnx_every, args.max_nodes, args.minimise, args.quiet, args.out
    )
    if not args.quiet:
        totals = payload["totals"]
        print(
            f"{totals['models']} models, {totals['checks']} checks, {totals['seconds']:.0f} s; "
            f"models with silent failures: {totals['models_with']['silent']}, crashes: "
            f"{totals['models_with']['crash']}, loud: {totals['models_with']['loud']}"
        )
        for kind, entry in payload["failures_by_kind"].items():
            print(f"  {entry['models']:4d} models  {kind}")
        print(f"written: {args.out / 'soak.json'}, {args.out / 'soak.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
