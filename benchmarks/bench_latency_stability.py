"""Do two latency tables built back to back agree? MobileNetV2 and ResNet-50 (224x224,
batch 8, eager, 2 threads): each table built twice in a row, each entry's ratio between
the two, and the table's time.

    python benchmarks/bench_latency_stability.py [--label NAME] [--models ...]
                                                 [--tables N | --same-time | --stretches N]

`--same-time` separates the table's own reproducibility from the machine's: one table times
every entry as its own layer (`deduplicate=False`), so the entries that share a layer are
copies of it timed in the same rounds by the table's own procedure (rounds, groups);
the machine's speed is the same for both, and two copies' ratio is what the
procedure itself scatters.
`--tables N` builds N tables back to back and compares each with the next (a row per pair):
how far entries move as the machine's speed changes (the median ratio). `--stretches N`
takes the table out of it: the layers (those under 15 ms) are built once and timed side by
side (random order each round, memory held steady) for N stretches of 100 rounds, and each
stretch's medians are compared with the next's.

`--label` names the code measured (rows of other labels in the results are kept), so the
same script measures fxmerge before and after a change (run it with each on PYTHONPATH).
`worst_over_median` and `within_10pct_of_median` divide out the median ratio: the machine's
drift between the two tables, one scale for a whole table, which no plan depends on.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import random
import statistics
import time
from collections.abc import Callable

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
    parser.add_argument("--tables", type=int, default=2, help="tables back to back")
    parser.add_argument("--stretches", type=int, default=0,
                        help="time the same built layers for N stretches")
    parser.add_argument("--same-time", action="store_true",
                        help="one table, entries that share a layer timed as its copies")
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
        if args.stretches:
            tables, seconds = stretches(space, args.stretches)
        elif args.same_time:
            tables, seconds = same_time(space)
        else:
            tables, seconds = back_to_back(space, gm, args.tables)
        for n, (a, b) in enumerate(itertools.pairwise(tables)):
            code = args.label if len(tables) == 2 else f"{args.label} (tables {n}, {n + 1})"
            rows.append(compare(a, b, space) | {"code": code, "model": name,
                                                "table_s": round(statistics.fmean(seconds), 1)})
            print(rows[-1], flush=True)
    write("latency_stability", {"input": "8x3x224x224", "backend": "eager", "threads": 2,
                                "tables": "two built back to back, per code and model "
                                          "(or as the code's `--tables`, `--same-time`, "
                                          "`--stretches` say)"},
          rows, ["code", "model", "entries", "worst_ratio", "median_ratio", "within_10pct",
                 "worst_over_median", "within_10pct_of_median", "table_s", "worst_entry"],
          "Two latency tables built back to back")


def compare(a: dict, b: dict, space: fxmerge.MergeSpace) -> dict:
    """Each entry's ratio between two tables: the worst, the median (the machine's drift
    between them, one scale for a whole table, which no plan depends on), the share within
    10%, and the same with the median divided out (what the solver sees)."""
    by_entry = {e: a[e] / b[e] for e in space.entries if a[e] > 0}
    ratios = list(by_entry.values())
    median = statistics.median(ratios)
    worst = max(by_entry, key=lambda e: abs(math.log(by_entry[e] / median)))
    relative = [r / median for r in ratios]
    return {"entries": len(ratios), "worst_ratio": round(max(max(r, 1 / r) for r in ratios), 3),
            "median_ratio": round(median, 3),
            "within_10pct": round(sum(0.9 <= r <= 1.1 for r in ratios) / len(ratios), 3),
            "worst_over_median": round(max(max(r, 1 / r) for r in relative), 3),
            "within_10pct_of_median": round(sum(0.9 <= r <= 1.1 for r in relative)
                                            / len(ratios), 3),
            "worst_entry": f"{tuple(worst)}: {fxmerge.entry_layer(space, worst).label}, "
                           f"{a[worst]:.3g} / {b[worst]:.3g} ms"}


def back_to_back(space: fxmerge.MergeSpace, gm: torch.fx.GraphModule, count: int
                 ) -> tuple[list[fxmerge.LatencyTable], list[float]]:
    tables, seconds = [], []
    for _ in range(count):
        started = time.perf_counter()
        tables.append(fxmerge.measure_latency(space, gm, threads=2, progress=False))
        seconds.append(time.perf_counter() - started)
    return tables, seconds


def same_time(space: fxmerge.MergeSpace) -> tuple[list[dict], list[float]]:
    """One table that times every entry as its own layer (`deduplicate=False`): entries
    that share a layer are copies timed in the same rounds. For each layer of several
    entries, its first two entries' milliseconds (every such entry gets that pair), and the
    time the table took."""
    started = time.perf_counter()
    table = fxmerge.measure_latency(space, threads=2, deduplicate=False, progress=False)
    seconds = time.perf_counter() - started
    copies: dict[str, list[fxmerge.Entry]] = {}
    for e in space.entries:
        if table[e] > 0:
            copies.setdefault(fxmerge.entry_layer(space, e).label, []).append(e)
    pairs = {e: c[:2] for c in copies.values() if len(c) > 1 for e in c}
    return [{e: table[pairs[e][n]] if e in pairs else 0.0 for e in space.entries}
            for n in (0, 1)], [seconds] * 2


def stretches(space: fxmerge.MergeSpace, count: int, rounds: int = 100
              ) -> tuple[list[dict], list[float]]:
    """Each entry's median milliseconds in each of `count` stretches of `rounds` rounds,
    the same built layers throughout, and the seconds per stretch."""
    layers = {e: fxmerge.entry_layer(space, e) for e in space.entries
              if e.k != 0}  # identity entries cost nothing
    built, inputs = {}, {}

    def clock(fn: Callable[[], object]) -> float:
        started = time.perf_counter()
        fn()
        return (time.perf_counter() - started) * 1e3

    with torch.inference_mode(), fxmerge.steady_memory(), fxmerge.using_threads(2):
        for layer in dict.fromkeys(layers.values()):
            x = inputs.setdefault(layer.input_shape, torch.randn(layer.input_shape))
            module = layer.module(torch.device("cpu"), torch.float32).eval()
            module(x)
            if clock(lambda m=module, x=x: m(x)) < 15:
                built[layer.label] = lambda m=module, x=x: m(x)
        runs = [{key: [] for key in built} for _ in range(count)]
        started = time.perf_counter()
        for r in range(count * rounds):
            for key in random.Random(r).sample(list(built), len(built)):
                runs[r // rounds][key].append(clock(built[key]))
        seconds = (time.perf_counter() - started) / count
    tables = [{e: statistics.median(ms[layer.label]) if layer.label in ms else 0.0
               for e, layer in layers.items()} | {e: 0.0 for e in space.entries
                                                  if e not in layers} for ms in runs]
    return tables, [seconds] * count


if __name__ == "__main__":
    main()
