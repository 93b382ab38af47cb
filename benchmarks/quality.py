"""Separation quality at equal MACs: sepfx's pruning against Torch-Pruning's, fine-tuned alike.

sepfx's learned gates (SepPrune) are compared with sepfx's data-free magnitude ranking and
Torch-Pruning's magnitude, Taylor and random importance, every method fine-tuned the same way;
plus the paper's convergence check (the slim architecture trained from scratch for as many
steps as the others are fine-tuned).

    python benchmarks/make_data.py --out data/mixtures --train 2000 --valid 200 --test 200
    python benchmarks/quality.py                        # every bundled checkpoint, 0.6/0.4/0.25
    python benchmarks/quality.py --models conv_tasnet --budgets 0.4
    python benchmarks/quality.py --models tdanet --name quality_tdanet   # models run apart
    python benchmarks/quality.py --models conv_tasnet --seeds 0 --finetune distill  # quicker
    python benchmarks/quality.py --smoke                # untrained tiny Conv-TasNet, 2 seeds

For each model and budget b:

- ``sepfx-learned``: ``sepfx.compile(model, budget=b, data=train, steps=--gate-steps)``;
- ``sepfx-magnitude``: ``sepfx.compile(model, budget=b, allocation="uniform")`` (no data;
  every group keeps the same fraction);
- ``sepfx-latency``: ``sepfx.compile(model, budget=b)`` (compile's default allocation, the MACs
  spent where they write the fewest activation elements, the groups that change the output
  most kept at least at the uniform width): what those faster widths cost or gain in quality
  (results before 2026-12-03 under this name are the allocation without that guard);
- ``sepfx-time``: ``sepfx.compile(model, latency=b)`` (the budget b read as a latency request:
  ONNX Runtime, 1 thread, timed at a ``--latency-seconds`` input; data-free, so one model for
  every seed, which seeds only the fine-tuning), and ``uniform-time``: the ``sepfx-magnitude``
  model at the MAC budget, found by bisection, whose latency is closest to ``sepfx-time``'s.
  Both latencies are measured here, apart from the compile (dense and slim ONNX files timed
  side by side, medians of 3 rounds of 20 runs): quality at equal measured latency;
- ``tp-magnitude`` / ``tp-taylor`` / ``tp-random``: Torch-Pruning's ``MetaPruner`` with
  ``MagnitudeImportance(p=2)`` / ``TaylorImportance()`` (after one backward pass on a training
  batch) / ``RandomImportance()``, the same pruning ratio for every group, the ratio found by
  bisection so that the pruned model's MACs are within ``--tp-tolerance`` (1 point) of what
  ``sepfx-learned`` achieved. MACs of every model are counted the same way
  (``sepfx.analyze(model).cost.dense_macs``: FlopCounterMode plus the closed forms for
  LSTM/GRU/attention, on 1 s of audio). The layers whose output channels the model's interface
  fixes (the decoder, one waveform channel per source) are ``ignored_layers``; the encoder is not
  listed: its input (the waveform) is never pruned, and listing it would keep its N output
  channels whole, which sepfx prunes. Attention modules are given to it with their
  ``num_heads`` (whole heads pruned). If Torch-Pruning fails, it is tried once more with its
  recurrent and attention modules ignored too; if it still fails the error is recorded in the
  row and the benchmark goes on. A module whose output never reaches the model's output (dead
  code, e.g. the last residual conv of Conv-TasNet, as in the reference implementation) is not
  seen by Torch-Pruning's dependency graph, so its channels are not pruned and the pruned
  model cannot run; such modules are removed before Torch-Pruning sees the model (replaced by
  a constant 0, checked not to change the output), and the row's note says so;
- ``sepfx-scratch``: the ``sepfx-learned`` architecture with every module's parameters
  re-initialised (``reset_parameters()``; custom norms' gamma/beta to 1/0), trained from scratch.

Every method, budget and seed (``--seeds``, default 0 1 2: the seed drives the gates' learning,
the training batches, Torch-Pruning's random importance and the re-initialisation) gives one
pruned model, fine-tuned by ``sepfx.finetune`` for ``--finetune-steps`` on the same batches (a
fresh loader seeded alike for every method), once on the clean sources and once by distillation
from the dense model (``teacher=``; ``--finetune clean|distill|both``, default both). Each
fine-tuned model is scored by ``sepfx.metrics`` (SI-SNRi, BSS-eval SDRi, STOI, narrow-band PESQ;
a metric whose library is missing is left out and named) on the test split (``--eval-limit``
mixtures) and on the real-voice set (``sepfx.data.RealVoiceSet()``, 24 mixtures of recorded
speakers; columns ``real_*``); SI-SNRi also before fine-tuning. ``recovered`` is the fine-tuned
SI-SNRi as a fraction of the dense model's (only where the dense model's is positive).

The results are every run's row and a summary: mean and sample standard deviation over the
seeds per model, budget, method and fine-tuning mode, and for each budget whether the learned
gates beat the magnitude ranking by more than the spread (the sum of the two standard
deviations). Writes ``quality.json``, ``quality.md`` and ``quality.png`` (``quality_smoke.*``
with ``--smoke``, ``NAME.*`` with ``--name``) under ``--out``, rewritten after every budget
(``"complete": false`` until the run ends).

Time: a gate step of a small Conv-TasNet takes ~1.8 s and a fine-tune step of its slim model
~0.5 s on one thread of a shared 2-core CPU, and scoring 100 + 24 mixtures with every metric
about half a minute; with the defaults (3 budgets x 3 seeds, 200 gate steps, 6 methods x 2
fine-tunes of 100 steps) that is about 3-4 hours per model.
"""

