"""The classification demo (the default main job): a real end-to-end compression on data
that ships with scikit-learn.

Train a small MobileNetV2-style network on the bundled 8x8 digits (upsampled to 32x32),
measure its CPU latency table, estimate importance with the paper's estimator (brief
fine-tune, held-out accuracy), solve with LayerMerge, Depth and LayerOnly at a few budgets,
fine-tune each plan, merge it, and time original and merged networks side by side.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..capture import trace
from ..compress import CompressResult
from ..models import DemoMobileNetV2
from ..passes import prune, transform
from ..plan import Plan
from ..solve import METHODS, frontier
from ..space import analyze
from ..tables.importance import estimate_importance
from ..tables.latency import measure_latency, time_interleaved
from .shared import accuracy, feasible_plans, load_digits, pyplot, train

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoConfig:
    """Sizes of each stage; `quick()` is a seconds-long smoke run for the tests."""

    budgets: tuple[float, ...] = (0.8, 0.55, 0.35)
    train_epochs: int = 12
    importance_steps: int = 12
    importance_batch: int = 32
    finetune_epochs: int = 4
    batch: int = 64
    latency_batch: int = 64
    latency_repeat: int = 20
    compare_repeat: int = 60
    size: int = 32

    @classmethod
    def quick(cls) -> DemoConfig:
        return cls(budgets=(0.6,), train_epochs=1, importance_steps=2, finetune_epochs=1,
                   latency_batch=8, latency_repeat=3, compare_repeat=3, size=16)


class _Finetune:
    """The importance estimator's brief fine-tune (picklable, for process pools)."""

    def __init__(self, data, steps: int, batch: int) -> None:
        self.data, self.steps, self.batch = data, steps, batch

    def __call__(self, model: nn.Module) -> nn.Module:
        return train(model, self.data, steps=self.steps, lr=1e-3, batch=self.batch)


class _Accuracy:
    def __init__(self, data) -> None:
        self.data = data

    def __call__(self, model: nn.Module) -> float:
        return accuracy(model, self.data)


def run_demo(out: Path | None = None, config: DemoConfig = DemoConfig(),
             progress: bool | None = None) -> list[dict]:
    """Run the whole job; print the results table; write results.json and pareto.png."""
    torch.manual_seed(0)
    started = time.perf_counter()
    data = load_digits(config.size)
    model = train(DemoMobileNetV2(), data.train, epochs=config.train_epochs,
                  batch=config.batch)
    base_acc = accuracy(model, data.test)
    print(f"trained DemoMobileNetV2: test accuracy {base_acc:.2f}% "
          f"({time.perf_counter() - started:.0f} s)")

    example = data.test[0][: config.latency_batch]
    gm = trace(model, example)
    space = analyze(gm, exclude=DemoMobileNetV2.EXCLUDE)
    latency = measure_latency(space, warmup=5, repeat=config.latency_repeat, progress=progress)
    print(f"latency table: {space.num_entries} entries, {latency.settings['num_signatures']} "
          f"convs timed, batch {config.latency_batch}, {latency.settings['seconds']:.0f} s")
    importance = estimate_importance(
        space, evaluate=_Accuracy(data.val),
        finetune=_Finetune(data.train, config.importance_steps, config.importance_batch),
        progress=progress)
    print(f"importance table: {len(importance)} fine-tuned estimates "
          f"({time.perf_counter() - started:.0f} s so far)")

    nets = {"original": transform(gm, Plan.identity(space))}  # BN folded, as the paper times
    rows = []
    for method, budget, plan in feasible_plans(space, latency, importance, config.budgets):
        result = CompressResult(plan, space, prune(gm, plan), latency, importance)
        train(result.pruned, data.train, epochs=config.finetune_epochs, lr=1e-3,
              batch=config.batch)
        nets[f"{method}@{budget}"] = merged = result.merge()
        rows.append({"method": method, "budget": budget,
                     "accuracy": round(accuracy(merged, data.test), 2),
                     "predicted_latency_ms": round(plan.predicted_latency_ms, 4),
                     "original_predicted_ms": round(latency.identity_latency(space), 4)})
    measured = time_interleaved(nets, example, repeat=config.compare_repeat)
    # the layers outside the search (stem, head, pool, classifier) cost the same in every
    # network: estimate them from the original, measured minus its table latency
    outside = measured["original"] - latency.identity_latency(space)
    for row in rows:
        merged_ms = measured[f"{row['method']}@{row['budget']}"]
        row.update(latency_ms=round(merged_ms, 4), original_ms=round(measured["original"], 4),
                   predicted_total_ms=round(row["predicted_latency_ms"] + outside, 4),
                   speedup=round(measured["original"] / merged_ms, 3))
    print_table(rows, base_acc)
    if out is not None:
        write_results(Path(out), rows, base_acc, space, latency, importance, config)
    print(f"done in {time.perf_counter() - started:.0f} s")
    return rows


def print_table(rows: list[dict], base_acc: float) -> None:
    print(f"\noriginal: test accuracy {base_acc:.2f}%")
    head = (f"{'method':<11} {'budget':>6} {'acc %':>6} {'latency ms':>10} {'predicted ms':>12} "
            f"{'error':>6} {'original ms':>11} {'speed-up':>8}")
    print(head)
    print("-" * len(head))
    for r in rows:
        error = r["latency_ms"] / r["predicted_total_ms"] - 1
        print(f"{r['method']:<11} {r['budget']:>6.0%} {r['accuracy']:>6.2f} "
              f"{r['latency_ms']:>10.3f} {r['predicted_total_ms']:>12.3f} {error:>+6.0%} "
              f"{r['original_ms']:>11.3f} {r['speedup']:>7.2f}x")
    print("predicted ms: the plan's table latency plus the layers outside the search (the "
          "original's measured minus table latency); error: measured vs predicted")


def write_results(out: Path, rows, base_acc, space, latency, importance, config) -> None:
    out.mkdir(parents=True, exist_ok=True)
    meta = {"model": "DemoMobileNetV2", "data": "sklearn digits, 32x32", "device": "cpu",
            "batch": config.latency_batch, "threads": torch.get_num_threads(),
            "timing": f"median of {config.compare_repeat} interleaved rounds after 3 warm-up calls",
            "original_accuracy": base_acc}
    (out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    (out / "latency.json").write_text(latency.to_json())
    (out / "importance.json").write_text(importance.to_json())
    plot_results(out / "pareto.png", rows, base_acc, space, latency, importance)
    print(f"wrote {out / 'results.json'} and {out / 'pareto.png'}")


def plot_results(path: Path, rows, base_acc, space, latency, importance) -> None:
    """Left: measured accuracy vs measured latency. Right: the predicted frontiers."""
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for method in METHODS:
        pts = sorted((r["latency_ms"], r["accuracy"]) for r in rows if r["method"] == method)
        if pts:
            left.plot(*zip(*pts), marker="o", label=method)
        front = frontier(space, latency, importance, method=method, levels=400).points
        right.step([p["budget"] for p in front], [p["importance"] for p in front],
                   where="post", label=method)
    if rows:
        left.scatter([rows[0]["original_ms"]], [base_acc],
                     marker="*", s=150, color="k", label="original")
    left.set(xlabel="measured latency (ms, CPU)", ylabel="test accuracy (%)",
             title="after fine-tuning and merging")
    right.set(xlabel="predicted latency / original", ylabel="predicted importance (sum)",
              title="solver frontiers (one DP each)")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


__all__ = ["DemoConfig", "run_demo"]
