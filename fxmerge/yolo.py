"""ultralytics YOLO detectors compressed inside their own `DetectionModel`: the layers of
the backbone and neck, and the conv branches of the `Detect` head (`cv2`, `cv3`), searched
together (`searched`); the head itself kept as ultralytics' own module. The compressed
model trains with ultralytics' own `DetectionTrainer` (`trainer_for`: a subclass that
trains the model it is given), validates, saves, reloads with `YOLO(path)` and exports.
Nothing is downloaded (`offline`). ultralytics is an optional dependency (`fxmerge[zoo]`)."""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .backends.timing import using_threads
from .compress import compress, side_by_side, submodules_share
from .errors import ArgumentError, InfeasibleBudget
from .inside import capture_inside, merge
from .job import AUTO, AUTO_METHODS, Job, choose, fingerprint
from .pipeline.data import IMAGE_SUFFIXES
from .pipeline.settings import JobSettings
from .tables import LatencyTable

__all__ = ["check_data", "detection_summary", "floors", "holdout_yaml", "offline",
           "run_yolo_job", "searched", "trainer_for"]


def offline(config_dir: str | Path | None = None) -> Path:
    """Keep ultralytics off the network: `YOLO_OFFLINE=1` and a settings directory of its
    own (`YOLO_CONFIG_DIR`, kept where already set) holding the fonts its plots and dataset
    check would otherwise fetch (matplotlib's DejaVu Sans under ultralytics' names). Call
    it before ultralytics is imported; returns the settings directory."""
    os.environ["YOLO_OFFLINE"] = "1"
    folder = Path(os.environ.get("YOLO_CONFIG_DIR") or config_dir
                  or Path.home() / ".cache" / "fxmerge" / "ultralytics")
    folder.mkdir(parents=True, exist_ok=True)
    os.environ["YOLO_CONFIG_DIR"] = str(folder)
    import matplotlib

    font = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
    for name in ("Arial.ttf", "Arial.Unicode.ttf"):
        if not (folder / name).exists() and font.exists():
            shutil.copyfile(font, folder / name)
    return folder


def searched(model: nn.Module) -> Callable[[str, nn.Module], bool]:
    """The submodules of a YOLO `DetectionModel` that fxmerge searches: each layer of
    `model.model` that holds a conv, but the head (the last layer), and the head's conv
    branches (`cv2.*`, `cv3.*`)."""
    layers = getattr(model, "model", None)
    if not isinstance(layers, nn.Sequential) or not hasattr(layers[-1], "cv2"):
        raise ArgumentError(f"{type(model).__name__} is not an ultralytics detection model "
                            "(model.model[-1] should be its Detect head)")
    head = len(layers) - 1

    def pick(name: str, module: nn.Module) -> bool:
        parts = name.split(".")
        if parts[0] != "model" or len(parts) < 2 or not parts[1].isdigit():
            return False
        if len(parts) == 2:
            return int(parts[1]) < head and any(isinstance(m, nn.Conv2d)
                                                for m in module.modules())
        return len(parts) == 4 and int(parts[1]) == head and parts[2] in ("cv2", "cv3")
    return pick


def trainer_for(model: nn.Module) -> type:
    """ultralytics' `DetectionTrainer` training `model` as it is (a compressed model),
    where the stock trainer rebuilds a model from its yaml and drops every weight whose
    shape changed: `YOLO.train(trainer=trainer_for(model), data=..., ...)`."""
    from ultralytics.models.yolo.detect import DetectionTrainer

    class InMemoryTrainer(DetectionTrainer):
        """A `DetectionTrainer` whose model is the one it was made for."""

        def get_model(self, cfg: object = None, weights: object = None,
                      verbose: bool = True) -> nn.Module:
            return model

    return InMemoryTrainer


def floors(model: nn.Module, size: int, threads: int | None = None,
           methods: tuple[str, ...] = ("layermerge", "depth")) -> dict[str, float]:
    """Each method's fastest plan of the searched submodules, as a fraction of the whole
    model's time at batch 1 and `size` (the latency table's; the submodules' share timed
    side by side): the lowest budget `compress` can be asked for."""
    inside = capture_inside(model, torch.rand(1, 3, size, size), searched(model))
    share = submodules_share(inside, torch.rand(1, 3, size, size), threads)
    job = Job(inside.gm, inside.inputs, threads=threads)
    return {m: round(1 - share * (1 - job.reach(m)), 4) for m in methods}