from __future__ import annotations

import argparse
import copy
import functools
import math
import os
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, evaluate, machine, markdown_table, plot, write  # noqa: E402

import numpy as np  # noqa: E402

import sepfx  # noqa: E402
import sepfx.metrics  # noqa: E402
from sepfx.data import MixtureDataset, RealVoiceSet, bundled_test_set, loader  # noqa: E402
from sepfx.losses import pit_si_snr_loss  # noqa: E402
from sepfx.models import ZOO, build, pretrained, pretrained_names  # noqa: E402

METHODS = [
    "sepfx-learned",
    "sepfx-magnitude",
    "sepfx-latency",
    "sepfx-time",
    "uniform-time",
    "tp-magnitude",
    "tp-taylor",
    "tp-random",
    "sepfx-scratch",
]
FINETUNES = {"clean": "on the clean sources", "distill": "by distillation from the dense model"}
# scores after fine-tuning, on the test split and (real_) on the real-voice set
METRICS = ["si_snri", "sdri", "stoi", "pesq"]
AFTER = [f"{m}_after_ft" for m in METRICS] + [f"real_{m}_after_ft" for m in METRICS]
COLUMNS = [
    "model",
    "budget",
    "method",
    "finetune",
    "seed",
    "macs_ratio",
    "latency_measured",
    "params",
    "si_snri_before_ft",
    *AFTER[:4],
    "recovered",
    "real_si_snri_before_ft",
    *AFTER[4:],
    "real_recovered",
    "time_s",
]
SUMMARY_METRICS = ["latency_measured"] + AFTER[:4] + ["recovered"] + AFTER[4:] + ["real_recovered"]
SUMMARY_COLUMNS = ["model", "budget", "method", "finetune", "seeds", "macs_ratio"] + SUMMARY_METRICS


# --------------------------------------------------------------------------------------------
# Data and evaluation
# --------------------------------------------------------------------------------------------


class SyntheticBatches:
    """``count`` fixed batches of (mixture[B, T], sources[B, 2, T]) for the smoke run: each
    source is a few random sinusoids under a random envelope (no data set needed)."""

    def __init__(self, count: int, batch: int, length: int, seed: int = 0, rate: int = 8000):
        g = torch.Generator().manual_seed(seed)
        t = torch.arange(length) / rate
        self.batches = []
        for _ in range(count):
            freqs = 100 + 900 * torch.rand(batch, 2, 3, 1, generator=g)
            phase = 2 * math.pi * torch.rand(batch, 2, 3, 1, generator=g)
            tone = torch.sin(2 * math.pi * freqs * t + phase).sum(2)
            envelope = torch.sigmoid(
                torch.randn(batch, 2, 1, generator=g)
                * 4
                * torch.sin(2 * math.pi * 3 * t + torch.rand(1, generator=g))
            )
            sources = 0.1 * tone * envelope
            self.batches.append((sources.sum(1), sources))

    def __iter__(self):
        return iter(self.batches)

    def __len__(self):
        return len(self.batches)


def macs_of(model: nn.Module) -> float:
    """MACs on sepfx's reference input (1 s, batch 1), counted the same way for every model."""
    return float(sepfx.analyze(model).cost.dense_macs)


def params_of(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------------------------
# Torch-Pruning
# --------------------------------------------------------------------------------------------


def _interface_layers(model: nn.Module) -> list[nn.Module]:
    """Layers whose output channels the model's interface fixes: the decoder (or, without one,
    every conv/linear layer with a single output channel)."""
    decoder = getattr(model, "decoder", None)
    if isinstance(decoder, nn.Module):
        return [decoder]
    return [
        m
        for m in model.modules()
        if (isinstance(m, nn.modules.conv._ConvNd) and m.out_channels == 1)
        or (isinstance(m, nn.Linear) and m.out_features == 1)
    ]


def _dead_modules(model: nn.Module, batch) -> set[str]:
    """Leaf modules with parameters none of which gets a gradient: their output never reaches
    the model's output (Torch-Pruning's dependency graph, built from autograd, misses them)."""
    probe = copy.deepcopy(model)
    mixture, sources = batch
    loss, _ = pit_si_snr_loss(probe(mixture), sources)
    loss.backward()
    return {
        name
        for name, m in probe.named_modules()
        if list(m.parameters(recurse=False))
        and all(p.requires_grad and p.grad is None for p in m.parameters(recurse=False))
    }


class DeadCode(nn.Module):
    """Stands in for a module whose output never reaches the model's output: returns 0 (a
    scalar, so the dead arithmetic it fed still broadcasts)."""

    def forward(self, *args, **kwargs):
        return torch.zeros(())


def remove_dead(model: nn.Module, dead: set[str]) -> nn.Module:
    """A copy of ``model`` with its dead modules replaced by :class:`DeadCode` (same output)."""
    model = copy.deepcopy(model)
    for name in sorted(dead, key=len, reverse=True):
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, DeadCode())
    return model


