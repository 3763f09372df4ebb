"""Time to build the MobileNetV2 CPU latency table, with and without signature
deduplication, side by side in one process.

    python benchmarks/bench_latency_table.py [--batch 1] [--repeat 30]
"""

from __future__ import annotations

import argparse

import torch
import torchvision
from common import write

import fxmerge

EXCLUDE = ["features.0.0", "features.18.0"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--repeat", type=int, default=30)
    args = parser.parse_args()

    torch.manual_seed(0)
    gm = fxmerge.trace(torchvision.models.mobilenet_v2(), torch.randn(1, 3, 224, 224))
    space = fxmerge.analyze(gm, exclude=EXCLUDE)
    rows = []
    for dedup in (True, False):
        table = fxmerge.measure_latency(space, gm, batch_size=args.batch, warmup=args.warmup,
                                        repeat=args.repeat, deduplicate=dedup)
        s = table.settings
        rows.append({"deduplicate": dedup, "entries": s.num_entries,
                     "timed_convs": s.num_timed, "seconds": s.seconds,
                     "original_table_ms": table.identity_latency(space)})
    rows.append({"deduplicate": "saving", "timed_convs": rows[1]["timed_convs"]
                 - rows[0]["timed_convs"], "seconds": rows[1]["seconds"] / rows[0]["seconds"]})
    write("latency_table_mobilenet_v2",
          {"model": "mobilenet_v2 (1.0), 224x224", "backend": "eager", "device": "cpu",
           "batch": args.batch, "warmup": args.warmup, "repeat": args.repeat,
           "statistic": "median", "threads": torch.get_num_threads(),
           "saving row": "timed_convs: fewer convs timed; seconds: time ratio without/with"},
          rows, ["deduplicate", "entries", "timed_convs", "seconds", "original_table_ms"],
          "Building the MobileNetV2 CPU latency table")


if __name__ == "__main__":
    main()
