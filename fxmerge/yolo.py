"""ultralytics YOLO detectors compressed inside their own `DetectionModel`: the layers of
the backbone and neck, and the conv branches of the `Detect` head (`cv2`, `cv3`), searched
together (`searched`); the head itself kept as ultralytics' own module. The compressed
model trains with ultralytics' own `DetectionTrainer` (`trainer_for`: a subclass that
trains the model it is given), validates, saves, reloads with `YOLO(path)` and exports.
Nothing is downloaded (`offline`). ultralytics is an optional dependency (`fxmerge[zoo]`)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

from torch import nn

from .errors import ArgumentError


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
