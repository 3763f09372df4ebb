"""The settings of every stage a command runs, one field per CLI option (its one default,
help text and choices; `cli.add_settings` makes the options from them): `JobSettings` for
`fxmerge compress`, `AnalysisSettings`, `LatencyStageSettings`, `ImportanceStageSettings`,
`SolveStageSettings` for the stage commands. Options several commands share are declared
once (`_threads`, `_backend`, `_budget_basis`, `_timing_repeat`)."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from ..backends.runtimes import Backend, get_backend
from ..backends.timing import Allocator, get_allocator
from ..errors import ArgumentError, one_of
from ..estimate import NETWORK_REPEAT, measure_latency
from ..job import AUTO, AUTO_METHODS, BudgetBasis, basis_of
from ..recipes import ImportanceProtocol
from ..solve import METHODS, MethodName, get_method
from ..space import MAX_KERNEL_BYTES, StrideRule


def _defaults(function: Callable) -> dict[str, Any]:
    """A function's keyword defaults: where an option's default is written once."""
    return {name: p.default for name, p in inspect.signature(function).parameters.items()
            if p.default is not inspect.Parameter.empty}


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


# ---- options several commands share: each declared here once ------------------------------
def _threads() -> Any:
    return _option(None, "time with N intra-op threads (default: torch's; a budget holds only "
                   "at the thread count it was measured with, and many CPU servers run 1 per "
                   "request)", metavar="N")


def _backend() -> Any:
    return _option(Backend.EAGER, "what latencies are measured on", choices=Backend)


def _budget_basis() -> Any:
    return _option(BudgetBasis.MEASURED, "measured: plans are timed whole against the "
                   "original until one fits --budget; table: --budget is a fraction of the "
                   "latency table's sum", choices=BudgetBasis)


def _allocator() -> Any:
    return _option(Allocator.HELD, "how the process you deploy in handles freed memory: "
                   "held (jemalloc, tcmalloc, or glibc's MALLOC_MMAP_THRESHOLD_ and "
                   "MALLOC_TRIM_THRESHOLD_ at 1 GiB) or default (a plain glibc process, whose "
                   "timings of large activations are bimodal: docs/method.md §3b); networks "
                   "are timed in a fresh process so, the budget holds there, and the report "
                   "gives the other's figure too", choices=Allocator)


def _timing_repeat() -> Any:
    return _option(NETWORK_REPEAT, "interleaved rounds per whole-network timing (measured "
                   "basis, final timing)")


_LATENCY = _defaults(measure_latency)


@dataclass(frozen=True)
class AnalysisSettings:
    """What `analyze` is told: the options of every command that analyses a model."""

    exclude: tuple[str, ...] = _option((), "module names or glob patterns of convs kept out "
                                       "of the search", nargs="*", metavar="CONV")
    stride_rule: StrideRule = _option(  # noqa: RUF009
        StrideRule.PAPER, "paper: a strided conv ends its block unless one 1x1 conv follows "
        "(as the authors); exact: any kernel may follow it", choices=StrideRule)
    add_activations: str = _option(
        "auto", "an activation after merged blocks of several convs that end without one "
        "(auto: on, except in nets with GroupNorm before activations); a plan keeps the "
        "setting it was solved with", choices=("auto", "on", "off"))
    max_kernel_mb: float = _option(
        MAX_KERNEL_BYTES / 2**20, "offer no merged kernel larger than this, in MiB of float64: "
        "it bounds the memory merging takes", metavar="MIB")

    def options(self) -> dict[str, Any]:
        """`analyze`'s keyword arguments."""
        return {"stride_rule": StrideRule(self.stride_rule), "exclude": tuple(self.exclude),
                "add_activations": {"auto": None, "on": True, "off": False}[
                    self.add_activations],
                "max_kernel_bytes": round(self.max_kernel_mb * 2**20)}


