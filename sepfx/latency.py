"""Latency budgets: a slim model whose time on the target runtime is at most a fraction of the
dense model's, measured there.

A ``Target`` is where the model will run: ONNX Runtime on the CPU (``"ort-cpu"``, the default),
PyTorch eager on the CPU (``"torch-cpu"``), or PyTorch on a GPU (``"cuda"``, eager or replayed
as CUDA graphs), each at a thread count and the reference input (batch and length matter).

``LatencySearch`` does the work of one compile. ``LatencyTable`` holds what was measured: the slim / dense time of keep sets (probes whose
groups keep random widths, and every candidate tried), timed side by side with the dense model
by ``sepfx.bench``. ``passes.cost.fit_latency`` fits a latency cost to it (a constant plus
weights on the MACs and the activation elements of matrix products and of channel-linear
work), which budget projection uses in place of the MACs. ``LatencySearch.meet`` then repeats: fit,
project the keep set onto the fitted latency, time the slim model, and correct the goal by the
ratio of measured to wanted, until the measured latency lies in [0.95, 1] x the request. Every
measurement is kept, and the table is cached on disk keyed by the model's structure (not its
weights), the target, the input shape and the versions of torch and ONNX Runtime, with the
keep set each search returned: compiled again with the same weights and request, a model is
timed no more; another model of the same architecture reuses the probes and the fit, and times
only its candidates. A data-free compile's checked answer is stored too, under a key known
before anything is computed (``LatencySearch.answer_key``: the weights, the example input's
values, the request and sepfx's own code): compiled again, it skips the ranking and the check.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from passes.cost import LATENCY_FEATURES, LinearCost, fit_latency
from passes.export import ExportResult
from sepfx.budget import _multiples, _snap, floor_counts, project
from sepfx.errors import InputError, SlimError

TARGETS = ("ort-cpu", "torch-cpu", "cuda")
TABLE_VERSION = 3  # 3: adaptive_avg_pool1d and attention lowered otherwise for export
PROBES = 8  # keep sets of random widths timed before the first fit
PROBE_RUNS = 5  # timed runs per probe (they are timed all together, interleaved)
CANDIDATE_RUNS = 9  # timed runs for each candidate slim model
ATTEMPTS = 6  # fit, project, time: at most this many candidates
WINDOW = 0.05  # a candidate is accepted when measured / request is in [1 - WINDOW, 1]


@dataclass(frozen=True)
class Target:
    """Where a slim model will run."""

    name: str = "ort-cpu"
    threads: int = 1
    graphs: bool = False  # "cuda" only: replayed as CUDA graphs

    def describe(self) -> str:
        if self.name == "ort-cpu":
            return f"ONNX Runtime, {self.threads} CPU thread{'s' * (self.threads > 1)}"
        if self.name == "torch-cpu":
            return f"PyTorch eager, {self.threads} CPU thread{'s' * (self.threads > 1)}"
        return "PyTorch on CUDA" + (", CUDA graphs" if self.graphs else ", eager")


def check_target(target, threads=1, graphs=False) -> Target:
    if isinstance(target, Target):
        return target
    if target not in TARGETS:
        raise InputError(f"target must be one of {TARGETS}, got {target!r}")
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise InputError(f"threads must be a positive integer, got {threads!r}")
    if graphs and target != "cuda":
        raise InputError("graphs=True (CUDA graphs) needs target='cuda'")
    if target == "cuda" and not torch.cuda.is_available():
        raise InputError("target='cuda' needs a GPU, and torch sees none here")
    return Target(target, threads, bool(graphs))


def check_latency(latency) -> float:
    if isinstance(latency, bool) or not isinstance(latency, (int, float, np.floating)):
        raise InputError(
            f"latency must be a number in (0, 1) (the slim model's time as a fraction of the "
            f"dense model's), got {latency!r}"
        )
    value = float(latency)
    if not 0 < value < 1:  # also refuses nan
        raise InputError(
            f"latency must be in (0, 1) (a fraction of the dense model's time), got {value}"
        )
    return value


@dataclass
class LatencySample:
    counts: list[int]  # kept units per group (the first ones: time does not depend on which)
    ratio: float  # measured slim / dense time
    dense_ms: float
    slim_ms: float
    predicted: float | None = None  # the fitted latency's prediction before it was measured


@dataclass
class LatencyTable:
    """Measured slim / dense times of keep sets of one model structure on one target."""

    key: str
    description: dict
    samples: list[LatencySample] = field(default_factory=list)
    # keep sets a search returned, by what it was asked (``solution_key``): asked the same
    # again, a compile returns the same keep set without timing anything
    solutions: dict[str, dict] = field(default_factory=dict)
    exporter: str | None = None  # "ort-cpu": the exporter whose files were timed
    # checked answers of data-free compiles, by ``answer_key`` (known before the ranking is
    # computed): asked the same of the same weights, a compile skips the ranking and the check
    answers: dict[str, dict] = field(default_factory=dict)

    def find(self, counts: list[int]) -> LatencySample | None:
        return next((s for s in self.samples if s.counts == list(counts)), None)

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "key": self.key,
            "description": self.description,
            "samples": [vars(s) for s in self.samples],
            "solutions": self.solutions,
            "exporter": self.exporter,
            "answers": self.answers,
        }
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(payload, indent=1))
        tmp.replace(path)  # atomic: a concurrent compile reads the old or the new table

    @classmethod
    def load(cls, path: Path, key: str) -> LatencyTable | None:
        try:
            payload = json.loads(path.read_text())
            if payload.get("key") != key:
                return None
            samples = [LatencySample(**s) for s in payload["samples"]]
            solutions = dict(payload.get("solutions", {}))
            answers = dict(payload.get("answers", {}))
        except (OSError, ValueError, TypeError, KeyError):  # absent or unreadable: measure anew
            return None
        exporter = payload.get("exporter")
        return cls(key, payload["description"], samples, solutions, exporter, answers)


def cache_dir() -> Path:
    """Where latency tables are cached: ``$SEPFX_CACHE_DIR/latency``, by default
    ``~/.cache/sepfx/latency``."""
    root = os.environ.get("SEPFX_CACHE_DIR") or Path.home() / ".cache" / "sepfx"
    return Path(root) / "latency"


def table_key(analysis, target: Target, x: torch.Tensor) -> tuple[str, dict]:
    """A key that changes with whatever changes the times: the model's structure (graph code,
    parameter shapes, groups), the target, the input's shape and dtype, the versions of torch
    and ONNX Runtime, and the machine's processor. Weights do not enter it."""
    import onnxruntime

    gm = analysis.channels.graph_module
    structure = [
        gm.code,
        sorted((n, tuple(p.shape)) for n, p in gm.named_parameters()),
        [g.size for g in analysis.groups],
        sorted(analysis.capture.shells),
    ]
    description = {
        "model": analysis.model_name,
        "target": target.name,
        "threads": target.threads,
        "graphs": target.graphs,
        "input": list(x.shape),
        "dtype": str(x.dtype),
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        "machine": _processor(),
        "version": TABLE_VERSION,
    }
    text = json.dumps([repr(structure), description], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:24], description