class TorchPruningError(RuntimeError):
    """Torch-Pruning could not prune the model (its message says how it failed)."""


def _importance(name: str, tp):
    return {
        "tp-magnitude": lambda: tp.importance.MagnitudeImportance(p=2),
        "tp-taylor": lambda: tp.importance.TaylorImportance(),
        "tp-random": lambda: tp.importance.RandomImportance(),
    }[name]()


class TorchPruningSearch:
    """Torch-Pruning at a uniform pruning ratio, the ratio bisected to a MAC target."""

    def __init__(self, model: nn.Module, batch, dense_macs: float, tolerance: float):
        import torch_pruning as tp

        self.tp = tp
        self.model = model
        self.batch = batch
        self.dense_macs = dense_macs
        self.tolerance = tolerance
        self.example = sepfx.default_example_input(model)
        self.dead = sorted(_dead_modules(model, batch))
        if self.dead:  # Torch-Pruning would leave their input channels unpruned
            cleaned = remove_dead(model, set(self.dead))
            x = torch.randn(2, self.example.shape[-1])
            with torch.no_grad():
                same = torch.allclose(model.eval()(x), cleaned.eval()(x), atol=1e-6, rtol=1e-5)
            self.model = cleaned if same else model
            self.dead = self.dead if same else []
        self.extra_ignored: dict[str, bool] = {}  # per method: recurrent/attention ignored
        self.ratio_hint: float | None = None  # MACs depend on the ratio only, not the method

    def prune(self, method: str, ratio: float) -> tuple[nn.Module, list[str]]:
        tries = [self.extra_ignored[method]] if method in self.extra_ignored else [False, True]
        errors = []
        for extra in tries:
            try:
                pruned, notes = self._prune(method, ratio, extra)
                self.extra_ignored[method] = extra
                return pruned, notes
            except Exception as caught:  # Torch-Pruning's failure is a result, not a crash
                errors.append(
                    f"{type(caught).__name__}: {(str(caught).splitlines() or [''])[0][:200]}"
                )
        if len(errors) == 2:
            raise TorchPruningError(
                f"{errors[0]} (with recurrent/attention modules ignored too: {errors[1]})"
            )
        raise TorchPruningError(errors[0])

    def _prune(self, method, ratio, extra_ignored):
        tp = self.tp
        model = copy.deepcopy(self.model)
        model.eval()
        ignored = _interface_layers(model)
        notes = []
        attention = [m for m in model.modules() if isinstance(m, nn.MultiheadAttention)]
        if extra_ignored:
            ignored += [m for m in model.modules() if isinstance(m, nn.RNNBase)] + attention
            notes.append("recurrent/attention modules ignored (Torch-Pruning failed on them)")
        if method == "tp-taylor":  # Taylor importance reads the gradients of a real batch
            model.zero_grad()
            mixture, sources = self.batch
            pit_si_snr_loss(model(mixture), sources)[0].backward()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pruner = tp.pruner.MetaPruner(
                model,
                self.example,
                importance=_importance(method, tp),
                pruning_ratio=ratio,
                ignored_layers=ignored,
                num_heads={m: m.num_heads for m in attention},
            )
            pruner.step()
        model.zero_grad(set_to_none=True)
        if self.dead:
            notes.append("dead modules removed before pruning: " + ", ".join(self.dead))
        with torch.no_grad():  # the pruned model must still run, at another length and batch
            out = model(torch.randn(2, self.example.shape[-1] + 37))
        if out.shape[:2] != (2, self.batch[1].shape[1]) or not torch.isfinite(out).all():
            raise RuntimeError(f"the pruned model returns {list(out.shape)} or non-finite values")
        return model, notes

    def search(self, method: str, target: float) -> dict:
        """The pruned model whose MAC ratio is closest to ``target`` (within the tolerance if
        the granularity allows), with the ratio and the number of attempts."""
        best = None
        attempts = 0

        def attempt(ratio):
            nonlocal best, attempts
            attempts += 1
            pruned, notes = self.prune(method, ratio)
            macs_ratio = macs_of(pruned) / self.dense_macs
            if best is None or abs(macs_ratio - target) < abs(best["macs_ratio"] - target):
                best = {"model": pruned, "macs_ratio": macs_ratio, "ratio": ratio, "notes": notes}
            return macs_ratio

        if self.ratio_hint is not None and abs(attempt(self.ratio_hint) - target) <= self.tolerance:
            return {**best, "attempts": attempts}
        low, high = 0.0, 0.98  # pruning ratio; MACs fall as it grows
        for _ in range(14):
            mid = (low + high) / 2
            macs_ratio = attempt(mid)
            if abs(macs_ratio - target) <= self.tolerance:
                break
            low, high = (mid, high) if macs_ratio > target else (low, mid)
        if abs(best["macs_ratio"] - target) <= self.tolerance:
            self.ratio_hint = best["ratio"]
        else:
            best["notes"].append(
                f"closest MAC ratio reachable {best['macs_ratio']:.3f} (target {target:.3f})"
            )
        return {**best, "attempts": attempts}


