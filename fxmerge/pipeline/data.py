"""An image folder's data for the job: `train/` split into fit and held-out parts
(stratified), `val/` for the report alone, decoded once when it fits in memory, and the
fingerprint of its files (what a resumed job compares)."""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from ..errors import ArgumentError
from .settings import HOLDOUT_FLOOR, JobSettings

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # ImageNet's, as most models expect


@dataclass
class ImageData:
    """An image folder's loaders: `fit` (train/ less the held-out part), `holdout` (what
    every choice is scored on), `val` (val/: the report's only), and the class names."""

    fit: DataLoader
    holdout: DataLoader
    val: DataLoader
    classes: list[str]
    fingerprint: str = ""  # of train/'s files (`folder_fingerprint`): val/ only reports

    def sizes(self) -> dict[str, int]:
        return {name: len(getattr(self, name).dataset) for name in ("fit", "holdout", "val")}


def image_folder(root: str | Path, settings: JobSettings) -> ImageData:
    """Loaders over `root/train` (split into fit and held-out parts, stratified by class)
    and `root/val` (torchvision ImageFolder layout: one folder per class), images resized to
    `size` and normalised."""
    from torchvision import datasets, transforms

    root = Path(root)
    for part in ("train", "val"):
        if not (root / part).is_dir():
            raise ArgumentError(f"--data {root}: no '{part}' folder (an image folder has "
                                "train/CLASS/*.png and val/CLASS/*.png)")
    steps = [transforms.Resize((settings.size, settings.size))]
    if settings.grayscale:
        steps += [transforms.Grayscale(), transforms.ToTensor(),
                  transforms.Normalize((0.5,), (0.5,))]
    else:
        steps += [transforms.ToTensor(), transforms.Normalize(MEAN, STD)]
    tf = transforms.Compose(steps)
    train, val = (datasets.ImageFolder(str(root / p), tf) for p in ("train", "val"))
    if train.classes != val.classes:
        raise ArgumentError(f"--data {root}: train and val have other classes "
                            f"({train.classes[:5]} vs {val.classes[:5]})")
    fit, held = holdout_split(train.targets, settings.holdout, settings.seed)
    train, val = _in_memory(train), _in_memory(val)
    return ImageData(DataLoader(Subset(train, fit), batch_size=settings.batch, shuffle=True),
                     DataLoader(Subset(train, held), batch_size=settings.batch),
                     DataLoader(val, batch_size=settings.batch), train.classes,
                     folder_fingerprint(root / "train"))  # what every result reads


def holdout_split(labels: list[int], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Indices to fit on and to hold out: per class, `fraction` of its images (at least
    `HOLDOUT_FLOOR`, at most half of them), drawn with `seed`."""
    gen = torch.Generator().manual_seed(seed)
    fit, held = [], []
    for c in sorted(set(labels)):
        members = [i for i, y in enumerate(labels) if y == c]
        order = [members[i] for i in torch.randperm(len(members), generator=gen).tolist()]
        n = min(max(math.ceil(fraction * len(members)), HOLDOUT_FLOOR), len(members) // 2)
        held += order[:n]
        fit += order[n:]
    return sorted(fit), sorted(held)


IN_MEMORY_BYTES = 2**30  # image sets decoded once and kept when they fit in this


def _in_memory(images: Dataset) -> Dataset:
    """`images` decoded once into tensors when they fit in `IN_MEMORY_BYTES` (the
    importance estimator reads the data hundreds of times), else as they are."""
    x, _ = images[0]
    if len(images) * x.numel() * x.element_size() > IN_MEMORY_BYTES:
        return images
    pairs = [images[i] for i in range(len(images))]
    data = TensorDataset(torch.stack([p[0] for p in pairs]),
                         torch.tensor([p[1] for p in pairs]))
    data.classes = images.classes
    return data


def folder_fingerprint(root: str | Path) -> str:
    """A short hash of every file under `root`: its path and size."""
    root = Path(root)
    digest = hashlib.sha1()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(f"{path.relative_to(root)}:{path.stat().st_size}\n".encode())
    return digest.hexdigest()[:16]
