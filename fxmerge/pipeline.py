"""The practitioner's job end to end (`fxmerge compress MODEL --data DIR`): a model and an
image folder in; a faster merged network, deployed files and a report out. Each stage
keeps its result in the output folder, so an interrupted job resumes where it stopped."""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from .backends.runtimes import get_backend, plan_runner, prepare
from .backends.timing import at_batch, time_against_reference, using_threads
from .capture import trace
from .deploy import export_onnx, save
from .errors import ArgumentError, FxMergeError, InfeasibleBudget
from .passes import merge, prune
from .plan import Plan
from .recipes import ClassificationRecipe
from .solve import frontier, get_method
from .solve.measured import NetworkTimer, solve_measured
from .space import MergeSpace, analyze
from .tables.agreement import agreement_importance
from .tables.importance import ImportanceTable, estimate_importance
from .tables.latency import LatencyTable, measure_latency

log = logging.getLogger(__name__)
IMPORTANCE_MODES = ("proxy", "finetune")
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # ImageNet's, as most models expect


@dataclass(frozen=True)
class JobSettings:
    """What `fxmerge compress` does; every field is a CLI option of the same name."""

    budget: float
    method: str = "layermerge"
    size: int = 224  # images are resized to size x size
    batch: int = 64  # training and evaluation batch
    latency_batch: int = 1  # the deployment batch the budget is measured at
    epochs: float = 2.0  # fine-tune of the pruned network
    train_epochs: float = 0.0  # train the original first (a model without trained weights)
    lr: float = 1e-3
    importance: str = "proxy"  # or "finetune", the paper's estimator
    importance_steps: int = 12
    kd_weight: float = 0.5  # 0: no distillation from the original
    kd_temperature: float = 4.0
    threads: int | None = None
    backend: str = "eager"
    timing_repeat: int = 30
    scheduler: str | None = None  # a Dask scheduler for the fine-tuned importance entries
    grayscale: bool = False
    seed: int = 0

    def check(self) -> None:
        if self.importance not in IMPORTANCE_MODES:
            raise ArgumentError(f"importance must be one of {IMPORTANCE_MODES}, got "
                                f"{self.importance!r}")
        if not 0 < self.budget <= 1:
            raise ArgumentError(f"budget must be in (0, 1], got {self.budget}")
        get_method(self.method)
        get_backend(self.backend)
        if self.scheduler and self.importance != "finetune":
            raise ArgumentError("--scheduler runs the fine-tuned importance entries: it needs "
                                "--importance finetune")


def image_folder(root: str | Path, settings: JobSettings) -> tuple[DataLoader, DataLoader,
                                                                   list[str]]:
    """Loaders over `root/train` and `root/val` (torchvision ImageFolder layout: one folder
    per class), images resized to `size` and normalised, and the class names."""
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
    train, val = _in_memory(train), _in_memory(val)
    return (DataLoader(train, batch_size=settings.batch, shuffle=True),
            DataLoader(val, batch_size=settings.batch), train.classes)


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


class _Stage:
    """Times a stage into `report["seconds"]` and says what it is doing."""

    def __init__(self, report: dict, name: str, quiet: bool) -> None:
        self.report, self.name, self.quiet = report, name, quiet

    def __enter__(self) -> None:
        self.started = time.perf_counter()
        if not self.quiet:
            print(f"[{self.name}]", flush=True)

    def __exit__(self, *exc: object) -> None:
        self.report["seconds"][self.name] = round(time.perf_counter() - self.started, 1)


def _cached(path: Path, load, space: MergeSpace):
    """The table or plan at `path` when it belongs to `space`, else None."""
    if not path.is_file():
        return None
    try:
        item = load(path.read_text())
    except FxMergeError:
        return None
    return item if item.signature == space.signature else None


