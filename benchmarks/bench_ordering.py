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
import statistics
import time
from dataclasses import replace

from common import RESULTS, write
from plans import (
    OBJECTIVES,
    additive,
    pair_orders,
    paired_with_depth,
    previous_runs,
    provenance,
    solve_plans,
    summarize_plans,
)

from fxmerge import Plan, measure_latency, transform
from fxmerge.demos import (
    DemoConfig,
    finetune_importance,
    finetune_plan,
    time_against_original,
    train_seed,
)


def run_seed(config: DemoConfig, seed: int, budgets: list[float]) -> list[dict]:
    trained = train_seed(config, seed, progress=False)
    space = trained.space
    cpu = measure_latency(space, trained.gm, warmup=5, repeat=config.latency_repeat,
                          progress=False)
    tick = time.perf_counter()
    importance = finetune_importance(trained, config)
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
    measured = time_against_original(trained.job, nets, config.compare_repeat)
    for row in rows:
        row["speedup"] = round(1 / measured[row.pop("net")].ratio, 3)
        row["base_accuracy"] = round(trained.base_acc, 2)
        row["importance_s"] = importance_s
    return rows


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
