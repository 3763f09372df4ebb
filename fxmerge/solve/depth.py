"""Depth (Kim et al., ICML 2023): remove activations only, never convs.

Stage 1: for every activation-free span `(i, k)`, the fastest way to run it as one or more
merged convs, `T_opt(i, k) = min(T(i, k), min_j T_opt(i, j) + T(j, k))`.
Stage 2: the shared DP over kept-activation positions, each span costing `T_opt` and worth
its additive importance, as that paper defines it: the score change of merging the whole
span, `Δ = log I` of its all-convs-kept entry, relative to leaving it unchanged (a single
conv: 0). Where the network has no activation (MobileNetV2's block ends) and
`add_activations` is on, a span's end may have one added or not, as that paper's
MobileNetV2 variant chooses: the DP's nodes are (position, activation after it), and each
choice has its own importance (`depth_key`). Latencies are discretised in units of
`UNIT_MS`, as that paper does.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from functools import lru_cache
from itertools import pairwise

from ..plan import Plan
from ..space import DepthKey, Entry, MergeSpace
from ..tables import ImportanceTable, Key, LatencyTable
from . import layermerge
from .dp import Edge
from .method import Method, Probe

UNIT_MS = 0.05


def activation_options(space: MergeSpace, p: int) -> tuple[bool, ...]:
    """Whether an activation may follow position `p` at a block's end: where the network
    has one (and at the input) it stays; where it has none, Depth may add one when
    `add_activations` is on (its paper's choice at MobileNetV2's block ends)."""
    if p == 0 or space.activation(p) is not None:
        return (True,)
    return (False, True) if space.add_activations else (False,)


def _as_is(space: MergeSpace, i: int, j: int) -> tuple[bool, bool]:
    """(start, end) activations of block `(i, j)` as its full entry has them."""
    return i == 0 or space.activation(i) is not None, space.end_activation(i, j) is not None


def activation_choices(space: MergeSpace, i: int, j: int) -> tuple[tuple[bool, bool], ...]:
    """Depth's (start, end) activation choices for block `(i, j)`, restricted as its
    authors do: a block starting where the network has no activation chooses its start
    (and has one at its end where it may), any other block chooses its end; the full
    entry's choice is always among them, so the original network is a path."""
    starts, ends = activation_options(space, i), activation_options(space, j)
    if len(starts) > 1:
        choices = {(start, ends[-1]) for start in starts}
    else:
        choices = {(starts[0], end) for end in ends}
    return tuple(sorted(choices | {_as_is(space, i, j)}))


def depth_key(space: MergeSpace, i: int, j: int, start: bool, end: bool
              ) -> Entry | DepthKey | None:
    """The importance key scoring block `(i, j)` merged whole with these end activations:
    None for the original network (one conv, its ends as they are), the block's full entry
    when that entry's network is the same, else a `DepthKey`."""
    if (start, end) != _as_is(space, i, j):
        return DepthKey(i, j, start, end)
    return None if j == i + 1 else space.full_entries[(i, j)]


@lru_cache(maxsize=16)
def depth_choices(space: MergeSpace) -> dict[tuple[int, int], tuple[tuple[bool, bool, Key | None],
                                                                   ...]]:
    """Every block's `(start, end, depth_key(...))` activation choices (what the Depth
    solver reads), computed once per space."""
    return {(i, j): tuple((start, end, depth_key(space, i, j, start, end))
                          for start, end in activation_choices(space, i, j))
            for i, j in space.full_entries}


def depth_keys(space: MergeSpace) -> tuple[DepthKey, ...]:
    """The keys Depth's activation choices need beyond the full entries."""
    return tuple(key for choices in depth_choices(space).values()
                 for _, _, key in choices if isinstance(key, DepthKey))


