"""LayerOnly: prune whole convs (a 0/1 knapsack); activations and kernels stay as they are.

The paper's problem (8): maximise the sum over kept convs of `I[l]` within the budget,
where `I[l] = exp(-Δ_l)` and `Δ_l` is the score change of removing conv `l` alone (the
table holds `exp(Δ_l)`, keyed by the conv's name, so `I[l]` is its inverse). Keeping conv
`l` costs its single-conv latency entry; removing it costs and is worth nothing.
Irreducible convs are always kept (worth 1, a constant).
"""

from __future__ import annotations

from collections.abc import Mapping

from ..plan import Plan
from ..space import MergeSpace
from ..tables import ImportanceTable, LatencyTable
from . import layermerge
from .dp import Edge
from .method import Method, Probe


def importance_keys(space: MergeSpace) -> list[str]:
    """The per-conv importance LayerOnly needs: one per reducible conv."""
    return [c.name for c in space.convs if not c.irreducible]

def removal_plan(space: MergeSpace, conv: str) -> Plan:
    """Only `conv` removed (LayerOnly's per-conv importance)."""
    kept = {c.name for c in space.convs} - {conv}
    return Plan.from_positions(space, layermerge.singletons(space, range(0)), kept,
                           method=f"importance:remove {conv}")


def probes(space: MergeSpace, keys: list[str]) -> dict[str, Probe]:
    """Each conv's network: only that conv removed."""
    return {name: Probe(removal_plan(space, name), (), space.conv(name).index) for name in keys}


def edges(space: MergeSpace, latency: LatencyTable, importance: ImportanceTable) -> list[Edge]:
    keep_entries = [space.full_entries[(c.index - 1, c.index)] for c in space.convs]
    latency.check(space, keep_entries)
    importance.check(space, importance_keys(space))
    out = []
    for c, entry in zip(space.convs, keep_entries):
        # (a removal so harmful that exp(Δ) underflowed to 0 is worth at most 1e9 to keep)
        keep = 1.0 if c.irreducible else 1.0 / max(importance[c.name], 1e-9)
        out.append(Edge(c.index - 1, c.index, latency[entry], keep, (c.name, True)))
        if not c.irreducible:
            out.append(Edge(c.index - 1, c.index, 0.0, 0.0, (c.name, False)))
    return out


def blocks(space: MergeSpace, path: list[Edge], scores: Mapping[str, float]):
    positions = [(e.start, e.end) for e in path]
    kept = {name for e in path for name, keep in [e.payload] if keep}
    return positions, kept, {}


METHOD = Method("layeronly", importance_keys, probes, edges, blocks)
