"""sepfx on "wild" separation models (tests/wild/models.py): code written as people write it,
with no concession to torch.fx. For every model:

- ``sepfx.compile`` works on it unedited and lands in [0.38, 0.40] of the dense MACs;
- exactness: gated == slim for random keep sets, gated (all kept) == eager, at three lengths
  and two batch sizes, and the slim models run at every one of them;
- ONNX export with a dynamic time axis, checked against ONNX Runtime;
- the report lists assumptions, leaves and frozen parameter axes, and >= 80% of the MACs are
  prunable;
- the caller's model, its class and its module's globals are untouched.

Every model is built once, analysed once and compiled once per module (cached, errors too).
"""

from __future__ import annotations

import builtins
import copy
import math
import operator
import sys
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sepfx

from . import models as wild

NAMES = list(wild.MODELS)
TOL = 1e-5
ONNX_TOL = 1e-4
BUDGET = 0.4
# [batch, length]: 1 s at 8 kHz, a length that is a multiple of no stride, a short odd length
SHAPES = [(b, t) for t in (8000, 8000 + 37, 5003) for b in (1, 2)]
N_RANDOM_KEEP_SETS = 4  # plus one keeping a single unit per group

# substrings of the source lines whose values the tracer must list as assumptions
EXPECTED_ASSUMPTIONS = {
    "tdanet": ["wav.ndim == 1", "len(x.shape)"],
    "afrcnn": [],
    "transformer": [],  # its root is an eager shell (see test_length_branch_makes_a_shell)
    # a dtype test reads no tensor values: fixed while tracing, not a shell
    "dtype_tasnet": ["torch.is_complex(c)", "feature.is_floating_point()", "feature.dtype"],
    "dual_path": [],  # its separator pads by the length: an eager shell
    "skim": [],  # likewise
    "flash": ["x.view(*x.shape[:-1], -1, 2)"],  # rotate_half's pairs
    "masked_transformer": ["torch.finfo(scores.dtype)"],  # a dtype, not data
}
# models whose code branches on the input's length: their root runs as an eager shell
SHELLS = {"transformer", "dual_path", "skim", "masked_transformer"}
# a module called in a Python loop: (a submodule of the shared block, how many call sites)
SHARED_BLOCK = {"tdanet": ("block.proj_in", 3), "afrcnn": ("block.proj_in.conv", 3)}

# objects that a tracer might be tempted to patch while tracing; they must be these afterwards
GLOBAL_OBJECTS = {
    "torch.tensor": (torch, "tensor"),
    "torch.arange": (torch, "arange"),
    "torch.cat": (torch, "cat"),
    "torch.Tensor": (torch, "Tensor"),
    "torch.relu": (torch, "relu"),
    "torch.sigmoid": (torch, "sigmoid"),
    "torch.sqrt": (torch, "sqrt"),
    "torch.exp": (torch, "exp"),
    "builtins.int": (builtins, "int"),
    "builtins.len": (builtins, "len"),
    "builtins.range": (builtins, "range"),
    "builtins.isinstance": (builtins, "isinstance"),
    "F.pad": (F, "pad"),
    "F.interpolate": (F, "interpolate"),
    "F.adaptive_avg_pool1d": (F, "adaptive_avg_pool1d"),
    "F.multi_head_attention_forward": (F, "multi_head_attention_forward"),
    "math.log": (math, "log"),
    "math.sqrt": (math, "sqrt"),
    "operator.getitem": (operator, "getitem"),
    "Tensor.to": (torch.Tensor, "to"),
    "Tensor.tolist": (torch.Tensor, "tolist"),
    "Tensor.size": (torch.Tensor, "size"),
    "Tensor.view": (torch.Tensor, "view"),
    "Tensor.__getitem__": (torch.Tensor, "__getitem__"),
    "Tensor.__len__": (torch.Tensor, "__len__"),
    "Tensor.__int__": (torch.Tensor, "__int__"),
    "nn.Module.__call__": (nn.Module, "__call__"),
    "nn.Module._call_impl": (nn.Module, "_call_impl"),
    "nn.Module.__getattr__": (nn.Module, "__getattr__"),
}