# --------------------------------------------------------------------------------------------
# From scratch
# --------------------------------------------------------------------------------------------


def reinitialise(model: nn.Module, seed: int) -> tuple[nn.Module, int]:
    """A copy of ``model`` with every module's parameters re-initialised; returns it and the
    number of parameter tensors left as they were (no way known to re-initialise them)."""
    model = copy.deepcopy(model)
    torch.manual_seed(seed)
    done: set[int] = set()
    for module in model.modules():
        own = list(module.parameters(recurse=False))
        if not own:
            continue
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
            done.update(id(p) for p in own)
            continue
        with torch.no_grad():  # custom norms: gamma/weight -> 1, beta/bias -> 0
            for name, p in module.named_parameters(recurse=False):
                if name in ("gamma", "weight", "scale"):
                    p.fill_(1.0)
                elif name in ("beta", "bias", "shift"):
                    p.zero_()
                else:
                    continue
                done.add(id(p))
    left = sum(id(p) not in done for p in model.parameters())
    return model, left


# --------------------------------------------------------------------------------------------
# The benchmark
# --------------------------------------------------------------------------------------------


class Setup:
    """What every method of one run shares: training batches, evaluation sets, step counts."""

    def __init__(self, args):
        self.args = args
        if args.smoke:
            length = int(args.segment * 8000)
            self.make_train = lambda seed: SyntheticBatches(4, args.batch, length, seed=seed)
            self.test = bundled_test_set()
            self.test_name = "bundled test mixtures"
        else:
            self.make_train = lambda seed: loader(
                args.data, "train", args.batch, segment=args.segment, seed=seed
            )
            self.test = MixtureDataset(args.data, "test")
            self.test_name = f"{args.data} test split"
        self.real = RealVoiceSet(sample_rate=8000)
        self.batch = next(iter(self.make_train(args.seeds[0])))

    def _items(self, dataset):
        return (dataset[i] for i in range(min(self.args.eval_limit, len(dataset))))

    def si_snri(self, model) -> tuple[float, float]:
        """SI-SNRi on the test split and on the real-voice set (before fine-tuning)."""
        limit = self.args.eval_limit
        return evaluate(model, self.test, limit), evaluate(model, self.real, limit)

    def scores(self, model) -> dict[str, float]:
        """Every metric of ``sepfx.metrics`` on both sets, real-voice ones prefixed ``real_``."""
        rate = getattr(model, "sample_rate", 8000)
        test = sepfx.metrics.evaluate(model, self._items(self.test), rate)
        real = sepfx.metrics.evaluate(model, self._items(self.real), rate)
        return {**test, **{f"real_{k}": v for k, v in real.items()}}


def _load(name: str, config: str, seed: int) -> tuple[nn.Module, str]:
    torch.manual_seed(seed)
    if name in pretrained_names():
        return pretrained(name), "bundled checkpoint"
    print(f"{name}: no bundled checkpoint, using the untrained {config!r} config")
    return build(name, config).eval(), f"untrained {config}"


def _row(model_name, budget, method, **fields) -> dict:
    return {"model": model_name, "budget": budget, "method": method, **fields}


def _recovered(score: float | None, dense: float) -> float | None:
    return score / dense if score is not None and dense > 0 else None


