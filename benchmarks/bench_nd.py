"""Measured speed-ups of 1-D and 3-D networks: video models (torchvision r3d_18,
r2plus1d_18's factorised 1x3x3 + 3x1x1 convs, mc3_18's 1x3x3 stages), a 3-D U-Net on a
64x64x64 volume (MONAI BasicUNet with BatchNorm) and a Conv1d keyword-spotting TCN
(`fxmerge.models.TCN1d`), eager CPU, batch 1, 2 threads.

    python benchmarks/bench_nd.py [--only "r3d_18 (video)" ...] [--budgets 0.7 0.5] [--update]

Per model: a latency table, the output-agreement importance (random weights and inputs:
these runs measure speed, not accuracy), and for LayerMerge and Depth at each budget
`solve_measured` (plans transformed and timed against the original, BatchNorm folded,
until one measures within the budget). Each chosen plan is then timed again, side by side
with the original, by a second timer (`measured_ratio`, `speedup`), and its merged network
checked against its pruned one (float32, max-abs error relative to the output's).
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torchvision
from common import RESULTS, calibrate_batchnorm, write

import fxmerge
from fxmerge import NetworkTimer, agreement_importance, solve_measured
from fxmerge.models import TCN1d


def _basic_unet():
    from monai.networks.nets import BasicUNet

    return BasicUNet(spatial_dims=3, in_channels=1, out_channels=2,
                     features=(16, 16, 32, 64, 128, 16), norm="batch")


MODELS = {
    "r3d_18 (video)": (lambda: torchvision.models.video.r3d_18(), (1, 3, 8, 56, 56)),
    "r2plus1d_18 (video)": (lambda: torchvision.models.video.r2plus1d_18(), (1, 3, 8, 56, 56)),
    "mc3_18 (video)": (lambda: torchvision.models.video.mc3_18(), (1, 3, 8, 56, 56)),
    "BasicUNet 3-D (volume)": (_basic_unet, (1, 1, 64, 64, 64)),
    "TCN1d (audio)": (TCN1d, (1, 40, 1000)),
}


def bench(name: str, args) -> list[dict]:
    factory, shape = MODELS[name]
    torch.manual_seed(0)
    x = torch.randn(shape)
    model = calibrate_batchnorm(factory(), x)
    gm = fxmerge.trace(model, x)
    space = fxmerge.analyze(gm)
    start = time.perf_counter()
    latency = fxmerge.measure_latency(space, gm, repeat=args.table_repeat, progress=False)
    table_s = time.perf_counter() - start
    importance = agreement_importance(space, gm, x, progress=False)
    timer = NetworkTimer(gm, space, repeat=args.repeat)
    check = NetworkTimer(gm, space, repeat=args.final_repeat)
    rows = []
    for method in ("layermerge", "depth"):
        for budget in args.budgets:
            row = {"model": name, "input": "x".join(map(str, shape)), "method": method,
                   "budget": budget, "searched": space.L,
                   "multi_conv_entries": sum(e.j - e.i > 1 for e in space.entries),
                   "table_s": round(table_s, 1)}
            try:
                plan = solve_measured(space, latency, importance, timer, budget=budget,
                                      method=method)
            except fxmerge.InfeasibleBudget as exc:
                rows.append({**row, "note": str(exc)[:120]})
                continue
            measurement = check.measure(plan)
            pruned = fxmerge.prune(gm, plan, space).eval()
            merged = fxmerge.transform(gm, plan, space)
            with torch.no_grad():
                want = pruned(x)
                error = float((merged(x) - want).abs().max() / want.abs().max())
            rows.append({**row, "blocks": len(plan.blocks),
                         "original_ms": measurement.original_ms,
                         "merged_ms": measurement.ratio * measurement.original_ms,
                         "measured_ratio": measurement.ratio, "speedup": 1 / measurement.ratio,
                         "float32_error": error})
            print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*", choices=list(MODELS))
    parser.add_argument("--budgets", nargs="*", type=float, default=[0.7, 0.5])
    parser.add_argument("--table-repeat", type=int, default=10)
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--final-repeat", type=int, default=20)
    parser.add_argument("--update", action="store_true",
                        help="replace only the models run in results/nd_speedup")
    args = parser.parse_args()
    torch.set_num_threads(2)
    rows = [r for name in args.only or MODELS for r in bench(name, args)]
    if args.update:  # the models run replace theirs; the others stay as recorded
        run = {r["model"] for r in rows}
        old = json.loads((RESULTS / "nd_speedup.json").read_text())["rows"]
        rows = sorted([r for r in old if r["model"] not in run] + rows,
                      key=lambda r: list(MODELS).index(r["model"]))
    write("nd_speedup", {"backend": "eager CPU", "batch": 1, "threads": 2,
                         "weights": "random (BatchNorm statistics from 3 training passes)",
                         "importance": "output agreement on the input batch",
                         "check": f"each plan timed again with the original, "
                                  f"{args.final_repeat} repeats, median"},
          rows, ["model", "input", "method", "budget", "searched", "multi_conv_entries",
                 "blocks", "original_ms", "merged_ms", "measured_ratio", "speedup",
                 "float32_error", "table_s", "note"],
          "Measured speed-ups of 1-D and 3-D networks")


if __name__ == "__main__":
    main()
