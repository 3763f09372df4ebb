"""The practitioner's job end to end (`fxmerge compress MODEL --data DIR`): a model and an
image folder in; a faster merged network, deployed files and a report out. Each stage
keeps its result in the output folder, so an interrupted job resumes where it stopped,
and a result another input made is made again.

Nothing is chosen on the data the result is reported on: a stratified part of `train/` is
held out before anything is fitted; importance, every solve and the choice between methods
are scored on it; the fine-tunes train on the rest; `val/` is read once, for the report."""

from __future__ import annotations

import contextlib
import json
import logging
import warnings
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from ..backends.timing import at_batch
from ..capture.trace import copy_model
from ..errors import ArgumentError
from ..job import AUTO, Job, fingerprint
from ..plan import Plan
from ..recipes import AgreementRecipe, ClassificationRecipe, SegmentationRecipe
from ..solve import frontier, importance_keys
from ..tables import ImportanceTable
from .data import ImageData
from .report import render
from .settings import ImportanceMode, JobSettings

log = logging.getLogger(__name__)


def run_job(model: nn.Module, data: ImageData, out: str | Path, settings: JobSettings, *,
            spec: str = "", analyze_options: dict | None = None,
            progress: bool | None = None) -> dict[str, Any]:
    """Compress `model` (trained on `data`'s classes) to `settings.budget` of its latency, as
    a `Job` over `out`: latency table, the budget checked against what it allows, importance
    and solves scored on the held-out images, each candidate plan fine-tuned with
    distillation on the fit images, merged, timed, and kept by `Job.choose` on the held-out
    images; `val/` scored last, for the report. `out` gets every stage's result and
    `report.md`. Returns the report."""
    settings.check()
    out = Path(out)
    report: dict[str, Any] = {"settings": asdict(settings), "model": spec,
                              "images": data.sizes(), "classes": len(data.classes)}
    common = {"importance_steps": settings.importance_steps,
              "protocol": settings.importance_protocol, "kd_weight": settings.kd_weight,
              "kd_temperature": settings.kd_temperature, "seed": settings.seed}
    if data.task == "segment":  # torchvision's recipe (SGD at its own rate), mean IoU
        report["metric"] = "mIoU"
        recipe = SegmentationRecipe(data.fit, data.holdout, data.val,
                                    classes=mask_classes(model, data), **common)
    elif data.task == "unlabeled":  # distilled from the original, scored by agreement
        if settings.train_epochs > 0:
            raise ArgumentError("--train-epochs trains the original on labels; these images "
                                "have none (train/ holds images, not class folders)")
        report["metric"] = "output agreement"
        common["kd_weight"] = 1.0
        recipe = AgreementRecipe(data.fit, data.holdout, data.val, lr=settings.lr,
                                 teacher=model.eval(), **common)
    else:
        recipe = ClassificationRecipe(data.fit, data.holdout, data.val, lr=settings.lr,
                                      **common)
    torch.manual_seed(settings.seed)
    example = at_batch(next(iter(data.holdout))[0], settings.latency_batch)
    protocol = {k: v for k, v in asdict(settings).items() if k in PROTOCOL}
    if settings.train_epochs > 0:
        trainer = replace(recipe, report_data=None, lr=3 * recipe.lr) \
            if data.task == "classify" else recipe
        tag = fingerprint({"weights": model.state_dict(), "data": data.fingerprint,
                           "protocol": protocol})  # resumed only from the same start
        model = trainer.train(copy_model(model), epochs=settings.train_epochs,
                              checkpoint=out / f"original-train-{tag}.pt", progress=progress)
    job = Job(model.eval(), example, out=out, analysis=analyze_options,
              quiet=progress is False, progress=progress, threads=settings.threads,
              timing={"repeat": settings.timing_repeat, "allocator": settings.allocator},
              latency={"backend": settings.backend, "batch_size": settings.latency_batch},
              inputs={"data": data.fingerprint, "protocol": fingerprint(protocol)})
    space = job.space
    report["space"] = {"convs": space.L, "blocks": space.num_blocks,
                       "entries": space.num_entries, "capture": space.capture}
    methods = job.reachable(settings.budget, settings.methods, "--budget")  # before any
    report["reach"] = {m: round(job.reach(m), 4) for m in settings.methods}  # training
    report["holdout_original"] = round(100 * recipe.evaluate(job.gm), 2)
    if data.task == "classify":
        _check_teacher(report, len(data.classes))
    calibration = next(iter(DataLoader(data.fit.dataset, batch_size=32)))[0]  # fixed images
    importance = _importance(job, recipe, importance_keys(space, methods), settings,
                             calibration)
    candidates = job.candidates(
        importance, settings.budget, methods, evaluate=recipe.evaluate,
        basis=settings.budget_basis, plan_file=lambda m: out / f"plan-{m}.json",
        settings={k: v for k, v in asdict(settings).items() if k in FINETUNE},
        train=lambda net, checkpoint: recipe.train(net, epochs=settings.epochs, teacher=job.gm,
                                                   checkpoint=checkpoint, progress=progress))
    report["dropped"] = dict(job.dropped)
    # a tie: within one held-out image
    chosen, reason = job.choose(candidates, resolution=1 / len(data.holdout.dataset))
    best = candidates[chosen]
    text = (out / f"plan-{chosen}.json").read_text()
    plan = Plan.from_json(text)
    if not (out / "plan.json").is_file() or (out / "plan.json").read_text() != text:
        (out / "plan.json").write_text(text)  # the chosen plan
    report["onnx"] = job.deploy(best.merged, spec)["onnx"]
    try:
        frontier(space, job.latency, importance, method=chosen).plot(out / "frontier.png",
                                                                      mark=plan)
    except ImportError:  # matplotlib is the demo extra's
        log.info("no matplotlib: no frontier plot")
    report["choice"] = {"method": chosen, "reason": reason if settings.method == AUTO
                        else f"{chosen} was asked for"}
    with job.stage("report (val/)"):  # the first time val/ is read
        report["accuracy_original"] = round(100 * recipe.report(job.gm), 2)
        report["candidates"] = {m: {
            "holdout": round(100 * c.score, 2), "val": round(100 * recipe.report(c.merged), 2),
            "holdout_before_finetune": round(100 * c.before, 2), "timing": c.timing,
            "blocks": len(c.plan.blocks), "removed_convs": len(c.plan.removed_convs),
            "removed_activations": len(c.plan.removed_activations(space)),
            "plan": f"plan-{m}.json", "measured": c.plan.measured}
            for m, c in candidates.items()}
    report["accuracy_compressed"] = report["candidates"][chosen]["val"]
    report["accuracy_pruned_before_finetune"] = report["candidates"][chosen][
        "holdout_before_finetune"]
    report["timing"] = best.timing
    report["seconds"] = dict(job.seconds)
    report["plan"] = {"method": plan.method, "budget": plan.budget, "blocks": len(plan.blocks),
                      "removed_convs": len(plan.removed_convs),
                      "removed_activations": len(plan.removed_activations(space)),
                      "measured": plan.measured}
    (out / "report.json").write_text(json.dumps(report, indent=1))
    (out / "report.md").write_text(render(report, plan))
    return report


# the settings that shape the scores (importance, the held-out evaluation) and the fine-tune
PROTOCOL = ("holdout", "size", "grayscale", "batch", "lr", "importance_protocol",
            "importance_steps", "seed", "train_epochs")
FINETUNE = ("epochs", "kd_weight", "kd_temperature")


def mask_classes(model: nn.Module, data: ImageData) -> int:
    """How many classes `model` predicts per pixel (its output's channels); `ArgumentError`
    where the masks hold a class it cannot predict."""
    x = next(iter(data.holdout))[0][:1]
    with torch.no_grad():
        out = model.eval()(x)
    classes = (out["out"] if isinstance(out, dict) else out).shape[1]
    if len(data.classes) > classes:
        raise ArgumentError(f"--data: the masks hold classes up to {len(data.classes) - 1}, "
                            f"but the model predicts {classes} (0 to {classes - 1}; 255 is "
                            "ignored): build it with as many classes as the masks")
    return classes


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
