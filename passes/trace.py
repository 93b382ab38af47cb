"""Trace an nn.Module into a torch.fx GraphModule, as code people actually write allows.

Built-in ``torch.nn`` layers stay leaves, custom modules are traced through. While tracing,
every node is also evaluated on two concrete inputs (the reference input and a probe of another
batch size and length), so that values which never vary for a given model (a tensor's rank, a
channel count) can answer Python control flow (``if x.ndim == 1``, ``len(x.shape)``,
``assert x.ndim == 3``): a value is only resolved when it is a plain Python value equal on both
inputs, and each resolution is recorded as an assumption. A custom module that still cannot be
traced becomes a leaf (it runs eagerly inside the GraphModule) and the result names it.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import math
import operator
import sys
import types
from collections.abc import Callable, Iterator
from unittest import mock
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import fx

from passes import rules, runtime
from passes.errors import InputError, TraceError
from passes.values import probe_input, seeded_noise

_VALUES = "_sepfx_values"  # node.meta key: the node's value on (reference, probe) inputs
_SHAPE_ONLY = "_sepfx_shape_only"  # node.meta key: the value derives from shapes, not data
# node.meta key: the value derives from a size that varies with the input (batch, length):
# a bool, or one per element for a shape
_VARYING = "_sepfx_varying"

# reading these from a tensor gives metadata, not data (a dtype test reads no values)
_SHAPE_ATTRIBUTES = {"shape", "ndim", "dtype", "device", "is_cuda"}
_SHAPE_METHODS = {
    "size",
    "dim",
    "numel",
    "ndimension",
    "is_complex",
    "is_floating_point",
    "is_signed",
    "type",
    "get_device",
}
_SHAPE_FUNCTIONS = {torch.is_complex, torch.is_floating_point, torch.numel}


def is_impure_node(node: fx.Node) -> bool:
    """Whether dead-code elimination must keep ``node`` although nothing reads its value: an
    in-place op (``result.index_add_(-2, frame, chunk)``, ``buf[..., :T] = x``, ``y.copy_(x)``)
    writes into a tensor that others read; and whatever torch itself calls impure."""
    return rules.mutates(node) or node.is_impure()


def _shape_only(node: fx.Node) -> bool:
    """True when the node's value is computed from tensor metadata alone (a rank, a size, sizes'
    arithmetic), so fixing it from example inputs cannot bake in data."""
    if node.op == "call_function" and node.target is getattr:
        return node.args[1] in _SHAPE_ATTRIBUTES
    if node.op == "call_method" and node.target in _SHAPE_METHODS:
        return node.target != "type" or len(node.args) == 1 and not node.kwargs  # x.type()
    if node.op == "call_function" and node.target in _SHAPE_FUNCTIONS:
        return True
    if node.op in ("placeholder", "get_attr", "call_module"):
        return False
    inputs: list[fx.Node] = []
    fx.node.map_arg((node.args, node.kwargs), inputs.append)
    return bool(inputs) and all(n.meta.get(_SHAPE_ONLY, False) for n in inputs)


def _reads_metadata(node: fx.Node) -> bool:
    """A rank, dtype or device read from a tensor (``x.dim()``, ``x.is_cuda``,
    ``torch.is_complex(x)``): metadata that no batch size or length changes."""
    if node.op == "call_function" and node.target is getattr:
        return node.args[1] in _SHAPE_ATTRIBUTES - {"shape"}
    if node.op == "call_method":
        fixed = _SHAPE_METHODS - {"size", "numel", "type"}
        return node.target in fixed or node.target == "type" and len(node.args) == 1
    return node.op == "call_function" and node.target in _SHAPE_FUNCTIONS - {torch.numel}


def _varying(node: fx.Node) -> bool | tuple[bool, ...]:
    """Whether ``node``'s value derives from a size that varies with the input: a direct size
    read varies where its two example values differ (the examples differ in batch and length);
    anything computed from a varying value varies, even when its two values happen to agree
    (``T % 4`` can be 1 at both); a shape varies per element, and indexing it picks those."""
    values = node.meta.get(_VALUES)
    reads_shape = (
        node.op == "call_function" and node.target is getattr and node.args[1] == "shape"
    ) or (
        node.op == "call_method"
        and node.target == "size"
        and len(node.args) == 1
        and "dim" not in node.kwargs
    )
    if reads_shape:
        if (
            values is None
            or not all(isinstance(v, tuple) for v in values)
            or len(values[0]) != len(values[1])
        ):
            return True
        return tuple(a != b for a, b in zip(*values))
    if node.op == "call_method" and node.target in ("size", "numel"):
        return values is None or values[0] != values[1]
    if _reads_metadata(node):  # the same at every batch size and length
        return False
    if (
        node.op == "call_function"
        and node.target is operator.getitem
        and isinstance(node.args[0], fx.Node)
    ):
        source: bool | tuple[bool, ...] = node.args[0].meta.get(_VARYING, False)
        if isinstance(source, tuple):
            index = node.args[1]
            if isinstance(index, int) and -len(source) <= index < len(source):
                return source[index]
            if isinstance(index, slice) and all(
                v is None or isinstance(v, int) for v in (index.start, index.stop, index.step)
            ):
                return source[index]
            return any(source)
    inputs: list[fx.Node] = []
    fx.node.map_arg((node.args, node.kwargs), inputs.append)
    return any(
        any(v) if isinstance(v, tuple) else bool(v)
        for v in (n.meta.get(_VARYING, False) for n in inputs)
    )


def _no_autograd_function(original: types.FunctionType) -> classmethod[Any, ..., Any]:
    """Function.apply that refuses proxies: tracing would inline ``forward`` and lose the custom
    ``backward``; the enclosing module becomes a leaf instead (run eagerly, backward intact)."""

    def apply(cls: type, *args: Any, **kwargs: Any) -> Any:
        found: list[fx.Proxy] = []
        torch.utils._pytree.tree_map(
            lambda a: found.append(a) if isinstance(a, fx.Proxy) else a, (args, kwargs)
        )
        if found:
            raise torch.fx.proxy.TraceError(
                f"custom autograd function {cls.__name__}: tracing would lose its backward"
            )
        return original.__get__(cls)(*args, **kwargs)

    return classmethod(apply)


@dataclass
class TraceResult:
    graph_module: fx.GraphModule
    leaves: dict[str, str] = field(default_factory=dict)  # fallback leaf -> why it is a leaf
    assumptions: list[str] = field(default_factory=list)  # values resolved from the inputs


def _user_line(node: fx.Node) -> str:
    """'file:line: source' of the innermost user frame that made ``node``."""
    lines = [ln.strip() for ln in (node.stack_trace or "").splitlines() if ln.strip()]
    frames = [
        (lines[i], lines[i + 1] if i + 1 < len(lines) else "")
        for i in range(len(lines))
        if lines[i].startswith("File ")
    ]
    user = [f for f in frames if "/torch/" not in f[0] and "/passes/trace.py" not in f[0]]
    if not user:
        return cast(str, node.format_node())  # None only for Graph.__str__'s placeholders
    where, source = user[-1]
    parts = where.split('"')
    file = parts[1].rsplit("/", 1)[-1] if len(parts) > 1 else where
    line = where.rsplit("line ", 1)[-1].split(",")[0]
    return f"{file}:{line}: {source}"


class _ConcreteProxy(fx.Proxy):
    """A Proxy that answers len() and int() when the concrete values say the answer is fixed."""

    tracer: _Tracer  # it is made by ``_Tracer.proxy``

    def __len__(self) -> int:
        values = self.node.meta.get(_VALUES)
        if values is not None and all(isinstance(v, torch.Tensor) for v in values):
            return self.tracer.static_length(self)  # a tensor's first size: metadata, not data
        # a sequence's length is its structure (a rank), fixed even if its items vary
        return cast(
            int, self.tracer.static_value(self, (tuple, list, torch.Size), len, structural=True)
        )

    def __int__(self) -> int:
        return cast(int, self.tracer.static_value(self, (int,)))

    def __index__(self) -> int:
        return cast(int, self.tracer.static_value(self, (int,)))

    def __getattr__(self, name: str) -> _ConcreteAttribute:
        return _ConcreteAttribute(self, name)

    def __setitem__(self, key: Any, value: Any) -> None:
        """``buf[..., :T] = x``: recorded (and kept: ``is_impure_node``)."""
        self.tracer.create_proxy("call_function", operator.setitem, (self, key, value), {})

    # ``[slice(None)] * x.ndim``: repeating a Python sequence needs the count itself
    # (fx.Proxy's operators are installed by setattr when torch.fx loads: the stubs lack them)
    def __mul__(self, other: Any) -> Any:
        if isinstance(other, (list, tuple, str)):
            return other * self.__index__()
        return fx.Proxy.__mul__(self, other)  # type: ignore[operator]

    def __rmul__(self, other: Any) -> Any:
        if isinstance(other, (list, tuple, str)):
            return other * self.__index__()
        return fx.Proxy.__rmul__(self, other)  # type: ignore[attr-defined]


class _ConcreteAttribute(fx.proxy.Attribute, _ConcreteProxy):
    pass


def _recording(
    tracer: "_Tracer", original: Callable[..., Any], recorded: Callable[..., Any]
) -> Callable[..., Any]:
    """``original`` that records a call of ``recorded`` (its proxy-aware twin in
    ``passes.runtime``) when called on a Proxy, as torch.fx.wrap does."""

    def call(*args: Any, **kwargs: Any) -> Any:
        found: list[fx.Proxy] = []
        torch.utils._pytree.tree_map(
            lambda a: found.append(a) if isinstance(a, fx.Proxy) else a, (args, kwargs)
        )
        if found:
            return tracer.create_proxy("call_function", recorded, args, kwargs)
        return original(*args, **kwargs)

    return call


# factories whose sizes may be given as separate arguments (``torch.zeros(B, N, gap)``), which
# torch's argument parser refuses when they are proxies (a list of them it accepts)
_FACTORIES = ("zeros", "ones", "empty", "full")


def _traced_variable(tracer: "_Tracer", variable: type) -> type:
    """``torch.autograd.Variable`` as a class again, recording ``runtime.as_variable`` when given
    a proxy (the legacy wrapper refuses anything but a tensor); ``isinstance`` still works."""

    class _Meta(type):
        def __instancecheck__(cls, other: Any) -> bool:
            return isinstance(other, variable)

        def __call__(cls, *args: Any, **kwargs: Any) -> Any:
            if args and isinstance(args[0], fx.Proxy):
                return tracer.create_proxy("call_function", runtime.as_variable, args, kwargs)
            return variable(*args, **kwargs)

    return _Meta("Variable", (), {"__doc__": variable.__doc__})


def _static_dtype(tracer: "_Tracer", info: Callable[..., Any]) -> Callable[..., Any]:
    """``torch.finfo``/``iinfo`` taking a traced dtype (``scores.dtype``, metadata that no
    batch size or length changes): its value at the examples, recorded as an assumption."""

    def traced(*args: Any) -> Any:
        if args and isinstance(args[0], fx.Proxy):
            args = (tracer.static_value(args[0], (torch.dtype,)), *args[1:])
        return info(*args)

    return traced


@contextlib.contextmanager
def _traced_builtins(tracer: "_Tracer", root: torch.nn.Module) -> Iterator[None]:
    """While tracing, ``int(...)`` in the model's own modules, ``torch.tensor(...)``, the
    factories given sizes as separate proxies (``torch.zeros(B, N, gap)``) and the legacy
    ``Variable(...)`` (as ``torch.autograd.Variable`` or imported by name into the model's
    modules) record graph nodes when given proxies, instead of failing; everything is restored
    afterwards."""
    namespaces = {
        id(g): g
        for g in (
            sys.modules[type(m).__module__].__dict__
            for m in root.modules()
            if type(m).__module__ in sys.modules
        )
        if not g.get("__name__", "").startswith("torch")
    }
    patched: list[dict[str, Any]] = []
    replaced: list[tuple[dict[str, Any], str, Any]] = []
    try:
        for g in namespaces.values():
            if "int" not in g:
                g["int"] = _recording(tracer, int, runtime.as_int)
                patched.append(g)
        variable = torch.autograd.Variable
        traced_variable = _traced_variable(tracer, variable)
        for g in namespaces.values():  # ``from torch.autograd import Variable``
            for name, value in list(g.items()):
                if value is variable:
                    replaced.append((g, name, value))
                    g[name] = traced_variable
        apply = torch.autograd.Function.__dict__["apply"].__func__
        with contextlib.ExitStack() as stack:
            stack.enter_context(
                mock.patch.object(
                    torch, "tensor", _recording(tracer, torch.tensor, runtime.shape_tensor)
                )
            )
            stack.enter_context(
                mock.patch.object(
                    torch, "as_tensor", _recording(tracer, torch.as_tensor, runtime.shape_as_tensor)
                )
            )
            stack.enter_context(
                mock.patch.object(torch.autograd.Function, "apply", _no_autograd_function(apply))
            )
            for name in _FACTORIES:  # torch.zeros(B, N, gap): sizes given as separate proxies
                original = getattr(torch, name)
                stack.enter_context(
                    mock.patch.object(torch, name, _recording(tracer, original, original))
                )
            for name in ("finfo", "iinfo"):  # torch.finfo(scores.dtype).min
                stack.enter_context(
                    mock.patch.object(torch, name, _static_dtype(tracer, getattr(torch, name)))
                )
            stack.enter_context(mock.patch.object(torch.autograd, "Variable", traced_variable))
            stack.enter_context(
                mock.patch.object(torch.autograd.variable, "Variable", traced_variable)
            )
            yield
    finally:
        for g in patched:
            g.pop("int", None)
        for g, name, value in replaced:
            g[name] = value


class _Tracer(fx.Tracer):
    def __init__(
        self, extra_leaves: set[str], examples: tuple[tuple[Any, ...], tuple[Any, ...]]
    ) -> None:
        super().__init__(autowrap_modules=(math,))
        self.record_stack_traces = True
        self.proxy_buffer_attributes = True  # buffers become graph attributes, sliceable by proxies
        self.extra_leaves = extra_leaves
        self.examples = examples
        self.assumptions: list[tuple[str, str]] = []  # (what was fixed, module path)
        self.sepfx_module_stack: list[str] = []
        self.failed_module: tuple[str, BaseException] | None = None
        self._placeholders = 0
        self._evaluating = False

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict[str, fx.Proxy]) -> Any:
        if self._evaluating:
            return attr_val
        return super().getattr(attr, attr_val, parameter_proxy_cache)

    # -- leaves -------------------------------------------------------------------------
    def is_leaf_module(self, m: torch.nn.Module, qualname: str) -> bool:
        return qualname in self.extra_leaves or super().is_leaf_module(m, qualname)

    def call_module(
        self,
        m: torch.nn.Module,
        forward: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> Any:
        if self._evaluating:  # computing a concrete value: run the real module
            return forward(*args, **kwargs)
        try:
            qualname = self.path_of_module(m)
        except NameError:  # made in the forward (``self.network[:2]``, a slice of a Sequential):
            return forward(*args, **kwargs)  # traced through to its installed children
        self.sepfx_module_stack.append(qualname)
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception as error:  # remember the innermost custom module that failed
            if self.failed_module is None and not self.is_leaf_module(m, qualname):
                self.failed_module = (qualname, error)
            raise
        finally:
            self.sepfx_module_stack.pop()

    # -- concrete values ----------------------------------------------------------------
    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _ConcreteProxy(node, self)

    def create_proxy(
        self,
        kind: str,
        target: fx.node.Target,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        name: str | None = None,
        type_expr: Any | None = None,
        proxy_factory_fn: Callable[[fx.Node], fx.Proxy] | None = None,
    ) -> fx.Proxy:
        proxy = super().create_proxy(kind, target, args, kwargs, name, type_expr, proxy_factory_fn)
        node = proxy.node
        if kind == "placeholder":
            index = self._placeholders
            self._placeholders += 1
            default = node.args[0] if node.args else None
            node.meta[_VALUES] = tuple(
                ex[index] if index < len(ex) else default for ex in self.examples
            )
        elif kind != "output":
            node.meta[_VALUES] = tuple(self._evaluate(node, k) for k in range(2))
            node.meta[_SHAPE_ONLY] = _shape_only(node)
            node.meta[_VARYING] = _varying(node)
        return proxy

    def _evaluate(self, node: fx.Node, k: int) -> Any:
        missing: list[fx.Node] = []

        def value_of(n: fx.Node) -> Any:
            values = n.meta.get(_VALUES)
            if values is None:
                missing.append(n)
                return None
            return values[k]

        args = fx.node.map_arg(node.args, value_of)
        kwargs = fx.node.map_arg(node.kwargs, value_of)
        if missing:
            return None
        self._evaluating = True
        try:
            with torch.no_grad():
                if node.op == "get_attr":
                    return operator.attrgetter(cast(str, node.target))(self.root)
                if node.op == "call_module":
                    return self.root.get_submodule(cast(str, node.target))(*args, **kwargs)
                if node.op == "call_method":
                    return getattr(args[0], cast(str, node.target))(*args[1:], **kwargs)
                return cast(Callable[..., Any], node.target)(*args, **kwargs)
        except Exception:
            return None
        finally:
            self._evaluating = False

    def static_value(
        self,
        proxy: fx.Proxy,
        types: tuple[type, ...],
        project: Callable[[Any], Any] = lambda value: value,
        structural: bool = False,
    ) -> Any:
        """``project(value)`` of ``proxy`` if the value is of ``types`` and the projection is the
        same on both inputs and derives from no size that varies with the input (unless the
        projection reads only the value's structure, ``structural``), else raise."""
        node = proxy.node
        values: Any = node.meta.get(_VALUES)  # (reference, probe) values, or None
        ok = values is not None and all(
            isinstance(v, types) and not isinstance(v, torch.Tensor) for v in values
        )
        # the number of tensors in a sequence (``x.unbind(1)``, ``x.chunk(2)``) is its structure,
        # not data
        holds_tensors = structural and all(
            any(isinstance(item, torch.Tensor) for item in v) for v in values or ()
        )
        if ok and not node.meta.get(_SHAPE_ONLY, False) and not holds_tensors:
            raise torch.fx.proxy.TraceError(
                f"node {node.name} ({_user_line(node)}) is used as a Python value but depends on "
                "tensor data, not only on shapes: it cannot be fixed while tracing"
            )
        if ok:
            values = [project(v) for v in values]
        varying = False if structural else node.meta.get(_VARYING, False)
        if ok and (any(varying) if isinstance(varying, tuple) else varying):
            seen = f"{values[0]!r} vs {values[1]!r}"
            raise torch.fx.proxy.TraceError(
                f"node {node.name} ({_user_line(node)}) is used as a Python value but derives "
                f"from the input's length or batch size ({seen} on two inputs of different "
                "batch and length): it would be fixed for one input only"
            )
        if ok and values[0] == values[1]:
            where = self.sepfx_module_stack[-1] if self.sepfx_module_stack else ""
            self.assumptions.append((f"{_user_line(node)}  ->  {values[0]!r}", where))
            return values[0]
        if values is not None and any(isinstance(v, torch.Tensor) for v in values):
            raise torch.fx.proxy.TraceError(
                f"node {node.name} ({_user_line(node)}) is a tensor used as a Python value "
                "(control flow on tensor data): it cannot be traced"
            )
        seen = "unknown" if values is None else f"{values[0]!r} vs {values[1]!r}"
        raise torch.fx.proxy.TraceError(
            f"node {node.name} ({_user_line(node)}) is used as a Python value but varies with "
            f"the input ({seen} on two inputs of different batch and length)"
        )

    def static_length(self, proxy: fx.Proxy) -> int:
        """``len()`` of a tensor (``len(torch.tensor(x.shape))``, the rank): its first size, if
        that is the same on both inputs, else raise."""
        node = proxy.node
        lengths = [len(v) if v.dim() else None for v in node.meta[_VALUES]]
        if lengths[0] is not None and lengths[0] == lengths[1]:
            where = self.sepfx_module_stack[-1] if self.sepfx_module_stack else ""
            self.assumptions.append((f"{_user_line(node)}  ->  {lengths[0]!r}", where))
            return lengths[0]
        raise torch.fx.proxy.TraceError(
            f"node {node.name} ({_user_line(node)}): len() of a tensor whose first size varies "
            f"with the input ({lengths[0]!r} vs {lengths[1]!r} on two inputs of different batch "
            "and length)"
        )

    def to_bool(self, obj: fx.Proxy) -> bool:
        return bool(self.static_value(obj, (bool, int)))

    def iter(self, obj: fx.Proxy) -> Iterator[Any]:
        values = obj.node.meta.get(_VALUES)
        if (
            values is not None
            and all(isinstance(v, (tuple, torch.Size)) for v in values)
            and len(values[0]) == len(values[1])
        ):
            # (fx.Proxy's __getitem__ is installed by setattr: the stubs lack it)
            return iter([obj[i] for i in range(len(values[0]))])  # type: ignore[index]
        return super().iter(obj)


def _keep_parameter_names(root: torch.nn.Module, graph: fx.Graph) -> None:
    """The graph's parameters named as ``root.forward``'s: fx names one traced with a constant
    (an optional ``fs=None`` the caller did not pass) ``fs_1``, and eager code that calls the
    graph with ``fs=None`` would then fail."""
    try:
        parameters = list(inspect.signature(root.forward).parameters.values())
    except (TypeError, ValueError):
        return
    if any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in parameters):
        return
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    if len(placeholders) == len(parameters):
        for node, parameter in zip(placeholders, parameters):
            node.target = parameter.name


