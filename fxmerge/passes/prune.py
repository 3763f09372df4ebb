"""The prune pass: apply a plan to a traced model, keeping every layer separate and trainable.

Removed activations and convs become identity, each block's padding moves to its first kept
conv (so that merging it later is exact), and skips inside a block are cropped or padded to
meet the larger feature maps. Fine-tune the result, then call `fxmerge.merge`.

The edits never change a module in place (a conv whose padding moves is replaced by a copy),
so `prune_graph` can apply them to a graph whose modules stay the original's.
"""

from __future__ import annotations

import copy
import logging
import math

import torch.nn.functional as F
from torch import fx, nn

from ..capture import ops
from ..capture.trace import example_inputs, propagate_shapes
from ..errors import PlanError, SpaceError
from ..plan import Plan
from ..space import MergeSpace, analyze

log = logging.getLogger(__name__)

PLAN_KEY = "fxmerge_plan"


class PrunedGraph:
    """A plan applied without copying modules: `graph`, the original's nodes copied and
    edited, and `modules`, the modules the edits replaced or added (by target); every other
    target is `base`'s. Scoring many plans this way is cheap; never train it."""

    def __init__(self, base: fx.GraphModule) -> None:
        self.base = base
        self.graph = copy.deepcopy(base.graph)
        self.modules: dict[str, nn.Module] = {}

    def get_submodule(self, target: str) -> nn.Module:
        return self.modules[target] if target in self.modules else self.base.get_submodule(target)

    def add_submodule(self, target: str, module: nn.Module) -> None:
        self.modules[target] = module


Editable = fx.GraphModule | PrunedGraph  # what the edits below act on


def block_borders(space: MergeSpace, i: int, j: int, kept: set[str]) -> dict[int, int]:
    """Border width at each position of block `(i, j)` once its padding sits on its first
    kept conv: the extra pixels each side that later convs of the block will consume."""
    border = {j: 0}
    for p in range(j, i, -1):
        c = space.conv(p)
        border[p - 1] = border[p] * c.stride + c.padding if c.name in kept else border[p]
    return border


def _move_padding(gm: Editable, space: MergeSpace, plan: Plan) -> dict:
    """Set paddings; return, per skip inside a block, the crop (>0) or pad (<0) of its source."""
    kept = set(plan.kept_convs)
    skip_crop = {}
    for (i, j), block in zip(plan.spans(space), plan.blocks):
        if not block.kept:
            continue
        border = block_borders(space, i, j, kept)
        first = space.conv(block.kept[0]).index
        for name in block.kept:
            p = space.conv(name).index
            _set_padding(gm, name, (border[p - 1],) * 2 if p == first else (0, 0))
        physical = {p: (0 if p < first else border[p]) for p in border}
        for skip in space.skips:
            if i <= skip.source and skip.target <= j:
                stride = gm.get_submodule(skip.projection).stride[0] if skip.projection else 1
                crop = physical[skip.source] - stride * physical[skip.target]
                if crop:
                    skip_crop[skip] = crop
    return skip_crop


def _set_padding(gm: Editable, name: str, padding: tuple[int, int]) -> None:
    """Give conv `name` a new padding on a shallow copy, never in place. The copy shares
    the conv's parameters (`copy.copy` refuses parametrized modules, so copy the dict)."""
    conv = gm.get_submodule(name)
    if tuple(conv.padding) != padding:
        new = conv.__class__.__new__(conv.__class__)
        new.__dict__ = {**conv.__dict__, "padding": padding}
        gm.add_submodule(name, new)


def _insert_skip_pads(gm: Editable, skip_crop: dict) -> None:
    nodes = {n.name: n for n in gm.graph.nodes}
    for skip, crop in skip_crop.items():
        source = nodes[skip.source_node]
        if skip.projection:
            consumer = next(n for n in source.users if n.op == "call_module"
                            and n.target == skip.projection)
        else:
            consumer = nodes[skip.add_node]
        with gm.graph.inserting_before(consumer):
            pad = gm.graph.call_function(F.pad, (source, (-crop,) * 4))
        consumer.replace_input_with(source, pad)


def _add_activations(gm: Editable, space: MergeSpace, plan: Plan) -> None:
    """The network's own activation after each block the plan gives one where the network
    has none (MobileNetV2's projections; docs/method.md §4)."""
    nodes = {n.name: n for n in gm.graph.nodes}
    kind = space.added_activation
    template = next(gm.get_submodule(nodes[u.act].target)  # the network's own, settings too
                    for c, u in zip(space.convs, space.units) if c.activation == kind)
    for n_added, conv in enumerate(plan.added_activations(space)):
        value = nodes[space.units[space.conv(conv).index - 1].output]
        name = f"fxmerge_added_act_{n_added}"  # capture names its activations fxmerge_act_N
        gm.add_submodule(name, copy.deepcopy(template))
        with gm.graph.inserting_after(value):
            act = gm.graph.call_module(name, (value,))
        value.replace_all_uses_with(act, delete_user_cb=lambda user, new=act: user is not new)


