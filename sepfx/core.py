"""The compiler front: trace -> channel groups -> cost model, and slim models from keep sets."""

from __future__ import annotations

import copy
import operator
from typing import Any

import numpy as np
import torch
from torch import fx, nn

from passes.capture import Capture, capture
from passes.axes import ChannelAnalysis
from passes.channels import analyze_channels
from passes.cost import CostModel, cost_model
from passes.gates import GateBank, gated_model
from passes.rules import RULES
from passes.slim import check_keep, slim_model
from sepfx.checks import check_slim, eval_outputs, unslimmable_groups
from sepfx.errors import InputError, describe_error, sepfx_errors_only
from sepfx.report import FrozenRow, GroupRow, Report


# torch.fx's GraphModule.__deepcopy__ keeps only the attributes its graph uses, and those named
# in its meta under this key.
_PRESERVED = getattr(
    fx.graph_module, "_USER_PRESERVED_ATTRIBUTES_KEY", "_user_preserved_attributes"
)


def set_sepfx_attribute(model: nn.Module, name: str, value: Any) -> None:
    """Set ``model.<name>`` (sepfx's own facts on a model it made: the report, the example
    input...) so that ``copy.deepcopy`` of a GraphModule keeps it too."""
    setattr(model, name, value)
    if isinstance(model, fx.GraphModule):
        model.meta.setdefault(_PRESERVED, {})[name] = value


def model_number(model: nn.Module, name: str) -> int | None:
    """A positive whole number the model states about itself (``sample_rate``, ``n_src``): an
    attribute, a property or a method without arguments; None where it has none we can read."""
    try:
        value: Any = getattr(model, name, None)
        if callable(value) and not isinstance(value, nn.Module):
            value = value()
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        number = float(value)
    except Exception:  # absent, or not a number: the model says nothing usable
        return None
    return int(number) if number > 0 and number == int(number) else None


def model_device(model: nn.Module) -> torch.device:
    """Where the model's parameters (else its buffers) live; the CPU for a model without any."""
    tensor: torch.Tensor | None = next(iter(model.parameters()), None)
    if tensor is None:
        tensor = next(iter(model.buffers()), None)
    return torch.device("cpu") if tensor is None else tensor.device


def default_example_input(model: nn.Module, seconds: float = 1.0) -> torch.Tensor:
    """One second of noise at the model's ``sample_rate`` (8 kHz if it has none), batch 1, in
    the model's dtype and on its device (drawn on the CPU: the same numbers on any device)."""
    rate = model_number(model, "sample_rate") or 8000
    generator = torch.Generator().manual_seed(0)
    param = next(iter(model.parameters()), None)
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    noise = torch.randn(1, int(rate * seconds), generator=generator, dtype=dtype, device="cpu")
    return noise.to(model_device(model))


def _check_example_dtype(model: nn.Module, example_input: torch.Tensor) -> None:
    """InputError when the model's floating-point tensors are all of one dtype and the example
    is of another (a float64 waveform for a float32 model fails deep inside its first layer)."""
    dtypes = {t.dtype for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()}
    if len(dtypes) != 1 or example_input.dtype in dtypes:
        return
    model_dtype, given = (str(d).replace("torch.", "") for d in (*dtypes, example_input.dtype))
    raise InputError(
        f"example_input is {given} but the model's parameters are {model_dtype}: pass "
        f"example_input.to(torch.{model_dtype}), or compile a {given} copy of the model "
        f"(copy.deepcopy(model).to(torch.{given}))"
    )


# other layouts of a waveform to try when the model refuses the example: (expression, make)
_LAYOUTS = (
    ("x[:, 0]", lambda x: x[:, 0] if x.dim() == 3 and x.shape[1] == 1 else None),
    ("x[..., 0]", lambda x: x[..., 0] if x.dim() == 3 and x.shape[-1] == 1 else None),
    ("x.unsqueeze(1)", lambda x: x.unsqueeze(1) if x.dim() == 2 else None),
    ("x.unsqueeze(0)", lambda x: x.unsqueeze(0) if x.dim() == 1 else None),
)
_LAYOUT_NAMES = {1: "[time]", 2: "[batch, time]", 3: "[batch, 1, time]"}


