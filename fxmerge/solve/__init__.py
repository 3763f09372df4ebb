"""Exact solvers: LayerMerge, and the Depth and LayerOnly baselines, on one DP engine."""

from __future__ import annotations

import json
import logging
import math
import numbers
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path

from ..errors import ArgumentError, InfeasibleBudget, TableError
from ..plan import Plan
from ..space import MergeSpace
from ..tables import ImportanceTable, Key, LatencyTable
from . import depth, layermerge, layeronly
from .dp import DPResult, Edge, min_latency, run_dp
from .method import Method, MethodName, Probe

log = logging.getLogger(__name__)

METHODS: dict[str, Method] = {m.name: m for m in (layermerge.METHOD, depth.METHOD,
                                                  layeronly.METHOD)}


def _positive(name: str, value: object) -> float:
    """`value` if it is a positive finite number, else TypeError / ValueError naming it."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ArgumentError(f"{name} must be a number, got {value!r}")
    if not (math.isfinite(value) and value > 0):
        raise ArgumentError(f"{name} must be a positive finite number, got {value}")
    return float(value)


def default_levels(method: str, budget_ms: float) -> int:
    """1000 budget levels, or, for a method with its own unit (Depth: 0.05 ms), as many of
    those units as the budget holds."""
    unit = get_method(method).unit_ms
    return 1000 if unit is None else max(1, math.ceil(budget_ms / unit - 1e-9))


def _check_levels(levels: object) -> None:
    if isinstance(levels, bool) or not isinstance(levels, int) or levels < 1:
        raise ArgumentError(f"levels must be a positive integer, got {levels!r}")


def get_method(name: str | MethodName) -> Method:
    """The registered method called `name` (`ArgumentError` listing the names otherwise)."""
    if str(name) not in METHODS:
        raise ArgumentError(f"unknown method {name!r}; choose from {sorted(METHODS)}")
    return METHODS[str(name)]


def importance_keys(space: MergeSpace, methods: Iterable[str | MethodName] | None = None
                    ) -> list[Key]:
    """The importance keys `methods` read (default: every registered method), each once,
    in the methods' order: what an importance table for them must hold."""
    names = list(METHODS) if methods is None else list(methods)
    return list(dict.fromkeys(k for m in names for k in get_method(m).importance_keys(space)))


def probes(space: MergeSpace, keys: Iterable[Key] | None = None) -> dict[Key, Probe]:
    """The network each key scores (default: every registered method's keys), from the
    first method that declares the key; `TableError` for a key no method reads."""
    keys = importance_keys(space) if keys is None else list(keys)
    left, out = set(keys), {}
    for method in METHODS.values():
        mine = [k for k in method.importance_keys(space) if k in left]
        if mine:
            out.update(method.probes(space, mine))
            left -= set(mine)
    if left:
        raise TableError(f"importance key {next(k for k in keys if k in left)!r} is not one "
                         "of this space's")
    return {k: out[k] for k in keys}


def _to_plan(space: MergeSpace, method: str, path: list[Edge],
             scores: Mapping[str, float] | None, **info) -> Plan:
    positions, kept, activation = get_method(method).blocks(
        space, path, scores if scores is not None else space.conv_scores)
    return Plan.from_positions(
        space, positions, kept, activation=activation, method=method,
        predicted_latency_ms=sum(e.latency_ms for e in path),
        predicted_importance=sum(e.value for e in path), **info)


def solve(
    space: MergeSpace,
    latency: LatencyTable,
    importance: ImportanceTable,
    *,
    budget: float | None = None,
    budget_ms: float | None = None,
    method: str | MethodName = MethodName.LAYERMERGE,
    levels: int | None = None,
    conv_scores: Mapping[str, float] | None = None,
) -> Plan:
    """The plan of largest total importance whose table latency is at most the budget.

    `budget` is a fraction of the original network's table latency (0.55), `budget_ms` an
    absolute one. Latencies are discretised into `levels` units of the budget (rounded down,
    as in the paper; default 1000, and for Depth units of 0.05 ms, as in its paper) and the
    DP is solved exactly for every budget level at once; the plan
    is the optimum at the largest level whose true latency fits the budget (recorded as
    `plan.extra["units"]`), so a plan never exceeds its budget.
    """
    if (budget is None) == (budget_ms is None):
        raise ArgumentError("give exactly one of budget (a fraction) or budget_ms")
    method = get_method(method).name
    original = latency.identity_latency(space)
    if latency.check_failure is not None:
        warnings.warn(f"solving on a latency table that failed its check against the whole "
                      f"network ({latency.check_failure})", stacklevel=2)
    if budget_ms is None:
        budget_ms = _positive("budget", budget) * original
    _positive("budget_ms", budget_ms)
    levels = default_levels(method, budget_ms) if levels is None else levels
    _check_levels(levels)
    edges = get_method(method).edges(space, latency, importance)
    result = run_dp(edges, budget_ms / levels, levels)
    found = result.fitting_path(budget_ms)
    if found is None:
        lowest = min_latency(edges)
        if lowest <= budget_ms:
            raise InfeasibleBudget(
                f"the fastest {method} plan ({lowest:.4g} ms) fits {budget_ms:.4g} ms, but "
                f"{levels} levels are too coarse to find it: use more levels")
        raise InfeasibleBudget(
            f"no {method} plan fits {budget_ms:.4g} ms; the smallest achievable table "
            f"latency is {lowest:.4g} ms ({lowest / original:.1%} of the original "
            f"{original:.4g} ms)", plan=fastest_plan(space, latency, importance, method))
    units, path = found
    plan = _to_plan(space, method, path, conv_scores,
                    budget=round(budget_ms / original, 6), budget_ms=round(budget_ms, 6),
                    extra={"levels": levels, "units": units,
                           "original_latency_ms": round(original, 6)})
    log.info("%s: %d blocks, predicted %.4g ms (budget %.4g ms)", method, len(plan.blocks),
             plan.predicted_latency_ms, budget_ms)
    return plan


