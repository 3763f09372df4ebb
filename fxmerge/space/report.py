"""What a merge space says about its network: `summary` (a readable table) and `reach`
(what the search can change, and what stops the rest)."""

from __future__ import annotations

from collections import Counter
from typing import Any

from ..capture.registry import NodeKind
from ..sides import label
from .records import SpaceView


def reach(space: SpaceView) -> dict[str, Any]:
    """Searched convs and activations against the graph's, convs left out with why, and the
    barrier nodes counted by their family's label."""
    projections = {s.projection for s in space.skips if s.projection}
    members = {b.conv for r in space.regions for b in r.branches if b.conv}
    searched = {c.name for c in space.convs} | projections | members
    conv_nodes = [n for n in space.nodes if n.kind is NodeKind.CONV]
    barriers = Counter(n.label or n.op_name or n.target
                       for n in space.nodes if n.kind is NodeKind.BARRIER)
    return {
        "convs": len(conv_nodes), "searched_convs": space.L - len(space.regions) + len(members),
        "regions": len(space.regions), "region_convs": len(members),
        "skip_projections": len(projections),
        "other_convs": len([n for n in conv_nodes if n.target not in searched]),
        "activations": sum(n.kind is NodeKind.ACTIVATION for n in space.nodes),
        "searched_activations": sum(c.activation is not None for c in space.convs),
        "left_out": dict(space.left_out),
        "barriers": dict(barriers.most_common()),
    }


def summary(space: SpaceView) -> str:
    """A readable table of the searched convs and the size of the space."""
    wide = max([2] + [len(label(v)) for c in space.convs for v in (c.kernel, c.stride)])
    header = (f"{'pos':>4}  {'conv':<28} {'in->out':>11} {'k':>{wide}} {'s':>{wide}} {'g':>4}  "
              f"{'act':<9} {'R':<1} note")
    lines = [header]
    starts = {s.source: s for s in space.skips}
    ends = {s.target: s for s in space.skips}
    for c in space.convs:
        note = []
        if c.index - 1 in starts:
            note.append(f"skip from {c.index - 1}")
        if c.index in ends:
            skip = ends[c.index]
            note.append(f"add ({skip.source}->{c.index}" + (
                f", proj {skip.projection})" if skip.projection else ")"))
        if c.index in space.breaks:
            note.append("break")
        lines.append(
            f"{c.index:>4}  {c.name:<28} {c.in_channels:>5}->{c.out_channels:<5}"
            f"{label(c.kernel):>{wide}} {label(c.stride):>{wide}} {c.groups:>4}  "
            f"{c.activation or '-':<9} "
            f"{'R' if c.irreducible else ' '} {', '.join(note)}"
        )
    for name, why in space.left_out.items():
        lines.append(f"   -  {name:<28} not searched: {why}")
    lines.append(
        f"L={space.L} convs, {len(space.irreducible)} irreducible, {len(space.skips)} skips, "
        f"{len(space.barriers)} barrier nodes, stride_rule={space.stride_rule.value}: "
        f"{space.num_blocks} blocks, {space.num_entries} entries"
    )
    found = reach(space)
    if space.regions:
        lines.append(f"{found['regions']} regions of parallel branches ("
                     f"{found['region_convs']} convs) each searched as one conv")
    lines.append(
        f"captured by {space.capture}; searched: {found['searched_convs']} of "
        f"{found['convs']} convs (+{found['skip_projections']} skip projections), "
        f"{found['searched_activations']} of {found['activations']} activations")
    if found["barriers"]:
        lines.append("what stops the rest (barrier ops by kind): " + ", ".join(
            f"{n} {kind}" for kind, n in found["barriers"].items()))
    if space.over_bound:
        lines.append(f"{space.over_bound} merged kernels over max_kernel_bytes="
                     f"{space.max_kernel_bytes} not offered")
    if space.add_activations:
        lines.append(f"add_activations: a {space.added_activation} after each merged "
                     "block of several convs that ends without an activation")
    return "\n".join(lines)