def _relocate_norms(gm: Editable, space: MergeSpace, plan: Plan) -> None:
    """A block whose removed activations had a relocatable norm (GroupNorm) before them gets
    one norm of that kind after its last conv, before the skip add. It is made fresh (weight
    1, bias 0), as the authors do: it now normalises another layer's output, so the removed
    norm's scale and shift mean nothing there; fine-tuning trains it."""
    nodes = {n.name: n for n in gm.graph.nodes}
    inner = set(plan.removed_activations(space))
    for (i, j) in plan.spans(space):
        removed = [space.units[p - 1].rnorm for p in range(i + 1, j + 1)
                   if space.conv(p).name in inner and space.units[p - 1].rnorm]
        if not removed:
            continue
        template = gm.get_submodule(nodes[removed[-1]].target)
        channels = space.conv(j).out_channels
        name = f"{space.conv(j).name}_norm"
        gm.add_submodule(name, nn.GroupNorm(math.gcd(template.num_groups, channels), channels,
                                            template.eps, template.affine))
        value = nodes[space.units[j - 1].pre_skip]
        with gm.graph.inserting_after(value):
            norm = gm.graph.call_module(name, (value,))
        value.replace_all_uses_with(norm, delete_user_cb=lambda user, new=norm: user is not new)


def _bypass(gm: Editable, first: fx.Node, last: fx.Node) -> None:
    """Replace the chain `first .. last` by `first`'s input and erase it."""
    last.replace_all_uses_with(first.args[0])
    node = last
    while True:
        prev = node.args[0] if node is not first else None
        gm.graph.erase_node(node)
        if prev is None:
            break
        node = prev


def _check_skips(gm: fx.GraphModule, space: MergeSpace) -> None:
    nodes = {n.name: n for n in gm.graph.nodes}
    for skip in space.skips:
        shapes = [ops.tensor_shape(a) for a in nodes[skip.add_node].args]
        if shapes[0] != shapes[1]:
            raise PlanError(f"after pruning, add '{skip.add_node}' meets shapes {shapes[0]} "
                            f"and {shapes[1]}: the skip could not be aligned")


def _apply(out: Editable, space: MergeSpace, plan: Plan) -> None:
    """Edit `out`, a copy of `space.gm`, by `plan` (modules are replaced, never changed)."""
    nodes = {n.name: n for n in out.graph.nodes}
    skip_crop = _move_padding(out, space, plan)
    _insert_skip_pads(out, skip_crop)
    if plan.added_activations(space):
        _add_activations(out, space, plan)
    _relocate_norms(out, space, plan)
    for name in plan.removed_activations(space):
        unit = space.units[space.conv(name).index - 1]
        _bypass(out, nodes[unit.rnorm or unit.act], nodes[unit.act])
    for name in plan.removed_convs:
        unit = space.units[space.conv(name).index - 1]
        _bypass(out, nodes[unit.conv], nodes[unit.norm or unit.conv])
    out.graph.lint()


def prune(gm: fx.GraphModule, plan: Plan) -> fx.GraphModule:
    """Apply `plan` to a traced model (see `fxmerge.trace`) and return a new, trainable
    GraphModule; `gm` is not changed. Blocks whose `activation` is on where the network
    has none get the network's activation there (`add_activations`)."""
    if not isinstance(gm, fx.GraphModule):
        raise PlanError("prune needs a GraphModule: trace the model with fxmerge.trace first")
    try:
        space = analyze(gm, stride_rule=plan.stride_rule, exclude=plan.exclude,
                        add_activations=plan.add_activations)
    except SpaceError as exc:
        raise PlanError(f"plan was made for another graph: {exc}") from None
    plan.validate(space)
    out = copy.deepcopy(gm)
    _apply(out, space, plan)
    out.delete_all_unused_submodules()
    out.recompile()
    propagate_shapes(out, example_inputs(gm))
    _check_skips(out, space)
    out.meta[PLAN_KEY] = plan
    log.info("pruned: %d convs removed, %d activations removed, %d added",
             len(plan.removed_convs), len(plan.removed_activations(space)),
             len(plan.added_activations(space)))
    return out


def prune_graph(space: MergeSpace, plan: Plan) -> PrunedGraph:
    """`plan` applied to `space.gm` as `prune` does, but without copying, compiling or
    shape-checking a network: for scoring many plans (the output-agreement importance)."""
    plan.validate(space)
    out = PrunedGraph(space.gm)
    _apply(out, space, plan)
    return out
