"""`fxmerge.compress`: the whole pipeline in one call, from a model to a plan and a pruned
network to fine-tune (a front end over `fxmerge.job.Job`)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import fx, nn

from .capture import ExampleInputs
from .errors import ArgumentError
from .job import AUTO, AUTO_METHODS, BudgetBasis, Candidate, Job, basis_of
from .passes import merge
from .plan import Plan
from .solve import importance_keys
from .space import MergeSpace, StrideRule
from .tables import ImportanceTable, LatencyTable


@dataclass
class CompressResult:
    """The plan, the pruned network to fine-tune, and how it was decided."""

    plan: Plan
    space: MergeSpace
    pruned: fx.GraphModule
    latency: LatencyTable
    importance: ImportanceTable
    # method="auto": each method tried (its plan, trained and merged networks, score)
    candidates: dict[str, Candidate] = field(default_factory=dict)
    reason: str = ""  # why this plan's method was kept

    def merge(self) -> fx.GraphModule:
        """The merged network (one conv per block) of the pruned one, in eval mode. Call it
        after fine-tuning `pruned`; it puts `pruned` in eval mode."""
        return merge(self.pruned.eval())

    def report(self) -> str:
        """Measured and predicted latency, importance, and each block's convs and kernel."""
        original = self.latency.identity_latency(self.space)
        p = self.plan
        basis = "measured" if p.measured else "table"
        head = (f"{p.method} at budget {p.budget:.0%} ({basis} latency): table "
                f"{p.predicted_latency_ms:.4g} ms of {original:.4g} ms "
                f"({p.predicted_latency_ms / original:.1%}), importance "
                f"{p.predicted_importance:.4g}; {len(p.removed_convs)} convs and "
                f"{len(p.removed_activations(self.space))} activations removed, "
                f"{len(p.added_activations(self.space))} added, {len(p.blocks)} blocks")
        return head + "\n" + p.describe()


def compress(
    model: nn.Module,
    example_inputs: ExampleInputs,
    *,
    budget: float,
    method: str = "layermerge",
    latency: LatencyTable | Mapping[str, Any] | None = None,
    importance: ImportanceTable | Callable[[nn.Module], float] | None = None,
    finetune: Callable[[nn.Module], nn.Module | None] | None = None,
    train: Callable[[fx.GraphModule], fx.GraphModule] | None = None,
    exclude: tuple[str, ...] = (),
    stride_rule: str | StrideRule = StrideRule.PAPER,
    levels: int | None = None,
    add_activations: bool | None = None,
    budget_basis: str | BudgetBasis = BudgetBasis.MEASURED,
    timing: Mapping[str, Any] | None = None,
    threads: int | None = None,
) -> CompressResult:
    """Trace, analyse, build the tables, solve at `budget` and prune. `model` is not
    changed.

    `budget` is a fraction of the original network's measured latency (BatchNorm folded) on
    the backend, device and batch of the latency table: plans are transformed and timed
    against the original until one measures within it (`solve_measured`; `timing`: keyword
    arguments for its `NetworkTimer`: `repeat`, and `allocator`, the memory handling you
    deploy with, `"held"` (the default) for jemalloc, tcmalloc or glibc told to hold freed
    memory, `"default"` for a plain glibc process: networks are timed in a fresh process of
    that kind).
    `budget_basis="table"` makes it a fraction of the table's sum instead, with no network
    timed.

    `latency`: a `LatencyTable`, or keyword arguments for `measure_latency` (default: eager
    on the CPU at the example batch). `importance`: an `ImportanceTable`, or an
    `evaluate(model) -> float` for the paper's estimator (with `finetune`), or None for the
    cheap output-agreement proxy on `example_inputs`. `threads`: the intra-op threads both
    the latency table and the network timings use (default: torch's), recorded in both.

    `method="auto"` tries LayerMerge and Depth from one importance pass: each plan's pruned
    network is trained by `train(pruned) -> pruned` (your final fine-tune) and scored by
    `importance` (an `evaluate` on held-out data, never the data you report on); the more
    accurate is kept (its trained network is `result.pruned`; `result.candidates` has both).
    A budget the latency table shows no plan can reach is refused before any importance is
    measured (with `auto`, such a method is dropped).
    """
    basis = basis_of(budget_basis)
    if method == AUTO and (not callable(importance) or train is None):
        raise ArgumentError('method="auto" picks the more accurate network: give '
                            "importance=evaluate (scored on held-out data) and train=")
    job = Job(model, example_inputs, threads=threads, latency=latency, timing=timing,
              importance=importance if isinstance(importance, ImportanceTable) else None,
              analysis={"stride_rule": stride_rule, "exclude": exclude,
                        "add_activations": add_activations})
    if method == AUTO:
        return _compress_auto(job, budget=budget, evaluate=importance, finetune=finetune,
                              train=train, basis=basis, levels=levels)
    job.reachable(budget, (method,))  # refused before any importance is measured
    keys = importance_keys(job.space, [method])  # only the keys `method` reads
    table = job.importance(keys, evaluate=importance if callable(importance) else None,
                           finetune=finetune)
    plan = job.solve(table, budget, method=method, basis=basis, levels=levels)
    return CompressResult(plan, job.space, job.prune(plan), job.latency, table)


def _compress_auto(job: Job, *, budget: float, evaluate: Callable[[nn.Module], float],
                   finetune: Callable[[nn.Module], nn.Module | None] | None,
                   train: Callable[[fx.GraphModule], fx.GraphModule], basis: BudgetBasis,
                   levels: int | None) -> CompressResult:
    """`compress` with `method="auto"`: LayerMerge and Depth, kept by `Job.choose`."""
    methods = job.reachable(budget, AUTO_METHODS)
    table = job.importance(importance_keys(job.space, methods), evaluate=evaluate,
                           finetune=finetune)
    candidates = job.candidates(table, budget, methods, evaluate=evaluate, basis=basis,
                                levels=levels, timed=False,
                                train=lambda net, checkpoint: train(net))
    chosen, reason = job.choose(candidates)
    best = candidates[chosen]
    return CompressResult(best.plan, job.space, best.pruned, job.latency, table, candidates,
                          reason)