# -- helpers ---------------------------------------------------------------------------------
def wav(batch: int, length: int, seed: int) -> torch.Tensor:
    return torch.randn(batch, length, generator=torch.Generator().manual_seed(seed))


def max_relative_error(expected: torch.Tensor, got: torch.Tensor) -> float:
    assert expected.shape == got.shape, f"shape {tuple(got.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(got).all(), "non-finite output"
    return float((expected - got).abs().max() / expected.abs().max().clamp_min(1e-30))


def synthetic_batches(n_batches: int = 3, batch: int = 2, length: int = 8000, n_src: int = 2):
    """(mixture[B, T], sources[B, n_src, T]): each source a few random sinusoids with an
    amplitude envelope, plus a little noise."""
    generator = torch.Generator().manual_seed(123)
    t = torch.arange(length) / 8000.0
    out = []
    for _ in range(n_batches):
        freqs = 100 + 1500 * torch.rand(batch, n_src, 3, 1, generator=generator)
        phases = 2 * math.pi * torch.rand(batch, n_src, 3, 1, generator=generator)
        tones = torch.sin(2 * math.pi * freqs * t + phases).sum(2)
        envelope = 0.5 + 0.5 * torch.sin(
            2 * math.pi * 3 * torch.rand(batch, n_src, 1, generator=generator) * t
        )
        sources = 0.3 * tones * envelope + 0.01 * torch.randn(
            batch, n_src, length, generator=generator
        )
        out.append((sources.sum(1), sources))
    return out


def random_keep(analysis, rng: np.random.Generator, single: bool = False) -> dict[int, list[int]]:
    keep = {}
    for group in analysis.groups:
        n = 1 if single else int(rng.integers(1, group.size + 1))
        keep[group.index] = sorted(int(i) for i in rng.choice(group.size, n, replace=False))
    return keep


def describe(keep) -> str:
    return "{" + ", ".join(f"{g}: {len(v)} kept" for g, v in keep.items()) + "}"


# -- the caller's side, before and after --------------------------------------------------------
@dataclass
class Snapshot:
    state: dict[str, torch.Tensor]
    data_ptrs: dict[str, int]
    parameters: dict[str, nn.Parameter]
    requires_grad: dict[str, bool]
    training: dict[str, bool]
    instance_attrs: dict[str, set]
    forwards: dict[type, object]
    module_globals: dict[str, object]
    objects: dict[str, object] = field(default_factory=dict)


def take_snapshot(model: nn.Module) -> Snapshot:
    state = model.state_dict()
    return Snapshot(
        state={k: v.detach().clone() for k, v in state.items()},
        data_ptrs={k: v.data_ptr() for k, v in state.items()},
        parameters=dict(model.named_parameters()),
        requires_grad={k: p.requires_grad for k, p in model.named_parameters()},
        training={k: m.training for k, m in model.named_modules()},
        instance_attrs={k: set(vars(m)) for k, m in model.named_modules()},
        forwards={type(m): type(m).forward for m in model.modules()},
        module_globals=dict(vars(sys.modules[type(model).__module__])),
        objects={k: getattr(owner, attr) for k, (owner, attr) in GLOBAL_OBJECTS.items()},
    )


def snapshot_differences(model: nn.Module, before: Snapshot) -> list[str]:
    after = take_snapshot(model)
    problems = []
    if after.state.keys() != before.state.keys():
        problems.append(
            f"state_dict keys changed: {sorted(after.state.keys() ^ before.state.keys())}"
        )
    for k in before.state.keys() & after.state.keys():
        a, b = before.state[k], after.state[k]
        if a.shape != b.shape or a.dtype != b.dtype or not torch.equal(a, b):
            problems.append(f"state_dict[{k!r}] changed")
        if before.data_ptrs[k] != after.data_ptrs[k]:
            problems.append(f"state_dict[{k!r}] now lives in another tensor")
    for k, p in before.parameters.items():
        if after.parameters.get(k) is not p:
            problems.append(f"parameter {k!r} replaced")
    if after.requires_grad != before.requires_grad:
        problems.append(
            f"requires_grad changed: {[k for k in before.requires_grad if before.requires_grad[k] != after.requires_grad.get(k)]}"
        )
    if after.training != before.training:
        problems.append("train/eval mode of some submodule changed")
    for k, attrs in before.instance_attrs.items():
        if after.instance_attrs.get(k) != attrs:
            problems.append(
                f"instance attributes of {k or 'the model'!r} changed: "
                f"{sorted((after.instance_attrs.get(k) or set()) ^ attrs)}"
            )
    for cls, forward in before.forwards.items():
        if cls.forward is not forward:
            problems.append(f"{cls.__name__}.forward replaced")
    # Python's warnings machinery adds __warningregistry__ to the globals of a module whose
    # code warns (a torch warning raised in the model's own forward): bookkeeping, not sepfx's
    changed = (set(after.module_globals) ^ set(before.module_globals)) - {"__warningregistry__"}
    if changed:
        problems.append(f"module globals added/removed: {sorted(changed)}")
    for k, v in before.module_globals.items():
        if k in after.module_globals and after.module_globals[k] is not v:
            problems.append(f"module global {k!r} replaced")
    for k, v in before.objects.items():
        if after.objects[k] is not v:
            problems.append(f"{k} is not the original object any more")
    return problems


