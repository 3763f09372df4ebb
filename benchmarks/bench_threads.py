"""A budget holds at the thread count it was measured with: MobileNetV2 (torchvision,
random weights, 224x224, batch 8) solved at 55% with the latency table and the network
timings at 1 and at 2 threads, each plan then timed at both thread counts.

    python benchmarks/bench_threads.py [--budget 0.55] [--batch 8]

Writes `results/threads_mobilenet_v2.{json,md}`.
"""

from __future__ import annotations

import argparse

import torch
import torchvision
from common import write

import fxmerge
from fxmerge import NetworkTimer, solve_measured

EXCLUDE = ["features.0.0", "features.18.0"]


def run() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--budget", type=float, default=0.55)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    torch.manual_seed(0)
    x = torch.randn(args.batch, 3, 224, 224)
    gm = fxmerge.trace(torchvision.models.mobilenet_v2().eval(), x)
    space = fxmerge.analyze(gm, exclude=EXCLUDE)
    importance = fxmerge.agreement_importance(space, gm, x[:4], progress=False)
    plans, rows = {}, []
    for threads in (1, 2):
        latency = fxmerge.measure_latency(space, gm, threads=threads, progress=False)
        timer = NetworkTimer.for_table(gm, space, latency)
        try:
            plans[threads] = solve_measured(space, latency, importance, timer,
                                            budget=args.budget, progress=False)
            verdict = "within budget"
        except fxmerge.InfeasibleBudget as exc:  # the fastest plan it timed, over budget
            plans[threads], verdict = exc.plan, "infeasible: " + str(exc).split(" (")[1]
        rows.append({"solved_at_threads": threads, "solve": verdict,
                     "table_check": latency.settings.check,
                     "solve_ratio": plans[threads].measured["ratio"],
                     "rounds": plans[threads].measured["rounds"],
                     "removed_convs": len(plans[threads].removed_convs),
                     "removed_activations": len(plans[threads].removed_activations(space))})
    for row in rows:  # every plan timed again at both thread counts, side by side
        plan = plans[row["solved_at_threads"]]
        for threads in (1, 2):
            m = NetworkTimer(gm, space, threads=threads).measure(plan)
            row[f"ratio_at_{threads}_threads"] = round(m.ratio, 4)
            row[f"ms_at_{threads}_threads"] = round(m.ms, 3)
    write("threads_mobilenet_v2", {
        "model": "torchvision mobilenet_v2, random weights, 224x224", "batch": args.batch,
        "budget": args.budget, "backend": "eager",
        "importance": "output agreement (4 images)",
        "timing": "NetworkTimer: 3 fresh preparations x 10 interleaved rounds, median ratio"},
        rows, ["solved_at_threads", "solve", "solve_ratio", "ratio_at_1_threads", "ratio_at_2_threads",
               "ms_at_1_threads", "ms_at_2_threads", "removed_convs", "removed_activations",
               "rounds", "table_check"],
        "A budget holds at the thread count it was measured with")


if __name__ == "__main__":
    run()
