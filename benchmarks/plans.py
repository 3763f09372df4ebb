"""What the ordering and additivity benchmarks share: the plans they solve (two cost models,
three objectives), how often an importance table orders plans as their accuracies, and
their results files."""

from __future__ import annotations

import itertools
import json
import math
import statistics
from collections.abc import Callable, Iterator
from pathlib import Path

from fxmerge import (
    Entry,
    ImportanceTable,
    InfeasibleBudget,
    LatencyTable,
    MergeSpace,
    Plan,
    entry_layer,
    solve,
)
from fxmerge.demos import summarize

OBJECTIVES = ("layermerge", "layermerge-additive", "depth")


def flops_table(space: MergeSpace) -> LatencyTable:
    """Each entry's multiply-adds (in millions) as its cost; removing a conv costs 0."""
    values = {}
    for e in space.entries:
        if e.k == 0:  # the entry that removes its conv
            values[e] = 0.0
            continue
        s = entry_layer(space, e)
        n, c, h, w = s.input_shape
        out_hw = math.ceil(h / s.stride) * math.ceil(w / s.stride)
        values[e] = n * s.out_channels * out_hw * (c // s.groups) * s.kernel ** 2 / 1e6
    return LatencyTable.from_values(space, values, source="multiply-adds (millions)")


def additive(space: MergeSpace, importance: ImportanceTable) -> ImportanceTable:
    """The table with each entry's `Δ = log I` as its value: LayerMerge's DP then maximises
    the predicted accuracy change instead of the sum of exponentials. A conv left as it is
    is worth 0, as in Depth (its table value is the fine-tune's noise)."""
    unchanged = {space.full_entries[(c.index - 1, c.index)] for c in space.convs}
    values = {k: 0.0 if k in unchanged else math.log(v)
              for k, v in importance.values.items() if isinstance(k, Entry)}
    return ImportanceTable(values, importance.signature, {"objective": "sum of log I"})


def predicted_delta(space: MergeSpace, plan: Plan, deltas: ImportanceTable) -> float:
    """Σ Δ over the plan's blocks (`deltas`: an `additive` table), in accuracy points;
    Depth's own value for its plans."""
    if plan.method == "depth":
        return 100 * plan.predicted_importance
    return 100 * sum(deltas[Entry(i, j, b.kernel, b.depthwise)]
                     for b, (i, j) in zip(plan.blocks, plan.positions(space)))


def solve_plans(space: MergeSpace, cpu: LatencyTable, importance: ImportanceTable,
                deltas: ImportanceTable, budgets: list[float]) -> Iterator[tuple[dict, Plan]]:
    """`(row, plan)` for every cost model, objective and budget a plan exists for; `row`
    describes the plan (its predicted Δ from `deltas`, an `additive` table)."""
    for cost, latency in {"cpu": cpu, "flops": flops_table(space)}.items():
        for objective in OBJECTIVES:
            table = deltas if objective == "layermerge-additive" else importance
            method = "depth" if objective == "depth" else "layermerge"
            for budget in budgets:
                try:
                    plan = solve(space, latency, table, budget=budget, method=method)
                except InfeasibleBudget as exc:
                    print(f"{cost} {objective} {budget:.0%}: infeasible ({exc})")
                    continue
                yield {"cost": cost, "objective": objective, "budget": budget,
                       "table_ratio": round(plan.predicted_latency_ms
                                            / latency.identity_latency(space), 4),
                       "predicted_delta": round(predicted_delta(space, plan, deltas), 2),
                       "removed_convs": len(plan.removed_convs),
                       "removed_activations": len(plan.removed_activations(space))}, plan


def ordered_pairs(runs: list[dict], score: Callable[[dict], float]) -> tuple[int, int]:
    """`(right, pairs)`: pairs of different plans with equal table latency (same seed, cost
    model and budget) that differ in accuracy and in `score`, and how many of them `score`
    orders as the accuracies after fine-tuning do (chance: half)."""
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        groups.setdefault((r["seed"], r["cost"], r["budget"]), []).append(r)
    right = pairs = 0
    for rows in groups.values():
        for a, b in itertools.combinations(rows, 2):
            measured = a["accuracy"] - b["accuracy"]
            predicted = score(a) - score(b)
            if measured and predicted:
                pairs += 1
                right += (measured > 0) == (predicted > 0)
    return right, pairs


def pair_orders(runs: list[dict], scores: dict[str, Callable[[dict], float]]) -> dict[str, str]:
    """Meta fields: for each named score, and for the number of convs a plan removes (fewer
    first), the equal-latency plan pairs it orders right."""
    scores = {**scores, "fewer removed convs": lambda r: -r["removed_convs"]}
    return {f"equal-latency plan pairs ordered right by {name}":
            "{} of {}".format(*ordered_pairs(runs, score)) for name, score in scores.items()}


def paired_with_depth(runs: list[dict], budgets: list[float]) -> dict[str, str]:
    """Meta fields: LayerMerge's accuracy minus Depth's on the `cpu` table at each budget,
    paired by seed (mean ± standard error over the seeds)."""
    return {f"LayerMerge − Depth at {b:.0%} (cpu table, paired by seed)": _paired(runs, b)
            for b in budgets}


def _paired(runs: list[dict], budget: float) -> str:
    acc = {(r["seed"], r["objective"]): r["accuracy"] for r in runs
           if r["cost"] == "cpu" and r["budget"] == budget}
    diffs = [a - acc[(seed, "depth")] for (seed, objective), a in acc.items()
             if objective == "layermerge" and (seed, "depth") in acc]
    if len(diffs) < 2:
        return "fewer than two seeds"
    sem = statistics.stdev(diffs) / math.sqrt(len(diffs))
    return f"{statistics.fmean(diffs):+.2f} ± {sem:.2f} pt over {len(diffs)} seeds"


def summarize_plans(runs: list[list[dict]], metrics: tuple[str, ...]) -> list[dict]:
    """`summarize` (mean and std over seeds) per cost model, objective and budget."""
    grouped = [[{**row, "method": f"{row['cost']}/{row['objective']}"} for row in r]
               for r in runs]
    rows = summarize(grouped, metrics)
    for row in rows:
        row["cost"], row["objective"] = row.pop("method").split("/")
    return rows


def previous_runs(path: Path, budgets: list[float]) -> tuple[dict[int, list[dict]], dict]:
    """The rows of every seed an earlier run with the same budgets wrote to `path` (a rerun
    with more seeds runs only the new ones), and the machine that run recorded."""
    if not path.exists():
        return {}, {}
    data = json.loads(path.read_text())
    if data["meta"].get("budget_list") != budgets:
        return {}, {}
    seeds: dict[int, list[dict]] = {}
    for row in data["runs"]:
        seeds.setdefault(row["seed"], []).append(row)
    return seeds, data["meta"]["machine"]


def provenance(done: dict[int, list[dict]], earlier: dict, seeds: int) -> dict:
    """Meta fields naming the machine of the seeds kept from an earlier run: `machine`
    itself when every seed was kept, so a re-summary does not credit this machine."""
    kept = [s for s in range(seeds) if s in done]
    if not kept:
        return {}
    if len(kept) == seeds:
        return {"machine": earlier}
    return {f"seeds {kept} ran earlier on": earlier}
