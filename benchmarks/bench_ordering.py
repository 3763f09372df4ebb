"""Why LayerMerge does not beat Depth on the demo: the objective or the cost model?

    python benchmarks/bench_ordering.py [--seeds 3] [--budgets 0.55 0.35] [--plain]
                                        [--importance-steps 12]

(seeds 0 .. N-1; seeds already in the results file, with the same budgets, are kept.)

Per seed, the distorted-digits demo network is trained and its fine-tuned importance table
estimated exactly as `fxmerge demo --distorted` does (the same seeds give the same tables),
then plans are solved at *table* budgets (equal predicted latency) on two cost models:

- `cpu`: the latency table measured on this machine (what the demo uses);
- `flops`: every entry costs its multiply-adds (a device on which a merged kernel costs what
  its arithmetic costs; no per-layer overhead).

and with three objectives over one importance table:

- `layermerge`: the paper's, the sum over blocks of `I = exp(Δ)`. Each block is worth about
  1 + Δ, so the objective counts blocks (kept activations) as much as accuracy;
- `layermerge-additive`: the same space and table, maximising the sum of `Δ = log I`, the
  predicted accuracy change (Depth's kind of objective);
- `depth`: the Depth baseline (activations only, additive importance).

Each plan is fine-tuned and merged as the demo does, and every merged network is timed
against the original on the CPU (side by side, interleaved). How well the importance table
predicts: of the pairs of plans solved for the same seed, cost model and budget (equal
table latency), how many it orders as their accuracies after fine-tuning do, and how many
the number of removed convs (fewer first) orders so.
`--importance-steps` sets the importance fine-tune's length (the demo's: 12). Writes
`results/ordering_<task>[_steps<N>].{json,md}`.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

from common import RESULTS, write

from fxmerge.demos.classify import DemoConfig, finetune_importance, finetune_plan, train_seed
from fxmerge.demos.shared import summarize, time_against_original
from fxmerge.errors import InfeasibleBudget
from fxmerge.passes import transform
from fxmerge.plan import Plan
from fxmerge.solve import solve
from fxmerge.space import IDENTITY, Entry, MergeSpace
from fxmerge.tables.importance import ImportanceTable
from fxmerge.tables.latency import LatencyTable, entry_signature, measure_latency

OBJECTIVES = ("layermerge", "layermerge-additive", "depth")


def flops_table(space: MergeSpace) -> LatencyTable:
    """Each entry's multiply-adds (in millions) as its cost; removing a conv costs 0."""
    values = {}
    for e in space.entries:
        if (e.k, e.dw) == IDENTITY:
            values[e] = 0.0
            continue
        s = entry_signature(space, e)
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
                     for b, (i, j) in zip(plan.blocks, plan.spans(space)))


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


def run_seed(config: DemoConfig, seed: int, budgets: list[float]) -> list[dict]:
    trained = train_seed(config, seed)
    space = trained.space
    cpu = measure_latency(space, trained.gm, warmup=5, repeat=config.latency_repeat,
                          progress=False)
    tick = time.perf_counter()
    importance = finetune_importance(trained, config, progress=False)
    importance_s = round(time.perf_counter() - tick, 1)
    print(f"[seed {seed}] importance: {len(importance)} keys in {importance_s:.0f} s")
    deltas = additive(space, importance)
    nets = {"original": transform(trained.gm, Plan.identity(space))}
    rows = []
    for row, plan in solve_plans(space, cpu, importance, deltas, budgets):
        name = f"{row['cost']}/{row['objective']}@{row['budget']}"
        nets[name], row["accuracy"] = finetune_plan(trained, plan, config, seed)
        rows.append({"seed": seed, **row, "net": name})
        print(f"[seed {seed}] {name}: accuracy {row['accuracy']:.2f}%, "
              f"predicted Δ {row['predicted_delta']:+.1f} pt, {row['removed_convs']} convs "
              f"and {row['removed_activations']} activations removed")
    measured = time_against_original(nets, trained.data.test[0][: config.latency_batch],
                                     config.compare_repeat)
    for row in rows:
        row["speedup"] = round(1 / measured[row.pop("net")].ratio, 3)
        row["base_accuracy"] = round(trained.base_acc, 2)
        row["importance_s"] = importance_s
    return rows


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.55, 0.35])
    parser.add_argument("--plain", action="store_true", help="plain digits, not distorted")
    parser.add_argument("--importance-steps", type=int, default=DemoConfig.importance_steps,
                        help="the importance fine-tune's steps (default: the demo's)")
    args = parser.parse_args()
    config = DemoConfig() if args.plain else DemoConfig.distorted_task()
    config = replace(config, importance_steps=args.importance_steps)
    data = "plain" if args.plain else "distorted"
    task = "digits" if args.plain else "distorted"
    if args.importance_steps != DemoConfig.importance_steps:
        task += f"_steps{args.importance_steps}"
    done, earlier = previous_runs(RESULTS / f"ordering_{task}.json", args.budgets)
    runs = [done.get(seed) or run_seed(config, seed, args.budgets)
            for seed in range(args.seeds)]
    rows = summarize_plans(runs, ("accuracy", "speedup", "predicted_delta", "table_ratio",
                                  "removed_convs", "removed_activations"))
    base = [r[0]["base_accuracy"] for r in runs if r]
    all_runs = [row for r in runs for row in r]
    seconds = [r[0]["importance_s"] for r in runs if "importance_s" in r[0]]
    found = {(r["cost"], r["objective"], r["budget"]) for r in rows}
    infeasible = [f"{c}/{o}@{b}" for c in ("cpu", "flops") for o in OBJECTIVES
                  for b in args.budgets if (c, o, b) not in found]
    write(f"ordering_{task}", {
        **provenance(done, earlier, args.seeds),
        "task": f"{data} digits demo network (DemoMobileNetV2), "
                f"{config.importance_steps}-step fine-tuned importance",
        "seeds": args.seeds, "budget_list": args.budgets,
        "infeasible in every seed": ", ".join(infeasible) or "none",
        "original_accuracy_mean": round(statistics.fmean(base), 2),
        "original_accuracy_std": round(statistics.pstdev(base), 2),
        **pair_orders(all_runs, {"the predicted Δ": lambda r: r["predicted_delta"]}),
        **paired_with_depth(all_runs, args.budgets),
        "importance table seconds (mean over seeds that recorded it)":
            round(statistics.fmean(seconds)) if seconds else "not recorded",
        "budgets": "fractions of each cost model's table latency of the original",
        "speedup": f"CPU eager, batch {config.latency_batch}, {config.compare_repeat} "
                   "interleaved rounds over fresh copies, median ratio"},
        rows, ["cost", "objective", "budget", "seeds", "accuracy_mean", "accuracy_std",
               "speedup_mean", "predicted_delta_mean", "table_ratio_mean",
               "removed_convs_mean", "removed_activations_mean"],
        "LayerMerge vs Depth: objective and cost model, at equal table latency",
        runs=all_runs)


if __name__ == "__main__":
    main()
