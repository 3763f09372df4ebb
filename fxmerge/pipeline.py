"""The practitioner's job end to end (`fxmerge compress MODEL --data DIR`): a model and an
image folder in; a faster merged network, deployed files and a report out. Each stage
keeps its result in the output folder, so an interrupted job resumes where it stopped."""

from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from .backends.runtimes import Backend, get_backend
from .backends.timing import at_batch
from .errors import ArgumentError
from .job import Job
from .plan import Plan
from .recipes import ClassificationRecipe
from .solve import METHODS, frontier, get_method
from .tables.importance import ImportanceTable

log = logging.getLogger(__name__)
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # ImageNet's, as most models expect


class ImportanceMode(str, Enum):
    """How the job estimates importance."""

    PROXY = "proxy"  # output agreement with the original: seconds
    FINETUNE = "finetune"  # the paper's estimator: a brief fine-tune per entry

    def __str__(self) -> str:
        return self.value


def _option(default: Any, help: str, choices: Any = None, **extra: Any) -> Any:
    """A setting that is also a CLI option: its one default, help string and choices."""
    return field(default=default, metadata={"help": help, "choices": choices, **extra})


@dataclass(frozen=True)
class JobSettings:
    """What `fxmerge compress` does; every field is the CLI option of the same name
    (`cli.add_settings` makes them from the metadata here)."""

    budget: float = field(metadata={"help": "the compressed network's latency as a fraction "
                                            "of the original's, measured (e.g. 0.6)"})
    method: str = _option("layermerge", "layermerge (the paper's), or its baselines depth "
                          "and layeronly", choices=METHODS)
    size: int = _option(224, "image side in pixels")
    grayscale: bool = _option(False, "one-channel images")
    batch: int = _option(64, "training and evaluation batch")
    latency_batch: int = _option(1, "the deployment batch the budget is measured at")
    epochs: float = _option(2.0, "fine-tune epochs of the pruned network")
    train_epochs: float = _option(0.0, "train the original first for this many epochs (for "
                                  "a model without trained weights)")
    lr: float = _option(1e-3, "fine-tuning learning rate (Adam)")
    importance: ImportanceMode = _option(  # noqa: RUF009
        ImportanceMode.PROXY, "proxy: output agreement, seconds; finetune: the paper's "
        "estimator, a brief fine-tune per entry", choices=ImportanceMode)
    importance_steps: int = _option(12, "steps of each importance fine-tune")
    kd_weight: float = _option(0.5, "weight of distillation from the original in the "
                               "fine-tune; 0 turns it off")
    kd_temperature: float = _option(4.0, "distillation temperature")
    threads: int | None = _option(None, "time with N intra-op threads (default: torch's; a "
                                  "budget holds only at the thread count it was measured "
                                  "with)", metavar="N")
    backend: Backend = _option(Backend.EAGER, "what latencies are measured on",  # noqa: RUF009
                               choices=Backend)
    timing_repeat: int = _option(30, "interleaved rounds per network timing")
    scheduler: str | None = _option(None, "a Dask scheduler to run the fine-tuned importance "
                                    "entries on (with --importance finetune)",
                                    metavar="ADDRESS")
    seed: int = _option(0, "seed of the training runs")

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "importance", ImportanceMode(self.importance))
        except ValueError:
            raise ArgumentError(f"importance must be one of {', '.join(ImportanceMode)}, got "
                                f"{self.importance!r}") from None
        object.__setattr__(self, "backend", get_backend(self.backend))

    def check(self) -> None:
        if not 0 < self.budget <= 1:
            raise ArgumentError(f"budget must be in (0, 1], got {self.budget}")
        get_method(self.method)
        if self.scheduler and self.importance is not ImportanceMode.FINETUNE:
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


def run_job(model: nn.Module, train: DataLoader, val: DataLoader, out: str | Path,
            settings: JobSettings, *, spec: str = "", analyze_options: dict | None = None,
            progress: bool | None = None) -> dict[str, Any]:
    """Compress `model` (trained on `train`'s classes) to `settings.budget` of its measured
    latency, as a `Job` over `out`: latency table, importance, measured solve, fine-tune
    with distillation, merge, deploy, final timing; `out` gets every stage's result and
    `report.md`. Returns the report."""
    settings.check()
    out = Path(out)
    report: dict[str, Any] = {"settings": asdict(settings), "model": spec}
    recipe = ClassificationRecipe(train, val, lr=settings.lr,
                                  importance_steps=settings.importance_steps,
                                  kd_weight=settings.kd_weight,
                                  kd_temperature=settings.kd_temperature, seed=settings.seed)
    torch.manual_seed(settings.seed)
    example = at_batch(next(iter(val))[0], settings.latency_batch)
    job = Job(model, example, out=out, analysis=analyze_options, quiet=progress is False,
              progress=progress, threads=settings.threads, timing={"repeat": settings.timing_repeat},
              latency={"backend": settings.backend, "batch_size": settings.latency_batch})
    if settings.train_epochs > 0:
        with job.stage("train the original"):
            trainer = ClassificationRecipe(train, val, lr=3 * settings.lr, seed=settings.seed)
            job.model = trainer.train(model, epochs=settings.train_epochs,
                                      checkpoint=out / "original-train.pt", progress=progress)
    job.model = job.model.eval()
    space = job.space
    report["space"] = {"convs": space.L, "blocks": space.num_blocks,
                       "entries": space.num_entries, "capture": space.capture}
    keys = get_method(settings.method).importance_keys(space)
    importance = _importance(job, recipe, keys, settings)
    plan = job.solve(importance, settings.budget, method=settings.method)
    try:
        frontier(space, job.latency, importance, method=settings.method).plot(
            out / "frontier.png", mark=plan)
    except ImportError:  # matplotlib is the demo extra's
        log.info("no matplotlib: no frontier plot")
    report["accuracy_original"] = round(100 * recipe.evaluate(job.gm), 2)
    report["accuracy_pruned_before_finetune"] = round(100 * recipe.evaluate(job.prune(plan)), 2)
    pruned = job.finetune(plan, lambda net, checkpoint: recipe.train(
        net, epochs=settings.epochs, teacher=job.gm, checkpoint=checkpoint, progress=progress))
    merged = job.merge(pruned)
    report["accuracy_compressed"] = round(100 * recipe.evaluate(merged), 2)
    report["onnx"] = job.deploy(merged, spec)["onnx"]
    report["timing"] = job.time(merged)
    report["seconds"] = dict(job.seconds)
    report["plan"] = {"method": plan.method, "budget": plan.budget, "blocks": len(plan.blocks),
                      "removed_convs": len(plan.removed_convs),
                      "removed_activations": len(plan.removed_activations(space)),
                      "measured": plan.measured}
    (out / "report.json").write_text(json.dumps(report, indent=1))
    (out / "report.md").write_text(render(report, plan))
    return report


def _importance(job: Job, recipe: ClassificationRecipe, keys, settings: JobSettings
                ) -> ImportanceTable:
    """The job's importance, as `settings.importance` asks (on a Dask scheduler if given)."""
    if settings.importance is ImportanceMode.PROXY:
        return job.importance(keys, batch=next(iter(recipe.val_data))[0][:32])
    with contextlib.ExitStack() as stack:
        executor = None
        if settings.scheduler:
            from dask.distributed import Client

            executor = stack.enter_context(Client(settings.scheduler)).get_executor()
        return job.importance(keys, evaluate=recipe.evaluate, finetune=recipe.finetune,
                              executor=executor)


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


__all__ = ["ImportanceMode", "JobSettings", "image_folder", "run_job"]