def tensor_digest(digest, name: str, tensor: torch.Tensor) -> None:
    """Add a tensor's name, dtype, shape and bytes to a hashlib digest."""
    t = tensor.detach().cpu().contiguous().reshape(-1)
    digest.update(f"{name}:{t.dtype}:{tuple(tensor.shape)}".encode())
    digest.update(t.view(torch.uint8).numpy().tobytes())


@functools.cache
def code_digest() -> str:
    """A digest of sepfx's own source (the packages ``sepfx`` and ``passes``): a cached answer
    was computed and checked by this code, and a change to it must not reuse the answer."""
    import passes

    digest = hashlib.sha256()
    for package in (Path(__file__).parent, Path(passes.__file__).parent):
        for path in sorted(package.rglob("*.py")):
            digest.update(f"{package.name}/{path.relative_to(package)}".encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:24]


def _processor() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


class LatencyMeter:
    """Times slim models of ``analysis`` beside its dense model on ``target`` at input ``x``:
    PyTorch runs the models, ONNX Runtime runs their exports (the dense one checked against
    PyTorch, the variants exported the same way)."""

    def __init__(self, analysis, target: Target, x: torch.Tensor, workdir: str):
        from passes.export import export_onnx

        self.analysis, self.target, self.x, self.workdir = analysis, target, x, workdir
        self.dense = analysis.slim(analysis.keep_all(), check=False).eval()
        self.exported: ExportResult | None = None
        self.traced_with = x
        if target.name == "ort-cpu":
            path = os.path.join(workdir, "dense.onnx")
            # checked at a 1 s slice where the file takes any length: ONNX Runtime's float32
            # reductions (ReduceMean of a global layer norm) drift past export's tolerance on
            # inputs of several seconds, while the time measured is the same
            short = x[..., : int(analysis.sample_rate or 8000)]
            self.exported = export_onnx(self.dense, path, short)
            if self.exported.dynamic_time:
                self.traced_with = short
            elif short.shape != x.shape:
                self.exported = export_onnx(self.dense, path, x)
        self.count = 0

    def ratios(self, keeps: list[dict], runs: int) -> list[tuple[float, float, float]]:
        """(slim / dense time, dense seconds, slim seconds) of each keep set, all timed
        interleaved with the dense model (medians of ``runs``)."""
        from sepfx import bench

        models = [self.analysis.slim(k, check=False).eval() for k in keeps]
        if self.target.name == "ort-cpu":
            from passes.export import export_like

            assert self.exported is not None
            paths = [self.exported.path]
            for model in models:
                self.count += 1
                path = os.path.join(self.workdir, f"variant{self.count}.onnx")
                export_like(model, path, self.traced_with, self.exported)
                paths.append(path)
            x = self.x.detach().cpu().float().numpy()
            times = bench.ort_medians(paths, x, self.target.threads, runs)
        elif self.target.name == "torch-cpu":
            previous = torch.get_num_threads()
            torch.set_num_threads(self.target.threads)
            try:
                with torch.inference_mode():
                    fns = [lambda m=m: m(self.x) for m in [self.dense, *models]]
                    times = bench.paired_medians(fns, runs)
            finally:
                torch.set_num_threads(previous)
        else:
            times = bench.cuda_medians(
                [self.dense, *models], self.x, runs, graphs=self.target.graphs
            )
        return [(t / times[0], times[0], t) for t in times[1:]]


