"""What the fine-tuned importance estimator spends per key outside the user's fine-tune and
evaluation: prune the graph for the key's plan, re-initialise, score, through the public
`estimate_importance` with an `evaluate` that returns a constant and no `finetune`.

    python benchmarks/bench_importance_overhead.py [--model resnet50] [--keys 24] [--size 224]

What is timed is fxmerge's own work per key: validation, the plan's edits, a deep copy, a
recompile and a shape propagation of the pruned network. Each key is estimated alone, keys
in a random order, and the median over keys is reported.
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
    keys = random.Random(0).sample(sorted(fxmerge.importance_keys(space), key=str), args.keys)
    times = []
    for key in keys:
        start = time.perf_counter()
        fxmerge.estimate_importance(space, gm, evaluate=lambda m: 1.0, keys=[key],
                                    progress=False)
        times.append(time.perf_counter() - start)
    rows = [{"per key": "estimate_importance, constant evaluate",
             "median_ms": statistics.median(times) * 1e3, "mean_ms": statistics.fmean(times) * 1e3}]
    write(f"importance_overhead_{args.model}",
          {"model": args.model, "input": f"1x3x{args.size}x{args.size}", "keys": args.keys,
           "space": repr(space), "threads": torch.get_num_threads()},
          rows, ["per key", "median_ms", "mean_ms"],
          f"Per-key overhead of the fine-tuned importance estimator ({args.model})")


if __name__ == "__main__":
    main()
