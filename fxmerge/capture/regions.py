"""Regions of parallel linear branches (structural re-parameterisation, found in the graph).

A region is an add, or a tree of adds, whose operands are each computed from one common
input by a branch of the form `[conv] [an affine map per channel: a BatchNorm, a scale]`, or are that input
itself; its convs share a stride and are centred on one grid. Such a sum is one conv
(`fxmerge.algebra.add`): RepVGG's 3x3 + 1x1 + BN identity, MobileOne's k branches plus scale
and identity, ACNet's 3x3 + 1x3 + 3x1, RepViT's depthwise 3x3 + 1x1 + input. The rules are
in docs/method.md §4b; no architecture is named here.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from torch import fx, nn

from .. import algebra
from . import ops
from .affine import AffineReader
from .registry import NodeKind, data_input, kind_of


@dataclass(frozen=True)
class Branch:
    """One operand of a region: the node of it that reads the region's input, and its conv
    (module target and own padding, rows and columns), if it has one."""

    reader: str
    conv: str | None = None
    padding: tuple[int, ...] = (0, 0)  # one per spatial side


@dataclass(frozen=True)
class Region:
    """A sum of linear branches of one input: one conv, named after its largest conv."""

    name: str  # the module target of its largest conv (the collapsed conv takes its name)
    input: str
    output: str  # the root add
    nodes: tuple[str, ...]  # every node of the region, in graph order, the output last
    branches: tuple[Branch, ...]
    padding: tuple[int, ...]  # the collapsed conv's, per axis: the largest of its branches'


def _branch_conv(gm: fx.GraphModule, node: fx.Node, exclude: Iterable[str],
                 sites: dict[str, int]) -> bool:
    """Whether `node` calls a conv that may be one branch of a region."""
    module = ops.module_of(gm, node)
    return (kind_of(gm, node) is NodeKind.CONV and sites[node.target] == 1 and len(node.users) == 1
            and not ops.excluded(node.target, exclude) and ops.conv_refusal(module) is None)


def _readings(gm: fx.GraphModule, t: fx.Node, exclude: Iterable[str], sites: dict[str, int]
              ) -> list[tuple[fx.Node, tuple[fx.Node, ...], fx.Node | None]]:
    """Each way to read operand `t` as a linear branch: `(input, its nodes, its conv)`,
    the input itself first."""
    out: list[tuple[fx.Node, tuple[fx.Node, ...], fx.Node | None]] = [(t, (), None)]
    if len(t.users) != 1:
        return out
    chain, cur = [], t
    if kind_of(gm, cur) in (NodeKind.NORM, NodeKind.SCALE):  # an affine map per channel
        chain.append(cur)
        cur = data_input(cur)
        out.append((cur, tuple(chain), None))
    if _branch_conv(gm, cur, exclude, sites):
        chain.append(cur)
        out.append((cur.args[0], tuple(chain), cur))
    return out


def _reach(conv: nn.Module) -> tuple[int, ...]:
    """Per axis, how many more input pixels the conv's field spans than it pads: equal for
    every branch when they are centred on one grid."""
    return tuple((k - 1) * d - 2 * p
                 for k, d, p in zip(conv.kernel_size, conv.dilation, conv.padding))


def _region_at(gm: fx.GraphModule, root: fx.Node, exclude: Iterable[str],
               sites: dict[str, int], order: dict[fx.Node, int]) -> Region | None:
    """The region whose output is `root`, or None: its tree of adds, each operand read as a
    branch of the one input all can be read from (the earliest such node)."""
    adds, operands, stack = [root], [], [root]
    while stack:
        for a in stack.pop().args:
            if isinstance(a, fx.Node) and kind_of(gm, a) is NodeKind.ADD and len(a.users) == 1:
                adds.append(a)
                stack.append(a)
            else:
                operands.append(a)
    readings = [_readings(gm, t, exclude, sites) for t in operands]
    common = set.intersection(*({x for x, _, _ in r} for r in readings))
    if len(operands) < 2 or not common:
        return None
    x = min(common, key=order.__getitem__)  # the earliest: the most read as branches
    chosen = [next(r for r in rs if r[0] is x) for rs in readings]
    interior = [n for _, chain, _ in chosen for n in chain]
    convs = [gm.get_submodule(c.target) for _, _, c in chosen if c is not None]
    plain = sum(not chain for _, chain, _ in chosen)  # operands that are the input itself
    if not convs or len(set(interior)) != len(interior) or x in interior or plain > 1:
        return None
    rank = len(convs[0].kernel_size)
    bare = {(1,) * rank} if len(convs) < len(chosen) else set()  # no conv: stride 1
    strides = {tuple(c.stride) for c in convs} | bare
    reaches = {_reach(c) for c in convs} | {(0,) * rank for _ in bare}
    if len(strides) != 1 or len(reaches) != 1:  # one stride, one grid
        return None
    branches = tuple(
        Branch((chain[-1] if chain else _reader_of(x, adds)).name,
               conv.target if conv is not None else None,
               tuple(gm.get_submodule(conv.target).padding) if conv is not None
               else (0,) * len(convs[0].padding))
        for _, chain, conv in chosen)
    largest = max((c for _, _, c in chosen if c is not None),
                  key=lambda c: (gm.get_submodule(c.target).weight[0, 0].numel(), -order[c]))
    nodes = sorted(set(interior) | set(adds), key=order.__getitem__)
    pads = [tuple(c.padding) for c in convs] + [(0,) * rank] * len(bare)
    padding = tuple(map(max, zip(*pads)))
    return Region(largest.target, x.name, root.name, tuple(n.name for n in nodes), branches,
                  padding)


def _reader_of(x: fx.Node, adds: list[fx.Node]) -> fx.Node:
    """The add of the tree that reads `x` itself."""
    return next(a for a in adds if x in a.args)


def find_regions(gm: fx.GraphModule, exclude: Iterable[str] = ()) -> list[Region]:
    """Every region of a canonical graph, in graph order; each node is in at most one (a
    tree of adds is taken whole where it can be, else its sub-trees are tried)."""
    nodes = list(gm.graph.nodes)
    order = {n: i for i, n in enumerate(nodes)}
    sites = ops.call_sites(gm)
    exclude = tuple(exclude)
    found, claimed = [], set()
    for root in reversed(nodes):
        if root.name in claimed or kind_of(gm, root) is not NodeKind.ADD:
            continue
        region = _region_at(gm, root, exclude, sites, order)
        if region is not None:
            found.append(region)
            claimed.update(region.nodes)
    return found[::-1]


def collapse(gm: fx.GraphModule, region: Region) -> algebra.AffineConv:
    """The one conv (float64) that computes `region`'s output from its input."""
    nodes = {n.name: n for n in gm.graph.nodes}
    source = nodes[region.input]
    shape = ops.tensor_shape(source)
    reader = AffineReader(gm, source, shape[1], rank=len(shape) - 2)
    return reader.read(nodes[region.output], strict=True)
