"""LayerMerge (Algorithm 1): every entry `(i, j, k, dw)` is an edge `i -> j`."""

from __future__ import annotations

from collections.abc import Mapping

from ..space import MergeSpace
from ..tables.importance import ImportanceTable
from ..tables.latency import LatencyTable
from .dp import Edge
from .method import Method


def importance_keys(space: MergeSpace) -> list:
    """Every entry: each is an edge."""
    return list(space.entries)


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
        kept.update(space.choose_convs(i, j, k, dw, scores))
    return positions, kept, {}


METHOD = Method("layermerge", importance_keys, edges, blocks)
