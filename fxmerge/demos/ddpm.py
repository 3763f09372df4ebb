"""The generation demo: LayerMerge on a small DDPM U-Net trained on the bundled digits.

Train a `DDPMUNet` (the CIFAR-10 model's block structure, narrower, one channel, 8x8) as a
denoising diffusion model; measure its CPU latency table; estimate importance by short
fine-tunes scored by held-out diffusion loss (`exp(-(loss - base) / base)`, as the authors);
solve with LayerMerge, Depth and LayerOnly at a few budgets; fine-tune, merge; report the
measured speed-up, the held-out loss, and a Frechet distance between generated and real
digits in the feature space of a digit classifier trained in the same run (offline FID:
Inception weights cannot be downloaded here).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..backends.timing import PREPARATIONS
from ..job import Job
from ..models import DDPM_EXCLUDE, DDPMUNet
from ..passes import transform
from ..plan import Plan
from ..recipes import ClassificationRecipe
from ..solve import METHODS, importance_keys
from .shared import (
    accuracy,
    feasible_plans,
    load_digits,
    loader,
    pyplot,
    time_against_original,
)


@dataclass(frozen=True)
class DDPMDemoConfig:
    """Sizes of each stage; `quick()` is a seconds-long smoke run for the tests."""

    budgets: tuple[float, ...] = (0.85, 0.7)
    size: int = 8
    channels: int = 16
    res_blocks: int = 1
    timesteps: int = 100
    train_steps: int = 1500
    batch: int = 64
    importance_steps: int = 8
    finetune_steps: int = 300
    finetune_lr: float = 1e-3
    eval_pairs: int = 600
    samples: int = 256
    classifier_epochs: int = 20
    latency_batch: int = 64
    latency_repeat: int = 20
    compare_repeat: int = 40

    @classmethod
    def quick(cls) -> DDPMDemoConfig:
        return cls(budgets=(0.9,), timesteps=10, train_steps=5,
                   importance_steps=1, finetune_steps=2, eval_pairs=32, samples=16,
                   classifier_epochs=1, latency_batch=4, latency_repeat=2, compare_repeat=6)


class Diffusion:
    """The DDPM forward process and ancestral sampler over `timesteps` steps, with the
    cosine noise schedule of Nichol & Dhariwal (2021): it stays well-behaved for the short
    chains a CPU demo can afford, where the linear schedule of Ho et al. needs ~1000 steps."""

    def __init__(self, timesteps: int) -> None:
        s = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps
        f = torch.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
        self.timesteps = timesteps
        self.betas = (1 - f[1:] / f[:-1]).clamp(max=0.999).float()
        self.alpha_bar = torch.cumprod(1 - self.betas, 0)

    def loss(self, model: nn.Module, x0: torch.Tensor, t: torch.Tensor,
             noise: torch.Tensor) -> torch.Tensor:
        """Mean squared error of the predicted noise (the simple DDPM objective)."""
        a = self.alpha_bar[t][:, None, None, None]
        return F.mse_loss(model(a.sqrt() * x0 + (1 - a).sqrt() * noise, t), noise)

    @torch.no_grad()
    def sample(self, model: nn.Module, n: int, size: int, seed: int = 0) -> torch.Tensor:
        """`n` images in [-1, 1] by ancestral sampling from fixed noise: at each step the
        predicted clean image, clipped to [-1, 1], gives the mean and variance of the
        forward process's posterior q(x_{t-1} | x_t, x_0)."""
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn(n, 1, size, size, generator=gen)
        for step in reversed(range(self.timesteps)):
            beta, abar = self.betas[step], self.alpha_bar[step]
            abar_prev = self.alpha_bar[step - 1] if step else torch.tensor(1.0)
            eps = model(x, torch.full((n,), step, dtype=torch.long))
            x0 = ((x - (1 - abar).sqrt() * eps) / abar.sqrt()).clamp(-1, 1)
            x = (beta * abar_prev.sqrt() * x0 + (1 - abar_prev) * (1 - beta).sqrt() * x) \
                / (1 - abar)
            if step:
                var = beta * (1 - abar_prev) / (1 - abar)
                x = x + var.sqrt() * torch.randn(x.shape, generator=gen)
        return x.clamp(-1, 1)


