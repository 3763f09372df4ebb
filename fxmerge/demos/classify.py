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
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import fx, nn

from ..backends.timing import PREPARATIONS
from ..job import AUTO_METHODS, Job, choose
from ..models import DemoMobileNetV2
from ..passes import transform
from ..pipeline import ImportanceMode
from ..plan import Plan
from ..recipes import ClassificationRecipe
from ..solve import METHODS, frontier, importance_keys
from ..solve.depth import depth_keys
from ..space import Entry, MergeSpace
from ..tables import ImportanceTable, LatencyTable
from .shared import (
    Digits,
    accuracy,
    feasible_plans,
    load_digits,
    loader,
    pyplot,
    summarize,
    time_against_original,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoConfig:
    """Sizes of each stage; `quick()` is a seconds-long smoke run for the tests."""

    budgets: tuple[float, ...] = (0.9, 0.55, 0.35)  # at 90% LayerOnly is feasible too
    train_epochs: int = 12
    importance_steps: int = 12  # at `batch`
    finetune_epochs: int = 4
    batch: int = 64
    latency_batch: int = 64
    latency_repeat: int = 20
    compare_repeat: int = 60
    size: int = 32
    # calibration images of the output-agreement proxy: 32 ranks entries as 64 does, 135x
    # cheaper than a fine-tuned entry against 95x (benchmarks/results/proxy_demo_*.md)
    proxy_batch: int = 32
    distorted: bool = False  # the harder task (`distorted_task()`)
    # The authors re-initialise single convs before the importance fine-tune; 12 steps cannot
    # recover such a conv, which skews the table (docs/experiments.md).
    reset_single: bool = False
    kd_weight: float = 0.0  # the plans' fine-tune distils from the original when > 0
    # LayerMerge plans solved on the proxy table too, fine-tuned and timed (a research
    # comparison, benchmarks/bench_proxy.py; off in the Quickstart)
    proxy_plans: bool = False
    # PROXY (output agreement: seconds) or FINETUNE (the paper's estimator: minutes)
    importance: ImportanceMode = ImportanceMode.PROXY

    @classmethod
    def distorted_task(cls) -> DemoConfig:
        """Digits rotated, scaled, shifted and noisy, four views of each training image:
        4 epochs train for 250 steps (the plain task: 187), 2 fine-tune 125 (plain: 62)."""
        return cls(distorted=True, train_epochs=4, finetune_epochs=2)

    @classmethod
    def quick(cls) -> DemoConfig:
        return cls(budgets=(0.6,), train_epochs=1, importance_steps=2, finetune_epochs=1,
                   latency_batch=8, latency_repeat=3, compare_repeat=6, size=16)


@dataclass
class SeedRun:
    """One whole job: per-method rows and what they were decided from."""

    seed: int
    rows: list[dict]
    base_acc: float
    space: MergeSpace
    latency: LatencyTable
    importance: ImportanceTable
    costs: dict


def spearman(a: ImportanceTable, b: ImportanceTable) -> float:
    """Spearman's rank correlation of two tables over the LayerMerge entries they share."""
    from scipy.stats import spearmanr

    keys = [k for k in a.values if k in b.values and isinstance(k, Entry)]
    return float(spearmanr([a[k] for k in keys], [b[k] for k in keys]).statistic)


@dataclass
class Trained:
    """A seed's data, trained network and its compression job."""

    data: Digits
    job: Job
    base_acc: float
    recipe: ClassificationRecipe  # the fine-tunes' (lr 1e-3), on the seed's split

    @property
    def gm(self) -> fx.GraphModule:
        return self.job.gm

    @property
    def space(self) -> MergeSpace:
        return self.job.space


def train_seed(config: DemoConfig, seed: int, progress: bool | None = None) -> Trained:
    """Split the data and train the demo network with `seed`; trace and analyse it."""
    torch.manual_seed(seed)
    started = time.perf_counter()
    data = load_digits(config.size, seed=seed, distorted=config.distorted)
    train, val = loader(data.train, config.batch), loader(data.val, 300, shuffle=False)
    model = ClassificationRecipe(train, val, lr=3e-3, seed=seed).train(
        DemoMobileNetV2(), epochs=config.train_epochs, progress=False)
    base_acc = accuracy(model, data.test)
    print(f"[seed {seed}] trained DemoMobileNetV2: test accuracy {base_acc:.2f}% "
          f"({time.perf_counter() - started:.0f} s)")
    job = Job(model, data.test[0][: config.latency_batch],
              analysis={"exclude": DemoMobileNetV2.EXCLUDE},
              latency={"warmup": 5, "repeat": config.latency_repeat},
              timing={"repeat": config.compare_repeat // 2}, progress=progress)
    recipe = ClassificationRecipe(train, val, lr=1e-3, importance_steps=config.importance_steps,
                                  kd_weight=config.kd_weight, seed=seed)
    return Trained(data, job, base_acc, recipe)


def estimator(trained: Trained, config: DemoConfig) -> tuple[Callable, Callable]:
    """The importance estimator's score (validation accuracy, a fraction) and brief
    fine-tune: the recipe's."""
    return trained.recipe.evaluate, trained.recipe.finetune


def finetune_importance(trained: Trained, config: DemoConfig) -> ImportanceTable:
    """The paper's importance table (every method's keys): brief fine-tune, validation
    accuracy."""
    evaluate, finetune = estimator(trained, config)
    return trained.job.importance(importance_keys(trained.space), evaluate=evaluate,
                                  finetune=finetune, reset_single=config.reset_single)


def finetune_plan(trained: Trained, plan: Plan, config: DemoConfig, seed: int
                  ) -> tuple[nn.Module, float]:
    """`plan`'s pruned network fine-tuned, then merged, and its test accuracy."""
    pruned = trained.job.finetune(plan, lambda net, checkpoint: trained.recipe.train(
        net, epochs=config.finetune_epochs, teacher=trained.gm, checkpoint=checkpoint,
        progress=False))
    merged = trained.job.merge(pruned)
    return merged, round(accuracy(merged, trained.data.test), 2)


def run_seed(config: DemoConfig, seed: int, progress: bool | None = None) -> SeedRun:
    """Split, train, measure both tables, solve, fine-tune, merge and time, with `seed`."""
    started = time.perf_counter()
    trained = train_seed(config, seed, progress)
    data, job, base_acc = trained.data, trained.job, trained.base_acc
    gm, space = job.gm, job.space
    latency = job.latency
    print(f"latency table: {space.num_entries} entries, {latency.settings.num_layers} "
          f"convs timed, batch {config.latency_batch}, {latency.settings.seconds:.0f} s")
    tick = time.perf_counter()
    calibration = data.train[0][: config.proxy_batch]  # training images
    proxy = job.importance(importance_keys(space), batch=calibration)
    proxy_s = time.perf_counter() - tick
    costs = {"proxy_importance_s": round(proxy_s, 2), "proxy_keys": len(proxy)}
    what = (f"{space.num_entries} LayerMerge entries, {len(depth_keys(space))} Depth "
            "activation choices, the rest LayerOnly's")
    if config.importance is ImportanceMode.FINETUNE:
        tick = time.perf_counter()
        importance = finetune_importance(trained, config)
        finetune_s = time.perf_counter() - tick
        rho = spearman(importance, proxy)
        costs.update(finetune_importance_s=round(finetune_s, 2),
                     finetune_keys=len(importance), spearman_rho=round(rho, 3))
        print(f"importance table: {len(importance)} fine-tuned estimates in {finetune_s:.0f} s "
              f"({what}); the output-agreement proxy's in {proxy_s:.1f} s rank the LayerMerge "
              f"entries with Spearman rho {rho:.2f} to them "
              f"({time.perf_counter() - started:.0f} s so far)")
    else:
        importance = proxy
        print(f"importance table: {len(proxy)} output-agreement estimates in {proxy_s:.1f} s "
              f"({what}; the paper's fine-tuned estimator: --importance finetune) "
              f"({time.perf_counter() - started:.0f} s so far)")

    nets = {"original": transform(gm, Plan.identity(space))}  # BN folded, as the paper times
    # budgets are fractions of the original's measured latency at the table's batch
    rows = []
    proxy_plans = [(f"{method}-proxy", budget, plan) for method, budget, plan in
                   feasible_plans(job, proxy, config.budgets, ("layermerge",))
                   ] if config.proxy_plans else []
    plans = [*feasible_plans(job, importance, config.budgets), *proxy_plans]
    for method, budget, plan in plans:
        nets[f"{method}@{budget}"], acc = finetune_plan(trained, plan, config, seed)
        rows.append({"seed": seed, "method": method, "budget": budget, "accuracy": acc,
                     "holdout": round(100 * trained.recipe.evaluate(nets[f"{method}@{budget}"]),
                                      2),
                     "predicted_ratio": plan.measured["predicted_ratio"],
                     "solve_ratio": plan.measured["ratio"],
                     "solve_scatter": plan.measured["scatter"]})
    measured = time_against_original(job, nets, config.compare_repeat)
    for row in rows:
        merged = measured[f"{row['method']}@{row['budget']}"]
        row.update(latency_ms=round(merged.ms, 4),
                   original_ms=round(measured["original"].ms, 4),
                   measured_ratio=round(merged.ratio, 4),
                   speedup=round(1 / merged.ratio, 3))
    rows += auto_rows(rows, resolution=100 / len(data.val[1]))
    print_table(rows, base_acc)
    return SeedRun(seed, rows, base_acc, space, latency, importance, costs)


def auto_rows(rows: list[dict], resolution: float) -> list[dict]:
    """What `--method auto` keeps at each budget (`fxmerge.job.choose`): of LayerMerge and
    Depth, the network more accurate on the held-out split (val, in %; within `resolution`,
    one image, the faster), reported on test."""
    out = []
    for budget in dict.fromkeys(r["budget"] for r in rows):
        both = {r["method"]: r for r in rows if r["budget"] == budget
                and r["method"] in AUTO_METHODS}
        if both:
            kept, _ = choose({m: r["holdout"] for m, r in both.items()},
                             {m: r["speedup"] for m, r in both.items()}, resolution)
            out.append({**both[kept], "method": "auto", "kept": kept})
    return out


def run_demo(out: Path | None = None, config: DemoConfig = DemoConfig(),
             progress: bool | None = None, seeds: int = 1) -> list[dict]:
    """Run the whole job once per seed (0 .. seeds-1); print each table and, over seeds,
    mean and standard deviation; write results.json and pareto.png. Returns the summary
    rows."""
    started = time.perf_counter()
    runs = [run_seed(config, seed, progress) for seed in range(seeds)]
    rows = summarize([r.rows for r in runs], ("accuracy", "speedup", "latency_ms", "measured_ratio"))
    base = [r.base_acc for r in runs]
    if seeds > 1:
        print_summary(rows, base)
    if out is not None:
        write_results(Path(out), rows, runs, config)
    print(f"done in {time.perf_counter() - started:.0f} s")
    return rows


def print_table(rows: list[dict], base_acc: float) -> None:
    print(f"\noriginal: test accuracy {base_acc:.2f}%")
    head = (f"{'method':<18} {'budget':>6} {'held-out %':>10} {'test %':>6} {'latency ms':>10} "
            f"{'measured':>8} {'predicted':>9} {'speed-up':>8}")
    print(head)
    print("-" * len(head))
    for r in rows:
        name = f"auto: {r['kept']}" if r["method"] == "auto" else r["method"]
        print(f"{name:<18} {r['budget']:>6.0%} {r['holdout']:>10.2f} {r['accuracy']:>6.2f} "
              f"{r['latency_ms']:>10.3f} {r['measured_ratio']:>8.1%} "
              f"{r['predicted_ratio']:>9.1%} {r['speedup']:>7.2f}x")
    print("held-out: the validation split every choice is scored on; test: reported only. "
          "auto keeps, per budget, the more accurate of layermerge and depth on held-out. "
          "budget, measured and predicted: fractions of the original's measured latency "
          f"({rows[0]['original_ms']:.3f} ms; predicted: calibrated on the other plans' "
          "timings, before this plan was timed)" if rows else "no plan met any budget")


def print_summary(rows: list[dict], base: list[float]) -> None:
    mean, std = statistics.fmean(base), statistics.pstdev(base)
    print(f"\nover {len(base)} seeds: original test accuracy {mean:.2f} ± {std:.2f}%")
    head = f"{'method':<11} {'budget':>6} {'seeds':>5} {'acc %':>14} {'speed-up':>14}"
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['method']:<11} {r['budget']:>6.0%} {r['seeds']:>5} "
              f"{r['accuracy_mean']:>7.2f} ± {r['accuracy_std']:<4.2f} "
              f"{r['speedup_mean']:>6.2f}x ± {r['speedup_std']:.2f}")


def write_results(out: Path, rows: list[dict], runs: list[SeedRun], config: DemoConfig
                  ) -> None:
    out.mkdir(parents=True, exist_ok=True)
    base = [r.base_acc for r in runs]
    data = f"sklearn digits, {config.size}x{config.size}{', distorted' if config.distorted else ''}"
    meta = {"model": "DemoMobileNetV2", "data": data, "device": "cpu",
            "batch": config.latency_batch, "threads": torch.get_num_threads(),
            "timing": f"{config.compare_repeat} interleaved rounds over {PREPARATIONS} fresh "
                      "copies of every network (3 warm-up calls each): median latency, and "
                      "the median over copies of the ratio to the original, in a fresh "
                      "process with the job's allocator (as the budgets were measured)",
            "seeds": len(runs), "original_accuracy": base[0] if len(base) == 1 else base,
            "original_accuracy_mean": statistics.fmean(base),
            "original_accuracy_std": statistics.pstdev(base), "config": asdict(config)}
    runs_rows = [row for r in runs for row in r.rows]
    meta["importance_cost"] = [{"seed": r.seed, **r.costs} for r in runs]
    (out / "results.json").write_text(json.dumps(
        {"meta": meta, "rows": rows, "runs": runs_rows}, indent=1))
    first = runs[0]
    (out / "latency.json").write_text(first.latency.to_json())
    (out / "importance.json").write_text(first.importance.to_json())
    plot_results(out / "pareto.png", rows, base, first)
    print(f"wrote {out / 'results.json'} and {out / 'pareto.png'}")


def plot_results(path: Path, rows: list[dict], base: list[float], first: SeedRun) -> None:
    """Left: measured accuracy vs measured speed-up (mean ± std over seeds). Right: the
    predicted frontiers of the first seed's tables."""
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for method in dict.fromkeys(r["method"] for r in rows):
        pts = sorted((r["speedup_mean"], r["accuracy_mean"], r["speedup_std"],
                      r["accuracy_std"]) for r in rows if r["method"] == method)
        x, y, xerr, yerr = zip(*pts)
        left.errorbar(x, y, xerr=xerr, yerr=yerr, marker="o", capsize=3, label=method)
    for method in METHODS:
        front = frontier(first.space, first.latency, first.importance, method=method,
                         levels=400).points
        right.step([p["budget"] for p in front], [p["importance"] for p in front],
                   where="post", label=method)
    left.errorbar([1.0], [statistics.fmean(base)], yerr=[statistics.pstdev(base)],
                  marker="*", ms=14, color="k", label="original")
    left.set(xlabel="measured speed-up (CPU, eager)", ylabel="test accuracy (%)",
             title=f"after fine-tuning and merging ({len(base)} seed(s))")
    right.set(xlabel="predicted latency / original", ylabel="objective (each method's own)",
              title="solver frontiers (one DP each)")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


__all__ = [
    "DemoConfig",
    "Trained",
    "estimator",
    "finetune_importance",
    "finetune_plan",
    "run_demo",
    "train_seed",
]
