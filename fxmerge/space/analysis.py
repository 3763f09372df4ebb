"""`analyze`: the merge space of a canonical graph, read from the graph alone.

Each searchable conv (or region of parallel branches) becomes one position with its unit
(conv -> [norm] -> [condition] -> [skip add] -> [group norm -> activation]); skip-adds
whose branch is `[pad] [1x1 conv [norm]] [pad]` of an earlier value become `Skip`s; a
value read by anything outside the chain is a break. Node kinds come from the op families
(`fxmerge.capture.families`).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from torch import Tensor, fx

from ..capture import capture_path, check_canonical, example_inputs, ops, require_graph_module
from ..capture.families.activation import activation_kind
from ..capture.regions import Region, collapse, find_regions
from ..capture.registry import NodeKind, kind_of, label_of, op_name
from ..errors import ArgumentError, SpaceError
from ..sides import largest
from .records import MAX_KERNEL_BYTES, Conv, GraphNode, Skip, StrideRule, Unit
from .space import MergeSpace


@dataclass(frozen=True)
class _SkipBranch:
    source: fx.Node
    main: fx.Node
    branch: tuple[fx.Node, ...]


def _space_kind(gm: fx.GraphModule, n: fx.Node, in_region: bool) -> NodeKind:
    """What the search makes of a node: its family's kind, except that a per-channel scale
    outside a region, a GroupNorm and a conditioning add outside the units the analysis
    builds are met only as they are, like any barrier (reports count them so)."""
    kind = kind_of(gm, n)
    if kind is NodeKind.SCALE and not in_region:
        return NodeKind.BARRIER
    if kind in (NodeKind.GROUP_NORM, NodeKind.CONDITION):
        return NodeKind.BARRIER
    return kind


def _graph_nodes(gm: fx.GraphModule, in_regions: set[str]) -> list[GraphNode]:
    return [GraphNode(n.name, n.op, str(n.target), _space_kind(gm, n, n.name in in_regions),
                      tuple(a.name for a in n.all_input_nodes), op_name(gm, n),
                      label_of(gm, n) if n.op not in ("placeholder", "output", "get_attr")
                      else "")
            for n in gm.graph.nodes]


def left_out_convs(gm: fx.GraphModule, exclude: Iterable[str]) -> dict[str, str]:
    """Each conv module that is not searched, with the reason."""
    sites = ops.call_sites(gm)
    reasons = {}
    for name, m in gm.named_modules():
        if not isinstance(m, ops.CONVS) or name not in sites:
            continue
        if ops.excluded(name, exclude):
            reasons[name] = "excluded"
        elif ops.has_hooks(m):
            reasons[name] = "has forward hooks or pre-hooks (a merge would drop them)"
        elif sites[name] > 1:
            reasons[name] = f"called from {sites[name]} places (shared weights)"
        elif ops.conv_refusal(m) is not None:
            reasons[name] = ops.conv_refusal(m)
    return reasons


def _searchable(gm: fx.GraphModule, node: fx.Node, left_out: Mapping[str, str]) -> bool:
    return kind_of(gm, node) is NodeKind.CONV and node.target not in left_out


def _strip_skip_branch(gm: fx.GraphModule, node: fx.Node, left_out: Mapping[str, str]):
    """Walk back over `[pad] [conv 1x1 [norm]] [pad]` that only feed the add."""
    branch: list[fx.Node] = []
    cur = node

    def strip_pads() -> None:
        nonlocal cur
        while ops.pad_amounts(cur) is not None and len(cur.users) == 1:
            branch.append(cur)
            cur = cur.args[0]

    strip_pads()
    if kind_of(gm, cur) is NodeKind.NORM and len(cur.users) == 1:
        branch.append(cur)
        cur = cur.args[0]
        if kind_of(gm, cur) is not NodeKind.CONV:
            return None
    if kind_of(gm, cur) is NodeKind.CONV and len(cur.users) == 1:
        conv = ops.module_of(gm, cur)
        if not (_searchable(gm, cur, left_out) and set(conv.kernel_size) == {1}
                and not any(conv.padding) and len(set(conv.stride)) == 1
                and conv.groups == 1):
            return None
        branch.append(cur)
        cur = cur.args[0]
        strip_pads()
    return cur, tuple(branch)


def _find_skip_adds(gm: fx.GraphModule, left_out: Mapping[str, str], in_regions: set[str]
                    ) -> dict[fx.Node, _SkipBranch]:
    """Adds whose one operand is a (projected) earlier value on the other operand's path
    (a region's adds are its own)."""
    found = {}
    for node in gm.graph.nodes:
        if kind_of(gm, node) is not NodeKind.ADD or node.name in in_regions:
            continue
        a, b = node.args
        candidates = []
        for main, skip in ((a, b), (b, a)):
            stripped = _strip_skip_branch(gm, skip, left_out)
            if stripped and stripped[0] in ops.ancestors(main):
                candidates.append(_SkipBranch(stripped[0], main, stripped[1]))
        if candidates:
            found[node] = min(candidates, key=lambda c: len(c.branch))
    return found


def _build_unit(gm: fx.GraphModule, conv: fx.Node, adds: dict[fx.Node, _SkipBranch],
                region: Region | None) -> Unit:
    cur = conv
    norm = cond = add = rnorm = act = None
    nxt = ops.only_user(cur)
    if nxt is not None and kind_of(gm, nxt) is NodeKind.NORM:
        norm = cur = nxt
        nxt = ops.only_user(cur)
    pair = ops.conditioning_add(nxt) if nxt is not None and kind_of(gm, nxt) is \
        NodeKind.CONDITION else None
    if pair is not None and pair[0] is cur and conv not in ops.ancestors(pair[1]):
        cond = cur = nxt
        nxt = ops.only_user(cur)
    if nxt is not None and nxt in adds and adds[nxt].main is cur:
        add = cur = nxt
        nxt = ops.only_user(cur)
    if nxt is not None and kind_of(gm, nxt) is NodeKind.GROUP_NORM:
        after = ops.only_user(nxt)
        if after is not None and kind_of(gm, after) is NodeKind.ACTIVATION:
            rnorm, act = nxt, after
    elif nxt is not None and kind_of(gm, nxt) is NodeKind.ACTIVATION:
        act = nxt
    name = lambda n: n.name if n is not None else None
    return Unit(region.input if region else conv.args[0].name, conv.name, name(norm),
                name(add), name(act), name(cond), name(rnorm), region.nodes if region else ())


def analyze(
    gm: fx.GraphModule, *, stride_rule: str | StrideRule = StrideRule.PAPER,
    exclude: Iterable[str] = (),
    add_activations: bool | None = None, max_kernel_bytes: int = MAX_KERNEL_BYTES,
) -> MergeSpace:
    """Derive the LayerMerge search space of a traced graph (see `fxmerge.trace`).

    `stride_rule="paper"` lets a strided conv be followed inside a block only by one 1x1
    conv; `"exact"` allows any later kernel (merged by dilating it). `exclude` holds module
    names or glob patterns (`"*.downsample.0"`) of convs kept out of the search; they act as
    barriers, as do convs with hooks or called from several places (see `summary()`).
    `add_activations`: insert the network's activation after merged blocks of several convs
    that end where it has none, in latency entries, importance, solving and pruning alike.
    By default on, as the authors do for their classifiers, except in networks with
    relocatable norms (GroupNorm before the activations: diffusion U-Nets, where they add
    none). `max_kernel_bytes` bounds the merged kernels offered (their float64 size, what
    `merge` materialises): a larger composition is not an entry (a single conv always is).
    """
    require_graph_module(gm, "analyze")
    check_canonical(gm)  # a TraceError, as everywhere a graph is not canonical
    if stride_rule not in tuple(StrideRule):
        raise ArgumentError(f"stride_rule must be one of {', '.join(StrideRule)}, got "
                            f"{stride_rule!r}")
    stride_rule = StrideRule(stride_rule)
    if isinstance(max_kernel_bytes, bool) or not isinstance(max_kernel_bytes, int) \
            or max_kernel_bytes <= 0:
        raise ArgumentError(f"max_kernel_bytes must be a positive number of bytes, got "
                         f"{max_kernel_bytes!r}")
    if isinstance(exclude, str) or not all(isinstance(p, str) for p in exclude):
        raise ArgumentError(f"exclude must be a list of module names or glob patterns, got "
                            f"{exclude!r}")
    exclude = set(exclude)
    convs_named = [n for n, m in gm.named_modules() if isinstance(m, ops.CONVS)]
    for pattern in exclude:
        if not any(fnmatch.fnmatchcase(n, pattern) for n in convs_named):
            raise ArgumentError(f"exclude names '{pattern}', which matches no conv of this "
                                "model")
    regions = {r.output: r for r in find_regions(gm, exclude)}
    in_regions = {name for r in regions.values() for name in r.nodes}
    members = {b.conv for r in regions.values() for b in r.branches if b.conv}
    left_out = {n: why for n, why in left_out_convs(gm, exclude).items() if n not in members}
    nodes = {n.name: n for n in gm.graph.nodes}

    adds = _find_skip_adds(gm, left_out, in_regions)
    while True:
        branch_nodes = {b for sk in adds.values() for b in sk.branch}
        conv_nodes = [n for n in gm.graph.nodes if n not in branch_nodes and (
            n.name in regions or (_searchable(gm, n, left_out) and n.name not in in_regions))]
        units = [_build_unit(gm, n, adds, regions.get(n.name)) for n in conv_nodes]
        value_position = {}
        for p, u in enumerate(units):
            value_position.setdefault(u.input, p)
            value_position[u.output] = p + 1
        bad = [add for add, sk in adds.items()
               if sk.source.name not in value_position
               or not any(u.add == add.name for u in units)
               # the block's first conv must read the skip's source itself: x + f(act(x))
               # is no conv of one input
               or value_position[sk.source.name] >= len(units)
               or units[value_position[sk.source.name]].input != sk.source.name]
        if not bad:
            break
        for add in bad:
            del adds[add]

    L = len(units)
    if L == 0:
        raise SpaceError("the graph has no searchable conv (Conv1d/2d/3d) on a main path")
    skips, skip_users = [], {}
    for p, u in enumerate(units, start=1):
        if u.add is None:
            continue
        sk = adds[nodes[u.add]]
        convs_in_branch = [b for b in sk.branch if kind_of(gm, b) is NodeKind.CONV]
        norms_in_branch = [b for b in sk.branch if kind_of(gm, b) is NodeKind.NORM]
        skips.append(Skip(
            source=value_position[sk.source.name], target=p, add_node=u.add,
            source_node=sk.source.name,
            projection=convs_in_branch[0].target if convs_in_branch else None,
            projection_norm=norms_in_branch[0].target if norms_in_branch else None,
            projection_stride=(ops.module_of(gm, convs_in_branch[0]).stride[0]
                               if convs_in_branch else 1),
        ))
        first = sk.branch[-1] if sk.branch else nodes[u.add]
        skip_users.setdefault(sk.source.name, set()).add(first.name)

    breaks = set()
    for p in range(1, L):
        prev, nxt = units[p - 1], units[p]
        if nxt.input != prev.output:
            breaks.add(p)
            continue
        allowed = {nxt.conv, *nxt.region} | skip_users.get(prev.output, set())
        if any(user.name not in allowed for user in nodes[prev.output].users):
            breaks.add(p)
    for p, u in enumerate(units):
        # the value feeding a region's first conv must not feed anything unknown either
        allowed = {u.conv, *u.region} | skip_users.get(u.input, set())
        if p > 0 and any(user.name not in allowed for user in nodes[u.input].users):
            breaks.add(p)

    convs = []
    for p, (node, u) in enumerate(zip(conv_nodes, units), start=1):
        region = regions.get(node.name)
        m = ops.module_of(gm, node) if region is None else _RegionConv(collapse(gm, region))
        convs.append(Conv(
            index=p, name=region.name if region else node.target, node=node.name,
            in_channels=m.in_channels, out_channels=m.out_channels,
            kernel=m.kernel_size, stride=m.stride, padding=m.padding,
            dilation=m.dilation, groups=m.groups, bias=m.bias is not None,
            norm=nodes[u.norm].target if u.norm else None,
            activation=activation_kind(gm, nodes[u.act]) if u.act else None,
            in_shape=ops.tensor_shape(nodes[u.input]), out_shape=ops.tensor_shape(node),
            relocatable_norm=nodes[u.rnorm].target if u.rnorm else None,
            activation_module=nodes[u.act].target if u.act else None,
            score=float(m.weight.detach().abs().sum()),
        ))
    for c in convs:
        if stride_rule is StrideRule.PAPER and largest(c.stride) > 1 and c.index < L:
            follower = convs[c.index]
            one_by_one = follower.kernel == 1 and c.index not in breaks
            breaks.add(c.index + 1 if one_by_one else c.index)
    breaks.discard(L)

    return MergeSpace(
        convs=convs, units=units, skips=skips, breaks=breaks,
        nodes=_graph_nodes(gm, in_regions), stride_rule=stride_rule, exclude=exclude,
        left_out={n: why for n, why in left_out.items() if why != "excluded"},
        add_activations=add_activations, max_kernel_bytes=max_kernel_bytes,
        capture=capture_path(gm), regions=tuple(regions.values()),
        input_shapes=[tuple(x.shape[1:]) if isinstance(x, Tensor) else ()
                      for x in example_inputs(gm)])


class _RegionConv:
    """A collapsed region read as the conv it is (the fields `analyze` reads of a conv)."""

    def __init__(self, affine) -> None:
        self.in_channels, self.out_channels = affine.in_channels, affine.out_channels
        self.kernel_size, self.stride = affine.kernel, affine.stride
        self.padding, self.dilation = affine.padding, affine.dilation
        self.groups, self.bias, self.weight = affine.groups, affine.bias, affine.weight
