"""What the fine-tuned importance estimator spends per key outside the user's fine-tune and
evaluation: prune the graph for the key's plan, re-initialise, score. Side by side in one
process, interleaved: pruning with the space the plan was made on (what
`estimate_importance` does now) against analysing the graph again for every key (what it
did before the pass contracts).

    python benchmarks/bench_importance_overhead.py [--model resnet50] [--keys 24] [--size 224]

`evaluate` returns a constant and there is no `finetune`, so what is timed is fxmerge's own
work: analysis (or not), validation, the plan's edits, a deep copy, a recompile and a shape
propagation of the pruned network.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch
import torchvision
from common import write

import fxmerge
from fxmerge.tables.importance import importance_jobs, score_plan


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--keys", type=int, default=24)
    parser.add_argument("--size", type=int, default=224)
    args = parser.parse_args()

    torch.manual_seed(0)
    model = getattr(torchvision.models, args.model)().eval()
    gm = fxmerge.trace(model, torch.randn(1, 3, args.size, args.size))
    space = fxmerge.analyze(gm)
    jobs = importance_jobs(space, None, reset_single=True)
    keys = random.Random(0).sample(sorted(jobs, key=str), args.keys)
    times: dict[str, list[float]] = {"with the space": [], "analysed again": []}
    for n, key in enumerate(keys):
        plan, reset = jobs[key]
        order = list(times) if n % 2 == 0 else list(times)[::-1]
        for way in order:
            start = time.perf_counter()
            score_plan(gm, plan, lambda m: 0.0, None, None, reset,
                       space if way == "with the space" else None)
            times[way].append(time.perf_counter() - start)
    rows = [{"prune for each key": way, "median_ms": statistics.median(t) * 1e3,
             "mean_ms": statistics.fmean(t) * 1e3} for way, t in times.items()]
    ratio = rows[1]["median_ms"] / rows[0]["median_ms"]
    write(f"importance_overhead_{args.model}",
          {"model": args.model, "input": f"1x3x{args.size}x{args.size}", "keys": args.keys,
           "space": repr(space), "threads": torch.get_num_threads(),
           "analysed again / with the space (medians)": round(ratio, 2)},
          rows, ["prune for each key", "median_ms", "mean_ms"],
          f"Per-key overhead of the fine-tuned importance estimator ({args.model})")


if __name__ == "__main__":
    main()
