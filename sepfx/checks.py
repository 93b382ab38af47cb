"""Checks a slim model must pass before sepfx returns it, at the check inputs (batch 1 and 2, a
length that is a multiple of no stride): it runs where the dense model runs (invariant 4's
premise), it computes what the hard-gated model computes (invariant 1) and its output is finite
wherever the dense model's is (invariant 6).

Traced graphs are exact by construction; the checks catch what the analysis cannot see: eager
code (``passes.capture``) that reads a channel count from somewhere sepfx cannot rewrite, or a
statistic that an op rule failed to guard. A failure is traced to the channel groups whose
pruning causes it, so that ``compile`` can keep exactly those whole (``failing_groups``) and
``prune`` can name them (``check_slim``)."""

from __future__ import annotations

import contextlib
import copy
import io
import sys
from dataclasses import dataclass

import torch
from torch import nn

from sepfx.errors import SlimError


def check_inputs(example: torch.Tensor) -> list[torch.Tensor]:
    """Batch 1 at the example's length and batch 2 at an odd length that is a multiple of no
    stride, in the example's dtype and on its device."""
    length = example.shape[-1]
    other = length + length // 4 + 37
    other += 1 - other % 2
    generator = torch.Generator().manual_seed(2468)  # drawn on the CPU: the same on any device
    return [
        torch.randn(
            [batch, *example.shape[1:-1], t], generator=generator, dtype=example.dtype, device="cpu"
        ).to(example.device)
        for batch, t in ((1, length), (2, other))
    ]


@dataclass
class Failure:
    kind: str  # "runs" | "exact" | "finite"
    input_shape: list[int]
    detail: str

    def describe(self) -> str:
        what = {
            "runs": "does not run",
            "exact": "differs from the hard-gated model",
            "finite": "outputs NaN or inf where the dense model's output is finite",
        }
        return f"the slim model {what[self.kind]} at input {self.input_shape} ({self.detail})"


class _Reference:
    """The dense and hard-gated outputs a slim model is checked against. Models are compared
    in float64 where they run in it (copies: a statistic over few kept channels can amplify
    float32 rounding past any fixed tolerance), else in their own dtype."""

    def __init__(self, analysis, double: bool = True, inputs: slice = slice(None)):
        self.analysis = analysis
        self.double = double and analysis.example_input.dtype == torch.float32
        self.inputs, self.dense = [], []
        while True:
            dense = self._cast(analysis.gated())  # every channel kept: the dense model
            try:
                for x in check_inputs(analysis.example_input)[inputs]:
                    try:
                        self.dense.append(eval_outputs(dense, self._cast(x)))
                    except Exception as error:
                        if self.double:
                            raise
                        _check_model_fails_too(analysis, x, error)  # else: no claim on x
                        continue
                    self.inputs.append(self._cast(x))
                return
            except Exception:  # the model does not run in float64: compare in its own dtype
                if not self.double:
                    raise
                self.double, self.inputs, self.dense = False, [], []

    def _cast(self, value):
        if not self.double:
            return value
        if isinstance(value, torch.Tensor):
            return value.double()
        return copy.deepcopy(value).double()

    def failure(self, keep: dict, slim: nn.Module, tolerance: float) -> Failure | None:
        gated = self._cast(self.analysis.gated(keep))
        slim = self._cast(slim)
        for x, dense in zip(self.inputs, self.dense):
            shape = list(x.shape)
            try:
                got = eval_outputs(slim, x)
            except Exception as error:
                return Failure("runs", shape, f"{type(error).__name__}: {error}")
            expected = eval_outputs(gated, x)
            if len(got) != len(expected):
                return Failure("exact", shape, f"{len(got)} outputs, expected {len(expected)}")
            for e, g, d in zip(expected, got, dense):
                if e.shape != g.shape:
                    return Failure(
                        "exact", shape, f"output shape {list(g.shape)}, expected {list(e.shape)}"
                    )
                if (
                    e.is_floating_point()
                    and d.shape == g.shape
                    and bool((torch.isfinite(d) & ~torch.isfinite(g)).any())
                ):
                    return Failure("finite", shape, "non-finite values")
                relative = _relative_error(e, g)
                if relative > tolerance:
                    return Failure("exact", shape, f"relative error {relative:.3g}")
        return None


def _check_model_fails_too(analysis, x: torch.Tensor, error: Exception) -> None:
    """The gated model (every channel kept) failed at ``x``: fine where the caller's model
    fails too (it does not take ``x``); where the caller's model runs, sepfx broke it."""
    try:
        eval_outputs(analysis.capture.root, x)
    except Exception:
        return
    raise SlimError(
        f"the model runs at input {list(x.shape)} but sepfx's rebuilt model (every channel "
        f"kept) does not: {type(error).__name__}: {error}. This is a sepfx bug (its graph "
        "parts replace the model's modules): please report it"
    ) from error


def _relative_error(expected: torch.Tensor, got: torch.Tensor) -> float:
    if not expected.is_floating_point():
        return 0.0 if torch.equal(expected, got) else float("inf")
    finite = torch.isfinite(expected) & torch.isfinite(got)
    if not finite.any():
        return 0.0
    scale = float(expected[finite].abs().max())
    return float((expected - got)[finite].abs().max()) / max(scale, 1e-12)