def _example_problem(model: nn.Module, example_input: torch.Tensor) -> str | None:
    """What is wrong with ``example_input`` when the model itself fails on it (run on a copy
    in eval mode), with the layout it does take where another layout of the same waveform
    runs; None when the model runs on it (the failure is not the input's)."""
    runner = copy.deepcopy(model).eval()

    def failure(x: torch.Tensor) -> str | None:
        try:
            with torch.no_grad():
                runner(x)
        except Exception as error:
            return describe_error(error)
        return None

    why = failure(example_input)
    if why is None:
        return None
    shape = list(example_input.shape)
    for expression, make in _LAYOUTS:
        other = make(example_input)
        if other is not None and failure(other) is None:
            layout = _LAYOUT_NAMES.get(other.dim(), f"{other.dim()} axes")
            return (
                f"the model fails on example_input of shape {shape} ({why}) and runs on "
                f"shape {list(other.shape)}: it takes a waveform {layout}; pass "
                f"example_input={expression} (x your input), e.g. "
                f"torch.randn({', '.join(map(str, other.shape))})"
            )
    return (
        f"the model fails on example_input of shape {shape} ({example_input.dtype}): {why}; "
        "sepfx runs model(example_input) as you would, so pass an input the model takes "
        "(for most separators a waveform [batch, time], e.g. torch.randn(1, 8000))"
    )


