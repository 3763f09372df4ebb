"""Peak memory of `fxmerge.transform` (prune + merge) beyond the traced model: each case in a
fresh process, resident memory polled every 0.5 ms while it runs.

    python benchmarks/bench_memory.py

`transform` keeps no second copy of what merging does not replace: the merged network
shares the pruned copy's tensors it keeps (`MergePass(share_weights=True)`; nobody else
holds that copy), where `merge` on a graph the caller holds clones them. VGG-16's 500 MB
classifier is what that saves.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import threading
import time

import torch
import torchvision
from common import write

import fxmerge

CASES = [("resnet50", "random"), ("resnet50", "identity"), ("vgg16", "random"),
         ("vgg16", "identity")]


def _rss() -> int:
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def one(name: str, plan_kind: str) -> dict:
    """Trace `name` at 224x224, then measure the peak growth of memory during transform."""
    torch.manual_seed(0)
    gm = fxmerge.trace(getattr(torchvision.models, name)().eval(), torch.randn(1, 3, 224, 224))
    space = fxmerge.analyze(gm)
    plan = fxmerge.Plan.random(space, 0) if plan_kind == "random" else \
        fxmerge.Plan.identity(space)
    gc.collect()
    base, peak, done = _rss(), [0], threading.Event()

    def poll() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(0.0005)

    watcher = threading.Thread(target=poll)
    watcher.start()
    fxmerge.transform(gm, plan, space)
    done.set()
    watcher.join()
    weights = sum(t.numel() * t.element_size() for t in (*gm.parameters(), *gm.buffers()))
    return {"model": name, "plan": plan_kind, "weights_mib": round(weights / 2**20, 1),
            "peak_growth_mib": round((peak[0] - base) / 2**20, 1),
            "growth_per_model": round((peak[0] - base) / weights, 2)}


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--one":
        print(json.dumps(one(sys.argv[2], sys.argv[3])))
        return
    rows = [json.loads(subprocess.run([sys.executable, __file__, "--one", name, kind],
                                      check=True, capture_output=True, text=True
                                      ).stdout.splitlines()[-1]) for name, kind in CASES]
    write("memory_transform", {"input": "1x3x224x224", "statistic": "peak RSS growth during "
                               "transform over the traced model, polled every 0.5 ms",
                               "threads": torch.get_num_threads()},
          rows, ["model", "plan", "weights_mib", "peak_growth_mib", "growth_per_model"],
          "Peak memory of fxmerge.transform")


if __name__ == "__main__":
    main()
