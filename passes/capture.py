"""Capture by parts: graphs where tracing holds, eager shells where it does not.

A module whose forward traces (``passes.trace``) and whose graph computes what the eager module
computes at every call recorded on the check inputs is a **graph part**. A module that does not
is an **eager shell**: its Python forward runs as written, and each module it calls is captured
the same way, recursively (the root included). Built-in layers that shells call directly are
**leaf parts** (a one-node graph).

What a shell's own glue does is read from recorded runs: the model runs under a
``TorchFunctionMode`` that writes every torch call made outside the parts as a node of one
straight-line ``fx.Graph`` (parts are opaque calls while recording, identified by forward hooks;
every recorded tensor is kept alive so that its ``id`` stays unique). Each part call is then
replaced by a copy of the part's graph, which gives the **analysis graph**: one graph for the
whole model, at the reference input, over which the op rules find the channel groups exactly as
for a traced model. It runs at the reference input only (pads and sizes of the glue are baked
in); the models sepfx hands out are built part by part (``passes.gates``, ``passes.slim``), and
the shells in them run their Python forward unchanged.

Static (channel) and dynamic (batch, time) axes are told apart as for traced graphs: the glue is
recorded a second time on a twin input with another batch size and a length longer by a multiple
of common strides and chunk sizes (so that shape-derived branches take the same side), and the
two recordings are paired node by node. Where they do not pair, every axis of the glue is taken
as dynamic, so nothing crossing it is pruned (the report says so).
"""

from __future__ import annotations

import copy
import difflib
import inspect
import operator
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import fx, nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map
from torch.utils.hooks import RemovableHandle

from passes import rules, runtime
from passes import trace as tracing
from passes.channels import summarise
from passes.values import CONSTANT, GLUE, PROBE, REF, Summary, seeded_noise
from passes.values import _summary as summary_of

PART = "sepfx_part"  # node.meta key of a part call while recording: the part's module path
CALL_INPUTS = "sepfx_call_inputs"  # node.meta key of a part call: its inputs (copies)

# How much longer the twin input is than the reference, tried in turn until the glue runs the
# same ops at both: multiples of common strides, chunk sizes and pad units, so that T mod each
# of them (and every branch on it) is unchanged. 16000 = 2^7 5^3; 201600 = 2^7 3^2 5^2 7.
TWIN_EXTRA_LENGTHS = (16000, 201600)

# Calls that read metadata or turn a tensor into Python values: not channel flow.
_NOT_RECORDED = {
    "size",
    "dim",
    "ndimension",
    "numel",
    "nelement",
    "stride",
    "is_contiguous",
    "data_ptr",
    "element_size",
    "__len__",
    "__bool__",
    "__int__",
    "__float__",
    "__index__",
    "item",
    "tolist",
    "__format__",
    "__repr__",
    "__hash__",
    "get_device",
    "is_floating_point",
    "is_complex",
    "numpy",
    "__array__",
    "__reduce_ex__",
    "__deepcopy__",
    "storage_offset",
    "untyped_storage",
    "is_nonzero",
    "has_names",
    "__dlpack__",
    "__iter__",
    "__contains__",
}
_IN_PLACE_OPERATORS = {
    "__iadd__": "add_",
    "__isub__": "sub_",
    "__imul__": "mul_",
    "__itruediv__": "div_",
    "__idiv__": "div_",
}

# Tensor methods that are wrappers named after an equivalent method (``Tensor.__pow__`` is a
# wrapped ``pow``, ``__rtruediv__`` one of ``__rdiv__``): recorded as a call of that method
_RENAMED_METHODS = {
    value
    for name, value in vars(torch.Tensor).items()
    if callable(value)
    and getattr(value, "__name__", name) != name
    and hasattr(torch.Tensor, value.__name__)
}

# one recorded call of a module: (run, args, kwargs, output), copies
_Call = tuple[int, tuple[Any, ...], dict[str, Any], Any]


@dataclass
class Constant:
    """A part's argument that was not a recorded tensor at a call site (a number, None)."""

    value: Any


