"""Do two latency tables built back to back agree? MobileNetV2 and ResNet-50 (224x224,
batch 8, eager, 2 threads): each table built twice in a row, each entry's ratio between
the two, and the table's time.

    python benchmarks/bench_latency_stability.py [--label NAME] [--models ...]

`--label` names the code measured (rows of other labels in the results are kept), so the
same script measures fxmerge before and after a change (run it with each on PYTHONPATH).
`worst_over_median` and `within_10pct_of_median` divide out the median ratio: the machine's
drift between the two tables, one scale for a whole table, which no plan depends on.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torchvision
from common import RESULTS, write

import fxmerge

MODELS = {"mobilenet_v2": ["features.0.0", "features.18.0"], "resnet50": ["conv1"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--label", default="current")
    parser.add_argument("--models", nargs="*", default=list(MODELS))
    args = parser.parse_args()
    torch.set_num_threads(2)
    path = RESULTS / "latency_stability.json"
    rows = [r for r in (json.loads(path.read_text())["rows"] if path.exists() else [])
            if r["code"] != args.label]
    for name in args.models:
        torch.manual_seed(0)
        gm = fxmerge.trace(getattr(torchvision.models, name)().eval(),
                           torch.randn(8, 3, 224, 224))
        space = fxmerge.analyze(gm, exclude=MODELS[name])
        tables, seconds = [], []
        for _ in range(2):
            started = time.perf_counter()
            tables.append(fxmerge.measure_latency(space, gm, threads=2, progress=False))
            seconds.append(time.perf_counter() - started)
        a, b = tables
        ratios = [a[e] / b[e] for e in space.entries if a[e] > 0]
        worst = max(max(r, 1 / r) for r in ratios)
        median = statistics.median(ratios)  # the machine's drift between the two tables
        relative = [r / median for r in ratios]  # what the solver sees: one table's scale
        rows.append({"code": args.label, "model": name, "entries": len(ratios),
                     "worst_ratio": round(worst, 3),
                     "median_ratio": round(median, 3),
                     "within_10pct": round(sum(0.9 <= r <= 1.1 for r in ratios)
                                           / len(ratios), 3),
                     "worst_over_median": round(max(max(r, 1 / r) for r in relative), 3),
                     "within_10pct_of_median": round(sum(0.9 <= r <= 1.1 for r in relative)
                                                     / len(ratios), 3),
                     "table_s": round(statistics.fmean(seconds), 1)})
        print(rows[-1], flush=True)
    write("latency_stability", {"input": "8x3x224x224", "backend": "eager", "threads": 2,
                                "tables": "two built back to back, per code and model"},
          rows, ["code", "model", "entries", "worst_ratio", "median_ratio", "within_10pct",
                 "worst_over_median", "within_10pct_of_median", "table_s"],
          "Two latency tables built back to back")


if __name__ == "__main__":
    main()
