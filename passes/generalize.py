"""A recorded run made shape-generic: the integers that vary with the input's shape rewritten as
shape arithmetic of the run's own tensors.

A run recorded at one input (``passes.capture.recorded_run``) holds every size of the eager code
as a constant, so it computes what the model computes at that shape only. Recorded again at
inputs of other lengths (and another batch size), the recordings that run the same ops differ
only in integers: a frame count handed to ``reshape`` or ``torch.arange``, a pad amount, the
length given to ``torch.full``. Each such integer is explained, over all recordings, as one of

- a size of an earlier tensor (``x.size(d)``), or ``a * size + c``;
- the difference of two sizes (a pad or trim to another tensor's length), or their product
  (the batch and frame axes merged, ``view(B * L, ...)``);
- ``(c - size) % k``, the pad that rounds a size up to a multiple of ``k`` (the form that also
  holds where there is nothing to pad);

and replaced by that expression, so that an exporter traces it as shape operations. An integer
no form explains, a constant tensor or a list whose length varies leaves the axis fixed
(``ShapeError``). A form that fits the recordings by chance is caught where the result is used:
``passes.export`` checks the exported file at many lengths.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import fx, nn
from torch.utils._pytree import tree_flatten

from passes.capture import _graph_module, _record, _signature_of_graph
from passes.values import REF

MAX_MODULUS = 4096  # the largest multiple a pad rounds a size up to, searched


class ShapeError(Exception):
    """The recordings differ in something no shape expression explains."""


# -- integers in arguments ----------------------------------------------------------------------
def _leaves(value: Any) -> Iterator[Any]:
    """The leaves of an argument: containers and slices opened."""
    if isinstance(value, (tuple, list)):
        for item in value:
            yield from _leaves(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _leaves(item)
    elif isinstance(value, slice):
        yield from _leaves((value.start, value.stop, value.step))
    else:
        yield value


def _replace_leaves(value: Any, new: Callable[[int, Any], Any], counter: list[int]) -> Any:
    """``value`` with leaf number ``i`` (in ``_leaves`` order) replaced by ``new(i, leaf)``."""
    if isinstance(value, (tuple, list)):
        items = [_replace_leaves(item, new, counter) for item in value]
        return type(value)(items) if isinstance(value, list) else tuple(items)
    if isinstance(value, dict):
        return {key: _replace_leaves(item, new, counter) for key, item in value.items()}
    if isinstance(value, slice):
        start, stop, step = (
            _replace_leaves(v, new, counter) for v in (value.start, value.stop, value.step)
        )
        return slice(start, stop, step)
    counter[0] += 1
    return new(counter[0] - 1, value)


def _structure(value: Any) -> Any:
    """What must agree between recordings apart from integers: container kinds and lengths."""
    if isinstance(value, (tuple, list)):
        return (type(value).__name__, tuple(_structure(v) for v in value))
    if isinstance(value, dict):
        return ("dict", tuple((k, _structure(v)) for k, v in value.items()))
    if isinstance(value, slice):
        return ("slice", _structure((value.start, value.stop, value.step)))
    if isinstance(value, fx.Node):
        return ("node", value.name)
    if isinstance(value, int) and not isinstance(value, bool):
        return "int"
    return ("value", repr(value))


# -- the sizes each recording saw -----------------------------------------------------------------
Size = tuple[str, int]  # (node name, axis)


def _sizes(graph: fx.Graph) -> dict[Size, int]:
    """Every axis length of every tensor node, by (node, axis)."""
    sizes = {}
    for node in graph.nodes:
        summary = node.meta.get(REF)
        if summary is not None and summary[0] == "tensor":
            for axis, length in enumerate(summary[1]):
                sizes[(node.name, axis)] = length
    return sizes


class _Explainer:
    """Finds, for a series of integers (one per recording), a shape expression of sizes that
    come before a node."""

    def __init__(self, graphs: list[fx.Graph]) -> None:
        self.order = {node.name: i for i, node in enumerate(graphs[0].nodes)}
        per_graph = [_sizes(g) for g in graphs]
        # the sizes that vary, in graph order: (node's position, (node, axis), the series)
        self.varying: list[tuple[int, Size, tuple[int, ...]]] = []
        for key in per_graph[0]:
            series = tuple(sizes.get(key, -1) for sizes in per_graph)
            if -1 not in series and len(set(series)) > 1:
                self.varying.append((self.order[key[0]], key, series))
        self.varying.sort()

    def explain(self, values: tuple[int, ...], before: str) -> tuple[Any, ...] | None:
        """An expression for ``values`` from sizes of nodes before ``before``, or None:
        ("size", s), ("affine", s, a, c), ("difference", s, t), ("product", s, t) (batch items
        times frames, merged) or ("round_up", s, c, k)."""
        limit = self.order[before]
        first: dict[tuple[int, ...], Size] = {}  # each series, and the earliest size with it
        for position, key, series in self.varying:
            if position >= limit:
                break
            first.setdefault(series, key)
        known = [(key, series) for series, key in first.items()]
        for key, series in known:
            if series == values:
                return ("size", key)
        for key, series in known:
            j = next(j for j, s in enumerate(series) if s != series[0])
            a, rest = divmod(values[j] - values[0], series[j] - series[0])
            c = values[0] - a * series[0]
            if a and not rest and all(a * s + c == v for s, v in zip(series, values)):
                return ("affine", key, a, c)
        for key, series in known:
            for other, others in known:
                if all(s - t == v for s, t, v in zip(series, others, values)):
                    return ("difference", key, other)
                if all(s * t == v for s, t, v in zip(series, others, values)):
                    return ("product", key, other)
        if all(0 <= v for v in values):
            for key, series in known:
                for k in range(max(values) + 1, MAX_MODULUS + 1):
                    c = (values[0] + series[0]) % k
                    if all((c - s) % k == v for s, v in zip(series, values)):
                        return ("round_up", key, c, k)
        return None


def _expression(
    graph: fx.Graph, nodes: dict[str, fx.Node], found: tuple[Any, ...], whole_multiples: bool
) -> fx.Node:
    """Nodes computing ``found`` (inserted at the graph's current insertion point). A pad to a
    multiple of ``k`` is 0 where the size is one already, or ``k`` (``whole_multiples``: code
    that pads ``k - size % k``); recordings at prime lengths cannot tell the two apart."""

    def size(key: Size) -> fx.Node:
        return graph.call_method("size", (nodes[key[0]], key[1]))

    kind = found[0]
    if kind == "size":
        return size(found[1])
    if kind == "affine":
        _, key, a, c = found
        scaled = graph.call_function(operator.mul, (size(key), a)) if a != 1 else size(key)
        return graph.call_function(operator.add, (scaled, c)) if c else scaled
    if kind in ("difference", "product"):
        combine = operator.sub if kind == "difference" else operator.mul
        return graph.call_function(combine, (size(found[1]), size(found[2])))
    _, key, c, k = found  # round_up
    if not whole_multiples:  # (c - s) % k
        return graph.call_function(
            operator.mod, (graph.call_function(operator.sub, (c, size(key))), k)
        )
    rest = graph.call_function(operator.sub, (c - 1, size(key)))  # (c - 1 - s) % k + 1
    return graph.call_function(operator.add, (graph.call_function(operator.mod, (rest, k)), 1))


def _generalize(
    recordings: list[tuple[fx.Graph, dict[str, torch.Tensor]]], whole_multiples: bool
) -> tuple[fx.Graph, bool]:
    """The first recording's graph (changed in place) with every integer argument that differs
    between the recordings replaced by a shape expression, and whether a pad to a multiple is
    among them (``_expression``). Raises ``ShapeError`` where the recordings ran other ops,
    hold other constants or differ in anything no expression explains."""
    graphs = [graph for graph, _ in recordings]
    signature = _signature_of_graph(graphs[0])
    if any(_signature_of_graph(g) != signature for g in graphs[1:]):
        raise ShapeError("the eager code runs other ops at other input shapes")
    first_constants = recordings[0][1]
    for _, constants in recordings[1:]:
        for name, value in first_constants.items():
            other = constants.get(name)
            if other is None or other.shape != value.shape or not torch.equal(other, value):
                raise ShapeError(f"the eager code makes the constant {name} from the input's shape")
    node_lists = [list(g.nodes) for g in graphs]
    for nodes_of_graph in node_lists:
        for node in nodes_of_graph:
            if (  # the legacy ``x.new(data)``: ``x.new_tensor(data)``, which rules lower
                node.op == "call_method"
                and node.target == "new"
                and len(node.args) == 2
                and isinstance(node.args[1], (list, tuple))
            ):
                node.target = "new_tensor"
    for position in range(len(node_lists[0])):
        same_nodes = [nodes[position] for nodes in node_lists]
        if len({_structure((n.args, n.kwargs)) for n in same_nodes}) > 1:
            for n in same_nodes:
                _as_filled(n)
    explainer = _Explainer(graphs)
    pads_to_multiples = False
    graph = graphs[0]
    nodes = {node.name: node for node in graph.nodes}
    for position, node in enumerate(node_lists[0]):
        arguments = (node.args, node.kwargs)
        others = [nodes_of_graph[position] for nodes_of_graph in node_lists[1:]]
        if any(_structure((o.args, o.kwargs)) != _structure(arguments) for o in others):
            raise ShapeError(
                f"{node.format_node()} has other arguments (a list of another length, another "
                "value) at another input shape"
            )
        leaves = [list(_leaves((o.args, o.kwargs))) for o in [node, *others]]
        varying = {
            i: tuple(series)
            for i, series in enumerate(zip(*leaves))
            if isinstance(series[0], int)
            and not isinstance(series[0], bool)
            and len(set(series)) > 1
        }
        if not varying:
            continue
        replacements: dict[int, fx.Node] = {}
        with graph.inserting_before(node):
            for i, values in varying.items():
                found = explainer.explain(values, node.name)
                if found is None:
                    raise ShapeError(
                        f"{node.format_node()}: the integer {values[0]} varies with the input's "
                        f"shape ({', '.join(map(str, values))}) as no size of the run does"
                    )
                replacements[i] = _expression(graph, nodes, found, whole_multiples)
                pads_to_multiples = pads_to_multiples or found[0] == "round_up"
        counter = [0]
        args, kwargs = _replace_leaves(
            arguments, lambda i, leaf: replacements.get(i, leaf), counter
        )
        node.args, node.kwargs = tuple(args), dict(kwargs)
    graph.lint()
    return graph, pads_to_multiples


def _as_filled(node: fx.Node) -> None:
    """``x.new_tensor([v, v, ...])`` as ``x.new_full([n], v)`` (and ``torch.tensor`` as
    ``torch.full``): a list of one value per batch item (the frame counts of a batch of full
    lengths) whose length is then an integer like the others."""
    method = node.op == "call_method" and node.target == "new_tensor"
    function = node.op == "call_function" and node.target in (torch.tensor, torch.as_tensor)
    data = node.args[1 if method else 0] if len(node.args) > (1 if method else 0) else None
    if (
        (method or function)
        and isinstance(data, (list, tuple))
        and data
        and all(type(v) is int and v == data[0] for v in data)
        and not set(node.kwargs) - {"dtype", "device"}
    ):
        if method:
            node.target, node.args = "new_full", (node.args[0], [len(data)], data[0])
        else:
            node.target, node.args = torch.full, ([len(data)], data[0])


def generic_recorded_run(
    model: nn.Module, inputs: list[torch.Tensor], checks: Sequence[torch.Tensor] = ()
) -> fx.GraphModule:
    """``model``'s run recorded at each of ``inputs`` (same rank; other lengths, perhaps
    another batch size), as one graph whose sizes follow the input's: see the module's
    docstring. Where it pads to a multiple, it is checked against ``model`` at ``checks``, and
    the other reading of such pads taken when it disagrees. Raises ``ShapeError``."""
    for whole_multiples in (False, True):
        recordings = [_record(model, {}, x)[:2] for x in inputs]
        graph, pads_to_multiples = _generalize(recordings, whole_multiples)
        generic = _graph_module(model, graph, recordings[0][1], type(model).__name__)
        if not pads_to_multiples:
            return generic
        wrong = _first_disagreement(generic, model, checks)
        if wrong is None:
            return generic
    raise ShapeError(
        f"its pads to a multiple, generalized either way, differ from the model at input shape "
        f"{wrong}"
    )


def _first_disagreement(
    generic: nn.Module, model: nn.Module, inputs: Sequence[torch.Tensor]
) -> list[int] | None:
    """The shape of the first input at which ``generic`` does not compute what ``model`` does
    (1e-5 of the output's scale), or None."""
    for x in inputs:
        try:
            with torch.no_grad():
                expected = tree_flatten(model(x))[0]
                got = tree_flatten(generic(x))[0]
        except Exception:
            return list(x.shape)
        for e, g in zip(expected, got):
            if e.shape != g.shape:
                return list(x.shape)
            if e.numel() and float((e - g).abs().max()) > 1e-5 * max(float(e.abs().max()), 1e-12):
                return list(x.shape)
        if len(expected) != len(got):
            return list(x.shape)
    return None
