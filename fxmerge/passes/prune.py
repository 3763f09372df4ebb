"""The prune pass: apply a plan to a traced model, keeping every layer separate and trainable.

Removed activations and convs become identity, each block's padding moves to its first kept
conv (so that merging it later is exact), and skips inside a block are cropped or padded to
meet the larger feature maps. A region of parallel branches stays branched (each branch
trainable): its padding moves branch by branch. Fine-tune the result, then call
`fxmerge.merge`.

A plan is read against its space once (`resolve`: every edit, by node and module name); the
edits read only that. They never change a module in place (a conv whose padding moves is
replaced by a copy), so `prune_graph` can apply them to a graph whose modules stay the
original's.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.infra.pass_base import PassResult

from ..capture import check_canonical, ops, require_graph_module
from ..capture.regions import Branch
from ..capture.trace import example_inputs, propagate_shapes
from ..errors import PlanError
from ..plan import Plan
from ..sides import per_axis
from ..space import MergeSpace, require_space_of
from .base import MERGED_META, PLAN_META, FxMergePass

log = logging.getLogger(__name__)



class PrunedGraph:
    """A plan applied to the part of a graph it changes, without copying modules.

    `graph` holds the nodes of `base.graph` from position `start` up to `stop` (the first
    node a plan edits to the last node reading an edited one), edited; its placeholders
    stand for the values it reads from outside (`inputs`, by node name) and its output
    tuple gives the values nodes from `stop` on read (`outputs`, by name). `modules` are
    the modules the edits replaced or added (by target); every other target is `base`'s.
    Nothing outside the window differs from `base`. Scoring many plans this way is cheap;
    never train it."""

    def __init__(self, base: fx.GraphModule, touched: set[str]) -> None:
        self.base = base
        self.modules: dict[str, nn.Module] = {}
        self.graph = fx.Graph()
        self.inputs: list[str] = []
        self.outputs: list[str] = []
        order = list(base.graph.nodes)
        position = {n: k for k, n in enumerate(order)}
        marked = [n for n in order if n.name in touched]
        self.start = min((position[n] for n in marked), default=0)
        self.stop = max((position[u] + 1 for n in marked for u in (n, *n.users)
                         if u.op != "output"), default=0)
        window = [n for n in order[self.start:self.stop] if n.op != "placeholder"]
        env: dict[fx.Node, fx.Node] = {}
        for node in window:  # values from outside the window, read in it
            for value in node.all_input_nodes:
                if value not in env and (value.op == "placeholder"
                                         or not self.start <= position[value] < self.stop):
                    env[value] = self.graph.placeholder(value.name)
                    self.inputs.append(value.name)
        for node in window:
            env[node] = self.graph.node_copy(node, env.__getitem__)
        read_after = [n for n in window if any(position[u] >= self.stop for u in n.users)]
        self.outputs = [n.name for n in read_after]
        self.graph.output(tuple(env[n] for n in read_after))

    def get_submodule(self, target: str) -> nn.Module:
        return self.modules[target] if target in self.modules else self.base.get_submodule(target)

    def add_submodule(self, target: str, module: nn.Module) -> None:
        self.modules[target] = module


Editable = fx.GraphModule | PrunedGraph  # what the edits below act on


def block_borders(space: MergeSpace, i: int, j: int, kept: set[str]
                  ) -> dict[int, tuple[int, ...]]:
    """Border width per axis at each position of block `(i, j)` once its padding sits on
    its first kept conv: the extra pixels each side that later convs of the block consume."""
    rank = space.conv(j).rank
    border = {j: (0,) * rank}
    for p in range(j, i, -1):
        c = space.conv(p)
        border[p - 1] = (tuple(b * s + q for b, s, q in zip(border[p], per_axis(c.stride, rank),
                                                            per_axis(c.padding, rank)))
                         if c.name in kept else border[p])
    return border


@dataclass(frozen=True)
class InputPad:
    """Crop (> 0) or zero-pad (< 0) value `source` where one consumer reads it: a skip's
    source where it meets the larger maps of a block whose padding moved (before its
    projection conv, or before its add), or a region's input where one branch reads it."""

    source: str
    consumer: str  # the projection's module target, or the add node
    is_projection: bool
    crop: tuple[int, ...]  # per spatial dimension, first to last (rows, columns in 2-D)


