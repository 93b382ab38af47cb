"""Node value summaries: what a GraphModule's nodes held on the reference and probe inputs.

The bottom layer of ``passes``: shape propagation (``passes.channels.propagate_shapes``) writes a
summary of every node's value into ``node.meta``; the op rules and the passes read it through
the helpers here. Nothing in this module imports another module of ``passes``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Literal, NamedTuple, Union

import torch
from torch import fx

# node.meta keys shared by the passes
REF = "sepfx_ref"  # summary of the node's value at the reference (example) input
PROBE = "sepfx_probe"  # ... at the probe input (another batch size and length)
GLUE = "sepfx_glue"  # the node was recorded from eager code (passes.capture)
LEAF_INPUTS = "sepfx_leaf_inputs"  # an opaque leaf's inputs at the reference, to certify it

CONSTANT = "_sepfx_constant_"  # attribute names of tensors that eager code made from values

Shape = tuple[int, ...]
# where a tensor sits in a node's (nested tuple) value: item indices; a rule may tag a path of
# its own (``NodeContext.keep_elements``: ("kept", label))
ValuePath = tuple[Any, ...]
# a value's summary: ("tensor", shape), ("tuple", (summaries...)), ("value", v), ("other", name)
Summary = tuple[str, Any]


class ValueAxisKey(NamedTuple):
    """Axis ``dim`` of the tensor at ``path`` in the value of graph node ``node``."""

    kind: Literal["value"]
    node: str
    path: ValuePath
    dim: int


class ModuleAxisKey(NamedTuple):
    """A parameter axis of module ``qualname``, named by its rule (``in``, ``out``, ``heads``...)."""

    kind: Literal["module"]
    qualname: str
    name: str


class AttrAxisKey(NamedTuple):
    """Axis ``dim`` of the parameter or buffer ``target`` read by the graph (``get_attr``)."""

    kind: Literal["attr"]
    target: str
    dim: int


AxisKey = Union[ValueAxisKey, ModuleAxisKey, AttrAxisKey]

# the sizes a node's value carries (``NodeContext.read_size``): an int read from one axis, or a
# shape {dim: axis}; None when it carries none
SizeRead = Union[AxisKey, dict[int, AxisKey], None]


def value_axis_key(node: str, path: ValuePath, dim: int) -> ValueAxisKey:
    return ValueAxisKey("value", node, path, dim)


def module_axis_key(qualname: str, name: str) -> ModuleAxisKey:
    return ModuleAxisKey("module", qualname, name)


def attr_axis_key(target: str, dim: int) -> AttrAxisKey:
    return AttrAxisKey("attr", target, dim)


def holds_parameters(key: AxisKey) -> bool:
    """Whether pruning the axis slices a parameter or buffer (module and attribute axes)."""
    return key.kind in ("module", "attr")


def seeded_noise(shape: list[int], seed: int, like: torch.Tensor) -> torch.Tensor:
    """Standard normal noise of ``shape`` from ``seed``, in ``like``'s dtype and on its device.

    Drawn on the CPU and then moved: every device sees the same numbers, so a model on a GPU is
    checked at the inputs it would be on the CPU (and gets the same keep set)."""
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(shape, generator=generator, dtype=like.dtype, device="cpu")
    return noise.to(like.device)


def probe_input(example: torch.Tensor) -> torch.Tensor:
    """A second input of another batch size and another length (not a multiple of common
    strides), used to tell fixed values from those that vary with batch and time."""
    shape = list(example.shape)
    shape[0] = shape[0] + 1
    shape[-1] = shape[-1] + shape[-1] // 4 + 37
    return seeded_noise(shape, 1234, example)


def _summary(value: Any) -> Summary:
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape))
    if isinstance(value, (tuple, list)) and not isinstance(value, torch.Size):
        return ("tuple", tuple(_summary(v) for v in value))
    if isinstance(value, (int, float, bool, torch.Size, str, type(None))):
        return ("value", value)
    return ("other", type(value).__name__)


def _flatten(summary: Summary, path: ValuePath = ()) -> Iterator[tuple[ValuePath, Summary]]:
    """Yield (path, summary leaf) for every leaf of a summary tree."""
    if summary[0] == "tuple":
        for i, item in enumerate(summary[1]):
            yield from _flatten(item, path + (i,))
    else:
        yield path, summary


def _value_leaf(node: fx.Node, path: ValuePath, which: str = REF) -> Summary | None:
    summary: Summary | None = node.meta.get(which)
    if summary is None:
        return None
    for p, leaf in _flatten(summary):
        if p == path:
            return leaf
    return None


def tensor_shapes(node: fx.Node, path: ValuePath = ()) -> tuple[Shape, Shape] | None:
    """(reference shape, probe shape) of a tensor value, or None."""
    ref, probe = _value_leaf(node, path), _value_leaf(node, path, PROBE)
    if ref is None or probe is None or ref[0] != "tensor" or probe[0] != "tensor":
        return None
    return ref[1], probe[1]


def scalar_values(node: fx.Node, path: ValuePath = ()) -> tuple[Any, Any] | None:
    ref, probe = _value_leaf(node, path), _value_leaf(node, path, PROBE)
    if ref is None or probe is None or ref[0] != "value":
        return None
    return ref[1], probe[1]


def is_tensor(node: Any, path: ValuePath = ()) -> bool:
    return isinstance(node, fx.Node) and tensor_shapes(node, path) is not None
