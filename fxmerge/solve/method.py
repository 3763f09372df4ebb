"""What a compression method is to fxmerge: the importance keys it reads and, for each, the
network that scores it (its probe), the DP edges it builds from the tables, and how a DP
path becomes a plan. Each method module defines one `Method`; `fxmerge.solve.METHODS`
registers them by name. A method with keys of a kind of its own registers that kind with
`fxmerge.tables.register_key_kind`."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import Enum
from typing import NamedTuple

from ..plan import Plan
from ..space import MergeSpace
from ..tables import ImportanceTable, Key, LatencyTable
from .dp import Edge

Blocks = tuple[list[tuple[int, int]], set[str], dict[int, bool]]  # positions, kept, activations


class MethodName(str, Enum):
    """The built-in methods, by their one spelling (`Method.name`)."""

    LAYERMERGE = "layermerge"
    DEPTH = "depth"
    LAYERONLY = "layeronly"

    def __str__(self) -> str:
        return self.value


class Probe(NamedTuple):
    """The network an importance key scores: `plan` applied to the original, the `reset`
    modules re-initialised first (when the estimator fine-tunes; the authors' protocol for
    a single conv kept), its change ending at position `end` (keys that end together share
    the rest of the network in the output-agreement proxy)."""

    plan: Plan
    reset: tuple[str, ...]
    end: int


@dataclass(frozen=True)
class Method:
    """One method, by its registered name.

    `importance_keys(space)`: the importance table keys its edges read.
    `probes(space, keys)`: for each of those keys (a subset of its own), the `Probe` that
    scores it. `edges(space, latency, importance)`: its DP edges.
    `blocks(space, path, conv_scores)`: the positions, kept convs and end activations of the
    plan a DP path stands for. `unit_ms`: its latency unit, if its paper fixes one."""

    name: str
    importance_keys: Callable[[MergeSpace], list[Key]]
    probes: Callable[[MergeSpace, list[Key]], dict[Key, Probe]]
    edges: Callable[[MergeSpace, LatencyTable, ImportanceTable], list[Edge]]
    blocks: Callable[[MergeSpace, list[Edge], Mapping[str, float]], Blocks]
    unit_ms: float | None = None