def fastest_splits(space: MergeSpace, latency: LatencyTable) -> dict:
    """Stage 1: `(i, k) -> (T_opt, [split positions])` for every legal block."""
    alone = {b: latency[e] for b, e in space.full_entries.items()}
    best: dict[tuple[int, int], tuple[float, list[int]]] = {}
    for i, k in sorted(alone, key=lambda b: b[1] - b[0]):
        fastest, cut = alone[(i, k)], None  # ties: the whole block, then the first cut
        for j in range(i + 1, k):
            if (i, j) in best and (j, k) in alone:
                t = best[(i, j)][0] + alone[(j, k)]
                if t < fastest:
                    fastest, cut = t, j
        best[(i, k)] = (fastest, [] if cut is None else [*best[(i, cut)][1], cut])
    return best


def node(p: int, activation: bool) -> int:
    """The DP node of position `p` followed by an activation or not (the input: node 0)."""
    return 2 * p + (not activation)


def importance_keys(space: MergeSpace) -> list[Key]:
    """The importance Depth reads: each block of several convs merged whole (its full
    entry), and `depth_keys` where its ends may change."""
    full = [e for (i, j), e in space.full_entries.items() if j - i > 1]
    return [*full, *depth_keys(space)]

def depth_plan(space: MergeSpace, key: DepthKey) -> Plan:
    """Only block `(key.i, key.j)` changed, merged whole, its end activations as the key
    says (Depth's importance where its ends may change)."""
    positions = sorted([*layermerge.singletons(space, range(key.i + 1, key.j + 1)), (key.i, key.j)])
    return Plan.from_positions(space, positions, {c.name for c in space.convs},
                           activation={key.i: key.start, key.j: key.end},
                           method=f"importance:depth {key.i}-{key.j} "
                                  f"activations {int(key.start)}{int(key.end)}")


def probes(space: MergeSpace, keys: list[Key]) -> dict[Key, Probe]:
    """Each key's network: a full entry's is LayerMerge's (every conv kept), a `DepthKey`'s
    its block merged whole with the ends it says."""
    entries = [k for k in keys if isinstance(k, Entry)]
    out: dict[Key, Probe] = dict(layermerge.probes(space, entries))
    out.update({k: Probe(depth_plan(space, k), (), k.j) for k in keys if isinstance(k, DepthKey)})
    return out


def edges(space: MergeSpace, latency: LatencyTable, importance: ImportanceTable) -> list[Edge]:
    """An edge per block and choice of its end activations (`depth_choices`),
    from `node(i, start)` to `node(j, end)`; then free edges from both nodes of position L
    to the last node."""
    latency.check(space, list(space.full_entries.values()))
    importance.check(space, importance_keys(space))
    splits = fastest_splits(space, latency)
    out = []
    for (i, j), choices in depth_choices(space).items():
        t_opt, cuts = splits[(i, j)]
        for start, end, key in choices:
            out.append(Edge(node(i, start), node(j, end), t_opt,
                            additive_importance(importance, key), (i, j, tuple(cuts), end)))
    sink = node(space.L, False) + 1
    out += [Edge(node(space.L, a), sink, 0.0, 0.0, None) for a in (True, False)]
    return out


def additive_importance(importance: ImportanceTable, key: Key | None) -> float:
    """The score change of a block merged whole with its end activations, `Δ = log I` of
    its key; 0 for the original network (one conv, its ends as they are): its table value,
    if any, may measure a re-initialised conv (the LayerMerge protocol), which means nothing
    to Depth."""
    return 0.0 if key is None else math.log(max(importance[key], 1e-300))


def blocks(space: MergeSpace, path: list[Edge], scores: Mapping[str, float]):
    positions, activation = [], {}
    for edge in path:
        if edge.payload is None:  # the last node
            continue
        i, j, cuts, end = edge.payload
        positions += list(pairwise([i, *cuts, j]))
        activation.update({c: False for c in cuts} | {j: end})
    return positions, {c.name for c in space.convs}, activation


METHOD = Method("depth", importance_keys, probes, edges, blocks, UNIT_MS)
