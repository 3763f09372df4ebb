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
from ..capture import check_canonical, ops, require_graph_module
from ..capture.affine import AffineReader
from ..capture.families.norm import refuse_training
from ..capture.registry import KIND_META, NodeKind, kind_of, tag
from ..capture.trace import example_inputs
from ..errors import MergeError
from ..plan import Plan
from ..space import MergeSpace
from .base import MERGED_META, PLAN_META, FxMergePass
from .prune import prune

log = logging.getLogger(__name__)



def _merge_block(gm: fx.GraphModule, convs: dict[str, fx.Node], kept: tuple[str, ...],
                 plan: Plan) -> None:
    first, last = convs[kept[0]], convs[kept[-1]]
    source = first.args[0]  # (a region first in its block: its largest conv reads its input)
    template = gm.get_submodule(kept[0])
    reader = AffineReader(gm, source, template.in_channels, plan.exclude, plan.max_kernel_bytes,
                          rank=template.weight.dim() - 2)
    try:
        reader.read(last, strict=True)  # every node on a path from the block input, or refused
        output = last
        while True:  # the tail: the last conv's norm, the rest of its region, adds whose skip
            # comes from the block
            user = ops.only_user(output)
            if user is None or kind_of(gm, user) not in (NodeKind.NORM, NodeKind.ADD,
                                                          NodeKind.SCALE):
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
        gm.add_submodule(name, algebra.condition_conv(matrix, dtype, device, affine.rank))
        with gm.graph.inserting_after(result):
            term = gm.graph.call_module(name, (nodes[key],))
        with gm.graph.inserting_after(term):
            result = gm.graph.call_function(operator.add, (result, term))
    for n in (merged, result):  # same value: later adds still see its shape
        n.meta = {k: v for k, v in output.meta.items() if k != KIND_META}
    output.replace_all_uses_with(result)
    for n in reversed([n for n in gm.graph.nodes if n in inside]):
        gm.graph.erase_node(n)


def _fold_remaining_norms(gm: fx.GraphModule) -> None:
    """Fold each BatchNorm that directly follows a conv outside the blocks (projections,
    excluded convs) into that conv, when neither is called from another place."""
    sites = ops.call_sites(gm)
    for node in list(gm.graph.nodes):
        conv_node = node.args[0] if kind_of(gm, node) is NodeKind.NORM else None
        if conv_node is None or kind_of(gm, conv_node) is not NodeKind.CONV \
                or len(conv_node.users) != 1:
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

    requires: a canonical graph made by `prune` (its plan recorded, or `plan` given), every
    BatchNorm in eval mode.
    call: a new graph; an already merged one is returned as it is (`modified` False).
    ensures: one conv per block, named after its first kept conv, and no other kept conv
    of a block left. With `verify`, `call` also checks that the merged network computes
    what the pruned one does on the graph's example inputs (a forward of each).

    `share_weights=True` lets the result keep the tensors of its input that merging does
    not replace (a classifier head, excluded convs) instead of cloning them: for an input
    nobody else holds, as in `transform`, where it saves their copy."""

    def __init__(self, plan: Plan | None = None, *, verify: bool = False,
                 share_weights: bool = False) -> None:
        self.plan = plan
        self.verify = verify
        self.share_weights = share_weights

    def plan_of(self, graph_module: fx.GraphModule) -> Plan:
        """The plan given, else the one `prune` recorded on the graph."""
        plan = self.plan or graph_module.meta.get(PLAN_META)
        if plan is None:
            raise MergeError("this graph carries no fxmerge plan: merge a graph made by "
                             "fxmerge.prune, or pass its plan: merge(pruned, plan)")
        return plan

    def requires(self, graph_module: fx.GraphModule) -> None:
        require_graph_module(graph_module, "merge")
        check_canonical(graph_module, shapes=False)
        if graph_module.meta.get(MERGED_META):
            return
        self.plan_of(graph_module)
        refuse_training(graph_module)

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        if graph_module.meta.get(MERGED_META):
            return PassResult(graph_module, False)
        out = merged_copy(graph_module, self.plan_of(graph_module), self.share_weights)
        if self.verify:
            check_equal(graph_module, out)
        return PassResult(out, True)

    def ensures(self, graph_module: fx.GraphModule) -> None:
        called = {n.target for n in graph_module.graph.nodes if n.op == "call_module"}
        for block in filter(lambda b: b.kept, graph_module.meta[PLAN_META].blocks):
            if block.kept[0] not in called or called & set(block.kept[1:]):
                raise MergeError(f"block {block.kept[0]}..{block.kept[-1]} did not become one "
                                 "conv: please report this")


def merged_copy(pruned: fx.GraphModule, plan: Plan, share_weights: bool = False
                ) -> fx.GraphModule:
    """A new GraphModule in eval mode: `pruned` with every block of `plan` merged.

    The copy never holds two copies of a merged block's weights: it starts sharing every
    tensor with `pruned`, the merge replaces the blocks' convs and norms by new ones, and
    what is still shared then is cloned (unless `share_weights`)."""
    given = {id(t): t for t in (*pruned.parameters(), *pruned.buffers())}
    out = copy.deepcopy(pruned, memo=dict(given)).eval()
    convs = {n.target: n for n in out.graph.nodes if n.op == "call_module"}
    with torch.no_grad():
        for block in filter(lambda b: b.kept, plan.blocks):
            missing = [name for name in block.kept if name not in convs]
            if missing:
                raise MergeError(f"kept conv(s) {missing} are not in this graph")
            _merge_block(out, convs, block.kept, plan)
        _fold_remaining_norms(out)
    out.graph.lint()
    out.delete_all_unused_submodules()
    if not share_weights:
        _unshare(out, given)
    out.recompile()
    tag(out)
    out.meta.update({PLAN_META: plan, MERGED_META: True})
    return out


def _unshare(gm: fx.GraphModule, given: dict[int, torch.Tensor]) -> None:
    """Clone every parameter and buffer of `gm` that is one of `given`'s tensors."""
    for module in gm.modules():
        for store in (module._parameters, module._buffers):
            for name, t in store.items():
                if t is not None and id(t) in given:
                    clone = t.detach().clone()
                    store[name] = (nn.Parameter(clone, t.requires_grad)
                                   if isinstance(t, nn.Parameter) else clone)


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


def merge(pruned: fx.GraphModule, plan: Plan | None = None) -> fx.GraphModule:
    """Merge every block of a pruned network (from `fxmerge.prune`, in eval mode) into one
    conv. Returns a new GraphModule in eval mode; `pruned` is not changed (a graph merged
    already is returned as it is).

    The plan is the one prune recorded on the graph; pass it again as `plan` when the graph
    lost it (torch.save / torch.load keep a GraphModule's code but not its metadata).
    """
    result = MergePass(plan)(pruned)
    if result.modified:
        log.info("merged %d blocks", len(result.graph_module.meta[PLAN_META].blocks))
    return result.graph_module


def transform(gm: fx.GraphModule, plan: Plan, space: MergeSpace | None = None
              ) -> fx.GraphModule:
    """`merge(prune(gm, plan, space).eval())`, for inference; `gm` is not changed. Pass
    the `space` the plan was made on to skip analysing `gm` again. The merged network
    keeps the pruned copy's tensors that it does not replace (`share_weights`: nobody
    else holds that copy), so `transform` holds `gm`, one copy and the merged kernels."""
    require_graph_module(gm, "transform")
    pruned = prune(gm, plan, space).eval()
    return MergePass(share_weights=True)(pruned).graph_module
