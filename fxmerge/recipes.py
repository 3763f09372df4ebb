"""Training recipes: what the importance estimator and the final fine-tune need, built from
the user's data. One training loop for the project (the demo uses it too)."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from enum import Enum
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._pytree import tree_leaves
from torch.utils.data import DataLoader, Subset

from .errors import ArgumentError, one_of
from .progress import Progress

log = logging.getLogger(__name__)

Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]  # a DataLoader of (images, labels)


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor,
                      temperature: float, weight: float) -> torch.Tensor:
    """Hinton et al.'s logit distillation: `(1 - weight)` x cross-entropy on the labels plus
    `weight` x `temperature**2` x KL(teacher || student) of the softened distributions."""
    hard = F.cross_entropy(student, labels)
    if weight == 0:
        return hard
    soft = F.kl_div(F.log_softmax(student / temperature, 1),
                    F.log_softmax(teacher / temperature, 1), log_target=True,
                    reduction="batchmean") * temperature**2
    return (1 - weight) * hard + weight * soft


class ImportanceProtocol(str, Enum):
    """How the importance estimator's brief fine-tune runs (the paper, §C: a random subset
    of the training data for a few epochs, scored on another training subset)."""

    STEPS = "steps"  # `importance_steps` steps over the training data
    PAPER_IMAGENET = "paper-imagenet"  # 4% of the training data, 1 epoch
    PAPER_CIFAR = "paper-cifar"  # 1% of the training data, 50 epochs

    def __str__(self) -> str:
        return self.value


PROTOCOL_SUBSETS = {ImportanceProtocol.PAPER_IMAGENET: (0.04, 1.0),
                    ImportanceProtocol.PAPER_CIFAR: (0.01, 50.0)}  # (fraction, epochs)


@dataclass
class ClassificationRecipe:
    """Image classification from DataLoaders of (images, labels): `train_data` to train on,
    `score_data` to choose with (held-out training images: `evaluate`, what importance and
    every selection read) and `report_data` to report on (`report`; never read by a choice).

    `evaluate` (top-1 accuracy on `score_data`, a fraction) and `finetune` (the importance
    estimator's brief fine-tune, by `protocol`) are what `estimate_importance` takes;
    `train` fine-tunes a pruned network, with knowledge distillation from a teacher (the
    original) when `kd_weight` > 0, with checkpoints and resume.

    Adam with cosine decay over each run. With `seed`, every run sees the same batches
    (a loader shuffled by torch's global generator; it is restored after), so an importance
    entry does not depend on which entries ran before it. Picklable when its loaders are,
    so the importance entries can run in a process pool or on a Dask cluster."""

    train_data: Batches
    score_data: Batches
    report_data: Batches | None = None
    lr: float = 1e-3
    weight_decay: float = 0.0
    importance_steps: int = 12
    protocol: ImportanceProtocol = ImportanceProtocol.STEPS
    kd_temperature: float = 4.0
    kd_weight: float = 0.5
    device: str = "cpu"
    seed: int | None = 0  # each run draws its batches (and dropout) from this seed

    def __post_init__(self) -> None:
        if not 0 <= self.kd_weight <= 1 or self.kd_temperature <= 0:
            raise ArgumentError(f"kd_weight must be in [0, 1] and kd_temperature positive, "
                                f"got {self.kd_weight}, {self.kd_temperature}")
        self.protocol = one_of(ImportanceProtocol, self.protocol, "protocol")

    def _batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for x, y in _forever(self.train_data):
            yield x.to(self.device), y.to(self.device)

    def score(self, model: nn.Module, data: Batches) -> float:
        """What `evaluate` and `report` read: here top-1 accuracy, a fraction."""
        return self.accuracy(model, data)

    def accuracy(self, model: nn.Module, data: Batches) -> float:
        """Top-1 accuracy of `model` on `data`, a fraction."""
        model = model.to(self.device).eval()
        right = total = 0
        with torch.no_grad():
            for x, y in data:
                right += (model(x.to(self.device)).argmax(1) == y.to(self.device)).sum().item()
                total += len(y)
        if total == 0:
            raise ArgumentError("the scoring data is empty")
        return right / total

    def evaluate(self, model: nn.Module) -> float:
        """Top-1 accuracy on the scoring data, a fraction (the paper's importance is the
        exponential of its change, accuracy in percent / 100)."""
        return self.score(model, self.score_data)

    def report(self, model: nn.Module) -> float:
        """Top-1 accuracy on the reporting data, a fraction: for the report only."""
        if self.report_data is None:
            raise ArgumentError("this recipe has no report_data")
        return self.score(model, self.report_data)

    def finetune(self, model: nn.Module) -> nn.Module:
        """The importance estimator's brief fine-tune: `importance_steps` steps, or the
        paper's random subset of the training data for its epochs (`protocol`)."""
        if self.protocol is ImportanceProtocol.STEPS:
            return self.train(model, steps=self.importance_steps, progress=False)
        fraction, epochs = PROTOCOL_SUBSETS[self.protocol]
        subset = replace(self, train_data=_subset(self.train_data, fraction, self.seed or 0),
                         protocol=ImportanceProtocol.STEPS)
        return subset.train(model, epochs=epochs, progress=False)

    def train(self, model: nn.Module, *, epochs: float = 1.0, steps: int | None = None,
              teacher: nn.Module | None = None, checkpoint: str | Path | None = None,
              progress: bool | None = None) -> nn.Module:
        """Fine-tune `model` in place for `epochs` over the training data (or `steps`
        batches), distilling from `teacher` when given and `kd_weight` > 0; returns it in
        eval mode. With `checkpoint`, the model, optimiser and step are saved there (tensors
        only) every epoch and at the end, and a run that finds one resumes from it."""
        total = steps if steps is not None else max(1, math.ceil(epochs * _length(
            self.train_data)))
        model = model.to(self.device)
        opt, sched = self.optimizer(model, total)
        done = _resume(checkpoint, model, opt, sched, total)
        if teacher is not None and self.kd_weight > 0:
            teacher = teacher.to(self.device).eval()
        else:
            teacher = None
        per_epoch = max(1, _length(self.train_data)) if steps is None else total
        bar = Progress(total - done, "fine-tune" + (" (distilled)" if teacher else ""), "step",
                       progress)
        with torch.random.fork_rng(devices=[], enabled=self.seed is not None):
            if self.seed is not None:
                torch.manual_seed(self.seed + done)
            self._loop(model, teacher, opt, sched, done, total, per_epoch, checkpoint, bar)
        bar.close()
        return model.eval()

    def optimizer(self, model: nn.Module, total: int) -> tuple:
        """Adam, its learning rate decayed by a cosine over the run's `total` steps."""
        opt = torch.optim.Adam(model.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        return opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, total)

    def loss(self, out: torch.Tensor, teacher: torch.Tensor | None, labels: torch.Tensor
             ) -> torch.Tensor:
        """Cross-entropy on the labels, distilled from the teacher's logits when given."""
        if teacher is None:
            return F.cross_entropy(out, labels)
        return distillation_loss(out, teacher, labels, self.kd_temperature, self.kd_weight)

    def _loop(self, model: nn.Module, teacher: nn.Module | None, opt, sched, done: int,
              total: int, per_epoch: int, checkpoint: str | Path | None, bar: Progress
              ) -> None:
        model.train()
        batches = self._batches()
        for step in range(done, total):
            x, y = next(batches)
            if teacher is not None:
                with torch.no_grad():
                    target = teacher(x)
            loss = self.loss(model(x), target if teacher is not None else None, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            bar.update(note=f"loss {loss.item():.3f}")
            if checkpoint is not None and ((step + 1) % per_epoch == 0 or step + 1 == total):
                _save_checkpoint(checkpoint, model, opt, sched, step + 1, total)


@dataclass
class SegmentationRecipe(ClassificationRecipe):
    """Semantic segmentation from DataLoaders of (images, masks), as torchvision's reference
    recipe trains it: cross-entropy over pixels ignoring `IGNORE` (255), the auxiliary
    head's loss (an output dict's "aux") at `aux_weight`, SGD with momentum and a poly
    learning rate; the score is the mean IoU over `classes`. Distillation from a teacher
    is pixel-wise on the "out" logits. The loop, checkpoints and seeds are the
    classification recipe's."""

    classes: int = 2
    lr: float = 0.02
    weight_decay: float = 1e-4
    aux_weight: float = 0.5

    def optimizer(self, model: nn.Module, total: int) -> tuple:
        """SGD (momentum 0.9), the learning rate times (1 - step / total) ** 0.9."""
        opt = torch.optim.SGD(model.parameters(), lr=self.lr, momentum=0.9,
                              weight_decay=self.weight_decay)
        return opt, torch.optim.lr_scheduler.LambdaLR(
            opt, lambda step: (1 - min(step, total - 1) / total) ** 0.9)

    def loss(self, out, teacher, labels: torch.Tensor) -> torch.Tensor:
        outputs = out if isinstance(out, dict) else {"out": out}
        loss = F.cross_entropy(outputs["out"], labels, ignore_index=IGNORE)
        if "aux" in outputs and self.aux_weight:
            loss = loss + self.aux_weight * F.cross_entropy(outputs["aux"], labels,
                                                            ignore_index=IGNORE)
        if teacher is not None and self.kd_weight > 0:
            t = teacher["out"] if isinstance(teacher, dict) else teacher
            c = t.shape[1]
            soft = F.kl_div(
                F.log_softmax(outputs["out"].movedim(1, -1).reshape(-1, c) / self.kd_temperature, 1),
                F.log_softmax(t.movedim(1, -1).reshape(-1, c) / self.kd_temperature, 1),
                log_target=True, reduction="batchmean") * self.kd_temperature ** 2
            loss = (1 - self.kd_weight) * loss + self.kd_weight * soft
        return loss

    def score(self, model: nn.Module, data: Batches) -> float:
        """The mean intersection over union of `model`'s pixel classes on `data`, over the
        classes that occur in the masks or the predictions, a fraction."""
        model = model.to(self.device).eval()
        confusion = torch.zeros(self.classes, self.classes, dtype=torch.long)
        with torch.no_grad():
            for x, y in data:
                out = model(x.to(self.device))
                pred = (out["out"] if isinstance(out, dict) else out).argmax(1).cpu()
                keep = y != IGNORE
                confusion += torch.bincount(y[keep] * self.classes + pred[keep],
                                            minlength=self.classes ** 2
                                            ).reshape(self.classes, self.classes)
        if confusion.sum() == 0:
            raise ArgumentError("the scoring data is empty")
        right = confusion.diag().double()
        union = confusion.sum(0) + confusion.sum(1) - confusion.diag()
        return (right[union > 0] / union[union > 0]).mean().item()


@dataclass
class AgreementRecipe(ClassificationRecipe):
    """No labels: the network is fine-tuned to compute what `teacher` (the original) does
    on the training inputs (`distill`'s loss) and scored by its output `agreement` with
    it; the labels the loaders carry are not read. Any model the capture reaches gets a
    compressed, fine-tuned network this way, without a task trainer."""

    teacher: nn.Module | None = None
    kd_weight: float = 1.0

    def score(self, model: nn.Module, data: Batches) -> float:
        if self.teacher is None:
            raise ArgumentError("AgreementRecipe: give the original as teacher=")
        return agreement(model, self.teacher, (x for x, _ in data))

    def loss(self, out, teacher, labels: torch.Tensor) -> torch.Tensor:
        if teacher is None:
            raise ArgumentError("AgreementRecipe trains by distillation: give a teacher")
        return sum(_relative_errors(out, teacher))


IGNORE = 255  # the mask value of pixels no loss or score reads (torchvision's convention)


def _relative_errors(out: Any, reference: Any) -> list[torch.Tensor]:
    """Per floating-point tensor of `reference` (a segmentation net's dict of outputs, a
    detector's tuple, the parts of a model compressed together), `out`'s squared error
    over the reference's squared size: the one rule `relative_squared_error` (the output
    agreement) and the distillation loss read."""
    return [(a - b).pow(2).sum() / b.pow(2).sum().clamp_min(1e-12)
            for a, b in zip(tree_leaves(out), tree_leaves(reference))
            if isinstance(b, torch.Tensor) and b.is_floating_point()]


def relative_squared_error(out: Any, reference: Any) -> float:
    """`_relative_errors` averaged over the tensors: each output counts alike, whatever its
    scale (class logits beside feature maps); 0 where there are none."""
    errors = _relative_errors(out, reference)
    return float(sum(errors)) / len(errors) if errors else 0.0


def agreement(model: nn.Module, original: nn.Module, batches: Iterable) -> float:
    """How closely `model` computes what `original` does on unlabeled input `batches` (each
    a tensor or a tuple of inputs): 1 minus the relative squared error of their outputs
    (`relative_squared_error`), averaged over the batches; 1 is the same function."""
    errors = []
    model, original = model.eval(), original.eval()
    with torch.no_grad():
        for batch in batches:
            errors.append(relative_squared_error(model(*_inputs(batch)),
                                                 original(*_inputs(batch))))
    if not errors:
        raise ArgumentError("agreement: the batches are empty")
    return 1 - sum(errors) / len(errors)


def distill(model: nn.Module, original: nn.Module, batches: Iterable, *, epochs: float = 1.0,
            lr: float = 1e-3, progress: bool | None = None) -> nn.Module:
    """Fine-tune `model` (a compressed network) in place to compute what `original` does
    on unlabeled input `batches` (a re-iterable of tensors or tuples of inputs: no labels,
    any model): Adam with cosine decay, the loss each output tensor's squared error over
    the original's mean square. Returns `model` in eval mode."""
    data = list(batches) if not hasattr(batches, "__len__") else batches
    total = max(1, math.ceil(epochs * len(data)))
    original = original.eval()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, total)
    bar = Progress(total, "distill", "step", progress)
    model.train()
    step = 0
    while step < total:
        for batch in data:
            if step == total:
                break
            with torch.no_grad():
                want = original(*_inputs(batch))
            loss = sum(_relative_errors(model(*_inputs(batch)), want))
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            bar.update(note=f"loss {loss.item():.4f}")
    bar.close()
    return model.eval()


def _inputs(batch: Any) -> tuple:
    return tuple(batch) if isinstance(batch, (tuple, list)) else (batch,)


def _subset(data: Batches, fraction: float, seed: int) -> DataLoader:
    """A loader over a random `fraction` of a DataLoader's dataset (at least one batch)."""
    if not isinstance(data, DataLoader):
        raise ArgumentError("the paper's importance protocol samples the training data: give "
                            "it as a DataLoader")
    n = len(data.dataset)
    size = min(n, max(data.batch_size or 1, round(fraction * n)))
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return DataLoader(Subset(data.dataset, order[:size].tolist()), batch_size=data.batch_size,
                      shuffle=True)


def _forever(data: Batches) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    while True:
        empty = True
        for batch in data:
            empty = False
            yield batch
        if empty:
            raise ArgumentError("the training data is empty")


def _length(data: Batches) -> int:
    try:
        return len(data)
    except TypeError:
        raise ArgumentError("give the training data as a DataLoader (it has a length), or "
                            "train(..., steps=N)") from None


def _save_checkpoint(path: str | Path, model: nn.Module, opt, sched, step: int,
                     total: int) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(), "step": step, "total": total}, tmp)
    tmp.replace(path)


def _resume(path: str | Path | None, model: nn.Module, opt, sched, total: int) -> int:
    """The step a checkpoint at `path` reached (its state loaded), or 0."""
    if path is None or not Path(path).is_file():
        return 0
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
    except Exception as exc:  # noqa: BLE001 (whatever the file holds: one line)
        raise ArgumentError(f"checkpoint {path}: cannot resume from it ({type(exc).__name__}: "
                            f"{exc}); delete it to start afresh") from None
    if state.get("total") != total:
        raise ArgumentError(f"checkpoint {path} is of a run of {state.get('total')} steps, "
                            f"not {total}: delete it to start afresh")
    log.info("resuming from %s at step %d of %d", path, state["step"], total)
    return int(state["step"])


__all__ = ["AgreementRecipe", "ClassificationRecipe", "ImportanceProtocol",
           "SegmentationRecipe", "agreement", "distill", "distillation_loss",
           "relative_squared_error"]