def train_diffusion(model: nn.Module, x0: torch.Tensor, diffusion: Diffusion, *, steps: int,
                    lr: float, batch: int, seed: int = 0) -> nn.Module:
    """Adam with cosine decay and gradient clipping on the DDPM objective."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, steps))
    model.train()
    for _ in range(steps):
        idx = torch.randint(len(x0), (batch,), generator=gen)
        t = torch.randint(diffusion.timesteps, (batch,), generator=gen)
        noise = torch.randn(x0[idx].shape, generator=gen)
        loss = diffusion.loss(model, x0[idx], t, noise)
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
    return model.eval()


class HeldOutLoss:
    """The diffusion loss on fixed (image, timestep, noise) triples from held-out digits,
    so that every network is scored on the same draws."""

    def __init__(self, x0: torch.Tensor, diffusion: Diffusion, pairs: int, seed: int = 1
                 ) -> None:
        gen = torch.Generator().manual_seed(seed)
        idx = torch.arange(pairs) % len(x0)
        self.x0, self.diffusion = x0[idx], diffusion
        self.t = torch.randint(diffusion.timesteps, (pairs,), generator=gen)
        self.noise = torch.randn(self.x0.shape, generator=gen)

    def __call__(self, model: nn.Module) -> float:
        model.eval()
        with torch.no_grad():
            losses = [self.diffusion.loss(model, x, t, n).item() * len(x) for x, t, n in
                      zip(self.x0.split(200), self.t.split(200), self.noise.split(200))]
        return sum(losses) / len(self.x0)


class _Score:
    """Importance `evaluate`: minus the held-out loss relative to the original's, so the
    table holds exp(-(loss - base) / base)."""

    def __init__(self, loss: HeldOutLoss, base: float) -> None:
        self.loss, self.base = loss, base

    def __call__(self, model: nn.Module) -> float:
        return -self.loss(model) / self.base


class _Finetune:
    """The importance estimator's brief fine-tune (picklable, for process pools)."""

    def __init__(self, x0: torch.Tensor, diffusion: Diffusion, steps: int, batch: int) -> None:
        self.x0, self.diffusion, self.steps, self.batch = x0, diffusion, steps, batch

    def __call__(self, model: nn.Module) -> nn.Module:
        return train_diffusion(model, self.x0, self.diffusion, steps=self.steps, lr=1e-3,
                               batch=self.batch)


