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
    task: str = "classify"  # "segment": masks for labels, scored by mean IoU; "unlabeled":
    # no labels, fine-tuned by distillation and scored by output agreement

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
    x, y = images[0]
    if len(images) * (x.numel() * x.element_size() + torch.as_tensor(y).numel() * 8
                      ) > IN_MEMORY_BYTES:
        return images
    pairs = [images[i] for i in range(len(images))]
    data = TensorDataset(torch.stack([p[0] for p in pairs]),
                         torch.stack([torch.as_tensor(p[1]) for p in pairs]))
    data.classes = getattr(images, "classes", None)
    return data


def folder_fingerprint(root: str | Path) -> str:
    """A short hash of every file under `root`: its path and size."""
    root = Path(root)
    digest = hashlib.sha1()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(f"{path.relative_to(root)}:{path.stat().st_size}\n".encode())
    return digest.hexdigest()[:16]


def is_segmentation_folder(root: str | Path) -> bool:
    """Whether `root` is a segmentation folder: train/images and train/masks."""
    return (Path(root) / "train" / "images").is_dir() and (Path(root) / "train" / "masks"
                                                          ).is_dir()


class _Masks(Dataset):
    """Images and masks of one split (`DIR/images/NAME`, `DIR/masks/NAME` as .png), resized
    to `size` (masks by nearest neighbour), images normalised."""

    def __init__(self, folder: Path, size: int) -> None:
        self.images = sorted(p for p in (folder / "images").iterdir() if p.is_file())
        missing = [p.name for p in self.images
                   if not (folder / "masks" / p.with_suffix(".png").name).is_file()]
        if not self.images or missing:
            raise ArgumentError(f"--data {folder}: " + (f"no mask for {missing[0]} (masks/ "
                                "holds one .png per image, of the same name)" if missing
                                else "no images in images/"))
        self.folder, self.size = folder, size

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        import numpy as np
        from PIL import Image

        path = self.images[i]
        image = Image.open(path).convert("RGB").resize((self.size, self.size), Image.BILINEAR)
        mask = Image.open(self.folder / "masks" / path.with_suffix(".png").name)
        mask = mask.resize((self.size, self.size), Image.NEAREST)
        x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)
        x = (x - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]
        return x, torch.from_numpy(np.asarray(mask, dtype=np.int64))


def segmentation_folder(root: str | Path, settings: JobSettings) -> ImageData:
    """Loaders over `root/train` (split into fit and held-out parts) and `root/val` of a
    segmentation folder (`images/*.png|jpg` and `masks/*.png`: a class per pixel, 255
    ignored), at `size` x `size`; `classes` are the mask values seen, 0 to the largest."""
    root = Path(root)
    for part in ("train", "val"):
        if not (root / part / "images").is_dir() or not (root / part / "masks").is_dir():
            raise ArgumentError(f"--data {root}: no '{part}/images' and '{part}/masks' "
                                "folders (a segmentation folder)")
    train, val = (_in_memory(_Masks(root / p, settings.size)) for p in ("train", "val"))
    fit, held = holdout_split([0] * len(train), settings.holdout, settings.seed)
    values = torch.cat([train.tensors[1].unique(), val.tensors[1].unique()]) \
        if isinstance(train, TensorDataset) else torch.tensor([1])
    largest = int(values[values != 255].max()) if (values != 255).any() else 0
    return ImageData(DataLoader(Subset(train, fit), batch_size=settings.batch, shuffle=True),
                     DataLoader(Subset(train, held), batch_size=settings.batch),
                     DataLoader(val, batch_size=settings.batch),
                     [str(c) for c in range(largest + 1)], folder_fingerprint(root / "train"),
                     task="segment")


IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}


def is_unlabeled_folder(root: str | Path) -> bool:
    """Whether `root/train` holds images directly (no class folders: no labels)."""
    train = Path(root) / "train"
    return train.is_dir() and any(p.suffix.lower() in IMAGE_SUFFIXES for p in train.iterdir())


class _Unlabeled(Dataset):
    """The images of a folder, resized to `size` and normalised, each with label 0."""

    def __init__(self, folder: Path, size: int, grayscale: bool) -> None:
        self.images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not self.images:
            raise ArgumentError(f"--data {folder}: no images")
        self.size, self.grayscale = size, grayscale

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        from PIL import Image
        from torchvision.transforms.functional import normalize, pil_to_tensor, resize

        image = Image.open(self.images[i]).convert("L" if self.grayscale else "RGB")
        x = resize(pil_to_tensor(image), [self.size, self.size], antialias=True).float() / 255
        mean, std = ((0.5,), (0.5,)) if self.grayscale else (MEAN, STD)
        return normalize(x, mean, std), 0


def unlabeled_folder(root: str | Path, settings: JobSettings) -> ImageData:
    """Loaders over the images of `root/train` (split into fit and held-out parts) and
    `root/val` (images directly in each, no labels): what a distilled fine-tune and the
    output agreement read."""
    root = Path(root)
    for part in ("train", "val"):
        if not (root / part).is_dir():
            raise ArgumentError(f"--data {root}: no '{part}' folder of images")
    train, val = (_in_memory(_Unlabeled(root / p, settings.size, settings.grayscale))
                  for p in ("train", "val"))
    fit, held = holdout_split([0] * len(train), settings.holdout, settings.seed)
    return ImageData(DataLoader(Subset(train, fit), batch_size=settings.batch, shuffle=True),
                     DataLoader(Subset(train, held), batch_size=settings.batch),
                     DataLoader(val, batch_size=settings.batch), [],
                     folder_fingerprint(root / "train"), task="unlabeled")
