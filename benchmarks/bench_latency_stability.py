"""Do two latency tables built back to back agree? MobileNetV2 and ResNet-50 (224x224,
batch 8, eager, 2 threads): each table built twice in a row, each entry's ratio between
the two, and the table's time.

    python benchmarks/bench_latency_stability.py [--label NAME] [--models ...]
                                                 [--tables N | --same-time]

`--same-time` separates the table's own reproducibility from the machine's: every layer is
built twice and both copies are timed in the same rounds of one table (the table's own
procedure: rounds, groups, re-timing, `steady`), so the machine's speed is the same for
both and each entry's ratio between its two copies is what the procedure itself scatters.
`--tables N` builds N tables back to back and compares each with the next (a row per pair):
how far entries move as the machine's speed changes (the median ratio).

`--label` names the code measured (rows of other labels in the results are kept), so the
same script measures fxmerge before and after a change (run it with each on PYTHONPATH).
`worst_over_median` and `within_10pct_of_median` divide out the median ratio: the machine's
drift between the two tables, one scale for a whole table, which no plan depends on.
"""

from __future__ import annotations

import argparse
import inspect
import itertools
import json
import statistics
import time

import torch
import torchvision
from common import RESULTS, write

import fxmerge
from fxmerge.backends.runtimes import Backend
from fxmerge.backends.timing import using_threads
from fxmerge.space import IDENTITY
from fxmerge.tables import latency

MODELS = {"mobilenet_v2": ["features.0.0", "features.18.0"], "resnet50": ["conv1"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--label", default="current")
    parser.add_argument("--models", nargs="*", default=list(MODELS))
    parser.add_argument("--tables", type=int, default=2, help="tables back to back")
    parser.add_argument("--same-time", action="store_true",
                        help="two copies of every layer in one table's rounds")
    args = parser.parse_args()
    torch.set_num_threads(2)
    path = RESULTS / "latency_stability.json"
    rows = [r for r in (json.loads(path.read_text())["rows"] if path.exists() else [])
            if r["code"].split(" (tables ")[0] != args.label]
    for name in args.models:
        torch.manual_seed(0)
        gm = fxmerge.trace(getattr(torchvision.models, name)().eval(),
                           torch.randn(8, 3, 224, 224))
        space = fxmerge.analyze(gm, exclude=MODELS[name])
        tables, seconds = (same_time(space) if args.same_time
                           else back_to_back(space, gm, args.tables))
        for n, (a, b) in enumerate(itertools.pairwise(tables)):
            code = args.label if len(tables) == 2 else f"{args.label} (tables {n}, {n + 1})"
            rows.append(compare(a, b, space) | {"code": code, "model": name,
                                                "table_s": round(statistics.fmean(seconds), 1)})
            print(rows[-1], flush=True)
    write("latency_stability", {"input": "8x3x224x224", "backend": "eager", "threads": 2,
                                "tables": "two built back to back, per code and model "
                                          "(`same time`: two copies in one table's rounds)"},
          rows, ["code", "model", "entries", "worst_ratio", "median_ratio", "within_10pct",
                 "worst_over_median", "within_10pct_of_median", "table_s"],
          "Two latency tables built back to back")


def compare(a: dict, b: dict, space: fxmerge.MergeSpace) -> dict:
    """Each entry's ratio between two tables: the worst, the median (the machine's drift
    between them, one scale for a whole table, which no plan depends on), the share within
    10%, and the same with the median divided out (what the solver sees)."""
    ratios = [a[e] / b[e] for e in space.entries if a[e] > 0]
    median = statistics.median(ratios)
    relative = [r / median for r in ratios]
    return {"entries": len(ratios), "worst_ratio": round(max(max(r, 1 / r) for r in ratios), 3),
            "median_ratio": round(median, 3),
            "within_10pct": round(sum(0.9 <= r <= 1.1 for r in ratios) / len(ratios), 3),
            "worst_over_median": round(max(max(r, 1 / r) for r in relative), 3),
            "within_10pct_of_median": round(sum(0.9 <= r <= 1.1 for r in relative)
                                            / len(ratios), 3)}


def back_to_back(space: fxmerge.MergeSpace, gm: torch.fx.GraphModule, count: int
                 ) -> tuple[list[fxmerge.LatencyTable], list[float]]:
    tables, seconds = [], []
    for _ in range(count):
        started = time.perf_counter()
        tables.append(fxmerge.measure_latency(space, gm, threads=2, progress=False))
        seconds.append(time.perf_counter() - started)
    return tables, seconds


def same_time(space: fxmerge.MergeSpace) -> tuple[list[dict], list[float]]:
    """Each entry's milliseconds from the two copies of its layer, timed in the same rounds,
    and the time the one table took."""
    defaults = inspect.signature(fxmerge.measure_latency).parameters
    layers = {e: fxmerge.entry_layer(space, e) for e in space.entries 
              if (e.k, e.dw) != IDENTITY}
    copies = {f"{layer.label} #{n}": layer for layer in dict.fromkeys(layers.values())
              for n in (1, 2)}
    samples, targets = {}, {}
    started = time.perf_counter()
    with using_threads(2):
        runs, _ = latency.time_and_settle(
            copies, samples, targets, backend=Backend.EAGER,
            device=torch.device("cpu"), dtype=torch.float32, progress=False,
            save=lambda: None, **{name: defaults[name].default
                                  for name in ("warmup", "repeat", "seconds")})
    seconds = time.perf_counter() - started
    ms = {key: statistics.median(t) for key, t in runs.items()}
    return [{e: ms[f"{layer.label} #{n}"] for e, layer in layers.items()} | {
        e: 0.0 for e in space.entries if e not in layers} for n in (1, 2)], [seconds] * 2


if __name__ == "__main__":
    main()
