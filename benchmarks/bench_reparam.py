"""Re-parameterisable networks: LayerMerge at a measured budget next to the networks the
re-parameterisation papers deploy, timed side by side on one device.

    python benchmarks/bench_reparam.py [--models repvgg_a0 mobileone_s0] [--batch 1 8]

Per timm model (random weights, BatchNorm statistics from a few training-mode passes) and
batch: its space is analysed on the branchy training form (each region of parallel
branches one conv position), a latency table is measured, importance is the output-agreement
proxy (no fine-tuning: speed, not accuracy, is measured here), and `solve_measured` picks a
LayerMerge plan whose merged network measures within the budget of the identity plan's
(which is the re-parameterised network). Then, prepared afresh three times and timed in
interleaved rounds: the training form, timm's `reparameterize_model`, fxmerge's
`reparameterize` and the LayerMerge network; ratios are to timm's re-parameterised network.
"""

from __future__ import annotations

import argparse

import timm
import torch
from common import calibrate_batchnorm, write
from timm.utils.model import reparameterize_model

import fxmerge
from fxmerge import (
    NetworkTimer,
    agreement_importance,
    solve_measured,
    time_against_reference,
    using_threads,
)

REFERENCE = "timm reparameterize_model"


def bench(name: str, batch: int, args) -> list[dict]:
    torch.manual_seed(0)
    x = torch.randn(batch, 3, args.size, args.size)
    model = calibrate_batchnorm(timm.create_model(name, pretrained=False), x[:2].clone())
    gm = fxmerge.trace(model, x[:1])
    space = fxmerge.analyze(gm)
    importance = agreement_importance(space, gm, torch.randn(2, 3, args.size, args.size))
    latency = fxmerge.measure_latency(space, gm, batch_size=batch, repeat=args.table_repeat)
    timer = NetworkTimer(gm, space, batch_size=batch, repeat=args.repeat)
    reference = reparameterize_model(model)
    collapsed = fxmerge.reparameterize(gm)
    rows = []
    nets = {"training form": lambda: model, REFERENCE: lambda: reference,
            "fxmerge reparameterize": lambda: collapsed}
    for budget in args.budgets:
        try:
            plan = solve_measured(space, latency, importance, timer, budget=budget,
                                  method="layermerge")
        except fxmerge.InfeasibleBudget as exc:
            rows.append({"model": name, "batch": batch, "network": f"layermerge@{budget}",
                         "note": str(exc)})
            continue
        merged = fxmerge.transform(gm, plan, space)
        nets[f"layermerge@{budget}"] = lambda m=merged: m
        rows.append({"model": name, "batch": batch, "network": f"layermerge@{budget}",
                     "blocks": len(plan.blocks), "solve_ratio": plan.measured["ratio"]})
    with torch.no_grad():  # the collapsed networks compute the model (a plan changes it)
        want = model(x[:1])
        for net in (reference, collapsed):
            assert (net(x[:1]) - want).abs().max() <= 1e-4 * want.abs().max()
    timed = time_against_reference(lambda: {k: make() for k, make in nets.items()}, x,
                                   repeat=args.final_repeat, preparations=3,
                                   reference=REFERENCE)
    convs = {k: sum(isinstance(m, torch.nn.Conv2d) for m in make().modules())
             for k, make in nets.items()}
    solved = {r["network"]: r for r in rows}
    out = []
    for key, t in timed.items():
        row = {"model": name, "batch": batch, "network": key, "convs": convs[key],
               "ms": t.ms, "ratio_to_reference": t.ratio, "speedup": 1 / t.ratio,
               "spread": t.spread, **{k: v for k, v in solved.get(key, {}).items()
                                      if k in ("blocks", "solve_ratio")}}
        out.append(row)
    out += [r for r in rows if "note" in r]
    print(*out, sep="\n", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", default=["repvgg_a0"])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.5])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=20, help="rounds per solve timing")
    parser.add_argument("--final-repeat", type=int, default=30, help="rounds of the check")
    parser.add_argument("--table-repeat", type=int, default=20)
    args = parser.parse_args()
    with using_threads(args.threads):
        rows = [row for name in args.models for batch in args.batch
                for row in bench(name, batch, args)]
    meta = {"device": "cpu", "backend": "eager", "threads": args.threads,
            "input": f"3x{args.size}x{args.size}", "dtype": "float32",
            "reference": f"{REFERENCE} (ratio 1)",
            "timing": f"{args.final_repeat} interleaved rounds over 3 fresh preparations, "
                      "median of the 3 ratios; ms: median",
            "solve": f"solve_measured, LayerMerge, budget of the identity plan's merged "
                     f"network (= the re-parameterised one), {args.repeat} rounds per timing",
            "latency table": f"eager, median of {args.table_repeat}",
            "importance": "output agreement proxy, no fine-tuning (speed only)"}
    write("reparam_cpu_eager", meta, rows,
          ["model", "batch", "network", "convs", "ms", "ratio_to_reference", "speedup",
           "solve_ratio", "blocks", "spread", "note"],
          "Re-parameterisable networks: LayerMerge next to the re-parameterised network (CPU)")


if __name__ == "__main__":
    main()
