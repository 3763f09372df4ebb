"""Do a plan's importance entries add up? The sum the solvers maximise, against the same
estimator applied to the whole plan.

    python benchmarks/bench_additivity.py [--seeds 3] [--budgets 0.55 0.35]

Per seed, the distorted-digits demo network, its latency table and its 12-step importance
table, and the plans `bench_ordering.py` solves from them (two cost models, three
objectives, each budget). For each plan:

- `predicted_delta`: the sum of its entries' Δ (each measured with only its block changed);
- `joint_delta`: the estimator applied to the whole plan at once (the same brief fine-tune
  and validation accuracy as one table entry);
- `accuracy`: test accuracy after the demo's full fine-tune, then merged.

If the entries were independent, the two Δ would agree. Which of them orders plans of equal
table latency as their final accuracies? No timing: the latency table only decides the
plans. Writes `results/additivity_distorted.{json,md}`; seeds already there are kept.
"""

from __future__ import annotations

import argparse

from common import RESULTS, write
from plans import (
    additive,
    pair_orders,
    paired_with_depth,
    previous_runs,
    provenance,
    solve_plans,
    summarize_plans,
)

from fxmerge import ImportanceTable, Plan, measure_latency, score_plan
from fxmerge.demos import (
    DemoConfig,
    Trained,
    estimator,
    finetune_importance,
    finetune_plan,
    train_seed,
)


def plan_delta(trained: Trained, plan: Plan, config: DemoConfig,
               importance: ImportanceTable) -> float:
    """The importance estimator applied to a whole plan: the change of validation accuracy
    (a fraction) after the estimator's brief fine-tune, from the base score `importance`'s
    entries were measured against."""
    evaluate, finetune = estimator(trained, config)
    return score_plan(trained.gm, plan, evaluate, finetune) - importance.settings.base_score


def run_seed(config: DemoConfig, seed: int, budgets: list[float]) -> list[dict]:
    trained = train_seed(config, seed, progress=False)
    space = trained.space
    cpu = measure_latency(space, trained.gm, warmup=5, repeat=config.latency_repeat,
                          progress=False)
    importance = finetune_importance(trained, config)
    rows = []
    for row, plan in solve_plans(space, cpu, importance, additive(space, importance), budgets):
        row["joint_delta"] = round(100 * plan_delta(trained, plan, config, importance), 2)
        row["accuracy"] = finetune_plan(trained, plan, config, seed)[1]
        rows.append({"seed": seed, **row})
        print(f"[seed {seed}] {row['cost']}/{row['objective']}@{row['budget']}: predicted Δ "
              f"{row['predicted_delta']:+.1f} pt, joint Δ {row['joint_delta']:+.1f} pt, "
              f"accuracy {row['accuracy']:.2f}%")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.55, 0.35])
    args = parser.parse_args()
    config = DemoConfig.distorted_task()
    done, earlier = previous_runs(RESULTS / "additivity_distorted.json", args.budgets)
    per_seed = [done.get(seed) or run_seed(config, seed, args.budgets)
                for seed in range(args.seeds)]
    runs = [row for r in per_seed for row in r]
    rows = summarize_plans(per_seed, ("predicted_delta", "joint_delta", "accuracy",
                                      "removed_convs"))
    write("additivity_distorted", {
        **provenance(done, earlier, args.seeds),
        "task": f"distorted digits demo network (DemoMobileNetV2), "
                f"{config.importance_steps}-step fine-tuned importance",
        "seeds": args.seeds, "budget_list": args.budgets,
        **pair_orders(runs, {"the sum of entries": lambda r: r["predicted_delta"],
                             "the joint estimate": lambda r: r["joint_delta"]}),
        **paired_with_depth(runs, args.budgets),
        "deltas": "accuracy points on the validation split, after the estimator's fine-tune",
        "accuracy": "test accuracy after the demo's fine-tune, merged"},
        rows, ["cost", "objective", "budget", "seeds", "predicted_delta_mean",
               "joint_delta_mean", "accuracy_mean", "removed_convs_mean"],
        "Does a plan's importance add up? Sum of entries against the whole plan",
        runs=runs)


if __name__ == "__main__":
    main()