# -- one build, one analysis, one compile per model ---------------------------------------------
class Case:
    def __init__(self, name: str):
        self.name = name
        self.model = wild.build(name)
        self.before = take_snapshot(self.model)
        self._analysis = self._compiled = None

    def _cached(self, attr, make):
        value = getattr(self, attr)
        if value is None:
            try:
                value = ("ok", make())
            except Exception as error:  # remembered, re-raised by every test that needs it
                value = ("error", error)
            setattr(self, attr, value)
        if value[0] == "error":
            raise value[1]
        return value[1]

    def analysis(self) -> sepfx.Analysis:
        return self._cached("_analysis", lambda: sepfx.analyze(self.model))

    def compiled(self):
        return self._cached(
            "_compiled",
            lambda: sepfx.compile(
                self.model, budget=BUDGET, data=synthetic_batches(), steps=10, progress=False
            ),
        )


@pytest.fixture(scope="module")
def cases(one_thread):
    made: dict[str, Case] = {}

    def get(name: str) -> Case:
        if name not in made:
            made[name] = Case(name)
        return made[name]

    return get


def inputs():
    return [wav(b, t, seed=100 + i) for i, (b, t) in enumerate(SHAPES)]


# -- the models themselves ----------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_model_contract(name):
    """The models are what the suite claims: [B, T] -> [B, n_src, T] at 8 kHz, small, fast."""
    model = wild.build(name)
    assert model.sample_rate == 8000 and model.n_src == 2
    with torch.no_grad():
        for b, t in SHAPES:
            assert model(wav(b, t, seed=1)).shape == (b, 2, t)
        if name in ("tdanet", "transformer"):  # the root's ndim check is live code
            assert model(wav(1, 5003, seed=2)[0]).shape == (1, 2, 5003)
        if name == "transformer":  # attention across the batch axis, on purpose
            x = wav(2, 8000, seed=3)
            together = model(x)
            alone = torch.cat([model(x[:1]), model(x[1:])])
            assert max_relative_error(together, alone) > 1e-3


# -- compile ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_compile_meets_budget(cases, name):
    case = cases(name)
    slim = case.compiled()
    report = slim.sepfx_report
    print(f"\n{report}")
    assert BUDGET - 0.02 <= report.macs_ratio <= BUDGET, (
        f"{name}: MACs ratio {report.macs_ratio:.4f} not in [0.38, 0.40]"
    )
    with torch.no_grad():
        for x in inputs():
            assert slim(x).shape == (x.shape[0], 2, x.shape[-1])