@dataclass
class Part:
    """A module captured as a graph: traced (``leaf`` False) or a built-in layer (``leaf``)."""

    path: str
    graph_module: fx.GraphModule
    leaf: bool
    placeholders: list[str]  # the forward's parameter names, in placeholder order
    defaults: dict[str, Any]
    # per call site: part node name -> analysis node name (or Constant, for arguments)
    sites: list[dict[str, Any]] = field(default_factory=list)

    def target(self, target: str) -> str:
        """The analysis graph's (root-relative) name of a call_module/get_attr target."""
        if self.leaf:
            inner = target.split(".", 1)
            return self.path + ("." + inner[1] if len(inner) > 1 else "")
        return f"{self.path}.{target}" if self.path else target

    def bind(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[Any]:
        """The value of each placeholder for a call with ``args`` and ``kwargs``."""
        values = dict(zip(self.placeholders, args))
        values.update(kwargs)
        return [values.get(name, self.defaults.get(name)) for name in self.placeholders]


@dataclass
class Capture:
    """The model captured by parts, and its analysis graph at the reference input."""

    root: nn.Module  # a deep copy of the caller's model, in eval mode
    graph_module: fx.GraphModule  # the analysis graph (see module docstring)
    parts: dict[str, Part]  # module path -> graph or leaf part
    shells: dict[str, str]  # module path -> why it runs eagerly ("" is the root)
    assumptions: list[str]  # values fixed while tracing the graph parts
    notes: list[str]  # what the recordings showed (branches, unpaired glue)
    example_input: torch.Tensor

    @property
    def traced_whole(self) -> bool:
        return "" in self.parts


# -- recorded calls of every module ----------------------------------------------------------
def _detached(value: Any) -> Any:
    return tree_map(lambda v: v.detach().clone() if isinstance(v, torch.Tensor) else v, value)


def _record_calls(
    root: nn.Module, paths: list[str], inputs: list[torch.Tensor]
) -> dict[str, list[_Call]]:
    """Module path -> [(run, args, kwargs, output)] of every call of the modules at ``paths``,
    over runs of ``root`` at ``inputs`` (copies: in-place code cannot change them later)."""
    calls: dict[str, list[_Call]] = {}
    if "" in paths:
        with torch.no_grad():
            calls[""] = [(run, (x,), {}, _detached(root(x))) for run, x in enumerate(inputs)]
    paths = [p for p in paths if p]
    if not paths:
        return calls
    handles: list[RemovableHandle] = []
    run = 0
    for path in paths:

        def hook(
            module: nn.Module,
            args: tuple[Any, ...],
            kwargs: dict[str, Any],
            output: Any,
            path: str = path,
        ) -> None:
            calls.setdefault(path, []).append(
                (run, _detached(args), _detached(kwargs), _detached(output))
            )

        handles.append(root.get_submodule(path).register_forward_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            for run, x in enumerate(inputs):
                root(x)
    finally:
        for handle in handles:
            handle.remove()
    return calls


# -- graph parts -------------------------------------------------------------------------------
def _signature(module: nn.Module) -> tuple[list[str], dict[str, Any]] | None:
    """Parameter names and defaults of ``module.forward``; None for *args/**kwargs forwards."""
    try:
        params = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):
        return None
    if any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params):
        return None
    return [p.name for p in params], {
        p.name: p.default for p in params if p.default is not inspect.Parameter.empty
    }


def _leaf_part(path: str, module: nn.Module) -> Part | None:
    signature = _signature(module)
    if signature is None:
        return None
    names, defaults = signature
    graph = fx.Graph()
    placeholders = [
        graph.placeholder(name, default_value=defaults.get(name, inspect.Parameter.empty))
        for name in names
    ]
    graph.output(graph.call_module("leaf", tuple(placeholders)))
    gm = fx.GraphModule({"leaf": module}, graph, class_name=type(module).__name__)
    return Part(path, gm, True, names, defaults)


