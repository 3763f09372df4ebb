"""`JobSettings`: what `fxmerge compress` does, one field per CLI option (its one default,
help text and choices)."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from ..backends.runtimes import Backend, get_backend
from ..errors import ArgumentError
from ..job import AUTO, AUTO_METHODS, BudgetBasis, basis_of
from ..recipes import ImportanceProtocol
from ..solve import METHODS, get_method

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
