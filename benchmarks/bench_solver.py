"""DP solve time of LayerMerge, Depth and LayerOnly on MobileNetV2 and ResNet-34 sized
problems, at several discretisation levels.

    python benchmarks/bench_solver.py

Latency and importance are synthetic (solve time does not depend on the values): latency
proportional to each merged layer's multiply-accumulates, importance random in (0.5, 1].
"""

from __future__ import annotations

import random
import statistics
import time

import torch
import torchvision
from common import write

import fxmerge
from fxmerge.solve import layeronly
from fxmerge.tables.latency import entry_signature

MODELS = {
    "resnet34": (torchvision.models.resnet34, ["conv1"]),
    "mobilenet_v2": (torchvision.models.mobilenet_v2, ["features.0.0", "features.18.0"]),
}
LEVELS = [100, 300, 1000, 3000]
REPEATS = 31
METHODS = ("layermerge", "depth", "layeronly")


def synthetic_problem(factory, exclude):
    """A model's space at 224x224 with a MACs-proportional latency table and random
    importance in (0.5, 1] (for timing the solver and the passes, not for accuracy)."""
    gm = fxmerge.trace(factory().eval(), torch.randn(1, 3, 224, 224))
    space = fxmerge.analyze(gm, exclude=exclude)
    macs = {}
    for e in space.entries:
        sig = entry_signature(space, e)
        _, c, h, w = sig.input_shape
        macs[e] = c * sig.out_channels * sig.kernel**2 * h * w / sig.stride**2 / sig.groups
    lat = fxmerge.LatencyTable.from_values(space, {e: v * 1e-8 for e, v in macs.items()},
                                           source="MACs proxy")
    rng = random.Random(0)
    keys = [*space.entries, *space.depth_keys, *layeronly.importance_keys(space)]
    imp = fxmerge.ImportanceTable.from_values(space, {k: rng.uniform(0.5, 1) for k in keys})
    return gm, space, lat, imp


def main() -> None:
    rows = []
    for name, (factory, exclude) in MODELS.items():
        _, space, lat, imp = synthetic_problem(factory, exclude)
        for levels in LEVELS:
            times: dict[str, list[float]] = {m: [] for m in METHODS}
            for _ in range(REPEATS):  # the methods interleaved, so drift hits them alike
                for method in METHODS:
                    t0 = time.perf_counter()
                    fxmerge.solve(space, lat, imp, budget=1.1, method=method, levels=levels)
                    times[method].append((time.perf_counter() - t0) * 1e3)
            rows += [{"model": name, "entries": space.num_entries, "method": method,
                      "levels": levels, "solve_ms": statistics.median(times[method])}
                     for method in METHODS]
    write("solver", {"repeats": REPEATS, "statistic": "median, methods interleaved", "budget": 1.1,
                     "includes": "edge building, DP over all budgets, back-tracking, plan"},
          rows, ["model", "entries", "method", "levels", "solve_ms"],
          "Solve time of the exact DP (CPU, one process)")


if __name__ == "__main__":
    main()
