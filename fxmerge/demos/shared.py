"""What both demos use: scikit-learn's bundled digits (no download) and their loaders, the
solve-or-skip loop over methods and budgets, and headless matplotlib."""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ..backends.timing import Relative
from ..errors import ArgumentError, InfeasibleBudget
from ..job import Job
from ..plan import Plan
from ..solve import METHODS
from ..tables import ImportanceTable


@dataclass
class Digits:
    """Images `(N, 1, size, size)` and labels, split 1000 / 300 / 497."""

    train: tuple[torch.Tensor, torch.Tensor]
    val: tuple[torch.Tensor, torch.Tensor]
    test: tuple[torch.Tensor, torch.Tensor]


TRAIN_VIEWS = 4  # distorted views of each training image in the harder task


def distort(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Each image rotated (up to 30 degrees), scaled (0.75-1.15), shifted (up to 15% of its
    side) and given pixel noise (std 0.15 of the [0, 1] range): the harder task."""
    n = len(x)
    angle = (torch.rand(n, generator=gen) * 2 - 1) * math.radians(30)
    zoom = 0.75 + 0.4 * torch.rand(n, generator=gen)
    shift = (torch.rand(n, 2, generator=gen) * 2 - 1) * 0.3
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1),
                         torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, align_corners=False, padding_mode="zeros")
    return x + 0.15 * torch.randn(x.shape, generator=gen)


def load_digits(size: int = 32, seed: int = 0, scale: str = "standard",
                distorted: bool = False) -> Digits:
    """The 8x8 digits upsampled to `size`; `scale` "standard" (zero mean, unit deviation)
    or "symmetric" (pixels in [-1, 1], as diffusion models take them). `distorted`: the
    harder task, every image through `distort` (drawn with `seed`), and `TRAIN_VIEWS`
    distorted views of each training image (4000 training images)."""
    from sklearn.datasets import load_digits as sk_digits

    data = sk_digits()
    x = torch.tensor(data.images, dtype=torch.float32)[:, None] / 16.0
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    y = torch.tensor(data.target)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    views = TRAIN_VIEWS if distorted else 1
    if distorted:  # split first, so that each training view is drawn afresh
        gen = torch.Generator().manual_seed(seed)
        x, y = x[order], y[order]
        x = torch.cat([*(distort(x[:1000], gen) for _ in range(views)), distort(x[1000:], gen)])
        y = torch.cat([y[:1000].repeat(views), y[1000:]])
    if scale == "standard":
        x = (x - x.mean()) / x.std()
    elif scale == "symmetric":
        x = x.clamp(0, 1) * 2 - 1
    else:
        raise ArgumentError(f"load_digits: scale must be 'standard' or 'symmetric', not {scale!r}")
    if not distorted:
        x, y = x[order], y[order]
    n = 1000 * views
    return Digits((x[:n], y[:n]), (x[n:n + 300], y[n:n + 300]), (x[n + 300:], y[n + 300:]))


def write_digits_folder(root: str | Path, size: int = 32, seed: int = 0) -> Path:
    """The bundled digits as an image folder (`train/` 1000 images, `val/` 797, one folder
    per digit, grayscale PNGs of `size` pixels): what `fxmerge compress --data` reads."""
    from PIL import Image
    from sklearn.datasets import load_digits as sk_digits

    data = sk_digits()
    x = torch.tensor(data.images, dtype=torch.float32)[:, None] / 16.0
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    pixels = (x.clamp(0, 1) * 255).round().to(torch.uint8)[:, 0].numpy()
    order = torch.randperm(len(pixels), generator=torch.Generator().manual_seed(seed))
    root = Path(root)
    for rank, i in enumerate(order.tolist()):
        folder = root / ("train" if rank < 1000 else "val") / str(int(data.target[i]))
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels[i]).save(folder / f"{i:04d}.png")
    return root


def loader(data: tuple[torch.Tensor, torch.Tensor], batch: int, shuffle: bool = True
           ) -> DataLoader:
    """A DataLoader over `(images, labels)` (shuffled by torch's generator, which the
    recipe seeds)."""
    return DataLoader(TensorDataset(*data), batch_size=batch, shuffle=shuffle)


def accuracy(model: nn.Module, data: tuple[torch.Tensor, torch.Tensor]) -> float:
    """Top-1 accuracy in percent."""
    x, y = data
    with torch.no_grad():
        return 100.0 * (model.eval()(x).argmax(1) == y).float().mean().item()


def feasible_plans(job: Job, importance: ImportanceTable, budgets: tuple[float, ...],
                   methods: tuple[str, ...] = tuple(METHODS)
                   ) -> Iterator[tuple[str, float, Plan]]:
    """`(method, budget, plan)` for every method and budget, each solved by the job at a
    measured budget; those the method cannot reach (by the latency table, then by the
    measured solve) are reported and skipped."""
    for method in methods:
        floor = job.reach(method)
        for budget in budgets:
            if budget < floor:  # what the latency table allows: skipped before any timing
                print(f"{method} at {budget:.0%}: infeasible (its fastest plan is {floor:.0%} "
                      "of the original's latency on the table)")
                continue
            try:
                yield method, budget, job.solve(importance, budget, method=method)
            except InfeasibleBudget as exc:
                print(f"{method} at {budget:.0%}: infeasible ({exc})")


def pyplot():
    """matplotlib's pyplot, drawing to files only."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def summarize(runs: Sequence[list[dict]], metrics: tuple[str, ...]) -> list[dict]:
    """One row per (method, budget) over the runs that reached it: `seeds`, and each
    metric's `_mean` and `_std` (population standard deviation; 0 for one seed)."""
    groups: dict[tuple[str, float], list[dict]] = {}
    for rows in runs:
        for row in rows:
            groups.setdefault((row["method"], row["budget"]), []).append(row)
    out = []
    for (method, budget), rows in groups.items():
        summary = {"method": method, "budget": budget, "seeds": len(rows)}
        for m in metrics:
            values = [r[m] for r in rows]
            summary[f"{m}_mean"] = round(statistics.fmean(values), 4)
            summary[f"{m}_std"] = round(statistics.pstdev(values), 4)
        if "speedup" in metrics:
            summary["speedup"] = summary["speedup_mean"]
        out.append(summary)
    return out


def time_against_original(job: Job, nets: dict[str, nn.Module], repeat: int
                          ) -> dict[str, Relative]:
    """Every network of `nets` timed side by side with the original (BatchNorm folded,
    `"original"`: the median over the pairs) as the job's timer times a plan: in a fresh
    process with the job's allocator, over fresh preparations, `repeat` rounds in all, one
    network and the original at a time (with glibc's default memory handling, a network's
    page faults depend on what else the process runs)."""
    pairs = {n: job.timer.compare({n: m}, repeat=repeat) for n, m in nets.items()
             if n != "original"}
    out = {n: t[n] for n, t in pairs.items()}
    originals = [t["original"] for t in pairs.values()]
    out["original"] = Relative(statistics.median(o.ms for o in originals), 1.0,
                               max(o.spread for o in originals))
    return out