def finish_graph(root: torch.nn.Module, graph: fx.Graph, class_name: str) -> fx.GraphModule:
    """The GraphModule of a traced ``graph`` over ``root``: tracing metadata dropped, dead code
    (never an in-place op) and unused submodules removed."""
    for node in graph.nodes:
        node.meta.pop(_VALUES, None)
        node.meta.pop(_VARYING, None)
        # annotations written as strings (``from __future__ import annotations``) would end
        # up as bare strings in the generated code's globals, which breaks pickling
        node.type = None
    graph._tracer_cls = None  # unpickling re-traces with a plain fx.Tracer
    _keep_parameter_names(root, graph)
    gm = fx.GraphModule(root, graph, class_name=class_name)
    gm.graph.eliminate_dead_code(is_impure_node)  # in-place ops are kept
    gm.delete_all_unused_submodules()  # dead branches' weights would never get gradients
    gm.graph.lint()
    gm.recompile()
    return gm


def trace(
    model: torch.nn.Module, example_input: torch.Tensor, *, max_leaves: int = 64
) -> TraceResult:
    """Trace ``model`` (not modified: a copy is traced) into a dead-code-free GraphModule."""
    if not isinstance(model, torch.nn.Module):
        raise InputError(
            f"sepfx needs a torch.nn.Module, got {type(model).__name__}. "
            "Pass the model object itself (not a function or a state_dict)."
        )
    if not isinstance(example_input, torch.Tensor):
        raise InputError(f"the example input must be a torch.Tensor, got {type(example_input)}")
    root = copy.deepcopy(model).eval()
    examples = ((example_input,), (probe_input(example_input),))
    leaves: dict[str, str] = {}
    while True:
        tracer, graph = _trace_with_fallback(root, examples, leaves, max_leaves)
        gm = finish_graph(root, graph, type(model).__name__)
        mismatch = _generalisation_mismatch(root, gm, example_input)
        if mismatch is None:
            break
        suspects = {where for _, where in tracer.assumptions if where and where not in leaves}
        if not suspects:
            fixed = "; ".join(text for text, _ in tracer.assumptions) or "none recorded"
            raise TraceError(
                f"the traced graph of {type(model).__name__} differs from the eager model at "
                f"input shape {mismatch}: its forward fixes a value that varies with the input. "
                f"Values fixed while tracing: {fixed}. Move that code into a submodule (it will "
                "run eagerly as a leaf) or make it depend on the input's shape symbolically."
            )
        for where in suspects:  # modules whose fixed values may not hold at other lengths
            leaves[where] = "fixes a value that does not hold at other input lengths"
    assumptions = [text for text, where in tracer.assumptions]
    return TraceResult(gm, leaves, list(dict.fromkeys(assumptions)))


