"""The whole job's time and memory (issue 42): `fxmerge.compress(model, 1x3x224x224,
budget=0.6, threads=2)` with random weights, proxy importance and the measured budget, each
run in a fresh process (imports counted), its resident memory and its timing workers'
sampled every 20 ms.

    python benchmarks/bench_job.py [--models resnet50 ...] [--runs 2]
                                   [--code LABEL=PATH ...]

Peaks: the resident memory of the job's own process and of its timing worker (one at a
time), and their proportional memory together (a worker runs while the job waits for it;
the pages of the libraries both map counted once). `--code` names checkouts of fxmerge to measure
side by side (their runs alternate; default: this one, labelled `current`); rows of other
labels in the results are kept. Writes `results/job.{json,md}`.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

from common import RESULTS, write

ROOT = Path(__file__).resolve().parents[1]

CHILD = """
import glob, json, sys, threading, time
started = time.perf_counter()
import torch, torchvision
import fxmerge

def memory(pid="self"):
    # resident and proportional (shared library pages split between processes) MiB
    out = {}
    try:
        for line in open(f"/proc/{pid}/smaps_rollup"):
            if line.startswith(("Rss:", "Pss:")):
                out[line[:3]] = int(line.split()[1]) / 1024
    except OSError:
        pass
    return out.get("Rss", 0.0), out.get("Pss", 0.0)

def workers():
    return [pid for f in glob.glob("/proc/self/task/*/children") for pid in open(f).read().split()]

peak = {"job_mb": 0.0, "worker_mb": 0.0, "together_mb": 0.0}
done = threading.Event()

def sample():
    while not done.is_set():
        (own, own_pss), kids = memory(), [memory(pid) for pid in workers()]
        together = own_pss + sum(pss for _, pss in kids)
        for key, value in (("job_mb", own), ("worker_mb", sum(r for r, _ in kids)),
                           ("together_mb", together)):
            peak[key] = max(peak[key], value)
        time.sleep(0.02)

threading.Thread(target=sample, daemon=True).start()
torch.manual_seed(0)
model = getattr(torchvision.models, sys.argv[1])().eval()
result = fxmerge.compress(model, torch.randn(1, 3, 224, 224), budget=0.6, threads=2)
done.set()
print(json.dumps({"seconds": round(time.perf_counter() - started, 1),
                  "table_s": result.latency.settings.seconds,
                  **{k: round(v) for k, v in peak.items()}}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", default=["resnet50"])
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--code", nargs="*", default=[f"current={ROOT}"],
                        help="LABEL=PATH: a checkout of fxmerge to measure")
    args = parser.parse_args()
    code = dict(item.split("=", 1) for item in args.code)
    path = RESULTS / "job.json"
    rows = [r for r in (json.loads(path.read_text())["rows"] if path.exists() else [])
            if r["code"] not in code]
    for name in args.models:
        for run, (label, checkout) in itertools.product(range(args.runs), code.items()):
            env = {**os.environ, "PYTHONPATH": str(Path(checkout).resolve())}
            out = subprocess.run([sys.executable, "-c", CHILD, name], capture_output=True,
                                 text=True, check=True, env=env)
            row = {"code": label, "model": name, "run": run,
                   **json.loads(out.stdout.strip().splitlines()[-1])}
            print(row, flush=True)
            rows.append(row)
    write("job", {"job": "compress(model, 1x3x224x224, budget=0.6, threads=2): random "
                  "weights, proxy importance, measured budget, eager CPU",
                  "peaks": "MiB sampled every 20 ms: resident, of the job's process and of "
                  "its timing worker; proportional (shared pages once), both together"},
          rows, ["code", "model", "run", "seconds", "table_s", "job_mb", "worker_mb",
                 "together_mb"], "The whole job: time and peak memory")


if __name__ == "__main__":
    main()