@dataclass(frozen=True)
class RelocatedNorm:
    """A fresh norm `name` of `template`'s kind after `value` (docs/method.md §4)."""

    name: str
    template: str
    value: str
    channels: int


@dataclass(frozen=True)
class Edits:
    """A plan resolved against its space: every edit `prune` makes, by node and module
    name, in the order they are made."""

    paddings: tuple[tuple[str, tuple[int, ...]], ...]  # conv module -> new padding, per side
    input_pads: tuple[InputPad, ...]
    activation: str | None  # the network's activation module copied where one is added
    added_after: tuple[str, ...]  # values an activation is added after
    norms: tuple[RelocatedNorm, ...]
    bypassed: tuple[tuple[str, ...], ...]  # nodes replaced by their one input, the last
    # of them the value replaced
    removed_activations: int


def resolve(space: MergeSpace, plan: Plan, validate: bool = True) -> Edits:
    """Validate `plan` on `space` (unless it was built from it) and read off every edit it
    asks for, once."""
    if validate:
        plan.validate(space)
    kept = set(plan.kept_convs)
    positions = plan.positions(space)
    paddings, input_pads = [], []
    for (i, j), block in zip(positions, plan.blocks):
        if not block.kept:
            continue
        border = block_borders(space, i, j, kept)
        first = space.conv(block.kept[0]).index
        zero = (0,) * space.conv(first).rank
        for name in block.kept:
            pad = border[first - 1] if space.conv(name).index == first else zero
            region = space.region(name)
            if region is None:
                if pad != per_axis(space.conv(name).padding, len(pad)):
                    paddings.append((name, pad))
                continue
            for branch in region.branches:  # each branch's padding moves as the region's
                pads, crop = _branch_padding(branch, [p - q for p, q in zip(pad, region.padding)])
                if branch.conv is not None and pads != tuple(branch.padding):
                    paddings.append((branch.conv, pads))
                if any(crop):
                    input_pads.append(InputPad(region.input, branch.reader, False, crop))
        physical = {p: (zero if p < first else border[p]) for p in border}
        for skip in space.skips:
            if i <= skip.source and skip.target <= j:
                crop = tuple(a - skip.projection_stride * b
                             for a, b in zip(physical[skip.source], physical[skip.target]))
                if any(crop):
                    input_pads.append(InputPad(
                        skip.source_node, skip.projection or skip.add_node,
                        skip.projection is not None, crop))
    added = plan.added_activations(space)
    template = next((c.activation_module for c in space.convs
                     if c.activation == space.added_activation), None) if added else None
    removed = plan.removed_activations(space)
    inner, norms = set(removed), []
    for i, j in positions:
        rnorms = [space.conv(p).relocatable_norm for p in range(i + 1, j + 1)
                  if space.conv(p).name in inner and space.conv(p).relocatable_norm]
        if rnorms:
            norms.append(RelocatedNorm(f"{space.conv(j).name}_norm", rnorms[-1],
                                       space.units[j - 1].pre_skip, space.conv(j).out_channels))
    units = {c.name: u for c, u in zip(space.convs, space.units)}
    bypassed = [tuple(filter(None, (units[n].rnorm, units[n].act))) for n in removed]
    bypassed += [(*(units[n].region or (units[n].conv,)), *filter(None, (units[n].norm,)))
                 for n in plan.removed_convs]
    return Edits(tuple(paddings), tuple(input_pads), template,
                 tuple(units[n].output for n in added), tuple(norms), tuple(bypassed),
                 len(removed))


def _branch_padding(branch: Branch, delta: Sequence[int]
                    ) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """A region branch's conv padding once the region's changes by `delta` (per axis), and
    the crop (> 0) or zero-pad (< 0), per axis, of the input it then reads: a conv pads as
    far as it can; a branch without one reads a padded input (docs/method.md §4b)."""
    if branch.conv is None:
        return (0,) * len(branch.padding), tuple(-d for d in delta)
    pads = [p + d for p, d in zip(branch.padding, delta)]
    crop = tuple(max(0, -p) for p in pads)
    return tuple(p + c for p, c in zip(pads, crop)), crop


