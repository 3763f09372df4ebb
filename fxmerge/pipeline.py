"""The practitioner's job end to end (`fxmerge compress MODEL --data DIR`): a model and an
image folder in; a faster merged network, deployed files and a report out. Each stage
keeps its result in the output folder, so an interrupted job resumes where it stopped.

Nothing is chosen on the data the result is reported on: a stratified part of `train/` is
held out before anything is fitted; importance, every solve and the choice between methods
are scored on it; the fine-tunes train on the rest; `val/` is read once, for the report."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import warnings
from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from .backends.runtimes import Backend, get_backend
from .backends.timing import at_batch
from .errors import ArgumentError, InfeasibleBudget
from .job import AUTO, AUTO_METHODS, BudgetBasis, Job, basis_of
from .plan import Plan
from .recipes import ClassificationRecipe, ImportanceProtocol
from .solve import METHODS, frontier, get_method
from .tables import ImportanceTable

log = logging.getLogger(__name__)
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # ImageNet's, as most models expect
HOLDOUT_FLOOR = 5  # held-out images per class at least (at most half of a class)


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
    method: str = _option(AUTO, "auto: LayerMerge and Depth both solved and fine-tuned, the "
                          "one more accurate on the held-out images kept; or one method alone "
                          "(layermerge, depth, layeronly)", choices=(AUTO, *METHODS))
    holdout: float = _option(0.1, "fraction of train/ held out (stratified, at least "
                             f"{HOLDOUT_FLOOR} images a class) to score importance and choose "
                             "plans on; val/ is read only for the report")
    budget_basis: BudgetBasis = _option(  # noqa: RUF009
        BudgetBasis.MEASURED, "measured: plans are timed whole against the original until one "
        "fits --budget; table: --budget is a fraction of the latency table's sum",
        choices=BudgetBasis)
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
    importance_protocol: ImportanceProtocol = _option(  # noqa: RUF009
        ImportanceProtocol.STEPS, "the fine-tuned estimator's brief fine-tune: steps "
        "(--importance-steps), or the paper's (paper-imagenet: 4%% of the training images for "
        "1 epoch; paper-cifar: 1%% for 50)", choices=ImportanceProtocol)
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
    seed: int = _option(0, "seed of the training runs and of the held-out split")

    def __post_init__(self) -> None:
        for name, kind in (("importance", ImportanceMode),
                           ("importance_protocol", ImportanceProtocol)):
            try:
                object.__setattr__(self, name, kind(getattr(self, name)))
            except ValueError:
                raise ArgumentError(f"{name} must be one of {', '.join(kind)}, got "
                                    f"{getattr(self, name)!r}") from None
        object.__setattr__(self, "backend", get_backend(self.backend))
        object.__setattr__(self, "budget_basis", basis_of(self.budget_basis))

    @property
    def methods(self) -> tuple[str, ...]:
        """The methods the job tries."""
        return AUTO_METHODS if self.method == AUTO else (self.method,)

    def check(self) -> None:
        if not 0 < self.budget <= 1:
            raise ArgumentError(f"budget must be in (0, 1], got {self.budget}")
        if not 0 < self.holdout < 1:
            raise ArgumentError(f"holdout must be a fraction in (0, 1), got {self.holdout}")
        for method in self.methods:
            get_method(method)
        if self.scheduler and self.importance is not ImportanceMode.FINETUNE:
            raise ArgumentError("--scheduler runs the fine-tuned importance entries: it needs "
                                "--importance finetune")


@dataclass
class ImageData:
    """An image folder's loaders: `fit` (train/ less the held-out part), `holdout` (what
    every choice is scored on), `val` (val/: the report's only), and the class names."""

    fit: DataLoader
    holdout: DataLoader
    val: DataLoader
    classes: list[str]

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
                     DataLoader(val, batch_size=settings.batch), train.classes)


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


