"""LayerMerge (Algorithm 1): every entry `(i, j, k, dw)` is an edge `i -> j`."""

from __future__ import annotations

import itertools
from collections.abc import Mapping

from ..capture.registry import NodeKind
from ..plan import Plan
from ..space import IDENTITY, Entry, MergeSpace, best_subsets, choose_convs
from ..tables import ImportanceTable, LatencyTable
from .dp import Edge
from .method import Method, Probe


def importance_keys(space: MergeSpace) -> list:
    """Every entry: each is an edge."""
    return list(space.entries)

def singletons(space: MergeSpace, skip: range) -> list[tuple[int, int]]:
    """Every one-conv block but those ending in `skip`."""
    return [(p - 1, p) for p in range(1, space.L + 1) if p not in skip]


def block_plan(space: MergeSpace, entry: Entry, scores: dict[str, float],
               chosen: tuple[str, ...] | None = None) -> Plan:
    """Only block `entry` changed: inner activations removed, convs kept by eq. 3 (`chosen`
    when the caller has it)."""
    i, j, k, dw = entry
    positions = sorted([*singletons(space, range(i + 1, j + 1)), (i, j)])
    kept = {c.name for c in space.convs} - {c.name for c in space.convs[i:j]}
    kept |= set(choose_convs(space, i, j, k, dw, scores) if chosen is None else chosen)
    return Plan.from_positions(space, positions, kept, method=f"importance:{tuple(entry)}")


def reset_modules(space: MergeSpace, entry: Entry) -> tuple[str, ...]:
    """The conv (and its norm; a region's every branch) of a single-conv entry that keeps
    the conv: the authors re-initialise them before the short fine-tune, so that the entry
    measures how much the task needs that layer rather than scoring "no change"."""
    i, j, k, _ = entry
    if j != i + 1 or k == 0:
        return ()
    conv = space.convs[i]
    region = space.region(conv.name)
    if region is None:
        layers = (conv.name,)
    else:  # every branch's conv and norm
        nodes = {n.name: n for n in space.nodes}
        layers = tuple(nodes[n].target for n in region.nodes
                       if nodes[n].kind in (NodeKind.CONV, NodeKind.NORM))
    return (*layers, conv.norm) if conv.norm else layers


def probes(space: MergeSpace, keys: list[Entry]) -> dict[Entry, Probe]:
    """Each entry's network: only its block changed, the convs eq. 3 keeps (one pass of
    `best_subsets` per block start), its single conv re-initialised where it keeps one."""
    scores = space.conv_scores
    eq3: dict[int, list] = {}  # by block start: best_subsets, by block end
    for key in keys:
        if key.j - key.i > len(eq3.get(key.i, ())):
            eq3[key.i] = list(itertools.islice(best_subsets(space, key.i, scores),
                                               key.j - key.i))
    out = {}
    for key in keys:
        option = (key.k, key.dw)
        chosen = () if option == IDENTITY else eq3[key.i][key.j - key.i - 1][option][1]
        out[key] = Probe(block_plan(space, key, scores, chosen), reset_modules(space, key),
                         key.j)
    return out


def edges(space: MergeSpace, latency: LatencyTable, importance: ImportanceTable) -> list[Edge]:
    latency.check(space)
    importance.check(space, importance_keys(space))
    return [Edge(e.i, e.j, latency[e], importance[e], e) for e in space.entries]


def blocks(space: MergeSpace, path: list[Edge], scores: Mapping[str, float]):
    """Spans, kept convs (eq. 3: the largest-norm subset giving each chosen kernel)."""
    positions, kept = [], set()
    for edge in path:
        i, j, k, dw = edge.payload
        positions.append((i, j))
        kept.update(choose_convs(space, i, j, k, dw, scores))
    return positions, kept, {}


METHOD = Method("layermerge", importance_keys, probes, edges, blocks)