@dataclass
class LatencyResult:
    """What ``LatencySearch.meet`` measured and chose."""

    target: Target
    requested: float
    measured: float
    predicted: float
    dense_ms: float
    slim_ms: float
    coefficients: dict[str, float]  # the fitted latency's weights (fractions of dense time)
    group_time_shares: list[float]  # per group: the fitted share of dense time it scales
    measurements: int  # keep sets timed by this compile (0: all from the cached table)
    table_size: int
    cache: str | None  # the table's file, where cached
    attempts: list[tuple[float, float]]  # (predicted, measured) of each candidate tried
    exporter: str | None = None  # "ort-cpu": the ONNX exporter whose files were timed


def solution_key(analysis, request, budget, probability, initial, min_per_group, multiple) -> str:
    """What a search's answer depends on besides the table: the request, the MAC budget, the
    ranking (the weights or gates it came from), the start and each group's minimum width."""
    digest = hashlib.sha256()
    digest.update(repr((request, budget, min_per_group, multiple)).encode())
    digest.update(repr([(g.size, g.min_size) for g in analysis.groups]).encode())
    digest.update(np.ascontiguousarray(probability, dtype=np.float64).tobytes())
    if initial is not None:
        digest.update(np.ascontiguousarray(initial, dtype=bool).tobytes())
    return digest.hexdigest()[:24]


def _counts_keep(analysis, counts) -> dict:
    return {g.index: np.arange(k) for g, k in zip(analysis.groups, counts)}


def _probe_counts(analysis, multiple: int, min_per_group: int, seed: int) -> list[list[int]]:
    """``PROBES`` keep counts: every group at a random width in [1/4, 1] of its size."""
    cost = analysis.cost
    steps, low = _multiples(cost, multiple), floor_counts(cost, min_per_group, multiple)
    rng = np.random.default_rng(seed)
    return [
        [
            _snap(max(1, round(rng.uniform(0.25, 1.0) * g.size)), g, s, low[g.index])
            for g, s in zip(analysis.groups, steps)
        ]
        for _ in range(PROBES)
    ]