def failing_groups(
    analysis, keep: dict, slim: nn.Module, tolerance: float = 1e-4
) -> tuple[Failure, list[int]] | None:
    """None when ``slim`` (``analysis.slim(keep)``) passes the checks; else the failure and the
    pruned groups responsible: each whose pruning alone reproduces a failure or, when none
    does alone, the fewest that together do (restored cumulatively). Empty when even that finds
    none."""
    reference = _Reference(analysis)
    failure = reference.failure(keep, slim, tolerance)
    if failure is None:
        return None
    groups = {g.index: g for g in analysis.groups}
    pruned = [i for i in sorted(keep) if len(keep[i]) < groups[i].size]

    def fails(trial: dict) -> bool:
        try:
            return (
                reference.failure(trial, analysis.slim(trial, check=False), tolerance) is not None
            )
        except SlimError:  # the slim pass itself refuses it: as broken as a wrong result
            return True

    alone = [i for i in pruned if fails(_only(keep, groups, [i]))]
    if alone:
        return failure, alone
    together: list[int] = []
    for i in pruned:
        together.append(i)
        if fails(_only(keep, groups, together)):
            return failure, together
    return failure, []


def unslimmable_groups(analysis, tolerance: float = 1e-3) -> dict[int, Failure]:
    """The groups of a model with eager shells that keep sets cannot prune: pruning them (one
    unit fewer, or down to their ``min_size``) fails a check, alone or together with others,
    so the eager code around them reads their channel count (``self.width``) where sepfx
    cannot rewrite it. Each group is tried alone, then the others together (bisected when
    they fail only together). Such code fails grossly (it raises, or mixes channels up), so
    this search compares in the model's dtype at one input, batch 2 and an odd length; the
    keep set a compile returns is checked in full."""
    reference = _Reference(analysis, double=False, inputs=slice(1, 2))
    groups = {g.index: g for g in analysis.groups}
    whole = {i: list(range(g.size)) for i, g in groups.items()}
    # two ways to prune each group: one unit fewer, and as few as it may keep (glue that
    # splits or chunks by a literal may survive one of them by coincidence, not both)
    patterns = [
        {i: list(range(g.size - 1)) for i, g in groups.items()},
        {i: list(range(g.size - max(1, g.min_size), g.size)) for i, g in groups.items()},
    ]

    def failure(indices: list[int]) -> Failure | None:
        for pattern in patterns:
            keep = {**whole, **{i: pattern[i] for i in indices}}
            try:
                found = reference.failure(keep, analysis.slim(keep, check=False), tolerance)
            except SlimError as error:
                found = Failure("runs", list(analysis.example_input.shape), str(error)[:300])
            if found is not None:
                return found
        return None

    found: dict[int, Failure] = {}

    def search(indices: list[int], known: Failure) -> None:
        if len(indices) == 1:
            found[indices[0]] = known
            return
        left, right = indices[: len(indices) // 2], indices[len(indices) // 2 :]
        failures = [(part, failure(part)) for part in (left, right)]
        if all(f is None for _, f in failures):  # only together: keep them all whole
            found.update({i: known for i in indices})
        for part, f in failures:
            if f is not None:
                search(part, f)

    for i, g in groups.items():  # each alone, then the rest together (bisected)
        if g.size > g.min_size:
            alone = failure([i])
            if alone is not None:
                found[i] = alone
    rest = [i for i, g in groups.items() if g.size > g.min_size and i not in found]
    together = failure(rest) if len(rest) > 1 else None
    if together is not None:
        search(rest, together)
    return found


def check_slim(analysis, keep: dict, slim: nn.Module, tolerance: float = 1e-4) -> None:
    """Raise ``SlimError`` when ``slim`` fails a check, naming the channel groups responsible."""
    found = failing_groups(analysis, keep, slim, tolerance)
    if found is None:
        return
    failure, responsible = found
    groups = {g.index: g for g in analysis.groups}
    names = (
        "; ".join(f"{groups[i].describe()} with {len(keep[i])} kept" for i in responsible)
        or "no single channel group"
    )
    advice = (
        "keep more units of these groups (a larger budget or ratio, or an explicit keep set)"
        if failure.kind == "finite"
        else "the model's own code probably reads a channel count that sepfx cannot rewrite; "
        "keep these groups whole (an explicit keep set)"
    )
    raise SlimError(
        f"{failure.describe()}; responsible: {names}. Its cause: {advice}, and "
        f"please report it: sepfx should have found it"
    )


def _only(keep: dict, groups: dict, indices: list[int]) -> dict:
    """``keep`` with only ``indices`` pruned as in it, every other group kept whole."""
    return {i: keep[i] if i in indices else list(range(g.size)) for i, g in groups.items()}


def eval_outputs(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """The output's tensors, computed in eval mode (the modules' modes are restored after)."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    printed = io.StringIO()
    try:
        # torch.fx prints the generated code around an error before raising it: a failure
        # here is sepfx's to report (a trial keep set, a model that does not run at an input)
        with torch.no_grad(), contextlib.redirect_stderr(printed):
            out = model(x)
    finally:
        for m, training in modes.items():
            m.training = training
    sys.stderr.write(printed.getvalue())  # what a run that worked printed (warnings) stays
    return [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