def _trace_part(
    path: str, module: nn.Module, calls: list[_Call]
) -> tuple[Part | None, str, list[str]]:
    """(part, "", assumptions) when ``module`` traces into a graph that matches every recorded
    call, else (None, why not, [])."""
    signature = _signature(module)
    if signature is None:
        return None, "its forward takes *args or **kwargs", []
    names, defaults = signature
    # the tracer tells fixed values from varying ones on a call of the reference run and one of
    # the probe run (another batch size and length)
    examples = [next((c for c in calls if c[0] == run), calls[0]) for run in (0, 1)]
    positional: list[tuple[Any, ...]] = []
    for _, args, kwargs, _ in examples:
        bound = dict(zip(names, args))
        bound.update(kwargs)
        positional.append(tuple(bound.get(n, defaults.get(n)) for n in names))
    # an argument that is None, or the same flag or string, at every call (an optional one the
    # caller did not pass, a state not there yet, ``expand_kv=False``) stays that constant
    # while tracing: ``if fs is not None`` cannot be asked of a proxy (fx checks the value at
    # run time: another value passed later fails loudly)
    constants: dict[str, Any] = {}
    for name in names:
        values = [
            dict(zip(names, args)).get(name, kwargs.get(name, defaults.get(name)))
            for _, args, kwargs, _ in calls
        ]
        if all(v is None or type(v) in (bool, str) for v in values) and all(
            type(v) is type(values[0]) and v == values[0] for v in values
        ):
            constants[name] = values[0]
    tracer = tracing._Tracer(set(), (positional[0], positional[1]))
    saved = _module_states(module)
    try:
        with tracing._traced_builtins(tracer, module):
            graph = tracer.trace(module, concrete_args=constants)
        gm = tracing.finish_graph(module, graph, type(module).__name__)
    except Exception as error:  # noqa: BLE001 - any failure to trace makes a shell
        cause = tracer.failed_module[1] if tracer.failed_module else error
        return None, f"{type(cause).__name__}: {str(cause).splitlines()[0][:200]}", []
    finally:
        # a forward that stores on its modules (``self.stft.n_fft = ...``) stored proxies or
        # traced values: the eager runs that follow must see the modules as they were
        _restore_module_states(saved)
    for _, args, kwargs, expected in calls:
        try:
            with torch.no_grad():
                got = gm(*args, **kwargs)
            same = tracing._close(expected, got)
        except Exception:  # noqa: BLE001
            same = False
        if not same:
            shapes = [
                tuple(a.shape)
                for a in tree_flatten((args, kwargs))[0]
                if isinstance(a, torch.Tensor)
            ]
            return None, f"its traced graph differs from its eager forward at input {shapes}", []
    assumptions = [f"{path or type(module).__name__}: {text}" for text, _ in tracer.assumptions]
    return Part(path, gm, False, names, defaults), "", assumptions


def _module_states(module: nn.Module) -> list[tuple[nn.Module, dict[str, Any]]]:
    """Every submodule's attributes (its parameter, buffer and child tables copied)."""
    return [
        (m, {k: copy.copy(v) if isinstance(v, dict) else v for k, v in vars(m).items()})
        for m in module.modules()
    ]


def _restore_module_states(states: list[tuple[nn.Module, dict[str, Any]]]) -> None:
    for m, state in states:
        vars(m).clear()
        vars(m).update(state)


def _is_rule_leaf(module: nn.Module) -> bool:
    """A built-in layer: fx keeps it as one call (its op rule, or opaque, decides)."""
    return fx.Tracer().is_leaf_module(module, "")


def _unusual_argument(calls: list[_Call]) -> str | None:
    """The type of the first argument of ``calls`` that is an object holding tensors (a
    PackedSequence, a ComplexTensor), not a tensor or a plain list/tuple/dict."""

    def unusual(value: Any) -> str | None:
        if isinstance(value, (list, dict)) or type(value) is tuple:
            items = value.values() if isinstance(value, dict) else value
            return next((u for u in map(unusual, items) if u is not None), None)
        if isinstance(value, (torch.Tensor, torch.Size)):
            return None
        held = (
            list(value)
            if isinstance(value, tuple)
            else list(getattr(value, "__dict__", {}).values())
        )
        return type(value).__name__ if any(isinstance(v, torch.Tensor) for v in held) else None

    for _, args, kwargs, _ in calls:
        found = unusual(list(args)) or unusual(dict(kwargs))
        if found is not None:
            return found
    return None