# -- exactness -------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_gated_equals_slim(cases, name):
    analysis = cases(name).analysis()
    assert analysis.groups, f"{name}: no channel groups"
    rng = np.random.default_rng(7)
    keep_sets = [("single", random_keep(analysis, rng, single=True))]
    keep_sets += [(f"random{i}", random_keep(analysis, rng)) for i in range(N_RANDOM_KEEP_SETS)]
    xs = inputs()
    failures = []
    # in float64 (a statistic over one kept channel amplifies float32 rounding past any fixed
    # tolerance, which is not what this test is about), where the model's own code runs in it
    # (SkiM makes its initial LSTM state as float32 zeros)
    try:
        with torch.no_grad():
            copy.deepcopy(cases(name).model).double()(xs[0].double())
        dtype = torch.float64
    except RuntimeError:
        dtype = torch.float32
    with torch.no_grad():
        for label, keep in keep_sets:
            try:
                # copies: the gated model shares its layers with the analysis
                gated = copy.deepcopy(analysis.gated(keep)).to(dtype)
                slim = analysis.slim(keep).to(dtype)
            except Exception as error:
                failures.append(
                    f"keep set {label} {describe(keep)}: {type(error).__name__}: "
                    f"{str(error).splitlines()[0][:300]}"
                )
                continue
            for x in xs:
                x = x.to(dtype)
                try:
                    expected = gated(x)
                    got = slim(x)
                    assert got.shape == (x.shape[0], 2, x.shape[-1]), tuple(got.shape)
                    err = max_relative_error(expected, got)
                except Exception as error:
                    failures.append(
                        f"keep set {label} {describe(keep)} input {list(x.shape)}: "
                        f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"
                    )
                    continue
                if not err <= TOL:
                    failures.append(
                        f"keep set {label} {describe(keep)} input {list(x.shape)}: "
                        f"max relative error {err:.3g} > {TOL:g}"
                    )
    assert not failures, f"{name}: gated != slim\n" + "\n".join(failures)


@pytest.mark.parametrize("name", NAMES)
def test_gated_keep_all_equals_eager(cases, name):
    case = cases(name)
    gated = case.analysis().gated()
    failures = []
    with torch.no_grad():
        for x in inputs():
            err = max_relative_error(case.model(x), gated(x))
            if not err <= TOL:
                failures.append(f"input {list(x.shape)}: max relative error {err:.3g}")
    assert not failures, f"{name}: gated (all kept) != eager\n" + "\n".join(failures)


# -- ONNX ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_export_onnx_dynamic_time(cases, name, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    slim = cases(name).compiled()
    path = tmp_path / "m.onnx"
    result = sepfx.export_onnx(slim, path)
    print(
        f"\n{name}: exporter {result.exporter}, dynamic time {result.dynamic_time}, "
        f"errors {result.errors}, notes {result.notes}"
    )
    assert path.is_file()
    assert result.errors and all(e <= ONNX_TOL for e in result.errors.values()), result.errors
    if not result.dynamic_time:
        print(f"*** {name}: exported at a fixed length only: {result.notes}")
        assert any("fixed length" in note for note in result.notes), (
            f"{name}: fixed-length export without a note saying so: {result.notes}"
        )
    assert result.dynamic_time, f"{name}: exported at a fixed length only: {result.notes}"
    assert result.dynamic_batch, f"{name}: exported at a fixed batch size only: {result.notes}"
    # the file really is dynamic: ONNX Runtime at lengths the exporter never saw
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    assert all(isinstance(d, str) for d in session.get_inputs()[0].shape)  # no fixed axis
    for b, t in ((2, 5003), (1, 8037), (2, 8000), (2, 12345), (2, 16001)):
        x = wav(b, t, seed=50)
        with torch.no_grad():
            expected = slim(x)
        got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
        err = max_relative_error(expected, got)
        assert err <= ONNX_TOL, f"{name}: ONNX Runtime differs at {[b, t]}: {err:.3g}"


# -- the report ------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_report_lists_assumptions_shells_frozen(cases, name):
    report = cases(name).compiled().sepfx_report
    text = str(report)
    print(f"\n{text}")
    problems = []
    for wanted in EXPECTED_ASSUMPTIONS[name]:
        if not any(wanted in a for a in report.assumptions):
            problems.append(f"no assumption about {wanted!r} in {report.assumptions}")
    for a in report.assumptions:
        if a not in text:
            problems.append(f"assumption {a!r} not in the text")
    for shell, why in report.shells.items():
        if shell not in text or why not in text:
            problems.append(f"eager shell {shell!r} ({why}) not in the text")
    with_parameters = [f for f in report.frozen if f.parameters]
    for f in with_parameters:
        missing = [p for p in f.parameters if p not in text]
        if missing:
            problems.append(f"frozen axis {f.axis!r}: parameter axes {missing} not in the text")
        if f.reason not in text:
            problems.append(f"frozen axis {f.axis!r}: reason {f.reason!r} not in the text")
    rest = len(report.frozen) - len(with_parameters)
    if rest and str(rest) not in text:
        problems.append(f"the {rest} frozen time/position axes are not counted in the text")
    if not report.prunable_macs_share >= 0.8:
        problems.append(f"only {100 * report.prunable_macs_share:.1f}% of the MACs are prunable")
    assert not problems, f"{name}:\n" + "\n".join(problems)


