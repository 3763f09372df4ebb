"""How long `fxmerge.transform` (prune + merge) takes on MobileNetV2 and ResNet-34 plans
solved at the paper's budgets, on this machine's CPU.

    python benchmarks/bench_transform.py

The latency table is a MACs proxy and the importance random: the time to transform does not
depend on where the plan came from, only on its blocks.
"""

from __future__ import annotations

import statistics
import time

import torchvision
from common import synthetic_problem, write

import fxmerge

MODELS = {
    "mobilenet_v2": (torchvision.models.mobilenet_v2, ["features.0.0", "features.18.0"],
                     (0.55, 0.33)),
    "resnet34": (torchvision.models.resnet34, ["conv1"], (0.71, 0.50)),
}
REPEATS = 5


def main() -> None:
    rows = []
    for name, (factory, exclude, budgets) in MODELS.items():
        gm, space, lat, imp = synthetic_problem(factory, exclude)
        for budget in budgets:
            plan = fxmerge.solve(space, lat, imp, budget=budget)
            times = {"prune": [], "merge": [], "transform": []}
            for _ in range(REPEATS):
                t0 = time.perf_counter()
                pruned = fxmerge.prune(gm, plan).eval()
                t1 = time.perf_counter()
                fxmerge.merge(pruned)
                t2 = time.perf_counter()
                times["prune"].append(t1 - t0)
                times["merge"].append(t2 - t1)
                times["transform"].append(t2 - t0)
            rows.append({"model": name, "budget": budget, "blocks": len(plan.blocks),
                         **{f"{k}_s": statistics.median(v) for k, v in times.items()}})
    write("transform", {"input": "1x3x224x224", "repeats": REPEATS, "statistic": "median",
                        "prune includes": "re-analysis, validation, copy, shape propagation"},
          rows, ["model", "budget", "blocks", "prune_s", "merge_s", "transform_s"],
          "Time of fxmerge.transform (prune + merge) on CPU")


if __name__ == "__main__":
    main()
