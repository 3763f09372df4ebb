"""DP solve time of LayerMerge, Depth and LayerOnly on MobileNetV2 and ResNet-34 sized
problems, at several discretisation levels.

    python benchmarks/bench_solver.py

Latency and importance are synthetic (solve time does not depend on the values): latency
proportional to each merged layer's multiply-accumulates, importance random in (0.5, 1].
"""

from __future__ import annotations

import statistics
import time

import torchvision
from common import synthetic_problem, write

import fxmerge

MODELS = {
    "resnet34": (torchvision.models.resnet34, ["conv1"]),
    "mobilenet_v2": (torchvision.models.mobilenet_v2, ["features.0.0", "features.18.0"]),
}
LEVELS = [100, 300, 1000, 3000]
REPEATS = 31
METHODS = ("layermerge", "depth", "layeronly")


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
