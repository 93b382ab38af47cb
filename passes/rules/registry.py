"""The op-rule registry and the helpers every rule uses. It knows no rule: each family module
(``passes.rules.pointwise``, ``.conv``...) registers its own entries, including the fallback for
modules that have none (``passes.rules.opaque``)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol, TypeGuard, TypeVar, cast

import numpy as np
import torch
from numpy.typing import ArrayLike, NDArray
from torch import fx, nn

from passes.axes import ChannelAnalysis
from passes.values import Shape, ValuePath

RuleT = TypeVar("RuleT")


class GatedBuilderView(Protocol):
    """What a rule's ``gated(builder, node)`` sees of the gated graph under construction
    (``passes.gates.GatedGraphBuilder``)."""

    env: dict[fx.Node, fx.Node]

    def arg(self, x: Any) -> Any: ...

    def shape(self, x: Any, path: ValuePath = ()) -> Shape | None: ...

    def module(self, target: str) -> nn.Module: ...

    def copy(self, node: fx.Node) -> fx.Node: ...

    def call_function(
        self, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any] | None = None
    ) -> fx.Node: ...

    def call_module(
        self, target: str, args: tuple[Any, ...], kwargs: dict[str, Any] | None = None
    ) -> fx.Node: ...

    def get_attr(self, target: str) -> fx.Node: ...

    def add_module(self, module: nn.Module, for_target: str) -> str: ...

    def value_mask(self, x: fx.Node, dim: int, path: ValuePath = ()) -> fx.Node | None: ...

    def module_mask(self, qualname: str, name: str) -> fx.Node | None: ...


class PruningView(Protocol):
    """What a rule's ``slim_module``/``rewrite`` sees: kept indices of every axis
    (``passes.slim.Pruning``)."""

    analysis: ChannelAnalysis

    def kept_module(self, qualname: str, name: str) -> NDArray[np.intp] | None: ...

    def kept_value(self, x: fx.Node, dim: int, path: ValuePath = ()) -> NDArray[np.intp] | None: ...

    def shape(self, x: fx.Node, path: ValuePath = ()) -> Shape | None: ...

    def tensor_paths(self, x: fx.Node) -> list[ValuePath]: ...


class Registry:
    """Rules by op kind: module classes (matched exactly: a subclass may compute something
    else), functions, tensor method names, graph node ops (``get_attr``), and the rule for a
    module whose class has none."""

    def __init__(self) -> None:
        self.modules: dict[type, Any] = {}
        self.functions: dict[Any, Any] = {}
        self.methods: dict[str, Any] = {}
        self.node_ops: dict[str, Any] = {}
        self.unknown_module: Any = None

    def add(
        self,
        rule: RuleT,
        modules: Iterable[type] = (),
        functions: Iterable[Any] = (),
        methods: Iterable[str] = (),
        node_ops: Iterable[str] = (),
        unknown_module: bool = False,
    ) -> RuleT:
        for m in modules:
            self.modules[m] = rule
        for f in functions:
            self.functions[f] = rule
        for name in methods:
            self.methods[name] = rule
        for op in node_ops:
            self.node_ops[op] = rule
        if unknown_module:
            self.unknown_module = rule
        return rule

    def for_module(self, module: nn.Module) -> Any:
        """The rule of a module, by its exact class; the unknown-module rule if it has none."""
        return self.modules.get(type(module), self.unknown_module)


RULES = Registry()


def lookup(node: fx.Node, modules: Mapping[str, nn.Module]) -> Any:
    """The rule of ``node``, or None when its op kind has none (every axis it touches is then
    frozen)."""
    if node.op == "call_module":
        return RULES.for_module(modules[cast(str, node.target)])
    if node.op == "call_function":
        return RULES.functions.get(node.target)
    if node.op == "call_method":
        return RULES.methods.get(cast(str, node.target))  # a method name
    return RULES.node_ops.get(node.op)


def describe_op(node: fx.Node, modules: Mapping[str, nn.Module]) -> str:
    if node.op == "call_module":
        return f"module {type(modules[cast(str, node.target)]).__name__} ({node.target})"
    if node.op == "call_function":
        function = cast(Callable[..., Any], node.target)
        return f"function {getattr(function, '__module__', '')}.{function.__name__}"
    return f"{node.op} {node.target}"


def arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    """Argument ``index`` (or keyword ``name``) of ``node``: whatever fx holds there."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def set_arg(node: fx.Node, index: int, name: str, value: Any) -> None:
    if len(node.args) > index:
        args = list(node.args)
        args[index] = value
        node.args = tuple(args)
    else:
        node.kwargs = {**node.kwargs, name: value}


def pruned(kept: NDArray[Any] | None, size: int) -> TypeGuard[NDArray[Any]]:
    """Whether an axis of ``size`` elements loses some: ``kept`` (its kept indices, None when
    it has none to lose) is then an array."""
    return kept is not None and len(kept) != size


def complex_values(x: Any) -> bool:
    """Whether node ``x``'s value is, or holds, a complex tensor (by its shape propagation)."""
    if not isinstance(x, fx.Node):
        return False
    metas: list[Any] = [x.meta.get("tensor_meta")]
    while metas:
        meta = metas.pop()
        if isinstance(getattr(meta, "dtype", None), torch.dtype):  # a TensorMetadata
            if meta.dtype.is_complex:
                return True
        elif isinstance(meta, (tuple, list)):
            metas.extend(meta)
        elif isinstance(meta, dict):
            metas.extend(meta.values())
    return False


def complex_rank(x: Any) -> int | None:
    """The rank of node ``x``'s value when it is a complex tensor (by its shape propagation),
    else None. For export such a value is carried as a real tensor of one more axis, the
    (real, imaginary) pair (``passes.rules.spectral``): its dims count from the front alike."""
    meta: Any = x.meta.get("tensor_meta") if isinstance(x, fx.Node) else None
    dtype = getattr(meta, "dtype", None)
    return len(meta.shape) if dtype is not None and dtype.is_complex else None


def sliced_parameter(t: torch.Tensor, *index_by_dim: ArrayLike | None) -> nn.Parameter:
    """``t`` sliced: ``index_by_dim[d]`` (an index array or None) along dim d."""
    out = t.detach()
    for d, idx in enumerate(index_by_dim):
        if idx is not None:
            out = out.index_select(d, torch.as_tensor(idx, dtype=torch.long, device=t.device))
    return nn.Parameter(out.clone(), requires_grad=t.requires_grad)
