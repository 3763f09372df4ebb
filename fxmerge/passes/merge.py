"""The merge pass: one convolution per block, exactly equal to the pruned network.

Each block is read as an affine map from its input: convs are composed, BatchNorms folded,
skip-additions whose whole branch lies inside the block fused (identity or projection
kernel), and the crops/pads the prune pass put on skips absorbed. Anything else inside a
block is refused: a wrong merge is worse than no merge.
"""

from __future__ import annotations

import copy
import logging
import operator

import torch
from torch import fx, nn
from torch.fx.passes.infra.pass_base import PassResult
from torch.utils._pytree import tree_leaves

from .. import algebra
from ..capture import check_canonical, ops
from ..capture.affine import AffineReader
from ..capture.trace import example_inputs
from ..errors import MergeError
from ..plan import Plan
from ..space import MergeSpace
from .base import FxMergePass
from .prune import PLAN_META, prune

log = logging.getLogger(__name__)

MERGED_META = "fxmerge_merged"


def _merge_block(gm: fx.GraphModule, convs: dict[str, fx.Node], kept: tuple[str, ...],
                 plan: Plan) -> None:
    first, last = convs[kept[0]], convs[kept[-1]]
    source = first.args[0]  # (a region first in its block: its largest conv reads its input)
    template = gm.get_submodule(kept[0])
    reader = AffineReader(gm, source, template.in_channels, plan.exclude, plan.max_kernel_bytes)
    try:
        reader.read(last, strict=True)  # every node on a path from the block input, or refused
        output = last
        while True:  # the tail: the last conv's norm, the rest of its region, adds whose skip
            # comes from the block
            user = ops.only_user(output)
            if user is None or not (ops.is_norm(gm, user) or ops.is_add(user)
                                    or ops.channel_scale(gm, user) is not None):
                break
            if reader.read(user, strict=False) is None:
                break
            output = user
    except MergeError as exc:
        raise MergeError(f"block {kept[0]}..{kept[-1]}: {exc}") from None
    region = reader.region
    inside = set(region)
    for n in region:
        outside = [u.name for u in n.users if u not in inside and n is not output]
        if outside:
            raise MergeError(f"value '{n.name}' inside the block of '{kept[0]}' is also used by "
                             f"{outside}; it cannot be merged away")
    affine = reader.affine[output]
    dtype, device = template.weight.dtype, template.weight.device
    gm.add_submodule(kept[0], algebra.to_conv(affine, dtype, device))
    with gm.graph.inserting_after(output):
        merged = gm.graph.call_module(kept[0], (source,))
    result = merged
    nodes = {n.name: n for n in gm.graph.nodes}
    for n, (key, matrix) in enumerate(affine.conditions):  # each added vector, carried through
        name = f"{kept[0]}_condition{n}"
        gm.add_submodule(name, algebra.condition_conv(matrix, dtype, device))
        with gm.graph.inserting_after(result):
            term = gm.graph.call_module(name, (nodes[key],))
        with gm.graph.inserting_after(term):
            result = gm.graph.call_function(operator.add, (result, term))
    for n in (merged, result):
        n.meta = dict(output.meta)  # same value: later adds still see its shape
    output.replace_all_uses_with(result)
    for n in reversed([n for n in gm.graph.nodes if n in inside]):
        gm.graph.erase_node(n)


def _fold_remaining_norms(gm: fx.GraphModule) -> None:
    """Fold each BatchNorm that directly follows a conv outside the blocks (projections,
    excluded convs) into that conv, when neither is called from another place."""
    sites = ops.call_sites(gm)
    for node in list(gm.graph.nodes):
        conv_node = node.args[0] if ops.is_norm(gm, node) else None
        if conv_node is None or not ops.is_conv(gm, conv_node) or len(conv_node.users) != 1:
            continue
        if sites[conv_node.target] > 1 or sites[node.target] > 1:
            continue
        conv = gm.get_submodule(conv_node.target)
        if ops.conv_refusal(conv) is not None:
            continue
        folded = algebra.fold_bn(algebra.from_conv(conv), gm.get_submodule(node.target))
        gm.add_submodule(conv_node.target,
                         algebra.to_conv(folded, conv.weight.dtype, conv.weight.device))
        node.replace_all_uses_with(conv_node)
        gm.graph.erase_node(node)