def run_job(model: nn.Module, data: ImageData, out: str | Path, settings: JobSettings, *,
            spec: str = "", analyze_options: dict | None = None,
            progress: bool | None = None) -> dict[str, Any]:
    """Compress `model` (trained on `data`'s classes) to `settings.budget` of its latency, as
    a `Job` over `out`: latency table, the budget checked against what it allows, importance
    and solves scored on the held-out images, each candidate plan fine-tuned with
    distillation on the fit images, the one more accurate on the held-out images kept,
    merged, deployed and timed; `val/` scored last, for the report. `out` gets every stage's
    result and `report.md`. Returns the report."""
    settings.check()
    out = Path(out)
    report: dict[str, Any] = {"settings": asdict(settings), "model": spec,
                              "images": data.sizes(), "classes": len(data.classes)}
    recipe = ClassificationRecipe(data.fit, data.holdout, data.val, lr=settings.lr,
                                  importance_steps=settings.importance_steps,
                                  protocol=settings.importance_protocol,
                                  kd_weight=settings.kd_weight,
                                  kd_temperature=settings.kd_temperature, seed=settings.seed)
    torch.manual_seed(settings.seed)
    example = at_batch(next(iter(data.holdout))[0], settings.latency_batch)
    job = Job(model, example, out=out, analysis=analyze_options, quiet=progress is False,
              progress=progress, threads=settings.threads,
              timing={"repeat": settings.timing_repeat},
              latency={"backend": settings.backend, "batch_size": settings.latency_batch})
    if settings.train_epochs > 0:
        with job.stage("train the original"):
            trainer = ClassificationRecipe(data.fit, data.holdout, lr=3 * settings.lr,
                                           seed=settings.seed)
            job.model = trainer.train(model, epochs=settings.train_epochs,
                                      checkpoint=out / "original-train.pt", progress=progress)
    job.model = job.model.eval()
    space = job.space
    report["space"] = {"convs": space.L, "blocks": space.num_blocks,
                       "entries": space.num_entries, "capture": space.capture}
    methods = _reachable(job, settings, report)  # before any importance, training or timing
    report["holdout_original"] = round(100 * recipe.evaluate(job.gm), 2)
    _check_teacher(report, len(data.classes))
    keys = list(dict.fromkeys(k for m in methods for k in get_method(m).importance_keys(space)))
    calibration = next(iter(DataLoader(data.fit.dataset, batch_size=32)))[0]  # fixed images
    importance = _importance(job, recipe, keys, settings, calibration)
    candidates = {}
    for method in methods:
        try:
            candidates[method] = _candidate(job, recipe, importance, method, settings, out,
                                            progress)
        except InfeasibleBudget as exc:
            if len(methods) == 1:
                raise
            report.setdefault("dropped", {})[method] = str(exc)
            _say(job, f"{method} dropped: {exc}")
    if not candidates:
        raise InfeasibleBudget("no method meets the budget: " + "; ".join(
            report.get("dropped", {}).values()))
    chosen = max(candidates, key=lambda m: (candidates[m]["holdout"],
                                            candidates[m]["timing"]["speedup"]))
    text = (out / f"plan-{chosen}.json").read_text()
    plan = Plan.from_json(text)
    if not (out / "plan.json").is_file() or (out / "plan.json").read_text() != text:
        (out / "plan.json").write_text(text)  # the chosen plan
    merged = candidates[chosen]["merged"]
    report["onnx"] = job.deploy(merged, spec)["onnx"]
    try:
        frontier(space, job.latency, importance, method=chosen).plot(out / "frontier.png",
                                                                      mark=plan)
    except ImportError:  # matplotlib is the demo extra's
        log.info("no matplotlib: no frontier plot")
    report["choice"] = {"method": chosen, "reason": _reason(candidates, chosen, settings)}
    with job.stage("report (val/)"):  # the first time val/ is read
        report["accuracy_original"] = round(100 * recipe.report(job.gm), 2)
        for method, c in candidates.items():
            c["val"] = round(100 * recipe.report(c.pop("merged")), 2)
    report["candidates"] = candidates
    report["accuracy_compressed"] = candidates[chosen]["val"]
    report["accuracy_pruned_before_finetune"] = candidates[chosen]["holdout_before_finetune"]
    report["timing"] = candidates[chosen]["timing"]
    report["seconds"] = dict(job.seconds)
    report["plan"] = {"method": plan.method, "budget": plan.budget, "blocks": len(plan.blocks),
                      "removed_convs": len(plan.removed_convs),
                      "removed_activations": len(plan.removed_activations(space)),
                      "measured": plan.measured}
    (out / "report.json").write_text(json.dumps(report, indent=1))
    (out / "report.md").write_text(render(report, plan))
    return report


