"""The op-family registry, at the bottom of capture: what a family is (`OpFamily`), what a
node is to the search (`NodeKind`), and the lookups every stage reads (`kind_of`,
`family_of`, `label_of`). The families themselves are declared in `capture.families`,
one module per family group, each owning its targets, match, rewrites, reading and refusal
(inductor's one rule per op family; Torch-Pruning's op kinds). Anything no family matches
is a barrier.

`register(OpFamily(...))` adds a family; capture tags every node's family in
`node.meta[KIND_META]` and the rest of fxmerge reads it there.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from torch import fx

from . import ops

KIND_META = "fxmerge_family"  # the name of a node's family, tagged at capture


class NodeKind(str, Enum):
    """What a graph node is to the search."""

    PLACEHOLDER = "placeholder"
    OUTPUT = "output"
    GET_ATTR = "get_attr"
    CONV = "conv"
    NORM = "norm"  # folded into the conv before it (running statistics)
    GROUP_NORM = "group_norm"  # per-sample statistics: relocated, never folded
    ACTIVATION = "activation"
    ADD = "add"
    CONDITION = "condition"  # a vector per sample added to a map (a timestep embedding)
    SCALE = "scale"  # an affine map per channel (one branch of a region)
    PAD = "pad"
    BARRIER = "barrier"  # anything else: never merged through

    def __str__(self) -> str:
        return self.value


# (a `canonical.Canonicaliser` and the node) -> True once it replaced the node
Rewrite = Callable[[Any, fx.Node], bool]
# (an `affine.AffineReader`, the node, strict) -> its `algebra.AffineConv`, or None
Read = Callable[[Any, fx.Node, bool], Any]
ANY = "*"  # a rewrite key: tried on every call node before the target's own


@dataclass(frozen=True)
class OpFamily:
    """One op family. `match(gm, node)` recognises its canonical form; `rewrites` maps the
    targets (functions, method names, module classes, or `ANY`) of its other forms to the
    rewrite into the canonical one; `read` is its affine reading (None: not linear, so never
    merged through); `refuse(gm, node)` names a node left in a non-canonical form; `label`
    says what it is in reports."""

    name: str
    kind: NodeKind
    match: Callable[[fx.GraphModule, fx.Node], bool]
    rewrites: Mapping[Any, Rewrite] = field(default_factory=dict)
    read: Read | None = None
    refuse: Callable[[fx.GraphModule, fx.Node], str | None] | None = None
    label: str = ""


FAMILIES: dict[str, OpFamily] = {}  # in the order they are tried


def register(family: OpFamily) -> OpFamily:
    """Add `family` (or replace the one of its name); families are tried in order."""
    FAMILIES[family.name] = family
    return family


def unregister(name: str) -> None:
    FAMILIES.pop(name, None)


def classify(gm: fx.GraphModule, node: fx.Node) -> OpFamily | None:
    """The family `node` belongs to, by its match (None: a barrier or a graph input)."""
    if node.op in ("placeholder", "output", "get_attr"):
        return None
    return next((f for f in FAMILIES.values() if f.match(gm, node)), None)


def tag(gm: fx.GraphModule) -> fx.GraphModule:
    """Record every node's family in `node.meta[KIND_META]` ("" for none)."""
    for node in gm.graph.nodes:
        family = classify(gm, node)
        node.meta[KIND_META] = family.name if family else ""
    return gm


def family_of(gm: fx.GraphModule, node: fx.Node) -> OpFamily | None:
    """The family tagged on `node` at capture (a node made since is classified now)."""
    name = node.meta.get(KIND_META)
    if name is None or (name and name not in FAMILIES):
        return classify(gm, node)
    return FAMILIES[name] if name else None


def kind_of(gm: fx.GraphModule, node: fx.Node) -> NodeKind:
    """What `node` is to the search: its family's kind, else a barrier."""
    if node.op in ("placeholder", "output", "get_attr"):
        return NodeKind(node.op)
    family = family_of(gm, node)
    return family.kind if family else NodeKind.BARRIER


def op_name(gm: fx.GraphModule, node: fx.Node) -> str:
    """The module's class or the function's name: `Conv2d`, `cat`, `mul`."""
    if node.op == "call_module":
        return type(gm.get_submodule(node.target)).__name__
    if node.op == "call_function":
        return getattr(node.target, "__name__", str(node.target)).split(".")[0]
    return str(node.target) if node.op == "call_method" else node.op


def label_of(gm: fx.GraphModule, node: fx.Node) -> str:
    """What `node` is in reports: its family's label, else its op's name."""
    family = family_of(gm, node)
    return (family.label if family and family.label else "") or op_name(gm, node)


def data_input(node: fx.Node) -> fx.Node:
    """The one value a per-channel op transforms (its input that is not a constant)."""
    return next(a for a in node.all_input_nodes if a.op != "get_attr")


def module_is(gm: fx.GraphModule, node: fx.Node, types: type | tuple[type, ...]) -> bool:
    return isinstance(ops.module_of(gm, node), types)


def functions(targets: Sequence[Any], rewrite: Rewrite) -> dict[Any, Rewrite]:
    return dict.fromkeys(targets, rewrite)


def rewrites() -> dict[Any, list[Rewrite]]:
    """Every family's rewrites by target, in registration order."""
    table: dict[Any, list[Rewrite]] = {}
    for family in FAMILIES.values():
        for target, rewrite in family.rewrites.items():
            table.setdefault(target, []).append(rewrite)
    return table
