"""ONNX export with a dynamic batch and time axis, checked against ONNX Runtime.

The legacy TorchScript-based exporter is tried first (fast, one self-contained file); the dynamo
exporter is the fallback, always with ``external_data=False`` (one file) and ``optimize=False``
(its optimizer has been seen to turn a correct transformer into all-NaN output). Either way ONNX
Runtime's output is compared with PyTorch's at the example input and at a second batch size and
length.

Both exporters run the model's Python once, at the length they trace with, so a branch that the
model's code takes on the length (``if T % k: pad``, ``if T_origin > T_est: pad else slice``) is
fixed by that length, while the sizes it computes stay shape arithmetic. A length that is a
multiple of every stride (the usual example, 8000) takes the "nothing to pad" side, which holds
at that length only; a prime length takes the "pad" side, whose traced amount is zero where
there is nothing to pad, so it holds at every length when the code computes the amount from the
length. The dynamic export is therefore traced at the example's length and then at the next
prime length, each checked at many lengths. Where the model's code fixes the length whatever the
traced length (a pad that changes what a global statistic sees, a length turned into a Python
int), the export is redone at the example's fixed length and the result says so: such a file
runs on any length through ``sepfx separate``, which overlap-adds chunks of the fixed length.

Nothing but a sepfx error leaves ``export_onnx``: an ``ExportError`` names each exporter tried
and the reason it failed; a lowering that fails is skipped and named.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import math
import os
import shutil
import sys
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import fx
from torch.fx.passes.shape_prop import ShapeProp
from torch.utils._pytree import tree_flatten

from passes import rules
from passes.capture import recorded_run
from passes.generalize import generic_recorded_run
from passes.trace import is_impure_node
from passes.values import seeded_noise

from passes.errors import ExportError, InputError, SepfxError, describe_error


class LoweringError(Exception):
    """An op rule's ``lower`` hook failed (its message names the rule and the node)."""


EXPORTERS = ("torchscript", "dynamo")  # tried in this order unless another is asked first


@dataclass
class ExportResult:
    path: str
    exporter: str
    dynamic_time: bool
    errors: dict[str, float] = field(default_factory=dict)  # input shape -> max relative error
    notes: list[str] = field(default_factory=list)
    dynamic_batch: bool = True
    traced_length: int | None = None  # the input length the exporter traced at
    recorded: bool = False  # exported from its run recorded at the example (fixed shape)


def _relative_error(expected: np.ndarray, got: np.ndarray) -> float:
    if expected.shape != got.shape:
        return float("inf")
    if not np.all(np.isfinite(got)):
        return float("inf")
    scale = max(float(np.abs(expected).max()), 1e-12)
    return float(np.abs(expected - got).max() / scale)


def _export(
    model: torch.nn.Module,
    example: torch.Tensor,
    path: str,
    exporter: str,
    dynamic_batch: bool,
    dynamic_time: bool,
    opset: int,
) -> None:
    in_rank = example.dim()
    with torch.no_grad():
        outputs = tree_flatten(model(example))[0]
    names = output_names(len(outputs))
    in_axes = {0: "batch"} if dynamic_batch else {}
    if dynamic_time:
        in_axes[in_rank - 1] = "time"
    out_axes = {}
    for name, out in zip(names, outputs):
        axes = {0: "batch"} if dynamic_batch else {}
        if dynamic_time:
            axes[out.dim() - 1] = "time"
        if axes:
            out_axes[name] = axes
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if exporter == "torchscript":
            with _quiet_output():
                torch.onnx.export(
                    model,
                    (example,),
                    path,
                    dynamo=False,
                    opset_version=opset,
                    input_names=["mixture"],
                    output_names=names,
                    dynamic_axes={"mixture": in_axes, **out_axes} if in_axes else None,
                )
        else:
            dims = {d: torch.export.Dim.AUTO for d in in_axes}
            quiet = logging.getLogger("torch.onnx")
            level = quiet.level
            quiet.setLevel(logging.ERROR)
            try:
                with _quiet_output(), contextlib.redirect_stdout(io.StringIO()):
                    torch.onnx.export(
                        model,
                        (example,),
                        path,
                        dynamo=True,
                        external_data=False,
                        optimize=False,
                        verbose=False,
                        input_names=["mixture"],
                        output_names=names,
                        dynamic_shapes=({**dims},) if dims else None,
                    )
            finally:
                quiet.setLevel(level)


