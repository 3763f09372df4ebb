"""What a canonical graph is, in words and in code (`check_canonical`).

A canonical GraphModule, as `fxmerge.trace` makes it (and `prune` keeps it):

1. it computes what the model computes in eval mode, on the example inputs (checked once,
   when it is captured: `trace` runs both and raises `TraceError` when they differ);
2. it carries those example inputs, and a shape on every node that computes a tensor (each
   conv call at least: that is what is checked);
3. weights and BatchNorm statistics are module parameters and buffers, and forward inputs
   stay placeholders: a conv of constant weights is an `nn.Conv1d/2d/3d` call, never a functional
   one; a weight computed from parameters alone (standardised, normalised) is that conv's
   weight: where the computation reads the module's attributes (symbolic_trace) it stays, as
   a parametrization of the conv from the raw weight, so fine-tuning trains what the model
   trained; otherwise it is folded (a conv whose weight depends on a forward input is a
   barrier);
4. its ops are in their families' canonical forms (`families`): `nn.Conv1d/2d/3d`, foldable
   `nn.BatchNorm1d/2d/3d`, activation modules (never their functional forms), `operator.add` of
   equal shapes, `F.pad`; identities (`nn.Identity`, dropout and drop path in eval mode,
   `x / 1`) are gone; each node's family is tagged in `node.meta[registry.KIND_META]`.
   Anything else is a barrier;
5. a searched conv has one call site and no hooks (others stay out of the search, with the
   reason in `MergeSpace.summary()`).

`check_canonical` checks 2-4 in one pass over the nodes, cheaply enough to run before every
pass; 1 costs a forward and 5 is the space's business.
"""

from __future__ import annotations

from torch import fx

from ..errors import ArgumentError, TraceError
from . import registry
from .registry import NodeKind
from .trace import INPUTS_META


def _refusal(gm: fx.GraphModule, node: fx.Node, shapes: bool) -> str | None:
    """Why `node` breaks an invariant, or None: each family's own (`OpFamily.refuse`), and
    a shape on every conv."""
    if shapes and registry.kind_of(gm, node) is NodeKind.CONV and "tensor_meta" not in node.meta:
        return "it has no recorded shape"
    for family in registry.FAMILIES.values():
        why = family.refuse(gm, node) if family.refuse else None
        if why is not None:
            return why
    return None


def require_graph_module(gm: object, who: str) -> None:
    """`ArgumentError` unless `gm` is a GraphModule: the one wording every entry point
    that needs a traced graph uses."""
    if not isinstance(gm, fx.GraphModule):
        raise ArgumentError(f"{who} needs a GraphModule from fxmerge.trace, got "
                            f"{type(gm).__name__}: trace the model first")


def check_canonical(gm: object, *, shapes: bool = True) -> None:
    """Raise `TraceError`, naming the node and the rule, unless `gm` is a canonical graph.
    `shapes=False` skips invariant 2 (a GraphModule saved and loaded again keeps its code
    but not its metadata; merging it needs no shapes)."""
    require_graph_module(gm, "check_canonical")
    if shapes and INPUTS_META not in gm.meta:
        raise TraceError("the graph has no example inputs or shapes: capture the model with "
                         "fxmerge.trace (a GraphModule loaded with torch.load loses them)")
    for node in gm.graph.nodes:
        why = _refusal(gm, node, shapes)
        if why is not None:
            raise TraceError(f"the graph is not canonical at node '{node.name}' ({node.op} "
                             f"{node.target}): {why}; capture the model with fxmerge.trace")
