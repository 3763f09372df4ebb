"""The budget where the user runs it (issue 42): `fxmerge.compress(model, x, budget=b)` for
each allocator, then the original (BatchNorm folded) and the merged network saved, and
timed by plain user code in fresh processes, one with glibc's default memory handling and
one with freed memory held (MALLOC_MMAP_THRESHOLD_ and MALLOC_TRIM_THRESHOLD_ at 1 GiB):
`torch.utils.benchmark`, 2 threads, the two networks in turn, median of 3 rounds' ratios.

    python benchmarks/bench_user_budget.py [--models mobilenet_v2:0.55 resnet34:0.5]
        [--batch 8] [--size 224]

Random weights, BatchNorm statistics from three training-mode passes. The latency table
and the proxy importance are measured once per model and shared by both allocators' solves.
Writes `results/user_budget.{json,md}`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torchvision
from common import calibrate_batchnorm, write

import fxmerge
from fxmerge.models import load_model

HELD = {"MALLOC_MMAP_THRESHOLD_": str(1 << 30), "MALLOC_TRIM_THRESHOLD_": str(1 << 30)}


def user_ratio(folder: Path, spec: str, batch: int, size: int) -> float:
    """In this (fresh) process: both saved networks timed the way a user would."""
    from torch.utils.benchmark import Timer

    torch.set_num_threads(2)
    nets = {name: fxmerge.load(folder / f"{name}.safetensors",
                               model=load_model(spec))
            for name in ("original", "merged")}
    x = torch.randn(batch, 3, size, size)
    ratios = []
    with torch.inference_mode():
        for _ in range(3):
            ms = {name: Timer("net(x)", globals={"net": net, "x": x}, num_threads=2)
                  .blocked_autorange(min_run_time=2).median for name, net in nets.items()}
            ratios.append(ms["merged"] / ms["original"])
    return statistics.median(ratios)


def in_fresh_process(folder: Path, spec: str, batch: int, size: int, env: dict) -> float:
    clean = {k: v for k, v in os.environ.items() if k not in HELD} | env
    out = subprocess.run([sys.executable, __file__, "--time", str(folder), "--spec", spec,
                          "--batch", str(batch), "--size", str(size)], env=clean, check=True,
                         capture_output=True, text=True, cwd=Path(__file__).parent)
    return float(out.stdout.strip().splitlines()[-1])


def run() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", nargs="*", default=["mobilenet_v2:0.55", "resnet34:0.5"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--time", help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.time:  # the user's own process
        print(user_ratio(Path(args.time), args.spec, args.batch, args.size))
        return
    rows = []
    for item in args.models:
        name, budget = item.split(":")
        spec, x = f"torchvision:{name}", torch.randn(args.batch, 3, args.size, args.size)
        model = calibrate_batchnorm(getattr(torchvision.models, name)(), x)
        tables: dict = {}
        for allocator in fxmerge.Allocator:
            started = time.perf_counter()
            result = fxmerge.compress(model, x, budget=float(budget), threads=2,
                                      timing={"allocator": allocator}, **tables)
            seconds = time.perf_counter() - started
            tables = {"latency": result.latency, "importance": result.importance}
            folder = Path(tempfile.mkdtemp(prefix="fxmerge-user-"))
            gm = fxmerge.trace(model, x)
            fxmerge.save(fxmerge.transform(gm, fxmerge.Plan.identity(result.space),
                                           result.space), folder / "original.safetensors",
                         model=spec)
            fxmerge.save(result.merge(), folder / "merged.safetensors", model=spec)
            m = result.plan.measured
            rows.append({"model": name, "budget": float(budget), "solved_for": str(allocator),
                         "fxmerge_ratio": m["ratio"], "compress_s": round(seconds, 1),
                         "user_default": round(in_fresh_process(folder, spec, args.batch,
                                                                args.size, {}), 4),
                         "user_held": round(in_fresh_process(folder, spec, args.batch,
                                                             args.size, HELD), 4)})
            print(json.dumps(rows[-1]), flush=True)
    write("user_budget", {
        "job": "fxmerge.compress(model, x, budget, threads=2, timing={'allocator': A}), "
               "random weights, proxy importance, LayerMerge, measured basis",
        "batch": args.batch, "size": args.size, "backend": "eager (CPU)",
        "user timing": "fresh process per allocator, fxmerge.load of both saved networks, "
                       "torch.utils.benchmark.Timer(num_threads=2).blocked_autorange("
                       "min_run_time=2), 3 rounds, median of the merged/original ratios"},
        rows, ["model", "budget", "solved_for", "fxmerge_ratio", "user_default", "user_held",
               "compress_s"], "The budget where the user runs it")


if __name__ == "__main__":
    run()