def run_method(
    setup: Setup, method: str, make, dense: dict, model_name, budget, seed
) -> tuple[list[dict], nn.Module | None]:
    """``make()`` -> (pruned model, extra fields); then evaluate, and for each fine-tuning mode
    (``--finetune``) fine-tune a copy and evaluate it: one row per mode."""
    args = setup.args
    start = time.perf_counter()
    common = {"seed": seed}
    try:
        torch.manual_seed(seed)  # Torch-Pruning's random importance draws from it
        model, extra = make()
    except Exception as error:
        message = (str(error).splitlines() or [""])[0][:400]
        if not isinstance(error, TorchPruningError):
            message = f"{type(error).__name__}: {message}"
        if args.verbose:
            traceback.print_exc()
        print(f"  {model_name} {budget} {method} seed {seed}: FAILED {message}")
        elapsed = time.perf_counter() - start
        rows = [
            _row(model_name, budget, method, finetune=f, error=message, time_s=elapsed, **common)
            for f in args.finetunes
        ]
        return rows, None
    prune_s = time.perf_counter() - start
    before, real_before = setup.si_snri(model)
    macs_ratio = extra.pop("macs_ratio", None)
    if macs_ratio is None:
        macs_ratio = macs_of(model) / dense["macs"]
    rows = []
    for finetune in args.finetunes:
        finetune_start = time.perf_counter()
        tuned = sepfx.finetune(
            copy.deepcopy(model),
            setup.make_train(seed),
            steps=args.finetune_steps,
            progress=args.progress,
            teacher=dense["model"] if finetune == "distill" else None,
        )
        finetune_s = time.perf_counter() - finetune_start
        after = {f"{k}_after_ft": v for k, v in setup.scores(tuned).items()}
        row = _row(
            model_name,
            budget,
            method,
            finetune=finetune,
            macs_ratio=macs_ratio,
            params=params_of(model),
            si_snri_before_ft=before,
            real_si_snri_before_ft=real_before,
            **after,
            recovered=_recovered(after.get("si_snri_after_ft"), dense["si_snri"]),
            real_recovered=_recovered(after.get("real_si_snri_after_ft"), dense["real_si_snri"]),
            time_s=prune_s + finetune_s,
            prune_s=prune_s,
            finetune_s=finetune_s,
            **common,
            **extra,
        )
        rows.append(row)
        print(
            f"  {model_name} {budget} {method} seed {seed} {finetune}: MACs {macs_ratio:.3f}, "
            f"SI-SNRi {before:.2f} -> {row['si_snri_after_ft']:.2f} dB "
            f"(real voices {real_before:.2f} -> {row['real_si_snri_after_ft']:.2f}), "
            f"{row['time_s']:.0f} s",
            flush=True,
        )
    return rows, model


def measured_latency(model: nn.Module, slim: nn.Module, x: torch.Tensor, tmp: str) -> float:
    """Slim / dense time on ONNX Runtime (1 thread) at ``x``: the median of 3 rounds of 20
    interleaved runs. The files are checked at a 1 s slice where the export takes any length
    (ONNX Runtime's float32 reductions drift on long inputs); the dense file is exported once
    per ``tmp``."""
    from sepfx.bench import ort_medians

    rate = int(getattr(model, "sample_rate", 8000) or 8000)
    paths = []
    for label, m in (("dense", None), ("slim", slim)):
        path = os.path.join(tmp, f"{label}.onnx")
        if label == "dense" and os.path.exists(path):  # exported by an earlier call
            paths.append(path)
            continue
        if m is None:  # the dense model as sepfx rewrites it (every channel kept), as in bench
            analysis = sepfx.analyze(model, x[..., :rate])
            m = analysis.slim(analysis.keep_all())
        if not sepfx.export_onnx(m, path, x[..., :rate]).dynamic_time:
            sepfx.export_onnx(m, path, x)
        paths.append(path)
    rounds = [ort_medians(paths, x.numpy(), 1, 20) for _ in range(3)]
    return float(np.median([slim_s / dense_s for dense_s, slim_s in rounds]))


def time_matched(setup: Setup, model: nn.Module, request: float, memo: dict):
    """{"sepfx-time": (slim, extra), "uniform-time": (slim, extra)} for latency ``request``,
    made once per request (or the exception that stopped it)."""
    if request in memo:
        return memo[request]
    args = setup.args
    rate = int(getattr(model, "sample_rate", 8000) or 8000)
    x = torch.randn(1, int(rate * args.latency_seconds), generator=torch.Generator().manual_seed(0))
    try:
        with tempfile.TemporaryDirectory() as tmp:
            timed = sepfx.compile(model, latency=request, example_input=x, progress=args.progress)
            goal = measured_latency(model, timed, x, tmp)
            print(f"  sepfx-time {request}: measured {goal:.3f} of dense", flush=True)
            low, high, best = 0.05, 1.0, None
            for _ in range(7):  # bisection on the MAC budget of the uniform allocation
                budget = (low + high) / 2
                uniform = sepfx.compile(
                    model, budget=budget, allocation="uniform", progress=args.progress
                )
                ratio = measured_latency(model, uniform, x, tmp)
                print(f"  uniform budget {budget:.3f}: measured {ratio:.3f}", flush=True)
                if best is None or abs(ratio - goal) < abs(best[2] - goal):
                    best = (uniform, budget, ratio)
                low, high = (budget, high) if ratio < goal else (low, budget)
        assert best is not None
        report = timed.sepfx_report
        memo[request] = {
            "sepfx-time": (
                timed,
                {
                    "macs_ratio": report.macs_ratio,
                    "latency_measured": goal,
                    "note": f"compile measured {report.latency.measured:.3f}",
                },
            ),
            "uniform-time": (
                best[0],
                {
                    "macs_ratio": best[0].sepfx_report.macs_ratio,
                    "latency_measured": best[2],
                    "note": f"uniform at MAC budget {best[1]:.3f}",
                },
            ),
        }
    except Exception as error:  # recorded in the rows of both methods
        memo[request] = error
    return memo[request]


