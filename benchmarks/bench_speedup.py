"""Measured budgets: LayerMerge, Depth and LayerOnly plans for ResNet-34 and MobileNetV2-1.0
/ 1.4 at the paper's budgets, solved so that the network measures within the budget, then
timed again, side by side with the original, to check it.

    python benchmarks/bench_speedup.py --backend eager --batch 1 8
    python benchmarks/bench_speedup.py --backend inductor --batch 1 8
    python benchmarks/bench_speedup.py --backend onnxruntime --batch 1 8
    python benchmarks/bench_speedup.py --device cuda --backend eager --batch 128

Per model, backend and batch: a latency table (eager; on the onnxruntime backend, timed in
ONNX Runtime), an importance proxy (output agreement on random images, no fine-tuning:
these runs measure speed, not accuracy; weights are random since none can be downloaded),
and for every method and budget `solve_measured` (plans transformed and timed against the
original on the backend until one measures within [0.9, 1.0] x the budget). Then every
chosen plan, and the plan the table alone gives at the same budget (`solve(budget=)`, how
fxmerge budgets worked before), is prepared again and timed side by side with the original
(BatchNorm folded) by a second timer: `measured_ratio` (chosen / original), `speedup`, `table_basis_ratio`
(the table-budget plan / original), `predicted_ratio` (the calibrated prediction for the
chosen plan, from the other plans' measurements) and `solve_ratio` (what the solve's loop
measured).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torchvision
from common import write

import fxmerge
from fxmerge import NetworkTimer, agreement_importance, solve_measured

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
    gm = fxmerge.trace(factory().eval(), torch.randn(1, 3, 224, 224))
    space = fxmerge.analyze(gm, exclude=exclude)
    importance = agreement_importance(space, gm, torch.randn(2, 3, 224, 224))
    rows = []
    for batch in args.batch:
        table_backend = "onnxruntime" if args.backend == "onnxruntime" else "eager"
        latency = fxmerge.measure_latency(space, gm, backend=table_backend, device=device,
                                          batch_size=batch, warmup=5, repeat=args.table_repeat)
        timer = NetworkTimer(gm, space, backend=args.backend, device=device, batch_size=batch,
                             repeat=args.repeat)
        original_table = latency.identity_latency(space)
        chosen, by_table = {}, {}
        for method in args.methods:
            for budget in budgets:
                key = f"{method}@{budget}"
                started = time.perf_counter()
                try:
                    chosen[key] = solve_measured(space, latency, importance, timer,
                                                 budget=budget, method=method)
                except fxmerge.InfeasibleBudget as exc:
                    print(f"{name} batch {batch} {key}: {exc}")
                    chosen[key] = str(exc)
                chosen[key + ":seconds"] = time.perf_counter() - started
                try:
                    by_table[key] = fxmerge.solve(space, latency, importance, budget=budget,
                                                  method=method)
                except fxmerge.InfeasibleBudget:
                    pass
        plans = {k: p for k, p in chosen.items() if isinstance(p, fxmerge.Plan)}
        plans.update({f"table:{k}": p for k, p in by_table.items()})
        # the check: each plan timed again by a second timer (its own fresh preparations
        # of the plan and the original), as a user would time it after the solve
        check = NetworkTimer(gm, space, backend=args.backend, device=device, batch_size=batch,
                             repeat=args.final_repeat, warmup=args.warmup)
        ratios = {key: check.measure(plan).ratio for key, plan in plans.items()}
        original_ms = statistics.median(m.original_ms for m in check.measurements.values())
        for method in args.methods:
            for budget in budgets:
                key = f"{method}@{budget}"
                plan = chosen[key]
                row = {"model": name, "backend": args.backend, "batch": batch,
                       "method": method, "budget": budget,
                       "paper_speedup": PAPER.get((name, budget)) if method == "layermerge"
                       else None, "solve_seconds": round(chosen[key + ":seconds"], 1)}
                if key in by_table:
                    row["table_basis_ratio"] = ratios[f"table:{key}"]
                if not isinstance(plan, fxmerge.Plan):
                    rows.append({**row, "note": plan})
                    continue
                m = plan.measured
                rows.append({**row, "original_ms": original_ms,
                             "merged_ms": ratios[key] * original_ms,
                             "measured_ratio": ratios[key], "speedup": 1 / ratios[key],
                             "predicted_ratio": m["predicted_ratio"],
                             "solve_ratio": m["ratio"], "rounds": m["rounds"],
                             "table_ratio": plan.predicted_latency_ms / original_table,
                             "blocks": len(plan.blocks)})
        print(f"{name} batch {batch}: done", flush=True)
    return rows


def headline(rows: list[dict]) -> dict:
    """Per batch: the worst budget miss (measured / budget), the worst prediction error,
    and the same miss for the table-basis plans."""
    out = {}
    for batch in sorted({r["batch"] for r in rows}):
        done = [r for r in rows if r["batch"] == batch and "measured_ratio" in r]
        table = [r for r in rows if r["batch"] == batch and "table_basis_ratio" in r]
        if not done:
            continue
        out[f"batch {batch}"] = {
            "plans": len(done),
            "measured/budget range": [round(min(r["measured_ratio"] / r["budget"] for r in done), 3),
                                      round(max(r["measured_ratio"] / r["budget"] for r in done), 3)],
            "worst prediction error": round(max(abs(r["predicted_ratio"] / r["measured_ratio"] - 1)
                                                for r in done), 3),
            "median prediction error": round(statistics.median(
                abs(r["predicted_ratio"] / r["measured_ratio"] - 1) for r in done), 3),
            "table basis: measured/budget range": [
                round(min(r["table_basis_ratio"] / r["budget"] for r in table), 3),
                round(max(r["table_basis_ratio"] / r["budget"] for r in table), 3)]}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--backend", choices=["eager", "inductor", "onnxruntime"],
                        default="eager")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeat", type=int, default=20, help="rounds per loop timing")
    parser.add_argument("--final-repeat", type=int, default=30, help="rounds of the check")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--table-repeat", type=int, default=20)
    parser.add_argument("--models", nargs="*", default=list(MODELS))
    parser.add_argument("--methods", nargs="*", default=["layermerge", "depth", "layeronly"])
    args = parser.parse_args()

    rows = [row for name in args.models for row in bench_model(name, args)]
    meta = {"device": args.device, "backend": args.backend, "batch": args.batch,
            "input": "3x224x224", "dtype": "float32",
            "check timing": f"a second NetworkTimer ({args.final_repeat} rounds): the plan and "
            "the original prepared afresh 3 times, each pair timed in interleaved rounds after "
            f"{args.warmup} warm-up calls, the median of the 3 ratios; original_ms: median "
            "over those runs",
            "solve": f"solve_measured, tolerance 0.1, {args.repeat} interleaved rounds per "
            "timing over 3 fresh preparations", "latency table": ("onnxruntime" if args.backend == "onnxruntime"
                                        else "eager") + f", median of {args.table_repeat}",
            "importance": "output agreement proxy, no fine-tuning",
            "original": "BatchNorm folded (identity plan)", "headline": headline(rows)}
    suffix = f"_b{'_'.join(map(str, args.batch))}" if args.batch != [1, 8] else ""
    write(f"speedup_{args.device.split(':')[0]}_{args.backend}{suffix}", meta, rows,
          ["model", "batch", "method", "budget", "measured_ratio", "speedup",
           "predicted_ratio", "solve_ratio", "table_basis_ratio", "paper_speedup", "rounds",
           "solve_seconds", "blocks", "note"],
          f"Measured budgets ({args.device}, {args.backend}, batch {args.batch})")


if __name__ == "__main__":
    main()
