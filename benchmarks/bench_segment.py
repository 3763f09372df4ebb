"""A U-Net (segmentation_models_pytorch, ResNet-18 encoder, `encoder_weights=None`) trained
here from scratch on the
synthetic shapes-and-masks set, compressed by `fxmerge compress` (the whole job: torchvision's
segmentation recipe, held-out choice by mean IoU, `auto` = LayerMerge and Depth both
fine-tuned as long as the original was trained). mIoU on val (never chosen on) of the
original and of each candidate at a measured 80% and at the lowest budget the latency table
allows plus 5 points; speed-ups timed side by side, eager PyTorch (the job's own timing) and
ONNX Runtime (batch 1, 2 threads).

    python benchmarks/bench_segment.py [--epochs 20] [--out DIR]

(torchvision's DeepLabV3-MobileNetV3 was tried first: from scratch it predicted background
everywhere after 30 epochs, 21.5% mIoU, whatever the optimiser, so nothing could be read
from its compression.)
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
from dataclasses import replace
from pathlib import Path

import torch
from common import ort_ratio, write

import fxmerge
from fxmerge.datasets import shapes_segmentation
from fxmerge.pipeline import JobSettings, run_job, segmentation_folder
from fxmerge.recipes import SegmentationRecipe

SPEC = "smp:Unet(resnet18, encoder_weights=None, classes=4)"
SIZE = 96


def unet() -> torch.nn.Module:
    import segmentation_models_pytorch as smp

    torch.manual_seed(0)
    return smp.Unet("resnet18", encoder_weights=None, classes=4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    root = Path(args.out or tempfile.mkdtemp(prefix="fxmerge-segment-"))
    torch.set_num_threads(2)
    data_dir = shapes_segmentation(root / "shapes")
    base = JobSettings(budget=0.8, size=SIZE, batch=16, train_epochs=args.epochs,
                       epochs=args.epochs, threads=2, method="auto")
    model = unet()
    rows, runs, floor = [], [], None
    for budget in (0.8, None):
        if budget is None:  # the table's floor (known after the first job) plus 5 points
            budget = math.ceil((floor + 0.05) * 100) / 100
        settings = replace(base, budget=budget)
        out = root / "job"  # one folder: the original trained once, the tables reused
        report = run_job(model, segmentation_folder(data_dir, settings), out, settings,
                         spec=SPEC, progress=False)
        floor = min(report["reach"].values())
        runs.append(report)
        print(json.dumps({k: v for k, v in report.items() if k != "settings"}), flush=True)
        original_onnx, merged_onnx = out / "original.onnx", out / "merged.onnx"
        if not original_onnx.exists():
            gm = fxmerge.trace(model.eval(), torch.randn(1, 3, SIZE, SIZE))
            plan = fxmerge.Plan.identity(fxmerge.analyze(gm))
            fxmerge.export_onnx(fxmerge.transform(gm, plan), torch.randn(1, 3, SIZE, SIZE),
                                original_onnx)  # BatchNorm folded, as the merged one
        if len(runs) == 1:
            rows.append({"method": "original", "val_miou": report["accuracy_original"]})
        chosen = report["choice"]["method"]
        for name, c in report["candidates"].items():
            rows.append({"budget": budget, "method": name, "kept": "yes" if name == chosen
                         else "", "val_miou": c["val"], "holdout_miou": c["holdout"],
                         "removed_convs": c["removed_convs"],
                         "removed_activations": c["removed_activations"],
                         "eager_ratio": (c["timing"] or {}).get("ratio"),
                         "ort_ratio": ort_ratio(original_onnx, merged_onnx,
                                                shape=(1, 3, SIZE, SIZE))
                         if name == chosen else None})
        rows += [{"budget": budget, "method": name, "note": why}
                 for name, why in report["dropped"].items()]
    data = segmentation_folder(data_dir, base)  # the control: as many epochs as the others
    recipe = SegmentationRecipe(data.fit, data.holdout, data.val, classes=4, seed=0)
    control = recipe.train(unet(), epochs=2 * args.epochs, progress=False)
    rows.insert(1, {"method": f"original, trained {2 * args.epochs} epochs (control)",
                    "val_miou": round(100 * recipe.report(control), 2)})
    write("segment_unet", {
        "task": "U-Net, ResNet-18 encoder (segmentation_models_pytorch, random init) on the "
                "synthetic shapes-and-masks set (240 train, 60 val images; 4 classes)",
        "size": SIZE, "epochs": f"original {args.epochs}, each fine-tune {args.epochs}",
        "recipe": "torchvision's (SGD 0.02, poly rate), distilled from the original",
        "holdout": "10% of train (choice); val reports",
        "timing": "batch 1, 2 threads, side by side: eager in a fresh process (the job's), "
                  "ONNX Runtime for the kept candidate"}, rows,
          ["budget", "method", "kept", "val_miou", "holdout_miou", "removed_convs",
           "removed_activations", "eager_ratio", "ort_ratio", "note"],
          "U-Net (ResNet-18) compressed by fxmerge compress (CPU)", runs=runs)


if __name__ == "__main__":
    main()