@contextlib.contextmanager
def _quiet_output() -> Iterator[None]:
    """Silence file descriptors 1 and 2 while an exporter runs: on failure the TorchScript
    exporter's C++ logger prints the whole graph (torch 2.13 enables it whatever ``verbose``
    says) and torch.export logs its graphs, and a failure here only means the next exporter
    is tried (``ExportError`` says why each one failed)."""
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    saved = [os.dup(1), os.dup(2)]
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 1)
            os.dup2(null.fileno(), 2)
            yield
    finally:
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        for fd, copy_of in zip((1, 2), saved):
            os.dup2(copy_of, fd)
            os.close(copy_of)


def _check(
    path: str, model: torch.nn.Module, inputs: list[torch.Tensor], rtol: float
) -> dict[str, float]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 4  # a shape ORT refuses is recorded below, not printed
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    errors = {}
    for x in inputs:
        with torch.no_grad():
            expected = [t.detach().cpu().numpy() for t in tree_flatten(model(x))[0]]
        try:
            got = session.run(None, {session.get_inputs()[0].name: x.cpu().numpy()})
            error = (
                max(_relative_error(e, g) for e, g in zip(expected, got))
                if len(got) == len(expected)
                else float("inf")
            )
        except Exception:  # ONNX Runtime refuses this shape
            error = float("inf")
        key = str(list(x.shape))
        errors[key if key not in errors else f"{key}, other values"] = error
    return errors


def output_names(count: int) -> list[str]:
    """ONNX output names: ``sources``, or ``sources_0``... for a model returning several
    tensors (a list per speaker, a tuple, a dict: in ``torch.utils._pytree`` order)."""
    return ["sources"] if count == 1 else [f"sources_{i}" for i in range(count)]


def export_onnx(
    model: torch.nn.Module,
    path: str | os.PathLike[str],
    example_input: torch.Tensor | None = None,
    *,
    opset: int = 17,
    rtol: float = 1e-4,
    exporter: str | None = None,
) -> ExportResult:
    """Export ``model`` to the single file ``path`` and check ONNX Runtime against PyTorch.

    ``example_input`` defaults to the input the model was compiled with
    (``model.sepfx_example_input``). ``exporter`` ("torchscript" or "dynamo") is tried first;
    by default the one a latency compile timed the model with (``model.sepfx_exporter``: the
    two exporters' files can differ in speed), else "torchscript". Raises ``ExportError`` when
    no export matches PyTorch."""
    if exporter is None:
        exporter = getattr(model, "sepfx_exporter", None) or "torchscript"
    if exporter not in EXPORTERS:
        raise InputError(f"exporter must be one of {', '.join(EXPORTERS)}, got {exporter!r}")
    order = (exporter, *[e for e in EXPORTERS if e != exporter])
    if example_input is None:
        example_input = getattr(model, "sepfx_example_input", None)
    if example_input is None:
        raise InputError(
            "export_onnx needs an example_input: this model was not made by sepfx, "
            "so pass one, e.g. torch.randn(1, 8000)"
        )
    if not isinstance(example_input, torch.Tensor):
        raise InputError(
            f"example_input must be a torch.Tensor (e.g. torch.randn(1, 8000)), "
            f"got {type(example_input).__name__}"
        )
    path = os.fspath(path)
    if os.path.isdir(path):
        raise InputError(f"{path} is a folder: give the ONNX file's name, e.g. {path}/slim.onnx")
    try:
        return _export_checked(model, path, example_input, opset, rtol, order)
    except SepfxError:
        raise
    except Exception as error:  # anything else is named, never raised raw
        raise ExportError(
            f"ONNX export of {type(model).__name__} failed outside the exporters: "
            f"{describe_error(error)}; please report it with the model"
        ) from error