def _say(job: Job, line: str) -> None:
    if not job.quiet:
        print(line, flush=True)


def _reachable(job: Job, settings: JobSettings, report: dict) -> tuple[str, ...]:
    """The methods whose fastest plan the latency table allows within the budget; a method
    that cannot reach it is dropped with a line (`auto`), or the job is refused, naming the
    figure and a budget that works."""
    methods = job.reachable(settings.budget, settings.methods, "--budget")
    report["reach"] = {m: round(job.reach(m), 4) for m in settings.methods}
    for m in settings.methods:
        if m not in methods:
            line = (f"{m} cannot reach --budget {settings.budget:g}: its fastest plan is "
                    f"{job.reach(m):.0%} of the original's latency on the table")
            report.setdefault("dropped", {})[m] = line
            _say(job, f"{line}; trying the others")
    return methods


def _check_teacher(report: dict, classes: int) -> None:
    """Warn when the original scores near chance on the held-out images: distilling from it
    would teach the compressed network nothing."""
    chance = 100 / classes
    if report["holdout_original"] < min(1.5 * chance, chance + 0.5 * (100 - chance)):
        line = (f"the original scores {report['holdout_original']:.1f}% on the held-out "
                f"images, near chance ({chance:.1f}%): it cannot be the teacher; give it "
                "trained --weights or --train-epochs (and check --size and --grayscale)")
        report["teacher_warning"] = line
        warnings.warn(line, stacklevel=3)


def _candidate(job: Job, recipe: ClassificationRecipe, importance: ImportanceTable,
               method: str, settings: JobSettings, out: Path, progress: bool | None) -> dict:
    """`method`'s plan at the budget, fine-tuned as the final network is, merged and timed;
    its held-out accuracy (what the choice reads)."""
    plan = job.solve(importance, settings.budget, method=method, basis=settings.budget_basis,
                     save_to=out / f"plan-{method}.json")
    before = round(100 * recipe.evaluate(job.prune(plan)), 2)
    pruned = job.finetune(plan, lambda net, checkpoint: recipe.train(
        net, epochs=settings.epochs, teacher=job.gm, checkpoint=checkpoint,
        progress=progress))
    merged = job.merge(pruned)
    return {"holdout": round(100 * recipe.evaluate(merged), 2),
            "holdout_before_finetune": before, "timing": job.time(merged),
            "blocks": len(plan.blocks), "removed_convs": len(plan.removed_convs),
            "removed_activations": len(plan.removed_activations(job.space)),
            "plan": f"plan-{method}.json", "measured": plan.measured,
            "merged": merged}


def _reason(candidates: dict, chosen: str, settings: JobSettings) -> str:
    if len(candidates) == 1:
        return (f"{chosen} was asked for" if settings.method != AUTO
                else f"{chosen} was the only method that met the budget")
    best = candidates[chosen]["holdout"]
    others = ", ".join(f"{m} {c['holdout']:.2f}%" for m, c in candidates.items() if m != chosen)
    tie = any(c["holdout"] == best for m, c in candidates.items() if m != chosen)
    return (f"{chosen} scored {best:.2f}% on the held-out images against {others}"
            + (" (a tie: the faster one)" if tie else ""))