@dataclass(frozen=True)
class LatencyStageSettings:
    """`fxmerge latency`: how the latency table is timed (`measure_latency`'s options)."""

    backend: Backend = _backend()  # noqa: RUF009
    device: str = _option(_LATENCY["device"], "torch device to time on")
    threads: int | None = _threads()
    batch: int | None = _option(None, "deployment batch (default: the input shape's)")
    warmup: int = _option(_LATENCY["warmup"], "untimed runs per layer, at most")
    repeat: int = _option(_LATENCY["repeat"], "rounds: every layer is timed once per round, "
                          "side by side (a slow one in fewer); the mean of its fastest "
                          "tenth is kept")
    seconds: float = _option(_LATENCY["seconds"], "time each layer for about this long (fewer "
                             "runs for slow layers)")
    cache: str | None = _option(None, "JSON file to resume an interrupted measurement from")
    no_dedup: bool = _option(False, "time every entry separately")

    def options(self) -> dict[str, Any]:
        """`measure_latency`'s keyword arguments (what a `Job` is given as `latency`)."""
        return {"backend": get_backend(self.backend), "device": self.device,
                "batch_size": self.batch, "warmup": self.warmup, "repeat": self.repeat,
                "seconds": self.seconds, "threads": self.threads, "cache": self.cache,
                "deduplicate": not self.no_dedup}


@dataclass(frozen=True)
class ImportanceStageSettings:
    """`fxmerge importance`: the paper's estimator with the user's functions, else the
    output-agreement proxy on a random batch."""

    evaluate: str | None = _option(None, "file.py:function scoring a model (higher is "
                                   "better); default: output agreement with the original on "
                                   "a random batch", metavar="FILE.py:NAME")
    finetune: str | None = _option(None, "file.py:function fine-tuning a model briefly (with "
                                   "--evaluate)", metavar="FILE.py:NAME")
    calibration_batch: int = _option(1, "batch of the output-agreement default")
    calibration_size: int = _option(64, "its images' side, at most the input's (a CNN ranks "
                                    "the keys as at full size: Spearman 0.995 or more against "
                                    "224, see docs/experiments.md)", metavar="PIXELS")
    cache: str | None = _option(None, "JSON-lines file: finished entries; a rerun resumes "
                                "(with --evaluate)")

    def check(self) -> None:
        if not self.evaluate and (self.finetune or self.cache):
            raise ArgumentError("--finetune and --cache need --evaluate (the output-agreement "
                                "default neither fine-tunes nor caches: it takes seconds)")


@dataclass(frozen=True)
class SolveStageSettings:
    """`fxmerge solve`: the best plan under a budget, from saved tables."""

    latency: str = field(metadata={"help": "latency table JSON"})
    importance: str = field(metadata={"help": "importance table JSON"})
    budget: float | None = _option(None, "fraction of the original network's latency, "
                                   "measured on the latency table's backend, device and batch "
                                   "(or --budget-ms)")
    budget_ms: float | None = _option(None, "absolute budget on the table (ms)")
    budget_basis: BudgetBasis = _budget_basis()  # noqa: RUF009
    timing_repeat: int = _timing_repeat()
    allocator: Allocator = _allocator()  # noqa: RUF009
    threads: int | None = _threads()
    method: str = _option(MethodName.LAYERMERGE, "layermerge (the paper's), or its baselines "
                          "depth and layeronly", choices=METHODS)
    levels: int | None = _option(None, "budget levels of the DP (default 1000; Depth: "
                                 "0.05 ms units)")
    frontier: str | None = _option(None, "write the importance/latency frontier as JSON")
    plot: str | None = _option(None, "save the frontier as a PNG (needs matplotlib)")

    def check(self) -> None:
        if (self.budget is None) == (self.budget_ms is None):
            raise ArgumentError("give exactly one of --budget and --budget-ms")


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
    budget_basis: BudgetBasis = _budget_basis()  # noqa: RUF009
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
    threads: int | None = _threads()
    backend: Backend = _backend()  # noqa: RUF009
    timing_repeat: int = _timing_repeat()
    allocator: Allocator = _allocator()  # noqa: RUF009
    scheduler: str | None = _option(None, "a Dask scheduler to run the fine-tuned importance "
                                    "entries on (with --importance finetune)",
                                    metavar="ADDRESS")
    seed: int = _option(0, "seed of the training runs and of the held-out split")

    def __post_init__(self) -> None:
        for name, kind in (("importance", ImportanceMode),
                           ("importance_protocol", ImportanceProtocol)):
            object.__setattr__(self, name, one_of(kind, getattr(self, name), name))
        object.__setattr__(self, "backend", get_backend(self.backend))
        object.__setattr__(self, "budget_basis", basis_of(self.budget_basis))
        object.__setattr__(self, "allocator", get_allocator(self.allocator))

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