def run_model(setup: Setup, name: str, save=None) -> list[dict]:
    """Every method at every budget and seed for one model; ``save(rows)`` after each budget."""
    args = setup.args
    if args.smoke:
        torch.manual_seed(0)
        model, source = build("conv_tasnet", "tiny").eval(), "untrained tiny (smoke)"
        name = "conv_tasnet"
    else:
        model, source = _load(name, args.config, 0)
    dense_macs = macs_of(model)
    scores = setup.scores(model)
    dense = {"model": model, "macs": dense_macs, **scores}
    print(
        f"{name} ({source}): {dense_macs / 1e6:.1f} MMACs/s, {params_of(model)} params, "
        f"SI-SNRi {scores['si_snri']:.2f} dB on {setup.test_name}, "
        f"{scores['real_si_snri']:.2f} dB on the real-voice set",
        flush=True,
    )
    rows = [
        _row(
            name,
            1.0,
            "dense",
            macs_ratio=1.0,
            params=params_of(model),
            si_snri_before_ft=scores["si_snri"],
            real_si_snri_before_ft=scores["real_si_snri"],
            **{f"{k}_after_ft": v for k, v in scores.items()},
            recovered=1.0 if scores["si_snri"] > 0 else None,
            real_recovered=1.0 if scores["real_si_snri"] > 0 else None,
            time_s=0.0,
            source=source,
        )
    ]
    try:
        search = TorchPruningSearch(model, setup.batch, dense_macs, args.tp_tolerance)
        search_error = None
    except Exception as error:  # torch_pruning missing, or the dead-code probe failed
        search, search_error = None, f"{type(error).__name__}: {str(error)[:300]}"
    timed_models: dict = {}  # per budget: the data-free models of equal measured latency
    for budget in args.budgets:
        for seed in args.seeds:
            common = dict(dense=dense, model_name=name, budget=budget, seed=seed)
            learned = {}

            def make_learned():
                slim = sepfx.compile(
                    model,
                    budget=budget,
                    data=setup.make_train(seed),
                    steps=args.gate_steps,
                    seed=seed,
                    progress=args.progress,
                )
                learned["slim"] = slim
                return slim, {"macs_ratio": slim.sepfx_report.macs_ratio}

            if "sepfx-learned" in args.methods:
                rows += run_method(setup, "sepfx-learned", make_learned, **common)[0]

            def make_magnitude(allocation="uniform"):  # data-free: seeds only the fine-tuning
                slim = sepfx.compile(
                    model, budget=budget, allocation=allocation, seed=seed, progress=args.progress
                )
                return slim, {"macs_ratio": slim.sepfx_report.macs_ratio}

            if "sepfx-magnitude" in args.methods:
                rows += run_method(setup, "sepfx-magnitude", make_magnitude, **common)[0]
            if "sepfx-latency" in args.methods:
                make_latency = functools.partial(make_magnitude, "latency")
                rows += run_method(setup, "sepfx-latency", make_latency, **common)[0]
            if {"sepfx-time", "uniform-time"} & set(args.methods):
                matched = time_matched(setup, model, budget, timed_models)
                for method in ("sepfx-time", "uniform-time"):
                    if method in args.methods:

                        def make_timed(method=method):
                            if isinstance(matched, Exception):
                                raise matched
                            slim, extra = matched[method]
                            return slim, dict(extra)

                        rows += run_method(setup, method, make_timed, **common)[0]
            if "slim" not in learned:
                continue  # nothing to match MACs to, nor to train from scratch
            target = learned["slim"].sepfx_report.macs_ratio
            for method in [
                m for m in ("tp-magnitude", "tp-taylor", "tp-random") if m in args.methods
            ]:

                def make_tp(method=method):
                    if search is None:
                        raise RuntimeError(search_error)
                    found = search.search(method, target)
                    return found["model"], {
                        "macs_ratio": found["macs_ratio"],
                        "tp_pruning_ratio": found["ratio"],
                        "tp_attempts": found["attempts"],
                        "note": "; ".join(found["notes"]) or None,
                    }

                rows += run_method(setup, method, make_tp, **common)[0]

            def make_scratch():
                slim, left = reinitialise(learned["slim"], seed)
                note = f"{left} parameter tensors could not be re-initialised" if left else None
                return slim, {"macs_ratio": target, "note": note}

            if "sepfx-scratch" in args.methods:
                rows += run_method(setup, "sepfx-scratch", make_scratch, **common)[0]
        if save is not None:
            save(rows)
    return rows