class Analysis:
    """A model traced and analysed once; slim or gated models for any keep set.

    ``keep`` sets are ``{group index: indices of units to keep}``."""

    def __init__(self, model: nn.Module, example_input: torch.Tensor | None = None):
        if not isinstance(model, nn.Module):
            raise InputError(f"sepfx needs a torch.nn.Module, got {type(model).__name__}")
        if example_input is None:
            example_input = default_example_input(model)
        if not isinstance(example_input, torch.Tensor):
            raise InputError(
                f"example_input must be a torch.Tensor (e.g. torch.randn(1, 8000)), "
                f"got {type(example_input).__name__}"
            )
        if not example_input.is_floating_point():
            raise InputError(
                f"example_input has dtype {example_input.dtype}, but sepfx expects a "
                f"floating-point waveform [batch, time] in the model's dtype: convert it, e.g. "
                f"x.float() / 32768 for 16-bit PCM samples, or pass torch.randn(1, 8000)"
            )
        _check_example_dtype(model, example_input)
        example_input = example_input.to(model_device(model))
        self.model_name = type(model).__name__
        self.sample_rate = model_number(model, "sample_rate")
        self.n_src = model_number(model, "n_src")
        try:
            self.capture: Capture = capture(model, example_input)
        except Exception as error:
            problem = _example_problem(model, example_input)  # the input's fault, or not
            if problem is not None:
                raise InputError(problem) from error
            raise
        self.example_input = example_input
        # for output_change: dense outputs per input, and one gated model with its gate bank
        self._dense_outputs: dict[tuple, tuple[torch.Tensor, list[torch.Tensor]]] = {}
        self._gated_for_change: tuple[nn.Module, GateBank] | None = None
        self.channels: ChannelAnalysis = analyze_channels(
            self.capture.graph_module, example_input, summarised=not self.capture.traced_whole
        )
        self.cost: CostModel = cost_model(self.channels)
        # a traced model's dead code is gone; a model with eager shells keeps all its weights
        counted = self.capture.graph_module if self.capture.traced_whole else self.capture.root
        self.dense_params = sum(p.numel() for p in counted.parameters())
        if not self.capture.traced_whole:
            self._freeze_unslimmable()

    def _freeze_unslimmable(self) -> None:
        """Eager code may read a channel count that sepfx cannot rewrite (``x.view(B,
        self.width, -1)``): the groups whose pruning breaks the slim model are frozen, with the
        failure as the reason, and the analysis redone without them."""
        broken = unslimmable_groups(self)
        if not broken:
            return
        frozen = {}
        for index, failure in broken.items():
            group = self.groups[index]
            reason = (
                f"eager code reads its channel count where sepfx cannot rewrite it: with "
                f"{group.describe()} pruned, {failure.describe()}"
            )
            frozen.update({key: reason for key in group.positions})
        self.channels = analyze_channels(
            self.capture.graph_module, self.example_input, summarised=True, frozen=frozen
        )
        self.cost = cost_model(self.channels)

    @property
    def groups(self):
        return self.channels.groups

    # -- keep sets -------------------------------------------------------------------------
    def keep_all(self) -> dict[int, np.ndarray]:
        return {g.index: np.arange(g.size) for g in self.groups}

    def keep_ratio(self, ratio: float, importance: str = "magnitude", seed: int = 0):
        """Keep ``ratio`` of every group's units (at least one, at least the group's
        ``min_size``): the largest by weight magnitude,
        the first ones, or random ones (``importance`` = "magnitude" | "first" | "random")."""
        if not 0 < ratio <= 1:
            raise InputError(f"keep ratio must be in (0, 1], got {ratio}")
        scores = self.unit_magnitudes() if importance == "magnitude" else None
        rng = np.random.default_rng(seed)
        keep = {}
        for g in self.groups:
            n = min(g.size, max(1, g.min_size, int(round(ratio * g.size))))
            if importance == "first":
                idx = np.arange(n)
            elif importance == "random":
                idx = rng.choice(g.size, n, replace=False)
            elif importance == "magnitude":
                assert scores is not None  # computed above for "magnitude"
                idx = np.argsort(-scores[g.index], kind="stable")[:n]
            else:
                raise InputError(
                    f"importance must be 'magnitude', 'first' or 'random', got {importance!r}"
                )
            keep[g.index] = np.sort(idx)
        return keep

    def unit_magnitudes(self) -> dict[int, np.ndarray]:
        """Per group, a data-free score per unit: the L2 norms of the parameter slices it owns,
        each member normalised by its mean so that members of different scale count alike."""
        gm = self.capture.graph_module
        scores = {}
        for g in self.groups:
            total = np.zeros(g.size)
            for key, positions in g.positions.items():
                norms = _slice_norms(gm, self.channels, key)
                if norms is None:
                    continue
                per_unit = norms[positions].sum(axis=1)
                total += per_unit / max(per_unit.mean(), 1e-12)
            scores[g.index] = total
        return scores

    def output_change(self, keep: dict, x: torch.Tensor | None = None) -> float:
        """How much keeping only ``keep`` (groups left out stay whole) changes the output at
        ``x`` (default: the example input): the squared error of the hard-gated model's output
        tensors relative to the dense model's squared output, in eval mode."""
        x = self.example_input if x is None else x
        if self._gated_for_change is None:  # one gated model; each call sets its hard gates
            bank = GateBank(self.channels)
            self._gated_for_change = (self.gated(bank=bank).to(x.device), bank)
        model, bank = self._gated_for_change
        key = (tuple(x.shape), x.data_ptr())
        if key not in self._dense_outputs:
            bank.set_keep(np.ones(self.channels.num_units))
            self._dense_outputs[key] = (x, eval_outputs(model, x))  # x kept: its pointer stays
        bank.set_keep(
            self.channels.keep_vector(check_keep(self.channels, {**self.keep_all(), **keep}))
        )
        error = total = 0.0
        for d, g in zip(self._dense_outputs[key][1], eval_outputs(model, x)):
            if d.is_floating_point() and d.shape == g.shape:
                error += float(((d.double() - g.double()) ** 2).sum())
                total += float((d.double() ** 2).sum())
        return error / max(total, 1e-30)

    # -- models -----------------------------------------------------------------------------
    def gated(self, keep: dict | None = None, bank: GateBank | None = None) -> nn.Module:
        """The hard-gated reference at the original width (all kept if ``keep`` is None), or the
        model gated by a gate ``bank`` (gate learning)."""
        flat = None if keep is None else self.channels.keep_vector(check_keep(self.channels, keep))
        return gated_model(self.capture, self.channels, flat, bank)

    def slim(
        self, keep: dict, budget: float | None = None, notes=(), check: bool = True
    ) -> nn.Module:
        """The slim model of a keep set. A model with eager shells is checked (it runs and
        computes what the hard-gated model computes at the check inputs; ``check``), since
        eager code may read a channel count sepfx cannot rewrite: a ``SlimError`` names the
        groups at fault."""
        model = slim_model(self.capture, self.channels, keep)
        for p in model.parameters():  # a new model: trainable like any other
            p.requires_grad_(True)
        set_sepfx_attribute(model, "sepfx_example_input", self.example_input)
        set_sepfx_attribute(model, "sepfx_n_src", self.n_src)
        report = self.report(keep, model, budget=budget, notes=list(notes))
        set_sepfx_attribute(model, "sepfx_report", report)
        if check and not self.capture.traced_whole:
            check_slim(self, keep, model)
        return model

    def report(
        self,
        keep: dict | None = None,
        slim_model: nn.Module | None = None,
        budget: float | None = None,
        notes: list[str] | None = None,
    ) -> Report:
        keep = self.keep_all() if keep is None else check_keep(self.channels, keep)
        flat = self.channels.keep_vector(keep)
        params = (
            self.dense_params
            if slim_model is None
            else sum(p.numel() for p in slim_model.parameters())
        )
        groups = [
            GroupRow(g.index, g.size, len(keep[g.index]), self.cost.shares[g.index], g.members)
            for g in self.groups
        ]
        frozen = [FrozenRow(f.label, f.reason, f.parameters) for f in self.channels.frozen]
        flat_none = np.zeros(self.channels.num_units)
        flat_none[0] = 1
        prunable = 1 - self.cost.macs(flat_none) / max(self.cost.dense_macs, 1)
        return Report(
            self.model_name,
            tuple(self.example_input.shape),
            self.sample_rate,
            groups,
            frozen,
            dict(self.capture.shells),
            list(dict.fromkeys(self.capture.assumptions)),
            self.cost.dense_macs,
            self.cost.macs(flat),
            self.dense_params,
            params,
            prunable,
            budget,
            list(self.capture.notes) + list(notes or []),
        )