def _decide(
    root: nn.Module, inputs: list[torch.Tensor]
) -> tuple[dict[str, Part], dict[str, str], list[str]]:
    """Top-down, one level of shells at a time: graph parts, leaf parts and shells of the
    modules that actually run. Only the modules a shell calls are recorded (one run of the
    model per level), so a model that traces whole runs just once per input here."""
    parts: dict[str, Part] = {}
    shells: dict[str, str] = {}
    assumptions: list[str] = []

    def children(path: str, module: nn.Module) -> list[tuple[str, nn.Module]]:
        return [
            (f"{path}.{name}" if path else name, child) for name, child in module.named_children()
        ]

    candidates = [("", root)]
    while candidates:
        calls = _record_calls(root, [path for path, _ in candidates], inputs)
        found: list[tuple[str, nn.Module]] = []
        for path, module in candidates:
            if path not in calls:  # not called itself (dead, or used through a method of its
                found += children(path, module)  # parent): its children may be
                continue
            unusual = _unusual_argument(calls[path])
            if unusual is not None:  # a graph cannot hold it: the module runs as written
                shells[path] = f"called with a {unusual}, which a graph's inputs cannot be"
                found += children(path, module)
                continue
            if _is_rule_leaf(module) and path:
                part = _leaf_part(path, module)
                if part is not None:
                    parts[path] = part
                    continue
            part, why, fixed = _trace_part(path, module, calls[path])
            if part is not None:
                parts[path] = part
                assumptions.extend(fixed)
                continue
            shells[path] = why
            found += children(path, module)
        candidates = found
    return parts, shells, assumptions