def _trace_with_fallback(
    root: torch.nn.Module,
    examples: tuple[tuple[Any, ...], tuple[Any, ...]],
    leaves: dict[str, str],
    max_leaves: int,
) -> tuple[_Tracer, fx.Graph]:
    """Trace ``root``, turning each custom module that fails into a leaf (``leaves`` grows)."""
    while True:
        tracer = _Tracer(set(leaves), examples)
        try:
            with _traced_builtins(tracer, root):
                graph = tracer.trace(root)
            return tracer, graph
        except Exception as error:
            if tracer.failed_module is None:
                raise TraceError(
                    f"cannot trace {type(root).__name__}.forward itself: "
                    f"{type(error).__name__}: {error}. The root module cannot fall back to a "
                    "leaf; move the offending code into a submodule or make it traceable."
                ) from error
            qualname, cause = tracer.failed_module
            if len(leaves) >= max_leaves:
                raise TraceError(
                    f"gave up after {max_leaves} leaf fallbacks; last: {qualname}: {cause}"
                ) from error
            leaves[qualname] = f"{type(cause).__name__}: {str(cause).splitlines()[0][:200]}"


def check_lengths(example: torch.Tensor) -> list[torch.Tensor]:
    """Inputs the traced graph must agree with the eager model on: the example, the probe, and
    a third length that is not a multiple of common strides."""
    third = list(example.shape)
    third[-1] = max(third[-1] // 2 + 13, 17)
    return [example, probe_input(example), seeded_noise(third, 4321, example)]


def _generalisation_mismatch(
    eager: torch.nn.Module, gm: fx.GraphModule, example: torch.Tensor
) -> tuple[int, ...] | None:
    """None if the graph computes what the eager model computes at three input sizes, else the
    first input shape where they differ."""
    with torch.no_grad():
        for x in check_lengths(example):
            try:
                same = _close(eager(x), gm(x))
            except Exception:
                same = False
            if not same:
                return tuple(x.shape)
    return None


def _close(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        if a.shape != b.shape:
            return False
        if not (a.is_floating_point() or a.is_complex()):  # a bool mask, integer lengths
            return a.dtype == b.dtype and torch.equal(a, b)
        if a.numel() == 0:
            return True
        scale = a.abs().max().clamp_min(1e-12)
        return bool(((a - b).abs().max() / scale) <= 1e-5)
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)) and len(a) == len(b):
        return all(_close(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):  # per-speaker outputs by name
        return a.keys() == b.keys() and all(_close(a[k], b[k]) for k in a)
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return False
    return cast(bool, a == b)  # (other values as their == compares them)


__all__ = ["TraceResult", "trace", "probe_input", "is_impure_node"]
