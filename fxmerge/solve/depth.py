"""Depth (Kim et al., ICML 2023): remove activations only, never convs.

Stage 1: for every activation-free span `(i, k)`, the fastest way to run it as one or more
merged convs, `T_opt(i, k) = min(T(i, k), min_j T_opt(i, j) + T(j, k))`.
Stage 2: the shared DP over kept-activation positions, each span costing `T_opt` and worth
its additive importance, as that paper defines it: the score change of merging the whole
span, `Δ = log I` of its all-convs-kept entry, relative to leaving it unchanged (a single
conv: 0). Latencies are discretised in units of `UNIT_MS`, as that paper does.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from itertools import pairwise

from ..space import MergeSpace
from ..tables.importance import ImportanceTable
from ..tables.latency import LatencyTable
from .dp import Edge

UNIT_MS = 0.05


def fastest_splits(space: MergeSpace, latency: LatencyTable) -> dict:
    """Stage 1: `(i, k) -> (T_opt, [split positions])` for every legal block."""
    alone = {b: latency[e] for b, e in space.full_entries.items()}
    best: dict[tuple[int, int], tuple[float, list[int]]] = {}
    for i, k in sorted(alone, key=lambda b: b[1] - b[0]):
        options = [(alone[(i, k)], [])]
        for j in range(i + 1, k):
            if (i, j) in best and (j, k) in alone:
                t_ij, splits = best[(i, j)]
                options.append((t_ij + alone[(j, k)], [*splits, j]))
        best[(i, k)] = min(options, key=lambda o: o[0])
    return best


def edges(space: MergeSpace, latency: LatencyTable, importance: ImportanceTable) -> list[Edge]:
    needed = list(space.full_entries.values())
    latency.check(space, needed)
    importance.check(space, needed)
    splits = fastest_splits(space, latency)
    return [Edge(i, j, splits[(i, j)][0], additive_importance(space, importance, i, j),
                 (i, j, tuple(splits[(i, j)][1]))) for i, j in space.blocks]


def additive_importance(space: MergeSpace, importance: ImportanceTable, i: int, j: int
                        ) -> float:
    """The score change of merging span `(i, j)`: `log I` of its full entry; 0 for a single
    conv, which changes nothing (its table value may measure a re-initialised conv, the
    LayerMerge protocol, which means nothing to Depth)."""
    if j == i + 1:
        return 0.0
    return math.log(max(importance[space.full_entries[(i, j)]], 1e-300))


def blocks(space: MergeSpace, path: list[Edge], scores: Mapping[str, float]):
    spans, no_activation = [], set()
    for edge in path:
        i, j, cuts = edge.payload
        bounds = [i, *cuts, j]
        spans += list(pairwise(bounds))
        no_activation.update(cuts)
    return spans, {c.name for c in space.convs}, no_activation
