"""`fxmerge compress` on the bundled digits written as an image folder: LayerMerge and Depth
at one budget, with and without distillation in the fine-tune.

    python benchmarks/bench_compress.py [--budget 0.55] [--importance finetune]

Each job is the command line itself (`fxmerge compress ...`, run as a process). The original
is trained once (12 epochs, seed 0) and its checkpoint and latency table are shared by the
four jobs, so they compress the same network on the same table; the two jobs of a
method share its importance table. Images are decoded once and kept in memory. Writes
`results/compress_digits.{json,md}`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from common import write

from fxmerge.demos import write_digits_folder

SHARED = ("original-train.pt", "latency.json", "latency-cache.json")


def run() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--budget", type=float, default=0.55)
    parser.add_argument("--importance", default="finetune")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="fxmerge-bench-"))
    data = write_digits_folder(root / "digits", size=32)
    rows, first = [], None
    for method in ("layermerge", "depth"):
        for kd in (0.5, 0.0):
            out = root / f"{method}-kd{kd}"
            out.mkdir()
            if first is not None:
                for name in SHARED:
                    shutil.copy(first / name, out / name)
            same = root / f"{method}-kd0.5"  # the importance of this method's first job
            if same != out and (same / f"importance-{args.importance}.json").exists():
                shutil.copy(same / f"importance-{args.importance}.json", out)
            started = time.perf_counter()
            code = subprocess.call(["fxmerge", "compress", "fxmerge:DemoMobileNetV2", "--data", str(data),
                         "--grayscale", "--size", "32", "--exclude", "stem.0", "head.0",
                         "--budget", str(args.budget), "--method", method,
                         "--importance", args.importance, "--train-epochs", "12",
                         "--epochs", "4", "--kd-weight", str(kd), "--latency-batch", "64",
                         "--out", str(out), "--quiet"])  # the command line itself
            if code != 0:
                rows.append({"method": method, "kd_weight": kd, "result": f"exit {code}"})
                continue
            first = first or out
            r = json.loads((out / "report.json").read_text())
            rows.append({"method": method, "kd_weight": kd,
                         "accuracy_original": r["accuracy_original"],
                         "accuracy_pruned": r["accuracy_pruned_before_finetune"],
                         "accuracy_compressed": r["accuracy_compressed"],
                         "solve_ratio": r["plan"]["measured"]["ratio"],
                         "final_ratio": r["timing"]["ratio"], "speedup": r["timing"]["speedup"],
                         "removed_convs": r["plan"]["removed_convs"],
                         "removed_activations": r["plan"]["removed_activations"],
                         "job_seconds": round(time.perf_counter() - started, 1),
                         "stages": r["seconds"]})
            if first == out:
                (Path(__file__).parent / "results" / "compress_digits_report.md").write_text(
                    (out / "report.md").read_text())
    write("compress_digits", {
        "job": "fxmerge compress fxmerge:DemoMobileNetV2 on the digits image folder (1000 "
               "train / 797 val, 32x32 grayscale), original trained 12 epochs, fine-tune 4 "
               "epochs, Adam 1e-3",
        "budget": args.budget, "importance": args.importance,
        "timing": "eager, batch 64, interleaved against the original (BN folded), 3 fresh "
                  "preparations x 10 rounds; accuracy on val"},
        rows, ["method", "kd_weight", "accuracy_original", "accuracy_pruned",
               "accuracy_compressed", "solve_ratio", "final_ratio", "speedup",
               "removed_convs", "removed_activations", "job_seconds"],
        "fxmerge compress on the digits image folder: LayerMerge and Depth, with and "
        "without distillation")
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    run()
