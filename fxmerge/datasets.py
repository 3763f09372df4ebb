"""Synthetic datasets made on the spot (nothing is downloaded): coloured shapes on a noisy
background, as a detection set in YOLO format (`shapes_detection`) and a segmentation set
of images and masks (`shapes_segmentation`). Some images are not square, as letterboxed
validation batches are not. Sized so a YOLOv8n or an FCN trains from scratch on 2 cores in
minutes."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import numpy as np

__all__ = ["SHAPES", "shapes_detection", "shapes_segmentation"]

SHAPES = ("circle", "square", "triangle")
SIZES = ((128, 128), (128, 96), (96, 128))  # (width, height); a third not square


def _scene(rng: random.Random, size: tuple[int, int], most: int
           ) -> tuple[object, np.ndarray, list[tuple[int, tuple[float, float, float, float]]]]:
    """An image (PIL), its mask (0 background, 1 + shape class) and its boxes
    (class, (x0, y0, x1, y1) in pixels), with 1 to `most` shapes."""
    from PIL import Image, ImageDraw

    w, h = size
    base = np.array([rng.randrange(40, 216) for _ in range(3)], dtype=np.float32)
    noise = np.random.default_rng(rng.randrange(1 << 30)).normal(0, 12, (h, w, 3))
    image = Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))
    mask = Image.new("L", size, 0)
    draw, paint = ImageDraw.Draw(image), ImageDraw.Draw(mask)
    boxes = []
    for _ in range(rng.randint(1, most)):
        cls = rng.randrange(len(SHAPES))
        side = rng.randint(min(w, h) // 6, min(w, h) // 2)
        x0, y0 = rng.randint(0, w - side), rng.randint(0, h - side)
        box = (x0, y0, x0 + side, y0 + side)
        colour = tuple(int((c + rng.randrange(80, 176)) % 256) for c in base)
        for d, fill in ((draw, colour), (paint, cls + 1)):
            if cls == 0:
                d.ellipse(box, fill=fill)
            elif cls == 1:
                d.rectangle(box, fill=fill)
            else:
                d.polygon([(x0 + side / 2, y0), (x0, y0 + side), (x0 + side, y0 + side)],
                          fill=fill)
        boxes.append((cls, box))
    return image, np.array(mask), boxes


def _scenes(n: int, seed: int, most: int) -> Iterator[tuple[object, np.ndarray, list]]:
    rng = random.Random(seed)
    for i in range(n):
        yield _scene(rng, SIZES[i % len(SIZES)], most)


def shapes_detection(root: str | Path, train: int = 320, val: int = 80, seed: int = 0
                     ) -> Path:
    """A detection set in YOLO format under `root` (`images/{train,val}/*.png`,
    `labels/{train,val}/*.txt`, one `class cx cy w h` line per shape, normalised) and its
    `data.yaml`; returns the yaml's path."""
    root = Path(root)
    for split, n, s in (("train", train, seed), ("val", val, seed + 1)):
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "labels" / split).mkdir(parents=True, exist_ok=True)
        for i, (image, _, boxes) in enumerate(_scenes(n, s, most=3)):
            w, h = image.size
            image.save(root / "images" / split / f"{i:05d}.png")
            lines = [f"{c} {(x0 + x1) / 2 / w:.6f} {(y0 + y1) / 2 / h:.6f} "
                     f"{(x1 - x0) / w:.6f} {(y1 - y0) / h:.6f}" for c, (x0, y0, x1, y1) in boxes]
            (root / "labels" / split / f"{i:05d}.txt").write_text("\n".join(lines) + "\n")
    names = "\n".join(f"  {i}: {name}" for i, name in enumerate(SHAPES))
    yaml = root / "data.yaml"
    yaml.write_text(f"path: {root.resolve()}\ntrain: images/train\nval: images/val\n"
                    f"names:\n{names}\n")
    return yaml


def shapes_segmentation(root: str | Path, train: int = 240, val: int = 60, seed: int = 0
                        ) -> Path:
    """A segmentation set under `root`: `{train,val}/images/*.png` and
    `{train,val}/masks/*.png` (one byte per pixel: 0 background, 1 + the shape's class);
    returns `root`. Classes: background and `SHAPES`."""
    from PIL import Image

    root = Path(root)
    for split, n, s in (("train", train, seed), ("val", val, seed + 1)):
        (root / split / "images").mkdir(parents=True, exist_ok=True)
        (root / split / "masks").mkdir(parents=True, exist_ok=True)
        for i, (image, mask, _) in enumerate(_scenes(n, s, most=3)):
            image.save(root / split / "images" / f"{i:05d}.png")
            Image.fromarray(mask).save(root / split / "masks" / f"{i:05d}.png")
    return root
