"""The op-rule registry and the helpers every rule uses. It knows no rule: each family module
(``passes.rules.pointwise``, ``.conv``...) registers its own entries, including the fallback for
modules that have none (``passes.rules.opaque``)."""
from __future__ import annotations

from typing import Any

import torch
from torch import fx, nn


class Registry:
    """Rules by op kind: module classes (matched exactly: a subclass may compute something
    else), functions, tensor method names, graph node ops (``get_attr``), and the rule for a
    module whose class has none."""

    def __init__(self):
        self.modules: dict[type, Any] = {}
        self.functions: dict[Any, Any] = {}
        self.methods: dict[str, Any] = {}
        self.node_ops: dict[str, Any] = {}
        self.unknown_module: Any = None

    def add(self, rule, modules=(), functions=(), methods=(), node_ops=(),
            unknown_module: bool = False):
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

    def for_module(self, module: nn.Module):
        """The rule of a module, by its exact class; the unknown-module rule if it has none."""
        return self.modules.get(type(module), self.unknown_module)


RULES = Registry()


def lookup(node: fx.Node, modules: dict[str, nn.Module]):
    """The rule of ``node``, or None when its op kind has none (every axis it touches is then
    frozen)."""
    if node.op == "call_module":
        return RULES.for_module(modules[node.target])
    if node.op == "call_function":
        return RULES.functions.get(node.target)
    if node.op == "call_method":
        return RULES.methods.get(node.target)
    return RULES.node_ops.get(node.op)


def describe_op(node: fx.Node, modules) -> str:
    if node.op == "call_module":
        return f"module {type(modules[node.target]).__name__} ({node.target})"
    if node.op == "call_function":
        return f"function {getattr(node.target, '__module__', '')}.{node.target.__name__}"
    return f"{node.op} {node.target}"


def arg(node: fx.Node, index: int, name: str, default=None):
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def set_arg(node: fx.Node, index: int, name: str, value) -> None:
    if len(node.args) > index:
        args = list(node.args)
        args[index] = value
        node.args = tuple(args)
    else:
        node.kwargs = {**node.kwargs, name: value}


def pruned(kept, size) -> bool:
    return kept is not None and len(kept) != size


def sliced_parameter(t: torch.Tensor, *index_by_dim) -> nn.Parameter:
    """``t`` sliced: ``index_by_dim[d]`` (an index array or None) along dim d."""
    out = t.detach()
    for d, idx in enumerate(index_by_dim):
        if idx is not None:
            out = out.index_select(d, torch.as_tensor(idx, dtype=torch.long, device=t.device))
    return nn.Parameter(out.clone(), requires_grad=t.requires_grad)