class LatencySearch:
    """The timings of one compile under a latency budget: the table (loaded from the cache
    where it exists), the probes, the fitted latency, and the search for a keep set that meets
    the request (``meet``). ``close()`` removes the exported files."""

    def __init__(
        self,
        analysis,
        target: Target,
        x: torch.Tensor,
        *,
        min_per_group: int = 1,
        multiple: int = 8,
        seed: int = 0,
        cache: bool = True,
        progress=None,
    ):
        self.analysis, self.target, self.x = analysis, target, x
        self.min_per_group, self.multiple, self.seed = min_per_group, multiple, seed
        key, description = table_key(analysis, target, x)
        self.path = cache_dir() / f"{key}.json" if cache else None
        loaded = LatencyTable.load(self.path, key) if self.path else None
        self.table = loaded or LatencyTable(key, description)
        self.say = progress or (lambda message: None)
        self.measured = 0  # keep sets timed by this search
        self._meter: LatencyMeter | None = None
        self._workdir: str | None = None

    def close(self) -> None:
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir, self._meter = None, None

    def _ready_meter(self) -> LatencyMeter:
        if self._meter is None:
            self.say(f"timing on {self.target.describe()}: exporting the dense model")
            self._workdir = tempfile.mkdtemp(prefix="sepfx-latency-")
            self._meter = LatencyMeter(self.analysis, self.target, self.x, self._workdir)
            if self._meter.exported is not None:
                self.table.exporter = self._meter.exported.exporter
        return self._meter

    def measure(self, counts_list: list[list[int]], runs: int, predicted=None) -> None:
        """Time keep sets (the first units of each group kept) and add them to the table."""
        keeps = [_counts_keep(self.analysis, c) for c in counts_list]
        for i, (counts, (ratio, dense, slim)) in enumerate(
            zip(counts_list, self._ready_meter().ratios(keeps, runs))
        ):
            old = self.table.find(counts)
            if old is not None:
                self.table.samples.remove(old)
            guess = None if predicted is None else predicted[i]
            self.table.samples.append(LatencySample(counts, ratio, 1e3 * dense, 1e3 * slim, guess))
        self.measured += len(counts_list)
        if self.path is not None:
            self.table.save(self.path)

    def probe(self) -> None:
        """Time ``PROBES`` keep sets of random widths, unless the table has enough samples."""
        probes = [
            c
            for c in _probe_counts(self.analysis, self.multiple, self.min_per_group, self.seed)
            if self.table.find(c) is None
        ]
        if len(self.table.samples) < PROBES and probes:
            self._ready_meter()
            self.say(f"timing {len(probes)} keep sets of random widths")
            self.measure(probes, PROBE_RUNS)

    def model(self) -> tuple[LinearCost, np.ndarray]:
        """The latency cost fitted to every sample of the table, and its coefficients."""
        self.probe()
        samples = [
            (self.analysis.channels.keep_vector(_counts_keep(self.analysis, s.counts)), s.ratio)
            for s in self.table.samples
        ]
        return fit_latency(self.analysis.cost.latency_features(), samples)

    def meet(
        self,
        request: float,
        probability: np.ndarray,
        *,
        budget: float | None = None,
        initial: np.ndarray | None = None,
    ) -> tuple[dict, LatencyResult]:
        """A keep set whose slim model, timed on the target, runs at most ``request`` x the
        dense model's time (and within ``WINDOW`` of it where the widths allow), the units
        ranked by ``probability`` (see ``budget.project``; ``budget``: a MAC budget that must
        hold too). Raises InputError when even the narrowest keep set is slower than asked."""
        analysis = self.analysis
        key = solution_key(
            analysis, request, budget, probability, initial, self.min_per_group, self.multiple
        )
        known = self.table.solutions.get(key)
        sample = None if known is None else self.table.find(known["counts"])
        if known is not None and sample is not None and sample.ratio <= request:
            keep = {int(g): np.asarray(units, dtype=np.int64) for g, units in known["keep"]}
            return keep, self._result(request, sample, known["predicted"], [])
        goal = request * (1 - WINDOW / 2)  # aim at the middle of the window
        floor = floor_counts(analysis.cost, self.min_per_group, self.multiple)
        tried: list[tuple[list[int], dict, float, LatencySample]] = []
        narrowest = False  # time the floor widths next (the fit cannot say how to go faster)
        for _ in range(ATTEMPTS):
            model, _ = self.model()
            if narrowest:
                keep = {
                    g.index: np.sort(np.argsort(-probability[g.units], kind="stable")[:k])
                    for g, k in zip(analysis.groups, floor)
                }
            else:
                keep = project(
                    analysis.cost,
                    probability,
                    budget,
                    initial=initial,
                    min_per_group=self.min_per_group,
                    multiple=self.multiple,
                    latency=(model, goal * model.dense),
                )
            counts = [len(keep[g.index]) for g in analysis.groups]
            predicted = model.value(analysis.channels.keep_vector(keep)) / model.dense
            sample = self.table.find(counts)
            if sample is None:
                self.say(f"timing a candidate (predicted {predicted:.3f} of dense)")
                self.measure([counts], CANDIDATE_RUNS, [predicted])
                sample = self.table.find(counts)
                assert sample is not None
            tried.append((counts, keep, predicted, sample))
            if (1 - WINDOW) * request <= sample.ratio <= request:
                break
            if sample.ratio > request and counts == floor:
                raise InputError(
                    f"latency {request:g} cannot be reached on {self.target.describe()} at "
                    f"input {list(self.x.shape)}: with every group at its minimum width the "
                    f"slim model still runs at {sample.ratio:.3f} of the dense model's time "
                    "(work that does not shrink with the channels); ask for latency >= "
                    f"{np.ceil(sample.ratio * 100) / 100:.2f}"
                )
            if any(c == counts for c, *_ in tried[:-1]):  # the goal no longer moves the widths
                # too slow: the fit sees nothing left to cut, so time the narrowest widths
                # next (they meet the request or show what can be reached); too fast: widen
                narrowest = sample.ratio > request
                goal *= 1.03
            else:
                narrowest = False
                goal *= request * (1 - WINDOW / 2) / sample.ratio
            goal = float(np.clip(goal, 1e-3, 1.0))
        met = [t for t in tried if t[3].ratio <= request]
        if not met:
            raise SlimError(
                f"no slim model ran at latency <= {request:g} on {self.target.describe()} "
                f"after {len(tried)} tries (measured "
                f"{', '.join(f'{t[3].ratio:.3f}' for t in tried)}): the machine may be too "
                "busy to time reliably; try again on a quieter machine or ask for a lower "
                "latency"
            )
        counts, keep, predicted, sample = max(met, key=lambda t: t[3].ratio)
        self.table.solutions[key] = {
            "counts": counts,
            "keep": [(g, [int(u) for u in units]) for g, units in keep.items()],
            "predicted": predicted,
        }
        if self.path is not None:
            self.table.save(self.path)
        return keep, self._result(request, sample, predicted, [(t[2], t[3].ratio) for t in tried])

    def answer_key(self, request: float, budget: float | None) -> str:
        """What a data-free compile's answer depends on beyond the table's key, all known
        before the ranking is computed: the weights, the example input's values (the ranking
        runs on them), the request, the MAC budget, the compile's arguments and sepfx's code."""
        digest = hashlib.sha256()
        digest.update(
            repr((request, budget, self.min_per_group, self.multiple, self.seed)).encode()
        )
        digest.update(repr([(g.size, g.min_size) for g in self.analysis.groups]).encode())
        digest.update(code_digest().encode())
        for name, tensor in self.analysis.capture.root.state_dict().items():
            tensor_digest(digest, name, tensor)
        tensor_digest(digest, "example_input", self.analysis.example_input)
        return digest.hexdigest()[:24]

    def recall(self, key: str, request: float) -> tuple[dict, LatencyResult, list[str]] | None:
        """The keep set, timing and notes (groups kept whole) that a compile with this
        ``answer_key`` returned after its slim model passed the checks; None where there is
        none, or its timing is gone from the table."""
        known = self.table.answers.get(key)
        sample = None if known is None else self.table.find(known["counts"])
        if known is None or sample is None or sample.ratio > request:
            return None
        keep = {int(g): np.asarray(units, dtype=np.int64) for g, units in known["keep"]}
        return keep, self._result(request, sample, known["predicted"], []), list(known["notes"])

    def remember(self, key: str, keep: dict, result: LatencyResult, notes: list[str]) -> None:
        """Store a compile's checked answer under its ``answer_key`` (taken before the compile
        kept any group whole, which changes the groups' minimum widths) for ``recall``."""
        self.table.answers[key] = {
            "counts": [len(keep[g.index]) for g in self.analysis.groups],
            "keep": [(g, [int(u) for u in units]) for g, units in keep.items()],
            "predicted": result.predicted,
            "notes": list(notes),
        }
        if self.path is not None:
            self.table.save(self.path)

    def _result(self, request, sample, predicted, attempts) -> LatencyResult:
        model, coefficients = self.model()
        return LatencyResult(
            target=self.target,
            requested=request,
            measured=sample.ratio,
            predicted=predicted,
            dense_ms=sample.dense_ms,
            slim_ms=sample.slim_ms,
            coefficients=dict(zip(("constant", *LATENCY_FEATURES), map(float, coefficients))),
            group_time_shares=model.shares(),
            measurements=self.measured,
            table_size=len(self.table.samples),
            cache=str(self.path) if self.path else None,
            attempts=attempts,
            exporter=self.table.exporter,
        )