def _slice_norms(gm: fx.GraphModule, analysis: ChannelAnalysis, key) -> np.ndarray | None:
    """L2 norm of each index's slice of the parameters behind a module or attribute axis."""
    if key.kind == "attr":
        return _norms(operator.attrgetter(key.target)(gm), key.dim)
    if key.kind != "module":
        return None
    module = gm.get_submodule(key.qualname)
    total = None
    rule = RULES.for_module(module)
    slices = rule.importance(module, key.name) if hasattr(rule, "importance") else []
    for tensor, dim in slices:
        n = _norms(tensor, dim)
        total = n if total is None else total + n
    return total


def _norms(tensor: torch.Tensor, dim: int) -> np.ndarray:
    t = tensor.detach().float().movedim(dim, 0).reshape(tensor.shape[dim], -1)
    return t.norm(dim=1).cpu().numpy().astype(np.float64)


@sepfx_errors_only
def analyze(model: nn.Module, example_input: torch.Tensor | None = None) -> Analysis:
    """Trace ``model`` (never modified) and find its channel groups and their MAC shares."""
    return Analysis(model, example_input)


@sepfx_errors_only
def prune(
    model: nn.Module,
    keep: dict | None = None,
    *,
    ratio: float | None = None,
    importance: str = "magnitude",
    example_input: torch.Tensor | None = None,
) -> nn.Module:
    """The slim model of ``model`` (see ``compile``) for an explicit keep set, or keeping
    ``ratio`` of every group by ``importance``. Its report is ``slim.sepfx_report``."""
    if (keep is None) == (ratio is None):
        raise InputError("prune needs exactly one of keep= (a keep set) or ratio= (a fraction)")
    analysis = Analysis(model, example_input)
    if keep is None:
        assert ratio is not None  # exactly one of the two
        keep = analysis.keep_ratio(ratio, importance)
    slim = analysis.slim(keep, check=False)
    check_slim(analysis, keep, slim)
    return slim
