"""The paper's regime, measured on the distorted digits: LayerMerge, Depth and `auto` (the
more accurate of the two on the held-out split) at measured budgets of 55% and 35%, 3
seeds, with the final fine-tune at 2 epochs and at as long as the original's training (4).

    python benchmarks/bench_regime.py [--seeds 3] [--epochs 2 4]

Every choice (importance, plans, auto's pick) is scored on the validation split; accuracy
is reported on the test split. Paired differences are per seed (same split, same trained
original, same tables).
"""

from __future__ import annotations

import argparse
import statistics
from dataclasses import replace

import torch
from common import write

from fxmerge.demos import DemoConfig, run_seed

BUDGETS = (0.55, 0.35)


def _stats(values: list[float]) -> str:
    return f"{statistics.fmean(values):.2f} ± {statistics.pstdev(values):.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=float, nargs="*", default=[2, 4])
    args = parser.parse_args()
    rows, runs = [], []
    for epochs in args.epochs:
        config = replace(DemoConfig.distorted_task(), finetune_epochs=epochs, budgets=BUDGETS)
        seeds = [run_seed(config, seed, progress=False) for seed in range(args.seeds)]
        for budget in BUDGETS:
            acc = {m: {} for m in ("layermerge", "depth", "auto")}
            for run in seeds:
                for r in run.rows:
                    if r["budget"] == budget and r["method"] in acc:
                        acc[r["method"]][run.seed] = r["accuracy"]
                        runs.append({"finetune_epochs": epochs, **r})
            paired = [s for s in acc["layermerge"] if s in acc["depth"] and s in acc["auto"]]
            lm, dp, auto = ([acc[m][s] for s in paired] for m in ("layermerge", "depth", "auto"))
            best = [max(a, b) for a, b in zip(lm, dp)]
            rows.append({
                "finetune_epochs": epochs, "budget": budget, "seeds": len(paired),
                "layermerge": _stats(lm) if lm else "-", "depth": _stats(dp) if dp else "-",
                "auto": _stats(auto) if auto else "-",
                "depth_minus_layermerge": _stats([d - m for d, m in zip(dp, lm)]) if lm else "-",
                "auto_minus_better": _stats([a - b for a, b in zip(auto, best)]) if lm else "-",
                "auto_picked": ", ".join(r["kept"] for run in seeds for r in run.rows
                                         if r["budget"] == budget and r["method"] == "auto"),
            })
            print(rows[-1], flush=True)
    write("regime_distorted", {"data": "distorted digits, 32x32", "model": "DemoMobileNetV2",
                               "original_training_epochs": DemoConfig.distorted_task().train_epochs,
                               "seeds": args.seeds, "threads": torch.get_num_threads(),
                               "accuracy": "test %, mean ± std over seeds; differences paired "
                                           "per seed", "choices": "scored on the val split"},
          rows, ["finetune_epochs", "budget", "seeds", "layermerge", "depth", "auto",
                 "depth_minus_layermerge", "auto_minus_better", "auto_picked"],
          "LayerMerge, Depth and auto on the distorted digits", runs=runs)


if __name__ == "__main__":
    main()