def _importance(job: Job, recipe: ClassificationRecipe, keys, settings: JobSettings,
                calibration: torch.Tensor) -> ImportanceTable:
    """The job's importance, as `settings.importance` asks (on a Dask scheduler if given):
    the estimator scores on the held-out images; the proxy's calibration batch is fit
    images."""
    if settings.importance is ImportanceMode.PROXY:
        return job.importance(keys, batch=calibration)
    with contextlib.ExitStack() as stack:
        executor = None
        if settings.scheduler:
            from dask.distributed import Client

            executor = stack.enter_context(Client(settings.scheduler)).get_executor()
        return job.importance(keys, evaluate=recipe.evaluate, finetune=recipe.finetune,
                              executor=executor)


def render(report: dict, plan: Plan) -> str:
    """report.md: what was done, on which images, and what it gave."""
    s, t, n = report["settings"], report["timing"], report["images"]
    distilled = (f"distilling from the original (weight {s['kd_weight']}, temperature "
                 f"{s['kd_temperature']})" if s["kd_weight"] > 0 else "without distillation")
    space, m, choice = report["space"], plan.measured, report["choice"]
    rows = [f"| {name} | {c['holdout']:.2f} | {c['val']:.2f} | {c['timing']['speedup']:.2f}x "
            f"| {c['blocks']} | {c['removed_convs']} | {c['removed_activations']} | "
            f"{c['plan']} |" for name, c in report["candidates"].items()]
    lines = [
        f"# fxmerge compress: {report['model'] or 'model'}",
        "",
        (f"{choice['method']} at a budget of {s['budget']:.0%} of the original's latency "
         f"({s['budget_basis']}), timed on {t['backend']} at batch {t['batch']} with "
         f"{t['threads']} threads."),
        "",
        "| | original | compressed |",
        "|---|---|---|",
        (f"| accuracy (val, %) | {report['accuracy_original']:.2f} | "
         f"{report['accuracy_compressed']:.2f} |"),
        f"| latency (ms) | {t['original_ms']:.4g} | {t['merged_ms']:.4g} |",
        f"| speed-up | 1.00 | {t['speedup']:.2f}x |",
        "",
        (f"**Which images chose it.** {n['holdout']} images held out of train/ (a stratified "
         f"{s['holdout']:.0%}, seed {s['seed']}) scored the importance table, the solves "
         f"and the choice; the fine-tunes trained on the other {n['fit']}; val/ "
         f"({n['val']} images) was read only for this report."),
        "",
        f"**The choice.** {choice['reason']}.",
        "",
        ("| method | held-out accuracy (%) | val accuracy (%) | speed-up | blocks | convs "
         "removed | activations removed | plan |"),
        "|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        *(f"- {name}: {why}" for name, why in report.get("dropped", {}).items()),
        *([f"- warning: {report['teacher_warning']}"] if "teacher_warning" in report else []),
        "",
        (f"The solve timed {m.get('rounds')} plan(s); the chosen one measured "
         f"{m.get('ratio', float('nan')):.1%} of the original (predicted "
         f"{m.get('predicted_ratio', float('nan')):.1%})." if m else
         "The plan was solved on the latency table's sum (no network timed)."),
        "",
        (f"Before fine-tuning the chosen pruned network scored "
         f"{report['accuracy_pruned_before_finetune']:.2f}% on the held-out images; each "
         f"candidate was fine-tuned for {s['epochs']} epochs {distilled}."),
        "",
        (f"Space: {space['convs']} convs, {space['blocks']} blocks, {space['entries']} "
         f"entries (captured by {space['capture']}); importance: {s['importance']}."),
        "",
        "| stage | seconds |",
        "|---|---|",
        *(f"| {k} | {v:.1f} |" for k, v in report["seconds"].items()),
        "",
        (f"Files: merged.safetensors (`fxmerge.load`), {report['onnx']}, plan.json (the "
         "chosen plan), plan-METHOD.json, latency.json, frontier.png."),
        "",
        "## Plan",
        "",
        "```",
        plan.describe(),
        "```",
        "",
    ]
    return "\n".join(lines)


__all__ = ["ImageData", "ImportanceMode", "JobSettings", "holdout_split",
           "image_folder", "run_job"]
