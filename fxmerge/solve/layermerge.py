"""LayerMerge (Algorithm 1): every entry `(i, j, k, dw)` is an edge `i -> j`."""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING

from ..errors import PlanError
from ..space import IDENTITY, KernelOption, MergeSpace
from ..space.kernels import MergeState, extend
from .dp import Edge
from .method import Method

if TYPE_CHECKING:
    from ..tables.importance import ImportanceTable
    from ..tables.latency import LatencyTable


Chosen = dict[KernelOption, tuple[float, tuple[str, ...]]]  # option -> (score, kept convs)


def best_subsets(space: MergeSpace, i: int, scores: Mapping[str, float] | None = None
                 ) -> Iterator[Chosen]:
    """Eq. 3 for the blocks starting at `i`, by their end `j = i + 1, i + 2, ...`: for each
    kernel option the block can give, its highest-scoring kept-conv subset that contains
    every irreducible conv and merges within `max_kernel_bytes` (`space.conv_scores`
    unless given). One pass: a block's subsets extend the shorter block's."""
    scores = space.conv_scores if scores is None else scores
    best: dict[MergeState, tuple[float, tuple[str, ...]]] = {MergeState(): (0.0, ())}
    for c in space.convs[i:]:
        nxt: dict[MergeState, tuple[float, tuple[str, ...]]] = {}
        for state, (score, kept) in best.items():
            options = [(extend(space, i, state, c), (score + scores[c.name], kept + (c.name,)))]
            if not c.irreducible:
                options.append((state, (score, kept)))
            for key, value in options:
                if not key.over and (key not in nxt or value[0] > nxt[key][0]):
                    nxt[key] = value
        best = nxt
        chosen: Chosen = {}
        for state, value in best.items():
            if state.kept and (state.option not in chosen or value > chosen[state.option]):
                chosen[state.option] = value
        yield chosen


def choose_convs(space: MergeSpace, i: int, j: int, k: int, dw: bool,
                 scores: Mapping[str, float] | None = None) -> tuple[str, ...]:
    """Eq. 3 for entry `(i, j, k, dw)` (`best_subsets`): the kept convs; () for identity."""
    if (k, dw) == IDENTITY:
        return ()
    chosen = next(itertools.islice(best_subsets(space, i, scores), j - i - 1, None), {})
    if (k, dw) not in chosen:
        raise PlanError(f"no kept-conv subset of block ({i}, {j}) gives kernel {k}, dw={dw}")
    return chosen[KernelOption(k, dw)][1]


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
        kept.update(choose_convs(space, i, j, k, dw, scores))
    return positions, kept, {}


METHOD = Method("layermerge", importance_keys, edges, blocks)