def _set_padding(gm: Editable, name: str, padding: tuple[int, ...]) -> bool:
    """Give conv `name` a new padding on a shallow copy, never in place; whether it moved.
    The copy shares the conv's parameters (`copy.copy` refuses parametrized modules, so
    copy the dict)."""
    conv = gm.get_submodule(name)
    if tuple(conv.padding) == padding:
        return False
    new = conv.__class__.__new__(conv.__class__)
    new.__dict__ = {**conv.__dict__, "padding": padding}
    gm.add_submodule(name, new)
    return True


def _insert_after(gm: Editable, value: fx.Node, module_name: str) -> None:
    """Call `module_name` on `value` and let every other user of `value` read its result."""
    with gm.graph.inserting_after(value):
        new = gm.graph.call_module(module_name, (value,))
    value.replace_all_uses_with(new, delete_user_cb=lambda user: user is not new)


def _bypass(gm: Editable, nodes: list[fx.Node]) -> None:
    """Replace `nodes[-1]` by the one value `nodes` read from outside (constants aside) and
    erase them: a conv and its norm, an activation, or a region of parallel branches."""
    inside = set(nodes)
    inputs = {a for n in nodes for a in n.all_input_nodes
              if a not in inside and a.op != "get_attr"}
    if len(inputs) != 1:
        raise PlanError(f"cannot remove {[n.name for n in nodes]}: they read "
                        f"{sorted(a.name for a in inputs)}, not one value")
    nodes[-1].replace_all_uses_with(inputs.pop())
    for n in reversed(nodes):
        gm.graph.erase_node(n)


def apply_edits(out: Editable, edits: Edits) -> bool:
    """Edit `out`, a copy of the planned graph (modules are replaced, never changed);
    whether anything changed."""
    nodes = {n.name: n for n in out.graph.nodes}
    padded = [_set_padding(out, name, pad) for name, pad in edits.paddings]
    for skip in edits.input_pads:
        source = nodes[skip.source]
        consumer = (next(n for n in source.users if n.op == "call_module"
                         and n.target == skip.consumer)
                    if skip.is_projection else nodes[skip.consumer])
        with out.graph.inserting_before(consumer):
            amounts = tuple(-c for c in reversed(skip.crop) for _ in range(2))  # last side first
            pad = out.graph.call_function(F.pad, (source, amounts))
        consumer.replace_input_with(source, pad)
    for n, value in enumerate(edits.added_after):  # the network's own, settings too
        name = f"fxmerge_added_act_{n}"  # capture names its activations fxmerge_act_N
        out.add_submodule(name, copy.deepcopy(out.get_submodule(edits.activation)))
        _insert_after(out, nodes[value], name)
    for norm in edits.norms:  # fresh (weight 1, bias 0): it normalises another layer now
        template = out.get_submodule(norm.template)
        out.add_submodule(norm.name, nn.GroupNorm(math.gcd(template.num_groups, norm.channels),
                                                  norm.channels, template.eps, template.affine))
        _insert_after(out, nodes[norm.value], norm.name)
    for names in edits.bypassed:
        _bypass(out, [nodes[n] for n in names])
    out.graph.lint()
    return any(padded) or bool(edits.input_pads or edits.added_after or edits.norms
                               or edits.bypassed)


def _check_skips(gm: fx.GraphModule, space: MergeSpace) -> None:
    nodes = {n.name: n for n in gm.graph.nodes}
    for skip in space.skips:
        shapes = [ops.tensor_shape(a) for a in nodes[skip.add_node].args]
        if shapes[0] != shapes[1]:
            raise PlanError(f"after pruning, add '{skip.add_node}' meets shapes {shapes[0]} "
                            f"and {shapes[1]}: the skip could not be aligned")


