"""Checks a compiled model must pass before sepfx returns it (invariant 6: finite output)."""
from __future__ import annotations

import torch
from torch import nn

from sepfx.errors import SlimError


def check_inputs(example: torch.Tensor) -> list[torch.Tensor]:
    """Batch 1 at the example's length and batch 2 at an odd length that is a multiple of no
    stride, in the example's dtype and on its device."""
    length = example.shape[-1]
    other = length + length // 4 + 37
    other += 1 - other % 2
    generator = torch.Generator().manual_seed(2468)
    return [torch.randn([batch, *example.shape[1:-1], t], generator=generator,
                        dtype=example.dtype).to(example.device)
            for batch, t in ((1, length), (2, other))]


def check_finite(analysis, keep: dict, slim: nn.Module) -> None:
    """Raise ``SlimError`` when ``slim`` (``analysis.slim(keep)``) outputs NaN or inf where the
    dense model's output is finite at the check inputs, naming the channel group(s) whose
    pruning causes it: each pruned group is restored in turn, then cumulatively."""
    inputs = []
    dense_outputs = []
    dense = analysis.gated()  # every channel kept: the dense model
    for x in check_inputs(analysis.example_input):
        try:
            dense_outputs.append(_run(dense, x))
        except Exception:  # the dense model does not take this input: no claim on it
            continue
        inputs.append(x)
    bad = _non_finite(slim, inputs, dense_outputs)
    if bad is None:
        return
    groups = {g.index: g for g in analysis.groups}
    pruned = [i for i in sorted(keep) if len(keep[i]) < groups[i].size]
    alone = [i for i in pruned if _non_finite(analysis.slim(_restored(keep, groups, [i])),
                                              inputs, dense_outputs) is None]
    responsible, how = alone, "keeping all of its units alone makes the output finite"
    if not alone:
        restored = []
        for i in pruned:
            restored.append(i)
            if _non_finite(analysis.slim(_restored(keep, groups, restored)), inputs,
                           dense_outputs) is None:
                break
        responsible, how = restored, "only keeping all units of these together makes the " \
                                     "output finite"
    names = "; ".join(f"{groups[i].describe()} with {len(keep[i])} kept" for i in responsible)
    raise SlimError(
        f"the slim model outputs NaN or inf at input {bad} where the dense model's output is "
        f"finite; responsible: {names or 'no single channel group'} ({how}). Keep more units "
        f"of {'these groups' if len(responsible) > 1 else 'that group'} (a larger budget or "
        f"ratio, or an explicit keep set), and please report it: sepfx should have required it")


def _restored(keep: dict, groups: dict, indices: list[int]) -> dict:
    out = dict(keep)
    for i in indices:
        out[i] = list(range(groups[i].size))
    return out


def _run(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """The output's tensors, computed in eval mode (the modules' modes are restored after)."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            out = model(x)
    finally:
        for m, training in modes.items():
            m.training = training
    return [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def _non_finite(model: nn.Module, inputs, dense_outputs) -> list[int] | None:
    """The shape of the first input at which ``model`` is non-finite where the dense model is
    finite, or None."""
    for x, expected in zip(inputs, dense_outputs):
        try:
            got = _run(model, x)
        except Exception as error:
            raise SlimError(f"the slim model does not run at input {list(x.shape)} where the "
                            f"dense model does: {type(error).__name__}: {error}") from error
        for e, g in zip(expected, got):
            if e.shape == g.shape and e.is_floating_point() and \
                    bool((torch.isfinite(e) & ~torch.isfinite(g)).any()):
                return list(x.shape)
    return None


def check_exact(analysis, keep: dict, slim: nn.Module, tolerance: float = 1e-4) -> None:
    """Raise ``SlimError`` when ``slim`` does not compute what the hard-gated model computes at
    the check inputs (invariant 1), naming the channel groups whose pruning breaks it. Traced
    graphs are exact by construction; this catches eager code (``passes.capture``) that reads
    a channel count from somewhere sepfx cannot rewrite."""
    gated = analysis.gated(keep)
    inputs = check_inputs(analysis.example_input)
    bad = _mismatch(gated, slim, inputs, tolerance)
    if bad is None:
        return
    groups = {g.index: g for g in analysis.groups}
    pruned = [i for i in sorted(keep) if len(keep[i]) < groups[i].size]
    responsible = [i for i in pruned if _mismatch(
        analysis.gated(_only(keep, groups, i)), analysis.slim(_only(keep, groups, i)), inputs,
        tolerance) is not None]
    names = "; ".join(groups[i].describe() for i in responsible) or "no single channel group"
    raise SlimError(
        f"the slim model differs from the hard-gated model at input {bad[0]} (relative error "
        f"{bad[1]:.3g}); pruning alone breaks it: {names}. The model's own code probably reads "
        "a channel count that sepfx cannot rewrite; keep those groups whole (an explicit keep "
        "set) and please report it")


def _only(keep: dict, groups: dict, index: int) -> dict:
    """``keep`` for group ``index``, every other group kept whole."""
    return {i: keep[i] if i == index else list(range(g.size)) for i, g in groups.items()}


def _mismatch(gated: nn.Module, slim: nn.Module, inputs, tolerance: float):
    """(input shape, relative error) of the first input where the two models differ, or None;
    inputs the gated model does not take make no claim."""
    for x in inputs:
        try:
            expected = _run(gated, x)
        except Exception:
            continue
        try:
            got = _run(slim, x)
        except Exception:  # runs dense, not slim: the same failure as a wrong value
            return list(x.shape), float("inf")
        for e, g in zip(expected, got):
            if e.shape != g.shape:
                return list(x.shape), float("inf")
            finite = torch.isfinite(e) & torch.isfinite(g)
            scale = float(e[finite].abs().max()) if finite.any() else 1.0
            error = float((e - g)[finite].abs().max()) / max(scale, 1e-12) if finite.any() else 0
            if error > tolerance:
                return list(x.shape), error
    return None
