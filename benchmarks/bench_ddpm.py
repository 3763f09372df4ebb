"""Speed-up of LayerMerge and Depth plans on the CIFAR-10 DDPM U-Net (35.7 M parameters,
32x32) at the paper's budgets, original and merged timed side by side in one process.

    python benchmarks/bench_ddpm.py --batch 4            # CPU
    python benchmarks/bench_ddpm.py --device cuda --batch 64

The latency table is measured here (eager, same device and batch); importance is the output
agreement proxy on a random batch and timesteps, without fine-tuning (speed only: weights are
random). The original is the identity plan's network. A plan's removed GroupNorm+swish pairs
leave one relocated GroupNorm per merged block, which the merged network keeps.
"""

from __future__ import annotations

import argparse

import torch
from common import write

import fxmerge
from fxmerge import agreement_importance, time_interleaved
from fxmerge.models import DDPM_EXCLUDE, DDPMUNet

# LayerMerge paper, Table 4 (DDPM on CIFAR-10, PyTorch speed-up)
PAPER = {("layermerge", 0.73): 1.13, ("layermerge", 0.70): 1.16, ("layermerge", 0.58): 1.27,
         ("depth", 0.89): 1.04}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=15)
    parser.add_argument("--table-repeat", type=int, default=10)
    args = parser.parse_args()
    torch.manual_seed(0)
    device = torch.device(args.device)
    model = DDPMUNet().eval()
    x, t = torch.randn(args.batch, 3, 32, 32), torch.randint(0, 1000, (args.batch,))
    gm = fxmerge.trace(model, (x, t))
    space = fxmerge.analyze(gm, exclude=DDPM_EXCLUDE)
    latency = fxmerge.measure_latency(space, gm, device=device, warmup=3,
                                     repeat=args.table_repeat)
    importance = agreement_importance(space, gm, (x[:2], t[:2]))
    original_table = latency.identity_latency(space)
    nets = {"original": fxmerge.transform(gm, fxmerge.Plan.identity(space))}
    plans, infeasible = {}, []
    for (method, budget), paper in PAPER.items():
        try:
            plan = fxmerge.solve(space, latency, importance, budget=budget, method=method)
        except fxmerge.InfeasibleBudget as exc:
            print(f"{method} at {budget:.0%}: {exc}")
            infeasible.append({"method": method, "budget": budget,
                               "paper_speedup": paper,
                               "note": f"infeasible on this device's table: {exc}"})
            continue
        plans[(method, budget)] = plan
        nets[f"{method}@{budget}"] = fxmerge.transform(gm, plan)
    nets = {k: v.to(device) for k, v in nets.items()}
    measured = {name: timing.ms for name, timing in time_interleaved(
        nets, (x.to(device), t.to(device)), repeat=args.repeat).items()}
    rows = []
    for (method, budget), plan in plans.items():
        ms = measured[f"{method}@{budget}"]
        rows.append({"method": method, "budget": budget, "original_ms": measured["original"],
                     "merged_ms": ms, "speedup": measured["original"] / ms,
                     "paper_speedup": PAPER[(method, budget)],
                     "predicted_speedup": original_table / plan.predicted_latency_ms,
                     "convs_removed": len(plan.removed_convs),
                     "merged_blocks": sum(len(b.kept) > 1 for b in plan.blocks)})
    rows += infeasible
    write(f"ddpm_{device.type}", {
        "device": args.device, "batch": args.batch, "input": "3x32x32 + timestep",
        "model": "DDPMUNet() (CIFAR-10 configuration)", "backend": "eager",
        "timing": f"median of {args.repeat} interleaved rounds after 3 warm-up calls",
        "latency table": f"eager, batch {args.batch}, median of {args.table_repeat}",
        "importance": "output agreement proxy, no fine-tuning"},
        rows, ["method", "budget", "original_ms", "merged_ms", "speedup", "paper_speedup",
               "predicted_speedup", "convs_removed", "merged_blocks", "note"],
        f"DDPM U-Net speed-up over the original ({args.device}, eager, batch {args.batch})")


if __name__ == "__main__":
    main()