class PrunePass(FxMergePass):
    """Apply `plan`, made on `space`, to the graph `space` was analysed from.

    requires: a canonical graph, the one `space` describes (or one this plan pruned
    already), and a plan that fits the space.
    call: a new graph with the plan recorded on it; a graph this plan pruned already is
    returned as it is. `modified` says whether the graph changed (an identity plan on a
    network without moved paddings changes nothing).
    ensures: every conv the plan removes is gone and every conv it keeps is called; every
    skip-add meets equal shapes."""

    def __init__(self, plan: Plan, space: MergeSpace) -> None:
        self.plan = plan
        self.space = space

    def done(self, graph_module: fx.GraphModule) -> bool:
        """Whether `graph_module` is the result of this plan already."""
        return graph_module.meta.get(PLAN_META) == self.plan

    def requires(self, graph_module: fx.GraphModule) -> None:
        require_graph_module(graph_module, "prune")
        check_canonical(graph_module)
        if self.done(graph_module):
            return
        if PLAN_META in graph_module.meta:
            raise PlanError("this graph was pruned with another plan already: prune the "
                            "traced model, not a pruned one")
        require_space_of(self.space, graph_module, "prune")
        self.plan.validate(self.space)

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        if self.done(graph_module):
            return PassResult(graph_module, False)
        out = copy.deepcopy(graph_module)
        changed = apply_edits(out, resolve(self.space, self.plan))
        out.delete_all_unused_submodules()
        out.recompile()
        propagate_shapes(out, example_inputs(graph_module))  # (and tags the families)
        out.meta[PLAN_META] = self.plan
        return PassResult(out, changed)

    def ensures(self, graph_module: fx.GraphModule) -> None:
        if graph_module.meta.get(MERGED_META):
            return  # given merged already: its blocks are one conv each
        _check_skips(graph_module, self.space)
        called = {n.target for n in graph_module.graph.nodes if n.op == "call_module"}
        left = set(self.plan.removed_convs) & called
        lost = set(self.plan.kept_convs) - called
        if left or lost:
            raise PlanError(f"prune left removed convs {sorted(left)} or lost kept convs "
                            f"{sorted(lost)}: please report this")


def prune(gm: fx.GraphModule, plan: Plan, space: MergeSpace | None = None) -> fx.GraphModule:
    """Apply `plan` to a traced model (see `fxmerge.trace`) and return a new, trainable
    GraphModule; `gm` is not changed. Pass the `space` the plan was made on to skip
    analysing `gm` again. Blocks whose `activation` is on where the network has none get
    the network's activation there (`add_activations`)."""
    require_graph_module(gm, "prune")
    space = space if space is not None else plan.space_of(gm)
    out = PrunePass(plan, space)(gm).graph_module
    log.info("pruned: %d convs removed, %d activations removed, %d added",
             len(plan.removed_convs), len(plan.removed_activations(space)),
             len(plan.added_activations(space)))
    return out

def prune_graph(gm: fx.GraphModule, space: MergeSpace, plan: Plan) -> PrunedGraph:
    """`plan` applied to `gm` (the graph `space` was analysed from) as `prune` does, but only
    to the nodes it changes, without copying, compiling or shape-checking a network: for
    scoring many plans (the output-agreement importance). `plan` is not validated: it must
    be one built from `space` (the importance tables' are)."""
    edits = resolve(space, plan, validate=False)
    out = PrunedGraph(gm, edited_nodes(gm, edits))
    apply_edits(out, edits)
    return out


def edited_nodes(gm: fx.GraphModule, edits: Edits) -> set[str]:
    """The nodes of `gm` that `edits` change (a conv whose padding moves, a value an
    activation or norm is added after, a skip's source and consumer, what is bypassed)."""
    padded = {name for name, _ in edits.paddings}
    projections = {p.consumer for p in edits.input_pads if p.is_projection}
    names = {n.name for n in gm.graph.nodes
             if n.op == "call_module" and n.target in padded | projections}
    names |= {p.source for p in edits.input_pads}
    names |= {p.consumer for p in edits.input_pads if not p.is_projection}
    names |= {*edits.added_after, *(norm.value for norm in edits.norms)}
    return names | {n for nodes in edits.bypassed for n in nodes}
