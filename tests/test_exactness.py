"""Invariant 1 (exactness) over the whole zoo: for any keep set, the hard-gated model at the
original width and the slim model compute the same output; with everything kept the gated
model is the original model; and the slim model really is smaller."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import LENGTHS, ZOO_NAMES, max_relative_error, random_keep, wav

N_KEEP_SETS = 20  # per model in float32: one single-unit set, one keep-all set, 18 random ones
FLOAT32_TOL = 1e-5
FLOAT64_TOL = 1e-10

# [batch, length]: the reference length, a length that is a multiple of no stride, batch 2
INPUT_SHAPES = ((1, LENGTHS[0]), (1, LENGTHS[1]), (2, LENGTHS[0]))


def keep_sets(analysis, count: int, seed: int):
    rng = np.random.default_rng(seed)
    sets = [
        ("single", random_keep(analysis, rng, single=True)),
        ("all", {g.index: list(range(g.size)) for g in analysis.groups}),
    ]
    sets += [(f"random{i}", random_keep(analysis, rng)) for i in range(count - 2)]
    return sets


def _describe(keep) -> str:
    return (
        "{"
        + ", ".join(f"{k}: {len(v)} kept {v if len(v) <= 4 else '...'}" for k, v in keep.items())
        + "}"
    )


def _check_keep_sets(analysis, sets, inputs, tol):
    failures = []
    reference = {}  # input index -> gated output with everything kept
    with torch.no_grad():
        for label, keep in sets:
            gated, slim = analysis.gated(keep), analysis.slim(keep)
            for i, x in enumerate(inputs):
                expected, got = gated(x), slim(x)
                if label == "all":
                    reference[i] = expected
                elif label == "single":
                    reference[("single", i)] = expected
                err = max_relative_error(expected, got)
                if not err <= tol:
                    failures.append(
                        f"keep set {label} {_describe(keep)} input "
                        f"{list(x.shape)}: max relative error {err:.3g} > {tol:g}"
                    )
    # the gates do something: keeping one unit per group changes the output
    for i in range(len(inputs)):
        if i in reference and ("single", i) in reference:
            change = max_relative_error(reference[i], reference[("single", i)])
            if not change > 1e3 * tol:
                failures.append(
                    f"input {i}: keeping one unit per group changes the gated "
                    f"output by only {change:.3g}: the gates have no effect"
                )
    return failures


@pytest.mark.parametrize("name", ZOO_NAMES)
def test_gated_equals_slim_float32(zoo, name):
    analysis = zoo(name).analysis
    assert analysis.groups, f"{name}: no channel groups at all"
    inputs = [wav(b, t, seed=10 + i) for i, (b, t) in enumerate(INPUT_SHAPES)]
    failures = _check_keep_sets(
        analysis, keep_sets(analysis, N_KEEP_SETS, seed=0), inputs, FLOAT32_TOL
    )
    assert not failures, f"{name}: gated != slim\n" + "\n".join(failures)


@pytest.mark.parametrize("name", ZOO_NAMES)
def test_gated_equals_slim_float64(zoo, name):
    entry = zoo(name, torch.float64)
    analysis = entry.analysis
    assert analysis.example_input.dtype == torch.float64
    inputs = [
        wav(1, LENGTHS[1], seed=20, dtype=torch.float64),
        wav(2, LENGTHS[0], seed=21, dtype=torch.float64),
    ]
    failures = _check_keep_sets(analysis, keep_sets(analysis, 4, seed=1), inputs, FLOAT64_TOL)
    assert not failures, f"{name} (float64): gated != slim\n" + "\n".join(failures)


@pytest.mark.parametrize(
    "dtype,tol",
    [(torch.float32, FLOAT32_TOL), (torch.float64, FLOAT64_TOL)],
    ids=["float32", "float64"],
)
@pytest.mark.parametrize("name", ZOO_NAMES)
def test_gated_keep_all_equals_eager(zoo, name, dtype, tol):
    entry = zoo(name, dtype)
    inputs = [wav(b, t, seed=30 + i, dtype=dtype) for i, (b, t) in enumerate(INPUT_SHAPES)]
    with torch.no_grad():
        for gated in (entry.analysis.gated(), entry.analysis.gated(entry.analysis.keep_all())):
            for x in inputs:
                err = max_relative_error(entry.model(x), gated(x))
                assert err <= tol, (
                    f"{name}: gated (all kept) differs from eager at {list(x.shape)}: {err:.3g}"
                )


@pytest.mark.parametrize("name", ZOO_NAMES)
def test_slim_is_smaller(zoo, name):
    analysis = zoo(name).analysis
    dense = analysis.capture.graph_module
    rng = np.random.default_rng(5)
    sets = [
        random_keep(analysis, rng, single=True),
        analysis.keep_ratio(0.5),
        random_keep(analysis, rng),
    ]
    for keep in sets:
        flat = analysis.channels.keep_vector(keep)
        slim = analysis.slim(keep)
        shrunk = 0
        for qualname, axes in analysis.channels.module_axes.items():
            pruned = [
                name_
                for name_, key in axes.items()
                if len(analysis.channels.kept_indices(key, flat)) < analysis.channels.axes[key].size
            ]
            before = sum(p.numel() for p in dense.get_submodule(qualname).parameters())
            after = sum(p.numel() for p in slim.get_submodule(qualname).parameters())
            if pruned:
                shrunk += 1
                assert after < before, (
                    f"{name}: module {qualname} lost channels on axes "
                    f"{pruned} but has {after} >= {before} parameters"
                )
            else:
                assert after == before, (
                    f"{name}: module {qualname} lost no channel but has "
                    f"{after} != {before} parameters"
                )
        total_before = sum(p.numel() for p in dense.parameters())
        total_after = sum(p.numel() for p in slim.parameters())
        if any(len(keep[g.index]) < g.size for g in analysis.groups):
            assert shrunk > 0
            assert total_after < total_before
        assert slim.sepfx_report.params == total_after
        assert slim.sepfx_report.dense_params == total_before
        # the dense analysis graph is untouched by slimming
        assert sum(p.numel() for p in analysis.capture.graph_module.parameters()) == total_before