# ---- sample quality: a Frechet distance in a digit classifier's feature space -----------
class DigitClassifier(nn.Module):
    """Two conv layers and a 64-wide feature layer; `features(x)` is what the distance uses."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
            nn.Flatten(), nn.Linear(256, 64), nn.ReLU())
        self.head = nn.Linear(64, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """|mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^1/2) between two feature sets (rows).
    The trace of the root is taken as that of (S_a^1/2 S_b S_a^1/2)^1/2, a symmetric matrix,
    by eigenvalues: no complex round-off, and singular covariances are fine."""
    a64, b64 = a.double().numpy(), b.double().numpy()
    s_a, s_b = np.cov(a64, rowvar=False), np.cov(b64, rowvar=False)
    w, v = np.linalg.eigh(s_a)
    root_a = (v * np.sqrt(w.clip(min=0))) @ v.T
    cross = np.sqrt(np.linalg.eigvalsh(root_a @ s_b @ root_a).clip(min=0)).sum()
    mean = ((a64.mean(0) - b64.mean(0)) ** 2).sum()
    return float(mean + np.trace(s_a) + np.trace(s_b) - 2 * cross)


# ---- the job --------------------------------------------------------------------------------
def run_ddpm_demo(out: Path | None = None, config: DDPMDemoConfig = DDPMDemoConfig(),
                  progress: bool | None = None) -> list[dict]:
    """Run the whole job; print the table; write results.json, samples.png, quality.png."""
    torch.manual_seed(0)
    started = time.perf_counter()

    def clock() -> str:
        return f"{time.perf_counter() - started:.0f} s"

    data = load_digits(config.size, scale="symmetric")
    diffusion = Diffusion(config.timesteps)
    x_train, x_val, x_test = data.train[0], data.val[0], data.test[0]
    model = DDPMUNet(ch=config.channels, ch_mult=(1, 2, 2), num_res_blocks=config.res_blocks,
                     attn_resolutions=(config.size // 2,), dropout=0.0,
                     resolution=config.size, in_channels=1, groups=8)
    train_diffusion(model, x_train, diffusion, steps=config.train_steps, lr=2e-3,
                    batch=config.batch)
    held_out = HeldOutLoss(x_val, diffusion, config.eval_pairs)
    base_loss = held_out(model)
    print(f"trained DDPMUNet ({sum(p.numel() for p in model.parameters()) / 1e6:.2f} M "
          f"parameters, {config.size}x{config.size}, T={config.timesteps}): held-out loss "
          f"{base_loss:.4f} ({clock()})")

    classifier = ClassificationRecipe(
        loader(data.train, config.batch), loader(data.val, 300, shuffle=False), lr=3e-3
    ).train(DigitClassifier(), epochs=config.classifier_epochs, progress=False)
    real = classifier.features(x_test)
    floor = frechet_distance(classifier.features(x_val), real)
    print(f"digit classifier for the Frechet distance: test accuracy "
          f"{accuracy(classifier, data.test):.1f}%; real-vs-real distance {floor:.2f}")

    x = x_val[: config.latency_batch]
    t = torch.randint(config.timesteps, (len(x),), generator=torch.Generator().manual_seed(2))
    job = Job(model, (x, t), analysis={"exclude": DDPM_EXCLUDE},
              latency={"warmup": 5, "repeat": config.latency_repeat},
              timing={"repeat": config.compare_repeat // 2}, progress=progress)
    gm, space, latency = job.gm, job.space, job.latency
    print(f"latency table: {space.num_entries} entries in {space.num_blocks} blocks, "
          f"{latency.settings.num_layers} convs timed, batch {config.latency_batch} "
          f"({clock()})")
    importance = job.importance(
        importance_keys(space), evaluate=_Score(held_out, base_loss),
        finetune=_Finetune(x_train, diffusion, config.importance_steps, config.batch))
    print(f"importance table: {len(importance)} fine-tuned estimates ({clock()})")

    nets = {"original": transform(gm, Plan.identity(space))}
    rows, plans = [], {}
    for method, budget, plan in feasible_plans(job, importance, config.budgets):
        pruned = job.finetune(plan, lambda net, checkpoint: train_diffusion(
            net, x_train, diffusion, steps=config.finetune_steps, lr=config.finetune_lr,
            batch=config.batch))
        merged = job.merge(pruned)
        with torch.no_grad():
            error = (merged(x, t) - pruned(x, t)).abs().max().item()
        name = f"{method}@{budget}"
        nets[name], plans[name] = merged, plan
        rows.append({"method": method, "budget": budget,
                     "loss": round(held_out(merged), 5),
                     "merge_error": error,
                     "convs_removed": len(plan.removed_convs),
                     "activations_removed": len(plan.removed_activations(space)),
                     "predicted_ratio": plan.measured["predicted_ratio"],
                     "solve_ratio": plan.measured["ratio"]})
    print(f"fine-tuned and merged {len(rows)} networks ({clock()})")

    measured = time_against_original(job, nets, config.compare_repeat)
    samples = {name: diffusion.sample(net, config.samples, config.size)
               for name, net in nets.items()}
    frechet = {name: frechet_distance(classifier.features(s), real)
               for name, s in samples.items()}
    original = {"loss": round(base_loss, 5), "frechet": round(frechet["original"], 3),
                "latency_ms": round(measured["original"].ms, 4)}
    for row in rows:
        name = f"{row['method']}@{row['budget']}"
        row.update(speedup=round(1 / measured[name].ratio, 3),
                   measured_ratio=round(measured[name].ratio, 4),
                   latency_ms=round(measured[name].ms, 4), frechet=round(frechet[name], 3))
    print_table(rows, original, floor)
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        meta = {"model": (f"DDPMUNet(ch={config.channels}, ch_mult=(1, 2, 2)), "
                          f"{config.size}x{config.size} digits"),
                "device": "cpu", "threads": torch.get_num_threads(),
                "batch": config.latency_batch, "backend": "eager",
                "timing": f"{config.compare_repeat} interleaved rounds over {PREPARATIONS} "
                          "fresh copies of every network (3 warm-up calls each): median "
                          "latency, and the median over copies of the ratio to the original, "
                          "in a fresh process with the job's allocator",
                "loss": "held-out DDPM loss (noise MSE) on "
                          f"{config.eval_pairs} fixed triples", "frechet": "Frechet distance "
                          f"of {config.samples} samples to the test digits in the features "
                          "of a digit classifier trained in the run",
                "config": asdict(config)}
        (out / "results.json").write_text(json.dumps(
            {"meta": meta, "original": original, "real_vs_real_frechet": round(floor, 3),
             "rows": rows}, indent=1))
        (out / "latency.json").write_text(latency.to_json())
        (out / "importance.json").write_text(importance.to_json())
        for name, plan in plans.items():
            (out / f"plan_{name}.json").write_text(plan.to_json())
        plot_samples(out / "samples.png", samples, rows)
        plot_quality(out / "quality.png", rows, original, floor)
        print(f"wrote {out / 'results.json'}, samples.png and quality.png")
    print(f"done in {clock()}")
    return rows


def print_table(rows: list[dict], original: dict, floor: float) -> None:
    print(f"\noriginal: held-out loss {original['loss']:.4f}, Frechet distance "
          f"{original['frechet']:.2f} (real vs real: {floor:.2f}), {original['latency_ms']:.2f} ms")
    head = (f"{'method':<11} {'budget':>6} {'loss':>7} {'Frechet':>8} {'latency ms':>10} "
            f"{'measured':>8} {'speed-up':>8}")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['method']:<11} {r['budget']:>6.0%} {r['loss']:>7.4f} {r['frechet']:>8.2f} "
              f"{r['latency_ms']:>10.2f} {r['measured_ratio']:>8.1%} {r['speedup']:>7.2f}x")
    print("budget and measured: fractions of the original's measured latency")


def plot_samples(path: Path, samples: dict[str, torch.Tensor], rows: list[dict]) -> None:
    """One panel of 32 samples (the same noise) per network."""
    plt = pyplot()
    speed = {f"{r['method']}@{r['budget']}": r["speedup"] for r in rows}
    cols = min(4, len(samples))
    fig, axes = plt.subplots(math.ceil(len(samples) / cols), cols,
                             figsize=(3 * cols, 1.9 * math.ceil(len(samples) / cols)),
                             squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (name, images) in zip(axes.flat, samples.items()):
        grid = images[:32]
        grid = torch.cat([grid, grid.new_full((32 - len(grid), *grid.shape[1:]), -1)])
        size = grid.shape[-1]
        tiled = grid.reshape(4, 8, size, size).permute(0, 2, 1, 3).reshape(4 * size, 8 * size)
        ax.imshow(tiled.numpy(), cmap="gray", vmin=-1, vmax=1)
        ax.set_title(name if name == "original" else f"{name} ({speed[name]:.2f}x)",
                     fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_quality(path: Path, rows: list[dict], original: dict, floor: float) -> None:
    """Frechet distance and held-out loss against the measured speed-up."""
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, key, label in ((left, "frechet", "Frechet distance (lower is better)"),
                           (right, "loss", "held-out diffusion loss")):
        for method in METHODS:
            pts = sorted((r["speedup"], r[key]) for r in rows if r["method"] == method)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=method)
        ax.scatter([1.0], [original[key]], marker="*", s=150, color="k", label="original")
        ax.set(xlabel="measured speed-up (CPU, eager)", ylabel=label)
        ax.grid(alpha=0.3)
    left.axhline(floor, color="gray", ls="--", lw=1, label="real vs real")
    left.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


__all__ = ["DDPMDemoConfig", "Diffusion", "frechet_distance", "run_ddpm_demo"]