def fastest_latency(space: MergeSpace, latency: LatencyTable, importance: ImportanceTable,
                    method: str | MethodName = MethodName.LAYERMERGE) -> float:
    """The smallest table latency any `method` plan reaches."""
    return min_latency(get_method(method).edges(space, latency, importance))


def fastest_plan(space: MergeSpace, latency: LatencyTable, importance: ImportanceTable,
                 method: str | MethodName = MethodName.LAYERMERGE) -> Plan | None:
    """The best `method` plan at its smallest table latency, marked `over_budget` in
    `extra` (what a failed solve hands back); None if the DP cannot resolve it."""
    floor = fastest_latency(space, latency, importance, method)
    for levels in (1000, 10_000):
        try:
            plan = solve(space, latency, importance, budget_ms=floor * (1 + 1e-9),
                         method=method, levels=levels)
        except InfeasibleBudget:  # levels too coarse
            continue
        return replace(plan, extra={**plan.extra, "over_budget": True})
    return None


@dataclass
class Frontier:
    """Best predicted importance for every budget, from one DP run."""

    space: MergeSpace
    method: str
    original_ms: float
    result: DPResult
    conv_scores: Mapping[str, float] | None = None

    @property
    def points(self) -> list[dict]:
        """Pareto points of the optimal plans at every level: predicted latency (and as a
        fraction of the original), predicted importance; importance strictly increasing."""
        row, candidates = self.result.best[-1], {}
        for t in range(self.result.levels + 1):
            if row[t] > float("-inf"):
                latency = sum(e.latency_ms for e in self.result.path(t))
                candidates[latency] = max(candidates.get(latency, float("-inf")), float(row[t]))
        out, last = [], float("-inf")
        for latency in sorted(candidates):
            if candidates[latency] > last:
                last = candidates[latency]
                out.append({"budget": latency / self.original_ms, "latency_ms": latency,
                            "importance": last})
        return out

    def plan(self, budget: float) -> Plan:
        """The optimal plan within a budget fraction, on the frontier's grid."""
        found = self.result.fitting_path(budget * self.original_ms)
        if found is None:
            raise InfeasibleBudget(f"no {self.method} plan fits budget {budget}")
        return _to_plan(self.space, self.method, found[1], self.conv_scores, budget=budget,
                        budget_ms=budget * self.original_ms)

    def to_json(self) -> str:
        return json.dumps({"method": self.method, "original_latency_ms": self.original_ms,
                           "points": self.points}, indent=1)

    def plot(self, path: str | Path, others: list[Frontier] = (),
             mark: Plan | None = None) -> Path:
        """Save importance vs latency (Pareto curves) as a PNG, with the plan `mark` as a
        point where given; needs matplotlib."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for f in (self, *others):
            pts = f.points
            ax.step([p["latency_ms"] for p in pts], [p["importance"] for p in pts],
                    where="post", label=f.method)
        if mark is not None and mark.predicted_latency_ms is not None:
            ax.plot([mark.predicted_latency_ms], [mark.predicted_importance], "k*", ms=12,
                    label=f"chosen plan ({mark.budget:.0%})")
        ax.set_xlabel("predicted latency (ms, table)")
        ax.set_ylabel("predicted importance (sum)")
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return Path(path)


def frontier(space: MergeSpace, latency: LatencyTable, importance: ImportanceTable, *,
             method: str | MethodName = MethodName.LAYERMERGE, levels: int = 1000,
             conv_scores: Mapping[str, float] | None = None) -> Frontier:
    """The whole importance-vs-latency frontier (budgets 0..100% of the original)."""
    _check_levels(levels)
    method = get_method(method).name
    original = latency.identity_latency(space)
    if original <= 0:
        raise TableError("the original network's table latency is not positive")
    edges = get_method(method).edges(space, latency, importance)
    return Frontier(space, method, original, run_dp(edges, original / levels, levels),
                    conv_scores)


__all__ = ["METHODS", "Frontier", "Method", "MethodName", "Probe", "fastest_latency",
           "fastest_plan", "frontier", "get_method", "importance_keys", "probes", "solve"]
