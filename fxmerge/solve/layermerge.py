"""LayerMerge (Algorithm 1): every entry `(i, j, k, dw)` is an edge `i -> j`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from ..errors import PlanError
from ..space import IDENTITY, MergeSpace
from ..space.kernels import MergeState, extend
from .dp import Edge
from .method import Method

if TYPE_CHECKING:
    from ..tables.importance import ImportanceTable
    from ..tables.latency import LatencyTable


def choose_convs(space: MergeSpace, i: int, j: int, k: int, dw: bool,
                 scores: Mapping[str, float] | None = None) -> tuple[str, ...]:
    """Eq. 3: among the kept-conv subsets of block `(i, j)` that contain every irreducible
    conv, give kernel `k` (depthwise `dw`) and merge within `max_kernel_bytes`, the one with
    the largest total score (`space.conv_scores` unless given)."""
    scores = space.conv_scores if scores is None else scores
    if (k, dw) == IDENTITY:
        return ()
    best: dict[MergeState, tuple[float, tuple[str, ...]]] = {MergeState(): (0.0, ())}
    for c in space.convs[i:j]:
        nxt: dict[MergeState, tuple[float, tuple[str, ...]]] = {}
        for state, (score, kept) in best.items():
            options = [(extend(space, i, state, c), (score + scores[c.name], kept + (c.name,)))]
            if not c.irreducible:
                options.append((state, (score, kept)))
            for key, value in options:
                if key not in nxt or value[0] > nxt[key][0]:
                    nxt[key] = value
        best = nxt
    found = [v for state, v in best.items()
             if state.kept and not state.over and state.option == (k, dw)]
    if not found:
        raise PlanError(f"no kept-conv subset of block ({i}, {j}) gives kernel {k}, dw={dw}")
    return max(found)[1]


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
