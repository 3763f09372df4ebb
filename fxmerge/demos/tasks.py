"""`fxmerge demo --task detect` and `--task segment`: the whole job on synthetic shapes
made on the spot (`fxmerge.datasets`), a YOLOv8n (ultralytics, built from its yaml) and a
DeepLabV3-MobileNetV3 (torchvision), each trained here from scratch first."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from ..datasets import shapes_detection, shapes_segmentation
from ..models import load_model
from ..pipeline import JobSettings, run_job, segmentation_folder

DETECT = JobSettings(budget=0.8, size=128, batch=16, train_epochs=20, epochs=20, threads=2)
SEGMENT_SPEC = "torchvision:deeplabv3_mobilenet_v3_large:num_classes=4,aux_loss=True"
SEGMENT = JobSettings(budget=0.8, size=96, batch=16, train_epochs=30, epochs=10, threads=2,
                      method="layermerge")
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
    """Shapes with masks as `out/shapes`; a DeepLabV3-MobileNetV3 trained on them, then
    compressed, fine-tuned (torchvision's recipe) and merged into `out/job`; the report."""
    out = Path(out)
    settings = replace(SEGMENT, **QUICK) if quick else SEGMENT
    data = shapes_segmentation(out / "shapes", **({"train": 32, "val": 8} if quick else {}))
    print(f"fxmerge compress {SEGMENT_SPEC} --data {data} --out {out / 'job'} --budget "
          f"{settings.budget} --size {settings.size} --train-epochs {settings.train_epochs} "
          f"--epochs {settings.epochs} --method {settings.method}")
    return run_job(load_model(SEGMENT_SPEC), segmentation_folder(data, settings), out / "job",
                   settings, spec=SEGMENT_SPEC, progress=progress)