# -- recording the glue -----------------------------------------------------------------------
class _Recorder(TorchFunctionMode):
    """Writes every torch call made outside the parts into ``graph``."""

    def __init__(self, root: nn.Module, parts: dict[str, Part]) -> None:
        super().__init__()
        self.graph = fx.Graph()
        self.nodes: dict[int, fx.Node] = {}  # id(tensor) -> the node that made it
        # the elements a recorded tensor views -> its node: a tensor object made outside torch
        # calls over the same elements (``Variable(x)``, which no torch function sees) is it
        self.aliases: dict[tuple[Any, ...], fx.Node] = {}
        self.alive: list[Any] = []  # every recorded value, so that no id is reused
        self.depth = 0  # > 0 while a part runs
        self.constants: dict[str, torch.Tensor] = {}
        self.attributes = {
            id(t): name
            for name, t in list(root.named_parameters(remove_duplicate=False))
            + list(root.named_buffers(remove_duplicate=False))
        }
        self.attribute_nodes: dict[str, fx.Node] = {}
        self.part_calls: list[fx.Node] = []
        self.handles: list[RemovableHandle] = []
        for path, part in parts.items():
            module = root.get_submodule(path)
            self.handles.append(module.register_forward_pre_hook(self._enter, with_kwargs=True))
            self.handles.append(
                module.register_forward_hook(
                    lambda m, a, k, out, path=path: self._leave(path, a, k, out), with_kwargs=True
                )
            )

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()

    # -- values -----------------------------------------------------------------------------
    def node_of(self, value: Any) -> Any:
        if not isinstance(value, torch.Tensor):
            return value
        node = self.nodes.get(id(value))
        name = self.attributes.get(id(value))
        alias = _alias_key(value) if node is None and name is None else None
        if alias is not None:
            # ``Variable(x)``: another tensor object over the elements of a recorded one
            node = self.aliases.get(alias)
        if node is not None:
            return node
        if name is None:  # a tensor made outside torch calls: a constant of the glue
            name = f"{CONSTANT}{len(self.constants)}"
            self.constants[name] = value.detach()
        if name not in self.attribute_nodes:
            node = self.graph.get_attr(name)
            node.meta[REF] = summary_of(value)
            node.meta[GLUE] = True
            self.attribute_nodes[name] = node
        self.alive.append(value)
        return self.attribute_nodes[name]

    def nodes_of(self, value: Any) -> Any:
        """``value`` with each recorded tensor in it replaced by its node, the bounds of slices
        too (``x[..., : lengths.max()]``)."""

        def node_of(item: Any) -> Any:
            if isinstance(item, slice):
                return slice(*(self.node_of(v) for v in (item.start, item.stop, item.step)))
            return self.node_of(item)

        return tree_map(node_of, value)

    def bind(self, node: fx.Node, result: Any) -> None:
        """Map the tensors of ``result`` to ``node`` (and getitem nodes for containers)."""
        node.meta[REF] = summary_of(result)
        self.alive.append(result)
        if isinstance(result, torch.Tensor):
            self.nodes[id(result)] = node
            key = _alias_key(result)
            if key is not None:
                self.aliases[key] = node
        elif isinstance(result, (tuple, list)) and not isinstance(result, torch.Size):
            for i, item in enumerate(result):
                if isinstance(item, (torch.Tensor, tuple, list)) and not isinstance(
                    item, torch.Size
                ):
                    element = self.graph.call_function(operator.getitem, (node, i))
                    element.meta[GLUE] = True
                    self.bind(element, item)

    # -- parts ------------------------------------------------------------------------------
    def _enter(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self.depth += 1

    def _leave(self, path: str, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        if self.depth > 1:
            self.depth -= 1
            return
        node = self.graph.call_module(path, self.nodes_of(tuple(args)), self.nodes_of(dict(kwargs)))
        node.meta[PART] = path
        # copied while depth > 0, so that the copies are not recorded as glue
        node.meta[CALL_INPUTS] = (_detached(tuple(args)), _detached(dict(kwargs)))
        self.depth -= 1
        self.part_calls.append(node)
        self.bind(node, output)

    # -- glue -------------------------------------------------------------------------------
    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        if self.depth:
            return result
        name = getattr(func, "__name__", "")
        if name == "__get__":  # a property: x.shape, x.T, x.data
            name = getattr(getattr(func, "__self__", None), "__name__", "")
            if not isinstance(result, torch.Tensor):
                return result
            node = self.graph.call_function(getattr, (self.node_of(args[0]), name))
        elif name in _NOT_RECORDED:
            return result
        elif name == "__setitem__":
            node = self.graph.call_function(runtime.assigned, tuple(self.nodes_of(tuple(args))))
            result = args[0]
        elif (
            getattr(torch.Tensor, name, None) is func
            or name in _IN_PLACE_OPERATORS
            or func in _RENAMED_METHODS
        ):
            method = _IN_PLACE_OPERATORS.get(name, name)
            if method == "__getitem__":
                node = self.graph.call_function(operator.getitem, tuple(self.nodes_of(tuple(args))))
            else:
                node = self.graph.call_method(
                    method,
                    tuple(self.nodes_of(tuple(args))),
                    self.nodes_of(kwargs),
                )
        else:
            node = self.graph.call_function(
                func, tuple(self.nodes_of(tuple(args))), self.nodes_of(kwargs)
            )
        node.meta[GLUE] = True
        self.bind(node, result)
        return result


def _alias_key(tensor: torch.Tensor) -> tuple[Any, ...] | None:
    """What identifies the elements a tensor views (None for an empty one, which has none)."""
    if tensor.numel() == 0 or tensor.layout != torch.strided:
        return None
    return (
        tensor.data_ptr(),
        tuple(tensor.shape),
        tensor.stride(),
        tensor.dtype,
        tensor.device,
    )


def _record(
    root: nn.Module, parts: dict[str, Part], x: torch.Tensor
) -> tuple[fx.Graph, dict[str, torch.Tensor], list[fx.Node]]:
    """One recorded run at ``x``: (graph, constants, the recorder's part calls)."""
    recorder = _Recorder(root, parts)
    try:
        placeholder = recorder.graph.placeholder("mixture")
        recorder.bind(placeholder, x)
        with torch.no_grad(), recorder:
            out = root(x)
        recorder.graph.output(recorder.nodes_of(out))
    finally:
        recorder.close()
    return recorder.graph, recorder.constants, recorder.part_calls


def _signature_of_graph(graph: fx.Graph) -> list[tuple[str, str | int]]:
    return [(n.op, n.target if isinstance(n.target, str) else id(n.target)) for n in graph.nodes]


def _all_dynamic(summary: Summary) -> Summary:
    """A probe summary for an unpaired node: every tensor axis taken as dynamic."""
    kind = summary[0]
    if kind == "tensor":
        return ("tensor", tuple(-1 - s for s in summary[1]))
    if kind == "tuple":
        return ("tuple", tuple(_all_dynamic(s) for s in summary[1]))
    return summary


# -- inlining the parts -----------------------------------------------------------------------
def _propagate(
    part: Part,
    key: str,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    keep_inputs: Callable[[fx.Node], bool],
) -> None:
    summarise(part.graph_module, key, part.bind(args, kwargs), keep_inputs)


def _inline(graph: fx.Graph, call: fx.Node, part: Part) -> None:
    env: dict[fx.Node, Any] = {}
    site: dict[str, Any] = {}
    values = part.bind(call.args, call.kwargs)
    placeholders = iter(values)
    result = None
    with graph.inserting_before(call):
        for node in part.graph_module.graph.nodes:
            if node.op == "placeholder":
                value = next(placeholders)
                env[node] = value
                site[node.name] = value.name if isinstance(value, fx.Node) else Constant(value)
                continue
            if node.op == "output":
                result = fx.node.map_arg(node.args[0], lambda n: env[n])
                continue
            new = graph.node_copy(node, lambda n: env[n])
            if new.op in ("call_module", "get_attr"):
                new.target = part.target(cast(str, node.target))  # a qualified name
            env[node] = new
            site[node.name] = new.name
    part.sites.append(site)
    if isinstance(result, fx.Node):
        call.replace_all_uses_with(result)
    else:
        for user in list(call.users):
            if (
                user.target is operator.getitem
                and isinstance(user.args[1], int)
                and isinstance(result, (tuple, list))
            ):
                user.replace_all_uses_with(result[user.args[1]])
                graph.erase_node(user)
    graph.erase_node(call)


def capture(model: nn.Module, example_input: torch.Tensor) -> Capture:
    """Capture ``model`` (not modified: a deep copy is captured) by parts."""
    root = copy.deepcopy(model).eval()
    check_inputs = tracing.check_lengths(example_input)  # example, probe, third
    parts, shells, assumptions = _decide(root, check_inputs)
    notes: list[str] = []
    if "" in parts:  # the whole model traces: the analysis graph is its graph
        part = parts[""]
        gm = part.graph_module
        part.sites.append({n.name: n.name for n in gm.graph.nodes})
        return Capture(root, gm, parts, shells, assumptions, notes, example_input)
    graph, constants, part_calls = _record(root, parts, example_input)
    notes += _branches(root, parts, graph, check_inputs[1:])
    for extra in TWIN_EXTRA_LENGTHS:
        twin_graph, _, twin_calls = _record(root, parts, twin_input(example_input, extra))
        paired = _signature_of_graph(graph) == _signature_of_graph(twin_graph)
        if paired:
            break
    if paired:
        for node, other in zip(graph.nodes, twin_graph.nodes):
            node.meta[PROBE] = other.meta.get(REF)
    else:
        notes.append(
            "the eager glue ran other ops at every longer twin input tried (lengths "
            f"+{', +'.join(map(str, TWIN_EXTRA_LENGTHS))}): every axis of the glue is "
            "taken as dynamic (nothing crossing it is pruned)"
        )
        for node in graph.nodes:
            if REF in node.meta:
                node.meta[PROBE] = _all_dynamic(node.meta[REF])
    for index, call in enumerate(part_calls):
        part = parts[call.meta[PART]]
        twin_args: tuple[tuple[Any, ...], dict[str, Any]] | None = (
            twin_calls[index].meta[CALL_INPUTS] if paired else None
        )
        args, kwargs = call.meta.pop(CALL_INPUTS)
        if twin_args is not None:
            _propagate(part, PROBE, *twin_args, _opaque)
        _propagate(part, REF, args, kwargs, _opaque)
        if twin_args is None:
            for node in part.graph_module.graph.nodes:
                if REF in node.meta:
                    node.meta[PROBE] = _all_dynamic(node.meta[REF])
        _inline(graph, call, part)
    for call in twin_calls:
        call.meta.pop(CALL_INPUTS, None)
    graph.lint()
    gm = _graph_module(root, graph, constants, type(model).__name__)
    return Capture(root, gm, parts, shells, assumptions, notes, example_input)


def _graph_module(
    root: nn.Module, graph: fx.Graph, constants: dict[str, torch.Tensor], name: str
) -> fx.GraphModule:
    """A recorded graph with its constants and the modules, parameters and buffers of ``root``
    that its nodes name."""
    objects: dict[str, Any] = dict(constants)
    for node in graph.nodes:
        if node.op in ("call_module", "get_attr") and node.target not in objects:
            objects[node.target] = operator.attrgetter(node.target)(root)
    return fx.GraphModule(objects, graph, class_name=name)


def recorded_run(model: nn.Module, x: torch.Tensor) -> fx.GraphModule:
    """``model``'s run at ``x`` as one straight-line graph of torch calls, eager code and
    graphs alike (what the exporters would trace, as a graph the op rules can lower): every
    size, branch and Python value of the run is fixed, so it computes what ``model`` computes
    at inputs of ``x``'s shape whose values take the same branches, and nowhere else."""
    graph, constants, _ = _record(model, {}, x)
    graph.lint()
    return _graph_module(model, graph, constants, type(model).__name__)


def site_graph(capture: Capture, part: Part, site: int = 0) -> fx.Graph:
    """The part's graph as inlined at call ``site`` of the analysis graph: the analysis graph's
    node names, root-relative targets and metadata, so that its channel axes are at hand. Its
    placeholders are the part's, named after the analysis values they received. Arguments are
    the part's own: a Python value its caller passed (``S``, ``(h, c)``) stays a placeholder, not
    the reference run's value that the analysis graph holds."""
    nodes = {n.name: n for n in capture.graph_module.graph.nodes}
    mapping = part.sites[site]
    graph = fx.Graph()
    env: dict[fx.Node, Any] = {}  # part node -> its node in the new graph
    received: dict[str, fx.Node] = {}  # analysis value -> the placeholder that receives it
    taken: set[str] = set()  # placeholder names are the generated forward's argument names

    def placeholder(name: str, default: Any) -> fx.Node:
        unique, count = name, 0
        while unique in taken:
            count += 1
            unique = f"{name}_{count}"
        taken.add(unique)
        return graph.placeholder(unique, default_value=default)

    for node in part.graph_module.graph.nodes:
        if node.op == "placeholder":
            source = mapping[node.name]
            default = node.args[0] if node.args else inspect.Parameter.empty
            if isinstance(source, Constant) or source in received:
                # a Python value, or a value already passed in another argument (``mha(e, e,
                # e)``): the graph reads the first one
                new = placeholder(node.name, default)
                env[node] = new if isinstance(source, Constant) else received[source]
                continue
            new = placeholder(source, default)
            new.meta = copy.copy(nodes[source].meta)
            env[node] = received[source] = new
        elif node.op == "output":
            graph.output(fx.node.map_arg(node.args[0], lambda n: env[n]))
        else:
            original = nodes[mapping[node.name]]
            new = graph.create_node(
                node.op,
                original.target,
                fx.node.map_arg(node.args, lambda n: env[n]),
                fx.node.map_arg(node.kwargs, lambda n: env[n]),
                name=original.name,
            )
            new.meta = copy.copy(original.meta)
            env[node] = new
    return graph


def _opaque(node: fx.Node) -> bool:
    """Opaque built-in layers (no op rule): their inputs are kept to certify them."""
    if node.op != "call_module":
        return False
    owner = node.graph.owning_module
    assert owner is not None  # a part's graph, in its GraphModule
    return (
        rules.lookup(node, dict(owner.named_modules(remove_duplicate=False))) is rules.OPAQUE_LEAF
    )


def _branches(
    root: nn.Module, parts: dict[str, Part], graph: fx.Graph, inputs: list[torch.Tensor]
) -> list[str]:
    """Notes for the report: where the glue ran other ops at another check input than at the
    reference (a shape-derived branch: a pad at one length, none at another)."""
    reference = [_op_name(n) for n in graph.nodes if n.op not in ("placeholder", "output")]
    notes = []
    for x in inputs:
        other_graph, _, _ = _record(root, parts, x)
        other = [_op_name(n) for n in other_graph.nodes if n.op not in ("placeholder", "output")]
        if other == reference:
            continue
        matcher = difflib.SequenceMatcher(a=reference, b=other, autojunk=False)
        only_reference, only_other = [], []
        for tag, i1, i2, j1, j2 in matcher.get_opcodes():
            if tag != "equal":
                only_reference += reference[i1:i2]
                only_other += other[j1:j2]
        notes.append(
            f"the eager glue took another branch at input {list(x.shape)} than at the reference "
            f"{list(graph.find_nodes(op='placeholder')[0].meta[REF][1])}: ops only at the "
            f"reference [{', '.join(only_reference) or 'none'}], only there "
            f"[{', '.join(only_other) or 'none'}]; the channel analysis follows the reference's "
            "ops, and the check of the slim model runs at both"
        )
    return notes


def _op_name(node: fx.Node) -> str:
    if node.op == "call_module":
        return f"part {node.target}"
    target = node.target
    return target if isinstance(target, str) else getattr(target, "__name__", str(target))


def twin_input(example: torch.Tensor, extra: int = TWIN_EXTRA_LENGTHS[0]) -> torch.Tensor:
    """The example with one more batch row and ``extra`` more samples."""
    shape = list(example.shape)
    shape[0] += 1
    shape[-1] += extra
    return seeded_noise(shape, 2468, example)


__all__ = ["Capture", "Constant", "Part", "capture", "site_graph", "twin_input", "PART"]