def run_job(model: nn.Module, train: DataLoader, val: DataLoader, out: str | Path,
            settings: JobSettings, *, spec: str = "", analyze_options: dict | None = None,
            progress: bool | None = None) -> dict[str, Any]:
    """Compress `model` (trained on `train`'s classes) to `settings.budget` of its measured
    latency: latency table, importance, measured solve, fine-tune with distillation, merge,
    save and export; `out` gets every stage's result and `report.md`. Returns the report."""
    settings.check()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    quiet = progress is False
    report: dict[str, Any] = {"settings": asdict(settings), "model": spec, "seconds": {}}
    recipe = ClassificationRecipe(train, val, lr=settings.lr,
                                  importance_steps=settings.importance_steps,
                                  kd_weight=settings.kd_weight,
                                  kd_temperature=settings.kd_temperature, seed=settings.seed)
    torch.manual_seed(settings.seed)
    if settings.train_epochs > 0:
        with _Stage(report, "train the original", quiet):
            trainer = ClassificationRecipe(train, val, lr=3 * settings.lr, seed=settings.seed)
            model = trainer.train(model, epochs=settings.train_epochs,
                                  checkpoint=out / "original-train.pt", progress=progress)
    model = model.eval()
    with _Stage(report, "capture and analyse", quiet):
        example = at_batch(next(iter(val))[0], settings.latency_batch)
        gm = trace(model, example)
        space = analyze(gm, **(analyze_options or {}))
        report["space"] = {"convs": space.L, "blocks": space.num_blocks,
                           "entries": space.num_entries, "capture": space.capture}
        (out / "space.json").write_text(space.to_json())
    with _Stage(report, "latency table", quiet):
        latency = _cached(out / "latency.json", LatencyTable.from_json, space)
        if latency is None or latency.settings.threads != _threads(settings) \
                or latency.settings.backend != settings.backend:
            latency = measure_latency(space, gm, backend=settings.backend,
                                      batch_size=settings.latency_batch,
                                      threads=settings.threads,
                                      cache=out / "latency-cache.json", progress=progress)
            (out / "latency.json").write_text(latency.to_json())
    keys = get_method(settings.method).importance_keys(space)
    with _Stage(report, f"importance ({settings.importance})", quiet):
        importance = _importance(gm, space, recipe, keys, out, settings, progress)
    with _Stage(report, "measured solve", quiet):
        plan = _plan(gm, space, latency, importance, out, settings, progress)
        try:
            frontier(space, latency, importance, method=settings.method).plot(
                out / "frontier.png", mark=plan)
        except ImportError:  # matplotlib is the demo extra's
            log.info("no matplotlib: no frontier plot")
    with _Stage(report, "fine-tune", quiet):
        report["accuracy_original"] = round(100 * recipe.evaluate(gm), 2)
        pruned = prune(gm, plan, space)
        report["accuracy_pruned_before_finetune"] = round(100 * recipe.evaluate(pruned), 2)
        tag = hashlib.sha1(json.dumps([asdict(b) for b in plan.blocks]).encode()).hexdigest()
        pruned = recipe.train(pruned, epochs=settings.epochs, teacher=gm,  # per plan
                              checkpoint=out / f"finetune-{tag[:10]}.pt", progress=progress)
    with _Stage(report, "merge and deploy", quiet):
        merged = merge(pruned.eval())
        report["accuracy_compressed"] = round(100 * recipe.evaluate(merged), 2)
        save(merged, out / "merged.safetensors", model=spec)
        try:
            export_onnx(merged, example, out / "merged.onnx")
            report["onnx"] = "merged.onnx"
        except Exception as exc:  # noqa: BLE001 (the exporter's: the network is still saved)
            report["onnx"] = f"not exported ({type(exc).__name__}: {exc})"
    with _Stage(report, "final timing", quiet):
        report["timing"] = _final_timing(gm, space, merged, example, settings)
    report["plan"] = {"method": plan.method, "budget": plan.budget, "blocks": len(plan.blocks),
                      "removed_convs": len(plan.removed_convs),
                      "removed_activations": len(plan.removed_activations(space)),
                      "measured": plan.measured}
    (out / "report.json").write_text(json.dumps(report, indent=1))
    (out / "report.md").write_text(render(report, plan))
    return report


def _threads(settings: JobSettings) -> int:
    return settings.threads or torch.get_num_threads()


def _importance(gm: fx.GraphModule, space: MergeSpace, recipe: ClassificationRecipe, keys,
                out: Path, settings: JobSettings, progress: bool | None) -> ImportanceTable:
    path = out / f"importance-{settings.importance}.json"
    table = _cached(path, ImportanceTable.from_json, space)
    if table is not None and all(k in table for k in keys):
        return table
    if settings.importance == "proxy":
        batch = next(iter(recipe.val_data))[0][:32]
        table = agreement_importance(space, gm, batch, keys=keys, progress=progress)
    else:
        with contextlib.ExitStack() as stack:
            executor = None
            if settings.scheduler:
                from dask.distributed import Client

                executor = stack.enter_context(Client(settings.scheduler)).get_executor()
            table = estimate_importance(space, gm, evaluate=recipe.evaluate,
                                        finetune=recipe.finetune, keys=keys, executor=executor,
                                        cache=out / "importance.jsonl", progress=progress)
    path.write_text(table.to_json())
    return table