def summarise(rows: list[dict]) -> list[dict]:
    """Mean and sample standard deviation over seeds of every score, per model, budget,
    method and fine-tuning mode (``seeds``: how many succeeded; ``error``: a failure's)."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["model"], r["budget"], r["method"], r.get("finetune")), []).append(r)
    summary = []
    for (model, budget, method, finetune), members in groups.items():
        ok = [r for r in members if not r.get("error")]
        entry = {
            "model": model,
            "budget": budget,
            "method": method,
            "finetune": finetune,
            "seeds": len(ok),
            "macs_ratio": float(np.mean([r["macs_ratio"] for r in ok])) if ok else None,
        }
        for metric in SUMMARY_METRICS:
            values = [r[metric] for r in ok if r.get(metric) is not None]
            entry[metric] = float(np.mean(values)) if values else None
            entry[f"{metric}_std"] = float(np.std(values, ddof=1)) if len(values) > 1 else None
        if len(ok) < len(members):
            entry["error"] = next(r["error"] for r in members if r.get("error"))
        summary.append(entry)
    return summary


def comparisons(summary: list[dict], metric: str = "si_snri_after_ft") -> list[str]:
    """Learned gates vs magnitude ranking, per budget and fine-tuning mode: the difference of
    the means, called a difference only where it exceeds the spread (the sum of the two
    standard deviations over seeds)."""
    lines = []
    index = {(s["model"], s["budget"], s["method"], s["finetune"]): s for s in summary}
    for (model, budget, method, finetune), learned in index.items():
        magnitude = index.get((model, budget, "sepfx-magnitude", finetune))
        if method != "sepfx-learned" or magnitude is None:
            continue
        if learned.get(metric) is None or magnitude.get(metric) is None:
            continue
        diff = learned[metric] - magnitude[metric]
        stds = [s.get(f"{metric}_std") for s in (learned, magnitude)]
        if None in stds:
            verdict = "one seed: no spread to compare with"
        else:
            spread = sum(stds)
            better = "learned better" if diff > 0 else "magnitude better"
            verdict = f"spread {spread:.2f}: " + (
                better if abs(diff) > spread else "within the spread"
            )
        lines.append(
            f"- {model} {budget} ({finetune}): learned - magnitude = {diff:+.2f} dB ({verdict})"
        )
    return lines


def _cell(entry: dict, metric: str):
    mean, std = entry.get(metric), entry.get(f"{metric}_std")
    if mean is None:
        return None
    return f"{mean:.3g} ± {std:.2g}" if std is not None else mean


def _table(rows: list[dict]) -> str:
    summary = summarise(rows)
    shown_summary = []
    for entry in summary:
        cells = {**entry, **{m: _cell(entry, m) for m in SUMMARY_METRICS}}
        if entry.get("error") and not entry["seeds"]:
            cells["si_snri_after_ft"] = "failed: " + entry["error"][:80].replace("|", "/")
        shown_summary.append({k: ("–" if v is None else v) for k, v in cells.items()})
    shown = [{k: ("–" if v is None else v) for k, v in r.items()} for r in rows]
    for r in shown:
        if r.get("error"):
            r["si_snri_after_ft"] = "failed: " + r["error"][:80].replace("|", "/")
    notes = [
        f"- {r['model']} {r['budget']} {r['method']}: {r['note']}" for r in rows if r.get("note")
    ]
    notes = sorted(set(notes), key=notes.index)
    compared = comparisons(summary)
    return (
        "Mean ± standard deviation over seeds:\n\n"
        + markdown_table(shown_summary, SUMMARY_COLUMNS)
        + (
            "\n\nLearned gates vs magnitude (SI-SNRi after fine-tuning, test split):\n\n"
            + "\n".join(compared)
            if compared
            else ""
        )
        + "\n\nEvery run:\n\n"
        + markdown_table(shown, COLUMNS)
        + ("\n\nNotes:\n\n" + "\n".join(notes) if notes else "")
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--models",
        nargs="+",
        default=None,
        help="zoo names (default: every model with a bundled checkpoint); one "
        "without a checkpoint is built untrained with --config",
    )
    parser.add_argument("--config", default="small", help="config for models without checkpoint")
    parser.add_argument(
        "--data", default="data/mixtures", help="folder written by benchmarks/make_data.py"
    )
    parser.add_argument("--budgets", nargs="+", type=float, default=[0.6, 0.4, 0.25])
    parser.add_argument(
        "--seeds",
        nargs="+",
        type=int,
        default=[0, 1, 2],
        help="every method at every budget once per seed (gates, batches, random importance)",
    )
    parser.add_argument(
        "--gate-steps",
        type=int,
        default=200,
        help="gate-learning steps (default 200; the paper uses ~500)",
    )
    parser.add_argument(
        "--finetune-steps",
        type=int,
        default=100,
        help="fine-tuning steps, the same for every method (default 100)",
    )
    parser.add_argument(
        "--finetune",
        choices=["clean", "distill", "both"],
        default="both",
        help="fine-tune on the clean sources, by distillation from the dense model "
        "(sepfx.finetune(teacher=...)), or each pruned model both ways (default)",
    )
    parser.add_argument(
        "--methods",
        nargs="+",
        choices=METHODS,
        default=METHODS,
        help="methods to run (default all; Torch-Pruning and scratch match sepfx-learned's "
        "MACs, so they run only with it)",
    )
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--segment", type=float, default=2.0, help="seconds per training item")
    parser.add_argument(
        "--eval-limit",
        type=int,
        default=100,
        help="mixtures evaluated per set (test split; the real-voice set has 24)",
    )
    parser.add_argument(
        "--tp-tolerance",
        type=float,
        default=0.01,
        help="Torch-Pruning's MAC ratio within this of sepfx's (default 0.01)",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument(
        "--latency-seconds",
        type=float,
        default=4.0,
        help="sepfx-time / uniform-time: the input length timed (default 4)",
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="untrained tiny Conv-TasNet, synthetic batches, a few steps, budget 0.4, 2 seeds",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--verbose", action="store_true", help="tracebacks of failed methods")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument(
        "--name",
        default=None,
        help="results file name without suffix (default: quality, or "
        "quality_smoke with --smoke); e.g. one file per model run apart",
    )
    args = parser.parse_args(argv)
    if args.smoke:
        args.models, args.budgets, args.seeds = ["conv_tasnet"], [0.4], [0, 1]
        args.gate_steps = args.finetune_steps = 8
        args.batch, args.segment, args.eval_limit = 2, 0.5, 4
    elif args.models is None:
        args.models = pretrained_names()
        if not args.models:
            parser.error(
                "no bundled checkpoint (benchmarks/train_baseline.py writes them): "
                "name the models with --models"
            )
    unknown = [m for m in args.models if m not in ZOO]
    if unknown:
        parser.error(f"unknown model(s) {unknown}; zoo: {', '.join(sorted(ZOO))}")
    absent = sepfx.metrics.missing()
    if absent:
        print(f"not measured (library missing: pip install -e '.[metrics]'): {', '.join(absent)}")
    matched = [m for m in args.methods if m.startswith("tp-") or m == "sepfx-scratch"]
    if matched and "sepfx-learned" not in args.methods:
        parser.error(f"{', '.join(matched)} match sepfx-learned's MACs: add sepfx-learned")
    args.finetunes = list(FINETUNES) if args.finetune == "both" else [args.finetune]
    args.progress = not (args.quiet or args.smoke)
    torch.set_num_threads(args.threads)
    try:
        setup = Setup(args)
    except sepfx.errors.InputError as error:  # no data folder: say how to make it
        parser.error(str(error))
    start = time.perf_counter()
    rows: list[dict] = []
    for name in args.models:  # results are rewritten after every budget: a stopped run keeps them
        rows += run_model(
            setup,
            name,
            save=lambda partial: _write(args, setup, rows + partial, start, complete=False),
        )
    name = _write(args, setup, rows, start, complete=True)
    print(f"wrote {args.out / (name + '.md')} ({time.perf_counter() - start:.0f} s)")


def _write(args, setup: Setup, rows: list[dict], start: float, complete: bool) -> str:
    """JSON, Markdown table and plot of ``rows``; returns the file name without suffix."""
    name = args.name or ("quality_smoke" if args.smoke else "quality")
    settings = {
        k: getattr(args, k)
        for k in (
            "models",
            "config",
            "data",
            "budgets",
            "seeds",
            "gate_steps",
            "finetune_steps",
            "finetunes",
            "batch",
            "segment",
            "eval_limit",
            "tp_tolerance",
            "threads",
            "smoke",
        )
    }
    settings["test_set"] = setup.test_name
    settings["real_voice_set"] = f"sepfx.data.RealVoiceSet() ({len(setup.real)} mixtures)"
    settings["metrics_missing"] = sepfx.metrics.missing()
    summary = summarise(rows)
    write(
        name,
        {
            "machine": machine(),
            "settings": settings,
            "complete": complete,
            "seconds": time.perf_counter() - start,
            "summary": summary,
            "rows": rows,
        },
        _table(rows),
        args.out,
    )
    series: dict[str, tuple[list, list]] = {}
    for s in summary:
        if s.get("si_snri_after_ft") is None:
            continue
        label = "dense" if s["method"] == "dense" else f"{s['method']} ({s['finetune']})"
        key = f"{s['model']} {label}" if len(args.models) > 1 else label
        series.setdefault(key, ([], []))
        series[key][0].append(s["macs_ratio"])
        series[key][1].append(s["si_snri_after_ft"])
    for x, y in series.values():  # lines left to right
        order = sorted(range(len(x)), key=x.__getitem__)
        x[:], y[:] = [x[i] for i in order], [y[i] for i in order]
    plot(
        args.out / f"{name}.png",
        series,
        "MACs / dense MACs",
        "SI-SNRi after fine-tune (dB, mean over seeds)",
        f"Quality at equal MACs ({args.finetune_steps} fine-tune steps)",
    )
    return name


if __name__ == "__main__":
    main()