# -- the patterns, one by one ------------------------------------------------------------------
@pytest.mark.parametrize("name", [n for n in NAMES if n not in SHELLS])
def test_no_pattern_falls_back_to_a_leaf(cases, name):
    """Every pattern of the table is traced, none hidden in an opaque leaf (whose channels
    would be frozen)."""
    analysis = cases(name).analysis()
    assert not analysis.capture.shells, f"{name}: eager shells {analysis.capture.shells}"


def test_length_branch_makes_a_shell_and_its_glue_freezes_what_it_reads(cases):
    """TinyTransformer's ``pad_to_multiple`` branches on ``rest = k - T % k > 0``: a value
    derived from the length, so its root runs as an eager shell (a trace would fix the branch
    for one length). Its layers are graphs, still prunable; the shell's own ``m.view(B, L,
    n_src, self.enc_channels)`` reads the encoder's channel count from an attribute, so that
    group (and only it) is frozen, with the reason."""
    analysis = cases("transformer").analysis()
    assert set(analysis.capture.shells) == {""} and "rest > 0" in analysis.capture.shells[""]
    assert {"layers.0", "layers.1", "position"} <= set(analysis.capture.parts)
    glue = [f for f in analysis.channels.frozen if "eager code reads its channel count" in f.reason]
    assert {p for f in glue for p in f.parameters} >= {"encoder out", "decoder in"}
    members = {m for g in analysis.groups for m in g.members}
    assert {"layers.0.attn heads", "layers.0.ffn.0 out", "in_proj out"} <= members, members


def test_position_buffer_sliced_with_its_group(cases):
    """``pe[:, :x.size(1)]`` added to [B, T, D]: the buffer's D axis belongs to the residual
    stream's group and is sliced with it."""
    analysis = cases("transformer").analysis()
    keep = analysis.keep_ratio(0.5, importance="first")
    slim = analysis.slim(keep)
    buffers = {k: tuple(v.shape) for k, v in slim.named_buffers() if k.endswith("pe")}
    assert buffers, (
        f"no positional-encoding buffer in the slim model: {dict(slim.named_buffers()).keys()}"
    )
    for k, shape in buffers.items():
        assert shape[-1] == 16, f"{k}: {shape}: its channel axis (32) was not sliced to 16"
    # the buffer's own position axis (dim 1, max_len) is rightly frozen: it is sliced by the
    # input length; its channel axis must not be
    frozen = [
        f
        for f in analysis.channels.frozen
        if any(
            p.startswith(("position", "in_proj", "layers"))
            and p not in ("position.pe dim 1", "in_proj in")
            for p in f.parameters
        )
    ]
    assert not frozen, "\n".join(f"{f.label}: {f.reason} ({f.parameters})" for f in frozen)


@pytest.mark.parametrize("name", sorted(SHARED_BLOCK))
def test_shared_block_keeps_one_module_at_every_call_site(cases, name):
    """One block called N times in a loop stays one module in the slim model, called N
    times; the never-used branch is gone."""
    target, calls = SHARED_BLOCK[name]
    slim = cases(name).compiled()
    sites = [n for n in slim.graph.nodes if n.op == "call_module" and n.target == target]
    assert len(sites) == calls, f"{name}: {target} called at {len(sites)} sites, expected {calls}"
    if name == "afrcnn":
        assert not any(
            n.op == "call_module" and n.target == "block.aux" for n in slim.graph.nodes
        ), "the unused branch block.aux is still computed"


# -- the caller's model ------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_callers_model_untouched(cases, name):
    case = cases(name)
    for step in (case.analysis, case.compiled):
        try:
            step()
        except Exception:
            pass  # even a failed analysis or compile must leave everything as it was
    problems = snapshot_differences(case.model, case.before)
    assert not problems, f"{name}:\n" + "\n".join(problems)