def _plan(gm: fx.GraphModule, space: MergeSpace, latency: LatencyTable,
          importance: ImportanceTable, out: Path, settings: JobSettings,
          progress: bool | None) -> Plan:
    path = out / "plan.json"
    plan = _cached(path, Plan.from_json, space)
    if plan is not None and plan.method == settings.method and plan.budget == settings.budget \
            and plan.measured and not plan.extra.get("over_budget"):
        return plan
    timer = NetworkTimer.for_table(gm, space, latency, repeat=settings.timing_repeat)
    try:
        plan = solve_measured(space, latency, importance, timer, budget=settings.budget,
                              method=settings.method, progress=progress)
    except InfeasibleBudget as exc:
        if exc.plan is not None:
            path.write_text(exc.plan.to_json())
        raise InfeasibleBudget(f"{exc} (the fastest plan found, over the budget, is in "
                               f"{path})" if exc.plan is not None else str(exc)) from None
    path.write_text(plan.to_json())
    return plan


def _final_timing(gm: fx.GraphModule, space: MergeSpace, merged: fx.GraphModule,
                  example: tuple, settings: JobSettings) -> dict:
    """The original (BatchNorm folded) and the merged network, timed side by side."""
    inputs = at_batch(example, settings.latency_batch)
    with using_threads(settings.threads) as threads:
        t = time_against_reference(
            lambda: {"original": plan_runner(gm, Plan.identity(space), settings.backend,
                                             inputs),
                     "merged": prepare(copy.deepcopy(merged), settings.backend, inputs)},
            inputs, repeat=settings.timing_repeat, preparations=3)
    return {"backend": settings.backend, "batch": settings.latency_batch, "threads": threads,
            "original_ms": round(t["original"].ms, 4), "merged_ms": round(t["merged"].ms, 4),
            "ratio": round(t["merged"].ratio, 4), "speedup": round(1 / t["merged"].ratio, 3)}


def render(report: dict, plan: Plan) -> str:
    """report.md: what was done and what it gave."""
    s, t = report["settings"], report["timing"]
    distilled = (f"distilling from the original (weight {s['kd_weight']}, temperature "
                 f"{s['kd_temperature']})" if s["kd_weight"] > 0 else "without distillation")
    space, m = report["space"], plan.measured
    lines = [
        f"# fxmerge compress: {report['model'] or 'model'}",
        "",
        (f"{s['method']} at a budget of {s['budget']:.0%} of the original's latency, measured "
         f"on {t['backend']} at batch {t['batch']} with {t['threads']} threads."),
        "",
        "| | original | compressed |",
        "|---|---|---|",
        (f"| accuracy (val, %) | {report['accuracy_original']:.2f} | "
         f"{report['accuracy_compressed']:.2f} |"),
        f"| latency (ms) | {t['original_ms']:.4g} | {t['merged_ms']:.4g} |",
        f"| speed-up | 1.00 | {t['speedup']:.2f}x |",
        "",
        (f"The solve timed {m.get('rounds')} plan(s); the chosen one measured "
         f"{m.get('ratio', float('nan')):.1%} of the original (predicted "
         f"{m.get('predicted_ratio', float('nan')):.1%})."),
        "",
        (f"Before fine-tuning the pruned network scored "
         f"{report['accuracy_pruned_before_finetune']:.2f}%; it was fine-tuned for "
         f"{s['epochs']} epochs {distilled}."),
        "",
        (f"Space: {space['convs']} convs, {space['blocks']} blocks, {space['entries']} "
         f"entries (captured by {space['capture']}); importance: {s['importance']}."),
        "",
        "| stage | seconds |",
        "|---|---|",
        *(f"| {k} | {v:.1f} |" for k, v in report["seconds"].items()),
        "",
        (f"Files: merged.safetensors (`fxmerge.load`), {report['onnx']}, plan.json, "
         "latency.json, frontier.png."),
        "",
        "## Plan",
        "",
        "```",
        plan.describe(),
        "```",
        "",
    ]
    return "\n".join(lines)


__all__ = ["IMPORTANCE_MODES", "JobSettings", "image_folder", "run_job"]
