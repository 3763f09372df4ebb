"""What a compression method is to fxmerge: the importance keys it reads, the DP edges it
builds from the tables, and how a DP path becomes a plan. Each method module defines one
`Method`; `fxmerge.solve.METHODS` registers them by name."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from ..space import MergeSpace
from .dp import Edge

Blocks = tuple[list[tuple[int, int]], set[str], dict[int, bool]]  # positions, kept, activations


@dataclass(frozen=True)
class Method:
    """One method, by its registered name.

    `importance_keys(space)`: the importance table keys its edges read (a table builder
    measures exactly these). `edges(space, latency, importance)`: its DP edges.
    `blocks(space, path, conv_scores)`: the positions, kept convs and end activations of the
    plan a DP path stands for. `unit_ms`: its latency unit, if its paper fixes one."""

    name: str
    importance_keys: Callable[[MergeSpace], list[Any]]
    edges: Callable[..., list[Edge]]
    blocks: Callable[[MergeSpace, list[Edge], Mapping[str, float]], Blocks]
    unit_ms: float | None = None