def _export_checked(
    model: torch.nn.Module,
    path: str,
    example_input: torch.Tensor,
    opset: int,
    rtol: float,
    exporters: tuple[str, ...] = ("torchscript", "dynamo"),
) -> ExportResult:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    model = copy.deepcopy(model).eval().cpu()  # the caller's keeps its mode and device
    example = _float32_example(model, example_input.detach().cpu())
    try:
        with torch.no_grad():
            model(example)
    except Exception as error:
        raise ExportError(
            f"the model fails on example_input of shape {list(example.shape)}, so there is "
            f"nothing to export: {describe_error(error)}; pass an input the model takes"
        ) from error
    lowering_failures: list[str] = []  # each lowering that failed, once
    eager = not isinstance(model, fx.GraphModule)  # eager shells (passes.capture) run Python
    failures = []
    length_fixed: set[str] = set()  # exporters whose dynamic-time file was wrong at a length
    # dynamic batch and time first; then fix what the model's code (or an exporter) fixes;
    # last, a model with eager code as its run recorded at the example (``_lower``)
    tries = [(True, True, False), (False, True, False), (True, False, False), (False, False, False)]
    if eager:  # its run recorded: at several shapes, sizes generalized (dynamic), else fixed
        tries += [(True, True, True), (False, True, True), (False, False, True)]
    for dynamic_batch, dynamic_time, recorded in tries:
        # a batch of 1 would be specialised by the exporters: export with 2 when it may vary
        batch = 2 if dynamic_batch and example.shape[0] == 1 else example.shape[0]
        lengths = trace_lengths(example.shape[-1]) if dynamic_time else [example.shape[-1]]
        inputs = [example] + _variants(example, dynamic_batch, dynamic_time, eager)
        for exporter in exporters:
            if dynamic_time and not dynamic_batch and not recorded and exporter in length_fixed:
                # wrong at another length with the example's batch size already: fixing the
                # batch does not change how the model's code fixes the length
                label = f"{exporter} (dynamic batch=False, time=True)"
                failures.append(
                    f"{label}: not tried (its dynamic-time export was wrong at another length)"
                )
                continue
            wrong_lengths = 0  # traced lengths whose file was wrong at another length
            for length in lengths:
                label = f"{exporter} (dynamic batch={dynamic_batch}, time={dynamic_time}"
                label += f", traced at length {length})" if dynamic_time else ")"
                if recorded:
                    label = f"{exporter} (its run recorded" + (
                        f", dynamic batch={dynamic_batch}, time={dynamic_time}, at length "
                        f"{length} and others)"
                        if dynamic_time
                        else " at the example's batch and length)"
                    )
                traced_with = _trace_input(example, batch, length)
                with tempfile.TemporaryDirectory() as tmp:
                    candidate = os.path.join(tmp, "model.onnx")
                    try:
                        lowered, failed = _lower(
                            copy.deepcopy(model), traced_with, recorded, dynamic_batch, dynamic_time
                        )
                        lowering_failures += [f for f in failed if f not in lowering_failures]
                        _export(
                            lowered,
                            traced_with,
                            candidate,
                            exporter,
                            dynamic_batch,
                            dynamic_time,
                            opset,
                        )
                        errors = _check(candidate, model, inputs, rtol)
                    except Exception as error:
                        failures.append(f"{label}: {describe_error(error)}")
                        continue
                    if all(e <= rtol for e in errors.values()):
                        shutil.move(candidate, path)  # may cross filesystems
                        notes = [
                            f"exported without the export lowering of {failure}"
                            for failure in failed
                        ] + _notes(example, length, dynamic_batch, dynamic_time, recorded)
                        return ExportResult(
                            path,
                            exporter,
                            dynamic_time,
                            errors,
                            notes,
                            dynamic_batch,
                            length,
                            recorded,
                        )
                    if dynamic_time and any(
                        e > rtol
                        and shape.startswith(f"[{example.shape[0]}, ")
                        and shape != str(list(example.shape))
                        for shape, e in errors.items()
                    ):
                        wrong_lengths += 1
                    failures.append(
                        f"{label}: ONNX Runtime differs from PyTorch: max relative error {errors}"
                    )
            if wrong_lengths == len(lengths) and not recorded:
                length_fixed.add(exporter)
    first: dict[str, str] = {}  # each exporter's first reason, for the message's first line
    for failure in failures:
        first.setdefault(failure.split(" ", 1)[0], failure.split(": ", 1)[-1])
    summary = "; ".join(
        f"{exporter}: {text if len(text) <= 200 else text[:199] + '…'}"
        for exporter, text in first.items()
    )
    lowering = [
        f"the export lowering of {failure} (exported without it)" for failure in lowering_failures
    ]
    raise ExportError(
        f"ONNX export of {type(model).__name__} failed: no exporter made a file that ONNX "
        f"Runtime runs as PyTorch does ({summary}). An op named here that ONNX cannot express, "
        "or a size the model computes from tensor values, is what to change or report. "
        "Every try:\n  " + "\n  ".join(lowering + failures)
    )


