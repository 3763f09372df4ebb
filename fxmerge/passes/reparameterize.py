"""The re-parameterisation pass: every region of parallel linear branches becomes one conv.

A region (`fxmerge.capture.regions`) is a sum of branches of one input, each a conv, a
conv + BatchNorm, a BatchNorm, a per-channel scale or the input itself; it collapses into
one conv with one bias (docs/method.md §4b), and the BatchNorm right after it, if any, is
folded in too. Found from the graph alone: RepVGG, MobileOne, ACNet and RepConv blocks
alike, no per-architecture code. Everything else is left as it is.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable

import torch
from torch import fx
from torch.fx.passes.infra.pass_base import PassResult

from .. import algebra
from ..capture import check_canonical, ops, require_graph_module
from ..capture.affine import AffineReader
from ..capture.families.norm import refuse_training
from ..capture.regions import Region, find_regions
from ..capture.registry import KIND_META, NodeKind, kind_of, tag
from ..errors import MergeError
from .base import REPARAMETERIZED_META, FxMergePass
from .merge import check_equal

log = logging.getLogger(__name__)



def _collapse(gm: fx.GraphModule, region: Region, nodes: dict[str, fx.Node]) -> None:
    """Replace `region` (and a BatchNorm right after it) by one conv named `region.name`.
    `nodes` maps the given graph's node names to the nodes now computing their values (a
    region's input may be the output of one collapsed before it); it is kept up to date."""
    source, output = nodes[region.input], nodes[region.output]
    template = gm.get_submodule(region.name)
    shape = ops.tensor_shape(source)
    reader = AffineReader(gm, source, shape[1], rank=len(shape) - 2)
    reader.read(output, strict=True)
    after = ops.only_user(output)
    if after is not None and kind_of(gm, after) is NodeKind.NORM \
            and not ops.module_of(gm, after).training:
        output = after
        reader.read(output, strict=True)
    affine = reader.affine[output]
    gm.add_submodule(region.name, algebra.to_conv(affine, template.weight.dtype,
                                                  template.weight.device))
    with gm.graph.inserting_after(output):
        conv = gm.graph.call_module(region.name, (source,))
    conv.meta = {k: v for k, v in output.meta.items() if k != KIND_META}
    output.replace_all_uses_with(conv)
    nodes[region.output] = nodes[output.name] = conv
    for n in reversed(reader.region):
        gm.graph.erase_node(n)


class ReparameterizePass(FxMergePass):
    """Collapse every region of parallel linear branches into one conv.

    requires: a canonical graph (`fxmerge.trace`), every BatchNorm of a region in eval mode.
    call: a new graph, recorded as re-parameterised; where there is no region, the graph
    given, untouched (`modified` False). With `verify` (the default), it also checks that the result computes what the given
    graph does on its example inputs.
    ensures: no region is left."""

    def __init__(self, *, exclude: Iterable[str] = (), verify: bool = True) -> None:
        self.exclude = tuple(exclude)
        self.verify = verify

    def requires(self, graph_module: fx.GraphModule) -> None:
        require_graph_module(graph_module, "reparameterize")
        check_canonical(graph_module)

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        regions = find_regions(graph_module, self.exclude)  # once: the BatchNorm check too
        if not regions:
            return PassResult(graph_module, False)
        inside = {name for region in regions for name in region.nodes}
        refuse_training(graph_module, [n for n in graph_module.graph.nodes if n.name in inside])
        out = copy.deepcopy(graph_module)
        with torch.no_grad():
            nodes = {n.name: n for n in out.graph.nodes}
            for region in regions:
                _collapse(out, region, nodes)
        out.graph.lint()
        out.delete_all_unused_submodules()
        out.recompile()
        tag(out)
        out.meta[REPARAMETERIZED_META] = graph_module.meta.get(REPARAMETERIZED_META, 0) + len(
            regions)
        if self.verify:
            check_equal(graph_module, out, "re-parameterised", "given")
        return PassResult(out, True)

    def ensures(self, graph_module: fx.GraphModule) -> None:
        left = find_regions(graph_module, self.exclude)
        if left:
            raise MergeError(f"region at '{left[0].output}' was not collapsed: please report "
                             "this")


def reparameterize(gm: fx.GraphModule, *, exclude: Iterable[str] = (), verify: bool = True
                   ) -> fx.GraphModule:
    """`gm` (from `fxmerge.trace`, in eval mode) with every region of parallel linear
    branches collapsed into one conv, as the re-parameterisation papers deploy their
    networks; `gm` is not changed (with no region the result shares its modules). Convs
    matching `exclude` (names or glob patterns) are in no region.
    `verify` compares both networks on the graph's example inputs."""
    result = ReparameterizePass(exclude=exclude, verify=verify)(gm)
    out = result.graph_module
    if not result.modified:  # no region: the same modules, a copy of the graph, recorded
        graph = fx.Graph()
        graph.output(graph.graph_copy(gm.graph, {}))
        graph._codegen = gm.graph._codegen  # (the calling convention: pytree inputs)
        out = fx.GraphModule(gm, graph)
        out.meta.update({**gm.meta, REPARAMETERIZED_META: gm.meta.get(REPARAMETERIZED_META, 0)})
    log.info("re-parameterised: regions collapsed into one conv each (%d in all)",
             out.meta[REPARAMETERIZED_META])
    return out
