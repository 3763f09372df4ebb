"""`fxmerge demo --task detect` and `--task segment`: the whole job on synthetic shapes
made on the spot (`fxmerge.datasets`), a YOLOv8n (ultralytics, built from its yaml) and a
U-Net with a ResNet-18 encoder (segmentation_models_pytorch), each trained here from
scratch first. Both need the `zoo` extra."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from ..datasets import SHAPES, shapes_detection, shapes_segmentation
from ..errors import ArgumentError
from ..pipeline import JobSettings, run_job, segmentation_folder

DETECT = JobSettings(budget=0.8, size=128, batch=16, train_epochs=20, epochs=20, threads=2)
SEGMENT = JobSettings(budget=0.8, size=96, batch=16, train_epochs=20, epochs=20, threads=2)
QUICK = {"train_epochs": 1, "epochs": 1, "timing_repeat": 6}


def run_detect_demo(out: str | Path = "fxmerge-detect-demo", quick: bool = False,
                    progress: bool | None = None) -> dict[str, Any]:
    """Shapes in YOLO format as `out/shapes`; YOLOv8n trained on them, then compressed,
    fine-tuned by ultralytics' trainer and merged into `out/job`; the report."""
    from ..yolo import offline, run_yolo_job

    out = Path(out)
    offline()
    settings = replace(DETECT, **QUICK) if quick else DETECT
    data = shapes_detection(out / "shapes", **({"train": 40, "val": 10} if quick else {}))
    print(f"fxmerge compress ultralytics:yolov8n.yaml --data {data} --out {out / 'job'} "
          f"--budget {settings.budget} --size {settings.size} --train-epochs "
          f"{settings.train_epochs} --epochs {settings.epochs}")
    return run_yolo_job("yolov8n.yaml", data, out / "job", settings, progress=progress)


def run_segment_demo(out: str | Path = "fxmerge-segment-demo", quick: bool = False,
                     progress: bool | None = None) -> dict[str, Any]:
    """Shapes with masks as `out/shapes`; a U-Net (ResNet-18 encoder) trained on them, then
    compressed, fine-tuned (torchvision's recipe) and merged into `out/job`; the report."""
    try:
        import segmentation_models_pytorch as smp
    except ImportError:
        raise ArgumentError("demo --task segment needs segmentation_models_pytorch: pip "
                            "install 'fxmerge[zoo]'") from None
    out = Path(out)
    settings = replace(SEGMENT, **QUICK) if quick else SEGMENT
    data = shapes_segmentation(out / "shapes", **({"train": 32, "val": 8} if quick else {}))
    print(f"a U-Net (ResNet-18 encoder) trained on {data} for {settings.train_epochs} epochs, "
          f"compressed to {settings.budget:.0%} into {out / 'job'}")
    torch.manual_seed(settings.seed)
    model = smp.Unet("resnet18", encoder_weights=None, classes=len(SHAPES) + 1)
    return run_job(model, segmentation_folder(data, settings), out / "job", settings,
                   spec="smp:Unet(resnet18)", progress=progress)