def _notes(
    example: torch.Tensor,
    traced_length: int,
    dynamic_batch: bool,
    dynamic_time: bool,
    recorded: bool = False,
) -> list[str]:
    if recorded and dynamic_time:
        return [
            "exported as its run recorded at several lengths"
            + (" and batch sizes" if dynamic_batch else "")
            + " (its eager code computes what no exporter traces, e.g. complex values), the "
            "sizes that vary with the input written as shape arithmetic (passes.generalize)"
        ] + (
            []
            if dynamic_batch
            else [
                f"exported at the fixed batch size {example.shape[0]}: its recorded runs at "
                "other batch sizes differ in more than sizes"
            ]
        )
    if recorded:
        return [
            f"exported as its run recorded at the example's batch size {example.shape[0]} and "
            f"length {example.shape[-1]} (its eager code computes what no exporter traced, e.g. "
            "complex values): the file takes that shape only; `sepfx separate` runs it on any "
            "length by overlap-adding chunks of that length"
        ]
    notes = []
    if dynamic_time and traced_length != example.shape[-1]:
        notes.append(
            f"traced at the prime length {traced_length}: at the example's length "
            f"{example.shape[-1]} the model's code takes a branch on the length that holds "
            "at that length only (e.g. nothing to pad)"
        )
    if not dynamic_time:
        notes.append(
            f"exported at the fixed length {example.shape[-1]}: at other lengths ONNX "
            "Runtime disagreed with PyTorch (the model's code fixes the length); `sepfx "
            "separate` runs the file on any length by overlap-adding chunks of that length"
        )
    if not dynamic_batch:
        notes.append(
            f"exported at the fixed batch size {example.shape[0]}: at other batch sizes ONNX "
            "Runtime disagreed with PyTorch (the model mixes the batch axis, e.g. attention "
            "over it)"
        )
    return notes


def export_like(
    model: torch.nn.Module,
    path: str | os.PathLike[str],
    example_input: torch.Tensor,
    like: ExportResult,
    *,
    opset: int = 17,
) -> None:
    """Export ``model`` the way ``like`` exported a model of the same structure (its exporter,
    dynamic axes and traced length) without checking it against PyTorch: for timing variants
    (other kept widths) of a model whose own export was checked. Raises ``ExportError`` when it
    fails."""
    model = copy.deepcopy(model).eval().cpu()
    example = _float32_example(model, example_input.detach().cpu())
    batch = 2 if like.dynamic_batch and example.shape[0] == 1 else example.shape[0]
    traced_with = _trace_input(example, batch, like.traced_length or example.shape[-1])
    try:
        _export(
            _lower(model, traced_with, like.recorded, like.dynamic_batch, like.dynamic_time)[0],
            traced_with,
            os.fspath(path),
            like.exporter,
            like.dynamic_batch,
            like.dynamic_time,
            opset,
        )
    except Exception as error:
        raise ExportError(
            f"exporting a variant with the {like.exporter} exporter failed: {describe_error(error)}"
        ) from error


