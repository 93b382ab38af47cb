"""The op-rule registry: everything sepfx knows about how one kind of op treats channels.

One rule per op kind (a module class, a function, a tensor method). A rule may implement:

- ``couple(ctx)``: link, unite or freeze the static axes of the node's inputs, outputs and
  parameters (``passes.channels.NodeContext``). Axes it leaves untouched are frozen.
- ``cost(ctx)`` (inside ``couple``): how the node's MACs scale with kept channels.
- ``gated(builder, node)``: how the gated model computes this node when channels are masked, where
  the plain op would not (norm statistics, recurrent state, attention heads). Default: run the
  op as is; the gate pass then zeroes pruned channels of the output.
- ``slim_module(module, pruning, qualname)``: the module with its channels sliced (slim pass;
  ``pruning`` says which indices of each axis the keep set keeps).
- ``rewrite(node, pruning)``: fix literal sizes in the node's arguments (slim pass).
- ``lower(node, graph_module)``: rewrite the node for the ONNX exporters (``passes.export``).
- ``lower_complex(node, graph_module)``: the same for a node that reads or makes a complex
  tensor, which export carries as a real one with a trailing (real, imaginary) pair axis; where
  the rule has no such hook, the lowering fails (ONNX has no complex type).

An op with no rule freezes every static axis it touches. Supporting a new op is one new entry.

Layout: ``registry`` (the registry and the helpers rules share; it knows no rule), then one
module per op family, each registering its own entries: ``pointwise``, ``conv``, ``norms``,
``recurrent``, ``attention``, ``layout``, ``reduce``, ``contraction``, ``spectral``, ``opaque``.
"""

# each family module registers its rules when imported
from passes.rules import (  # noqa: F401
    attention,
    contraction,
    conv,
    layout,
    norms,
    opaque,
    pointwise,
    recurrent,
    reduce,
    spectral,
)
from passes.rules.layout import ReshapeRule, reshape_groups
from passes.rules.opaque import OPAQUE_LEAF
from passes.rules.pointwise import mutates
from passes.rules.registry import (
    RULES,
    Registry,
    arg,
    complex_values,
    describe_op,
    lookup,
    set_arg,
)

__all__ = [
    "OPAQUE_LEAF",
    "RULES",
    "Registry",
    "ReshapeRule",
    "arg",
    "complex_values",
    "describe_op",
    "lookup",
    "mutates",
    "reshape_groups",
    "set_arg",
]
