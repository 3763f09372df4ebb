"""LayerOnly: prune whole convs (a 0/1 knapsack); activations and kernels stay as they are.

Keeping conv p costs its single-conv latency entry and is worth 1 (= exp(0), unchanged);
removing a reducible conv costs nothing and is worth its importance table value (keyed by
the conv's name).
"""

from __future__ import annotations

from collections.abc import Mapping

from ..space import Entry, MergeSpace
from ..tables.importance import ImportanceTable
from ..tables.latency import LatencyTable
from .dp import Edge


def single_conv_entry(space: MergeSpace, p: int) -> Entry:
    opt = space.kernel_of([p])
    return Entry(p - 1, p, opt.kernel, opt.depthwise)


def importance_keys(space: MergeSpace) -> list[str]:
    """The per-conv importance LayerOnly needs: one per reducible conv."""
    return [c.name for c in space.convs if not c.irreducible]


def edges(space: MergeSpace, latency: LatencyTable, importance: ImportanceTable) -> list[Edge]:
    keep_entries = [single_conv_entry(space, c.index) for c in space.convs]
    latency.check(space, keep_entries)
    importance.check(space, importance_keys(space))
    out = []
    for c, entry in zip(space.convs, keep_entries):
        out.append(Edge(c.index - 1, c.index, latency[entry], 1.0, (c.name, True)))
        if not c.irreducible:
            out.append(Edge(c.index - 1, c.index, 0.0, importance[c.name], (c.name, False)))
    return out


def blocks(space: MergeSpace, path: list[Edge], scores: Mapping[str, float]):
    spans = [(e.start, e.end) for e in path]
    kept = {name for e in path for name, keep in [e.payload] if keep}
    return spans, kept, set()
