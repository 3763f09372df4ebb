"""Speed-up of LayerMerge, Depth and LayerOnly plans over the original network, at the
paper's budgets, original and merged timed side by side (interleaved) in one process.

    python benchmarks/bench_speedup.py --device cpu --backend eager
    python benchmarks/bench_speedup.py --device cpu --backend compile
    python benchmarks/bench_speedup.py --device cuda --batch 128 --backend eager

Plans come from a latency table measured here with the eager backend on the same device and
batch, and from a fixed importance proxy: output agreement with the original network on a
calibration batch of random images, without fine-tuning (these runs measure speed, not
accuracy; weights are random since none can be downloaded). The original is timed with its
BatchNorm folded (`transform` with the identity plan), as the authors do, so the speed-up
measures depth alone. With `--backend compile` every network is compiled with torch.compile
(inductor) before timing; the table stays the eager one.
"""

from __future__ import annotations

import argparse

import torch
import torchvision
from common import write

import fxmerge
from fxmerge.tables.importance import agreement_importance
from fxmerge.tables.latency import time_interleaved

MBV2_EXCLUDE = ["features.0.0", "features.18.0"]
MODELS = {
    "resnet34": (lambda: torchvision.models.resnet34(), ["conv1"], (0.71, 0.50)),
    "mobilenet_v2": (lambda: torchvision.models.mobilenet_v2(), MBV2_EXCLUDE, (0.55, 0.33)),
    "mobilenet_v2_1.4": (lambda: torchvision.models.mobilenet_v2(width_mult=1.4),
                         MBV2_EXCLUDE, (0.43, 0.30)),
}
# method.md section 5 (RTX 2080 Ti, fp32, PyTorch): LayerMerge speed-ups reported by the paper
PAPER = {("resnet34", 0.71): 1.36, ("resnet34", 0.50): 1.79, ("mobilenet_v2", 0.55): 1.63,
         ("mobilenet_v2", 0.33): 2.49, ("mobilenet_v2_1.4", 0.43): 1.99,
         ("mobilenet_v2_1.4", 0.30): 2.72}


def bench_model(name: str, args) -> list[dict]:
    factory, exclude, budgets = MODELS[name]
    torch.manual_seed(0)
    device = torch.device(args.device)
    model = factory().eval()
    x = torch.randn(args.batch, 3, 224, 224)
    gm = fxmerge.trace(model, x)
    space = fxmerge.analyze(gm, exclude=exclude)
    latency = fxmerge.measure_latency(space, device=device, warmup=args.table_warmup,
                                      repeat=args.table_repeat)
    importance = agreement_importance(space, torch.randn(2, 3, 224, 224))
    original_table = latency.identity_latency(space)
    nets = {"original": fxmerge.transform(gm, fxmerge.Plan.identity(space))}
    plans = {}
    for method in args.methods:
        for budget in budgets:
            try:
                plan = fxmerge.solve(space, latency, importance, budget=budget, method=method)
            except fxmerge.InfeasibleBudget as exc:
                print(f"{name} {method} {budget:.0%}: {exc}")
                plans[(method, budget)] = None
                continue
            plans[(method, budget)] = plan
            nets[f"{method}@{budget}"] = fxmerge.transform(gm, plan)
    nets = {k: v.to(device) for k, v in nets.items()}
    if args.backend == "compile":
        nets = {k: torch.compile(v) for k, v in nets.items()}
    measured = time_interleaved(nets, x.to(device), repeat=args.repeat, warmup=args.warmup)
    rows = []
    for (method, budget), plan in plans.items():
        row = {"model": name, "method": method, "budget": budget,
               "paper_speedup": PAPER.get((name, budget)) if method == "layermerge" else None}
        if plan is None:
            rows.append({**row, "note": "infeasible"})
            continue
        ms = measured[f"{method}@{budget}"]
        rows.append({**row, "original_ms": measured["original"], "merged_ms": ms,
                     "speedup": measured["original"] / ms,
                     "predicted_speedup": original_table / plan.predicted_latency_ms,
                     "predicted_ms": plan.predicted_latency_ms,
                     "measured_over_predicted": ms / plan.predicted_latency_ms,
                     "original_measured_over_table": measured["original"] / original_table,
                     "blocks": len(plan.blocks)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--backend", choices=["eager", "compile"], default="eager")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--table-repeat", type=int, default=20)
    parser.add_argument("--table-warmup", type=int, default=5)
    parser.add_argument("--models", nargs="*", default=list(MODELS))
    parser.add_argument("--methods", nargs="*", default=["layermerge", "depth", "layeronly"])
    args = parser.parse_args()

    rows = [row for name in args.models for row in bench_model(name, args)]
    write(f"speedup_{args.device.split(':')[0]}_{args.backend}",
          {"device": args.device, "backend": args.backend, "batch": args.batch,
           "input": "3x224x224", "dtype": "float32", "timing": f"median of {args.repeat} "
           f"interleaved rounds after {args.warmup} warm-up calls",
           "latency table": f"eager, {args.device}, batch {args.batch}, median of "
           f"{args.table_repeat}", "importance": "output agreement proxy, no fine-tuning",
           "original": "BatchNorm folded (identity plan)"},
          rows, ["model", "method", "budget", "original_ms", "merged_ms", "speedup",
                 "predicted_speedup", "paper_speedup", "measured_over_predicted",
                 "original_measured_over_table", "blocks", "note"],
          f"Speed-up over the original ({args.device}, {args.backend}, batch {args.batch})")


if __name__ == "__main__":
    main()
