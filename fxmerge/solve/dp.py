"""The exact dynamic program all three methods share: a longest path over nodes 0..N (the
positions 0..L, or for Depth a position and whether an activation follows it), from 0 to
the last node, where each step (an edge a -> b, a < b) has a latency cost and an importance
value, under a latency budget discretised into `levels` units."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from ..errors import InfeasibleBudget, TableError


class Edge(NamedTuple):
    """One choice for nodes `start -> end`: its latency, importance and what it means."""

    start: int
    end: int
    latency_ms: float
    value: float
    payload: Any


@dataclass
class DPResult:
    """`best[n, t]`: the largest total value reaching node n within t units."""

    edges: Sequence[Edge]
    costs: np.ndarray
    best: np.ndarray
    choice: np.ndarray
    unit_ms: float

    @property
    def levels(self) -> int:
        return self.best.shape[1] - 1

    def fitting_path(self, budget_ms: float) -> tuple[int, list[Edge]] | None:
        """The optimal path at the largest budget level whose true (not rounded) latency is
        within `budget_ms`, with that level; None when no level has one."""
        L = self.best.shape[0] - 1
        top = min(self.levels, int(budget_ms / self.unit_ms + 1e-9))
        for units in range(top, -1, -1):
            if math.isfinite(self.best[L, units]):
                path = self.path(units)
                if sum(e.latency_ms for e in path) <= budget_ms * (1 + 1e-12):
                    return units, path
        return None

    def path(self, units: int) -> list[Edge]:
        """The optimal edges (in order) within `units` budget units."""
        L = self.best.shape[0] - 1
        if not math.isfinite(self.best[L, units]):
            raise InfeasibleBudget(f"no plan fits {units} units")
        path, l, t = [], L, units
        while l > 0:
            e = self.edges[self.choice[l, t]]
            path.append(e)
            t -= int(self.costs[self.choice[l, t]])
            l = e.start
        return path[::-1]


def discretise(latency_ms: float, unit_ms: float) -> int:
    """Latency in budget units, rounded down as in the paper (`solve` then checks the
    true latency of the plan it picks)."""
    return max(0, math.floor(latency_ms / unit_ms + 1e-9))


def last_node(edges: Sequence[Edge]) -> int:
    return max(e.end for e in edges)


def run_dp(edges: Sequence[Edge], unit_ms: float, levels: int) -> DPResult:
    """Fill the table of Algorithm 1 (LayerMerge) for every budget 0..levels units."""
    L = last_node(edges)
    for e in edges:
        if not (math.isfinite(e.latency_ms) and math.isfinite(e.value)):
            raise TableError(f"non-finite latency or importance for {e.payload}")
    costs = np.array([discretise(e.latency_ms, unit_ms) for e in edges], dtype=np.int64)
    best = np.full((L + 1, levels + 1), -np.inf)
    best[0, :] = 0.0
    choice = np.full((L + 1, levels + 1), -1, dtype=np.int64)
    by_end: list[list[int]] = [[] for _ in range(L + 1)]
    for idx, e in enumerate(edges):
        by_end[e.end].append(idx)
    for end in range(1, L + 1):
        row, row_choice = best[end], choice[end]
        for idx in by_end[end]:
            c = costs[idx]
            if c > levels:
                continue
            candidate = best[edges[idx].start, :levels + 1 - c] + edges[idx].value
            target = row[c:]
            better = candidate > target
            target[better] = candidate[better]
            row_choice[c:][better] = idx
    return DPResult(edges, costs, best, choice, unit_ms)


def min_latency(edges: Sequence[Edge]) -> float:
    """The smallest total latency of any path (what an infeasible budget is told)."""
    L = last_node(edges)
    lowest = [0.0] + [math.inf] * L
    for e in sorted(edges, key=lambda e: e.end):
        lowest[e.end] = min(lowest[e.end], lowest[e.start] + e.latency_ms)
    return lowest[L]