def check_data(path: str | Path) -> dict:
    """A detection `data.yaml` read and checked before ultralytics sees it (which would
    try to download a dataset whose folders are missing): its `train` and `val` folders
    (or image lists) exist and it names its classes. `ArgumentError` naming the file and
    the missing part."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ArgumentError(f"--data {path}: no such file (a detection data.yaml)")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ArgumentError(f"--data {path}: not valid YAML ({str(exc).splitlines()[0]})"
                            ) from None
    if not isinstance(data, dict) or "names" not in data:
        raise ArgumentError(f"--data {path}: a detection data.yaml names its classes "
                            "('names') and its 'train' and 'val' images")
    root = Path(data.get("path") or path.parent)
    root = root if root.is_absolute() else path.parent / root
    for split in ("train", "val"):
        if split not in data:
            raise ArgumentError(f"--data {path}: no '{split}' entry")
        where = root / str(data[split])
        if not where.exists():
            raise ArgumentError(f"--data {path}: its {split} images {where} do not exist "
                                "(fxmerge downloads nothing)")
    return {**data, "path": str(root.resolve())}


def holdout_yaml(data: dict, fraction: float, seed: int, folder: Path) -> Path:
    """A data.yaml in `folder` whose `train` is the original train images less a held-out
    `fraction` and whose `val` is that held-out part (lists of image paths): fine-tunes
    train on the first, plans and methods are chosen on the second, the original `val`
    only reports."""
    import random

    root = Path(data["path"])
    train = root / str(data["train"])
    images = sorted(p for p in train.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES) \
        if train.is_dir() else [root / line.strip() for line in train.read_text().split()]
    if len(images) < 10:
        raise ArgumentError(f"{train}: {len(images)} training images; fxmerge holds out a "
                            "part of them to choose on, so give at least 10")
    random.Random(seed).shuffle(images)
    n = max(2, round(fraction * len(images)))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "fit.txt").write_text("\n".join(str(p.resolve()) for p in images[n:]) + "\n")
    (folder / "holdout.txt").write_text("\n".join(str(p.resolve()) for p in images[:n]) + "\n")
    names = data["names"]
    names = dict(enumerate(names)) if isinstance(names, list) else names
    text = "".join(f"  {k}: {v}\n" for k, v in names.items())
    out = folder / "fit.yaml"
    out.write_text(f"path: {folder.resolve()}\ntrain: fit.txt\nval: holdout.txt\nnames:\n{text}")
    return out


def run_yolo_job(spec: str, data_yaml: str | Path, out: str | Path, settings: JobSettings,
                 progress: bool | None = None) -> dict[str, Any]:
    """`fxmerge compress ultralytics:WEIGHTS --data data.yaml`: the YOLO at `spec` (a
    trained `.pt`, or a model yaml, trained first for `settings.train_epochs`) compressed
    inside its `DetectionModel` for each method, fine-tuned by ultralytics' own trainer on
    the train images less a held-out part, scored there by ultralytics' validator
    (mAP50-95), the best kept (`job.choose`), merged, saved as `out/model.pt` (`YOLO(path)`
    loads it) and `out/model.onnx`; `val` is scored once, for the report. Returns it."""
    settings.check()
    data = check_data(data_yaml)
    weights = Path(spec)
    if weights.suffix not in (".pt", ".yaml", ".yml"):
        raise ArgumentError(f"ultralytics:{spec}: give a trained .pt or a model .yaml")
    if weights.suffix == ".pt" and not weights.is_file():
        raise ArgumentError(f"ultralytics:{spec}: no such file (fxmerge downloads no weights)")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    offline()
    from ultralytics import YOLO

    fit = holdout_yaml(data, settings.holdout, settings.seed, out / "data")
    common = {"imgsz": settings.size, "batch": settings.batch, "workers": 0, "plots": False,
              "device": "cpu", "verbose": False}
    train = {**common, "amp": False, "seed": settings.seed, "exist_ok": True,
             "project": str((out / "runs").resolve())}
    original = weights
    if settings.train_epochs > 0:
        tag = fingerprint({"spec": spec, "data": (out / "data" / "fit.txt").read_text(),
                           "epochs": settings.train_epochs, "size": settings.size,
                           "seed": settings.seed})
        original = out / f"original-train-{tag}.pt"
        if not original.exists():
            yolo = YOLO(str(weights))
            yolo.train(data=str(fit), epochs=math.ceil(settings.train_epochs),
                       name=f"original-{tag}", **train)
            shutil.copyfile(yolo.trainer.best, original)
    model = YOLO(str(original)).model.float().eval()
    x = torch.rand(settings.latency_batch, 3, settings.size, settings.size)
    methods = AUTO_METHODS if settings.method == AUTO else (settings.method,)
    report: dict[str, Any] = {"model": f"ultralytics:{spec}", "data": str(data_yaml),
                              "settings": asdict(settings), "candidates": {}, "dropped": {}}
    latency: LatencyTable | dict = {"backend": settings.backend}
    merged: dict[str, nn.Module] = {}
    for method in methods:
        try:
            result = compress(model, x, budget=settings.budget, method=str(method),
                              submodule=searched(model), latency=latency,
                              threads=settings.threads, budget_basis=settings.budget_basis,
                              timing={"repeat": settings.timing_repeat,
                                      "allocator": settings.allocator})
        except InfeasibleBudget as exc:
            report["dropped"][str(method)] = str(exc)
            continue
        latency = result.latency
        (out / f"plan-{method}.json").write_text(result.plan.to_json())
        tuned = YOLO(str(original))
        tuned.train(trainer=trainer_for(result.model), data=str(fit),
                    epochs=math.ceil(settings.epochs), name=f"finetune-{method}", **train)
        holdout = tuned.val(data=str(fit), **common).box.map
        merged[str(method)] = merge(tuned.model.float())
        timing = _time(model, merged[str(method)], x, settings)
        report["candidates"][str(method)] = {
            "holdout_map50_95": round(float(holdout), 4), "timing": timing,
            "removed_convs": len(result.plan.removed_convs),
            "removed_activations": len(result.plan.removed_activations(result.space)),
            "share": round(result.share, 4)}
    if not merged:
        raise InfeasibleBudget("; ".join(report["dropped"].values()))
    cands = report["candidates"]
    chosen = choose({m: c["holdout_map50_95"] for m, c in cands.items()},
                    {m: c["timing"]["speedup"] for m, c in cands.items()}, 0.0)
    yolo = YOLO(str(original))
    report["original_val_map50_95"] = round(float(yolo.val(data=str(data_yaml), **common)
                                                  .box.map), 4)
    yolo.model = merged[chosen[0]]
    yolo.save(str(out / "model.pt"))
    final = YOLO(str(out / "model.pt"))
    report["val_map50_95"] = round(float(final.val(data=str(data_yaml), **common).box.map), 4)
    report["onnx"] = str(Path(final.export(format="onnx", imgsz=settings.size,
                                           simplify=False)).name)
    report["choice"] = {"method": chosen[0], "reason": chosen[1]}
    report["timing"] = cands[chosen[0]]["timing"]
    (out / "report.json").write_text(json.dumps(report, indent=1))
    return report


def _time(original: nn.Module, merged: nn.Module, x: torch.Tensor,
          settings: JobSettings) -> dict[str, Any]:
    """The original (its convs and BatchNorms fused, as ultralytics deploys it) and the
    merged model, timed side by side in this process on `x`."""
    with using_threads(settings.threads) as threads:
        t = side_by_side(copy.deepcopy(original).fuse(verbose=False), merged, (x,), threads,
                         repeat=settings.timing_repeat)
    return {"backend": "eager", "batch": x.shape[0], "threads": threads,
            "allocator": "this process, held", "original_ms": round(t["original"].ms, 4),
            "merged_ms": round(t["merged"].ms, 4), "ratio": round(t["merged"].ratio, 4),
            "speedup": round(1 / t["merged"].ratio, 3)}


def detection_summary(report: dict, out: Path) -> str:
    """The job in one line: the choice, mAP, speed-up and where the model is."""
    t = report["timing"]
    return (f"{report['choice']['method']} at {report['settings']['budget']:.0%}: val "
            f"mAP50-95 {report['original_val_map50_95']:.3f} -> {report['val_map50_95']:.3f}, "
            f"{t['speedup']:.2f}x faster ({t['original_ms']:.4g} -> {t['merged_ms']:.4g} ms, "
            f"eager, batch {t['batch']}, {t['threads']} threads); {out / 'model.pt'} "
            f"(YOLO(path) loads it), {out / report['onnx']}")