def _float32_example(model: torch.nn.Module, example: torch.Tensor) -> torch.Tensor:
    """The example in float32, or ExportError when the model is not float32: ONNX Runtime has
    no float64 kernels for Conv and most other ops, and export would fail at every try."""
    dtypes = {t.dtype for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()}
    if not dtypes and example.is_floating_point():
        dtypes = {example.dtype}
    other = sorted(str(d).replace("torch.", "") for d in dtypes - {torch.float32})
    if other:
        raise ExportError(
            f"ONNX export needs a float32 model, and this one is {', '.join(other)} (ONNX "
            f"Runtime has no {other[0]} kernels for Conv and most other ops): convert it with "
            f"model.float() (in place; keep a copy.deepcopy of it first if you need the "
            f"{other[0]} one) and export again"
        )
    return example.float() if example.is_floating_point() else example


def trace_lengths(length: int) -> list[int]:
    """The lengths a dynamic-time export is traced at, in turn: the example's, then the first
    prime above it (a multiple of no stride, chunk or pad unit, so every pad-to-a-multiple
    branch of the model's code takes its "pad" side; see the module's docstring)."""
    prime = length + 1
    while prime < 2 or any(prime % d == 0 for d in range(2, math.isqrt(prime) + 1)):
        prime += 1
    return [length, prime]


def _trace_input(example: torch.Tensor, batch: int, length: int) -> torch.Tensor:
    """The example itself, or a random input of its dtype with another batch size or length."""
    shape = list(example.shape)
    if [batch, length] == [shape[0], shape[-1]]:
        return example
    shape[0], shape[-1] = batch, length
    return seeded_noise(shape, 9, example)


# For a model with eager code: lengths added to the example's, so that a branch on the length
# taken by the Python glue (pad when frames % k) meets both sides for every small stride and k.
EAGER_EXTRA_LENGTHS = tuple(range(1, 17)) + tuple(16 * k for k in range(2, 17))