class MergePass(FxMergePass):
    """Merge every block of a pruned network into one conv.

    requires: a canonical graph made by `prune` (its plan recorded, or `plan` given), not
    merged already, every BatchNorm in eval mode.
    ensures: one conv per block, named after its first kept conv, and no other kept conv
    of a block left; with `verify`, the merged network computes what the pruned one does
    on the graph's example inputs (a forward of each).

    `in_place=True` merges the given graph itself instead of a copy (one model's memory
    less): for a pruned graph nobody else holds, as in `transform`."""

    def __init__(self, plan: Plan | None = None, *, verify: bool = False,
                 in_place: bool = False) -> None:
        if verify and in_place:
            raise MergeError("MergePass(verify=True) compares the result with the graph it "
                             "was given, which in_place=True changes")
        self.plan = plan
        self.verify = verify
        self.in_place = in_place
        self.pruned: fx.GraphModule | None = None

    def requires(self, graph_module: fx.GraphModule) -> None:
        check_canonical(graph_module, shapes=False)
        self.plan = self.plan or getattr(graph_module, "meta", {}).get(PLAN_META)
        if self.plan is None:
            raise MergeError("this graph carries no fxmerge plan: merge a graph made by "
                             "fxmerge.prune, or pass its plan: merge(pruned, plan)")
        if graph_module.meta.get(MERGED_META):
            raise MergeError("this graph is already merged")
        for name, m in graph_module.named_modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training:
                raise MergeError(f"BatchNorm '{name}' is in training mode: call .eval() on the "
                                 "pruned model before merging")

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        self.pruned = graph_module
        out = (graph_module if self.in_place else copy.deepcopy(graph_module)).eval()
        convs = {n.target: n for n in out.graph.nodes if n.op == "call_module"}
        with torch.no_grad():
            for block in filter(lambda b: b.kept, self.plan.blocks):
                missing = [name for name in block.kept if name not in convs]
                if missing:
                    raise MergeError(f"kept conv(s) {missing} are not in this graph")
                _merge_block(out, convs, block.kept, self.plan)
            _fold_remaining_norms(out)
        out.graph.lint()
        out.delete_all_unused_submodules()
        out.recompile()
        out.meta[MERGED_META] = True
        return PassResult(out, True)

    def ensures(self, graph_module: fx.GraphModule) -> None:
        called = {n.target for n in graph_module.graph.nodes if n.op == "call_module"}
        for block in filter(lambda b: b.kept, self.plan.blocks):
            if block.kept[0] not in called or called & set(block.kept[1:]):
                raise MergeError(f"block {block.kept[0]}..{block.kept[-1]} did not become one "
                                 "conv: please report this")
        if self.verify:
            check_equal(self.pruned, graph_module)


def check_equal(want: fx.GraphModule, got: fx.GraphModule, what: str = "merged",
                against: str = "pruned") -> None:
    """`MergeError` unless both networks agree on `want`'s example inputs."""
    inputs = example_inputs(want)
    with torch.no_grad():
        a_out, b_out = (tree_leaves(net(*inputs)) for net in (want, got))
    for a, b in zip(a_out, b_out):
        scale = float(a.abs().max()) if a.numel() else 0.0
        if a.shape != b.shape or not torch.allclose(a.double(), b.double(), rtol=1e-4,
                                                     atol=1e-5 * max(1.0, scale)):
            raise MergeError(f"the {what} network differs from the {against} one on the "
                             "example inputs: please report this")


def merge(pruned: fx.GraphModule, plan: Plan | None = None, *, in_place: bool = False
          ) -> fx.GraphModule:
    """Merge every block of a pruned network (from `fxmerge.prune`, in eval mode) into one
    conv. Returns a new GraphModule in eval mode; `pruned` is not changed.

    The plan is the one prune recorded on the graph; pass it again as `plan` when the graph
    lost it (torch.save / torch.load keep a GraphModule's code but not its metadata).
    `in_place=True` merges `pruned` itself (see `MergePass`).
    """
    step = MergePass(plan, in_place=in_place)
    out = step(pruned).graph_module
    log.info("merged %d blocks", len(step.plan.blocks))
    return out


def transform(gm: fx.GraphModule, plan: Plan, space: MergeSpace | None = None
              ) -> fx.GraphModule:
    """`merge(prune(gm, plan, space))`, for inference: the pruned network is put in eval
    mode and merged in place (nobody else holds it), so `transform` holds `gm` and one
    copy. Pass the `space` the plan was made on to skip analysing `gm` again."""
    return merge(prune(gm, plan, space).eval(), in_place=True)