def _variants(
    example: torch.Tensor, other_batch: bool, other_length: bool, eager: bool = False
) -> list[torch.Tensor]:
    """Check inputs differing from the example in the axes the export keeps dynamic: another
    batch size, and lengths that are multiples of no stride or chunk (a pad computed from the
    length and baked into the export shows there). A model with eager code (``eager``), whose
    Python the exporters run once, is checked at many more lengths: a branch its glue takes on
    the length would be baked into the file, and two lengths can agree on it by chance. With
    neither axis dynamic, another input of the example's shape: a branch on the values baked
    in shows there."""
    if not other_batch and not other_length:
        return [seeded_noise(list(example.shape), 7, example)]
    shapes = []
    pairs = [
        (1, example.shape[-1] * 3 // 2 + 37),
        (1 - example.shape[0] % 2, example.shape[-1] * 2 + 1),
    ]
    if eager and other_length:
        pairs += [(0, example.shape[-1] + extra) for extra in EAGER_EXTRA_LENGTHS]
    for extra_batch, length in pairs:
        shape = list(example.shape)
        if other_batch:
            shape[0] += extra_batch
        if other_length:
            shape[-1] = length
        if shape != list(example.shape) and shape not in shapes:
            shapes.append(shape)
    return [seeded_noise(shape, 7 + i, example) for i, shape in enumerate(shapes)]


def _lower(
    model: torch.nn.Module,
    example: torch.Tensor,
    recorded: bool = False,
    dynamic_batch: bool = False,
    dynamic_time: bool = False,
) -> tuple[torch.nn.Module, list[str]]:
    """A copy of a GraphModule rewritten for the exporters by the op rules' ``lower`` hooks (ops
    the exporters cannot keep dynamic, or that ONNX Runtime runs slowly, replaced by equivalent
    ones), after shape propagation at ``example`` (the hooks read shapes). A model with eager
    code (``passes.capture``) gets its graph parts lowered so, each at the inputs it receives
    at ``example``; a model without graphs is returned as is. A graph whose lowering fails is
    kept as it is, and the failure returned (``where: why``).

    ``recorded``: the model's whole run at ``example``, eager code included, recorded as one
    graph (``passes.capture.recorded_run``) and lowered, for eager code that no exporter
    traces (complex values crossing it: the lowering carries them as real pairs). Every size
    and branch of that run is fixed: the graph holds at ``example``'s shape only, unless
    ``dynamic_time`` (and ``dynamic_batch``): then the run is recorded at other lengths (and
    batch sizes) too and its sizes generalized (``passes.generalize``; ``ShapeError`` where
    they cannot be)."""
    failures: list[str] = []
    if recorded:
        if dynamic_time:
            graph = generic_recorded_run(
                model,
                _recording_inputs(example, dynamic_batch),
                _variants(example, dynamic_batch, True, eager=True),
            )
        else:
            graph = recorded_run(model, example)
        try:
            return _lowered_graph(graph, (example,)), failures
        except LoweringError as error:  # what failed, and why
            raise LoweringError(f"{error}: {describe_error(error.__cause__ or error)}") from error
    if isinstance(model, fx.GraphModule):
        return _lowered_or_as_is(model, (example,), "the model", failures), failures
    parts = {name: m for name, m in model.named_modules() if isinstance(m, fx.GraphModule)}
    inputs: dict[str, tuple[Any, ...]] = {}
    handles = [
        m.register_forward_pre_hook(lambda module, args, name=name: inputs.setdefault(name, args))
        for name, m in parts.items()
    ]
    try:
        with torch.no_grad():
            model(example)
    finally:
        for handle in handles:
            handle.remove()
    for name, part in parts.items():  # ``model`` is export_onnx's own copy
        if name in inputs:
            model.set_submodule(name, _lowered_or_as_is(part, inputs[name], name, failures))
    return model, failures


def _recording_inputs(example: torch.Tensor, other_batch: bool) -> list[torch.Tensor]:
    """The inputs a recorded run is generalized over: ``example``, two longer prime lengths
    (every pad-to-a-multiple branch takes the side it takes at a prime ``example`` length),
    and, for a dynamic batch, another batch size."""
    batch, length = example.shape[0], example.shape[-1]
    shapes = [(batch, trace_lengths(length * 3 // 2)[1]), (batch, trace_lengths(length * 2)[1])]
    if other_batch:
        shapes.append((batch + 1, length))
    return [example] + [_trace_input(example, b, t) for b, t in shapes]


def _lowered_or_as_is(
    model: fx.GraphModule, args: tuple[Any, ...], name: str, failures: list[str]
) -> fx.GraphModule:
    """The lowered graph, or ``model`` as it is when a lowering fails (the exporters may still
    take it), the failure added to ``failures``."""
    try:
        return _lowered_graph(model, args)
    except LoweringError as error:
        failures.append(f"{name}, {error}: {describe_error(error.__cause__ or error)}")
        return model
    except Exception as error:
        failures.append(f"{name}: {describe_error(error)}")
        return model


def _lowered_graph(model: fx.GraphModule, args: tuple[Any, ...]) -> fx.GraphModule:
    lowered = fx.GraphModule(model, copy.deepcopy(model.graph))
    with torch.no_grad():
        ShapeProp(lowered).propagate(*args)
    modules = dict(lowered.named_modules(remove_duplicate=False))
    changed = False
    for node in list(lowered.graph.nodes):
        rule: Any = rules.lookup(node, modules) if node.op != "output" else None
        # a node reading or making a complex tensor: ONNX has none, so its rule carries it as
        # a (real, imaginary) pair; inputs come before their users, so they are pairs already
        complex_values = rules.complex_values(node) or any(
            rules.complex_values(x) for x in node.all_input_nodes
        )
        hook = "lower_complex" if complex_values else "lower"
        try:
            if complex_values and node.op in ("placeholder", "output"):
                raise ValueError(
                    f"the graph {'takes' if node.op == 'placeholder' else 'returns'} a complex "
                    "tensor, which ONNX has no type for"
                )
            if complex_values and not hasattr(rule, hook):
                raise ValueError(
                    f"{rules.describe_op(node, modules)} computes on complex values and has no "
                    "lowering to (real, imaginary) pairs"
                )
            changed = bool(hasattr(rule, hook) and getattr(rule, hook)(node, lowered)) or changed
        except Exception as error:
            raise LoweringError(f"{type(rule).__name__} at node {node.name}") from error
    if not changed:
        return model
    lowered.graph.eliminate_dead_code(is_impure_node)  # in-place ops are kept
    lowered.recompile()
    return lowered
