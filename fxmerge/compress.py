"""`fxmerge.compress`: the whole pipeline in one call, from a model to a plan and a pruned
network to fine-tune (a front end over `fxmerge.job.Job`)."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from torch import fx, nn

from .backends.timing import (
    PREPARATIONS,
    Relative,
    time_against_reference,
    time_interleaved,
    using_threads,
    within,
)
from .capture import ExampleInputs
from .capture.submodules import SubmoduleSpec
from .capture.trace import as_tuple
from .errors import ArgumentError, InfeasibleBudget
from .inside import (
    Inside,
    around,
    capture_inside,
    merge,
    merge_model,
    prune_inside,
    with_submodules,
)
from .job import AUTO, AUTO_METHODS, BudgetBasis, Candidate, Job, basis_of
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
    # `submodule=`: a copy of the user's model with the pruned submodules in place, to
    # fine-tune as the model is trained, and the searched submodules' share of its time
    model: nn.Module | None = None
    share: float | None = None

    def merge(self) -> nn.Module:
        """The merged network (one conv per block, eval mode) of the pruned one, or with
        `submodule=` the user's model with every pruned submodule merged. Call it after
        fine-tuning."""
        return merge(self.model if self.model is not None else self.pruned.eval())

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
        if self.share is not None:
            head += (f"\n{len(p.submodules)} submodules ({', '.join(list(p.submodules)[:4])}"
                     f"{', ...' if len(p.submodules) > 4 else ''}), {self.share:.0%} of the "
                     f"model's time: the model at {p.extra['model_ratio']:.1%} of its time "
                     f"(budget {p.extra['model_budget']:.0%}; measured side by side, "
                     "BatchNorm folded in both)")
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
    submodule: SubmoduleSpec | None = None,
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

    `submodule`: compress inside `model`: only these submodules (a name, several names, or
    a predicate `(name, module) -> bool`) are captured, together, on the inputs they
    receive when `model` runs on `example_inputs`; `budget` is a fraction of the whole
    model's time (the submodules' share of it measured side by side); `result.model` is a
    copy of `model`, of its class, with the pruned submodules in place, to fine-tune as
    the model is trained, and `fxmerge.merge(result.model)` merges them.
    """
    basis = basis_of(budget_basis)
    if submodule is not None:
        if method == AUTO:
            raise ArgumentError('method="auto" with submodule= is not supported yet: compress '
                                "with each method and keep the better one")
        return _compress_inside(model, example_inputs, submodule, budget=budget,
                                method=method, latency=latency, importance=importance,
                                finetune=finetune, basis=basis, levels=levels, timing=timing,
                                threads=threads, analysis={
                                    "stride_rule": stride_rule, "exclude": exclude,
                                    "add_activations": add_activations})
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


def _compress_inside(model: nn.Module, example_inputs: ExampleInputs, submodule: SubmoduleSpec,
                     *, budget: float, method: str, latency: LatencyTable | Mapping | None,
                     importance: ImportanceTable | Callable | None,
                     finetune: Callable | None, basis: BudgetBasis, levels: int | None,
                     timing: Mapping[str, Any] | None, threads: int | None,
                     analysis: dict) -> CompressResult:
    """`compress` with `submodule=`: the submodules captured together, searched under the
    whole model's budget, and put back in a copy of the model."""
    inside = capture_inside(model, example_inputs, submodule)
    share = submodules_share(inside, example_inputs, threads)
    own = 1 - (1 - budget) / share  # the submodules' budget for the model's `budget`
    if own <= 0:
        raise InfeasibleBudget(
            f"budget {budget:.0%}: the submodules take {share:.0%} of the model's time, so "
            f"removing all of them leaves {1 - share:.0%}; pick more submodules or a larger "
            "budget")
    job = Job(inside.gm, inside.inputs, threads=threads, latency=latency, timing=timing,
              importance=importance if isinstance(importance, ImportanceTable) else None,
              analysis=analysis)
    floor = 1 - share * (1 - job.reach(method))  # the fastest plan, of the model's time
    if floor > budget:
        raise InfeasibleBudget(
            f"budget {budget:g} is below what the latency table allows: the submodules take "
            f"{share:.0%} of the model's time and {method}'s fastest plan leaves the model at "
            f"{floor:.0%}; ask for budget {math.ceil(floor * 100 + 1) / 100:g} or more, or "
            "pick more submodules")
    keys = importance_keys(job.space, [method])
    evaluate = finetune_ = None
    if callable(importance):
        def evaluate(net: nn.Module) -> float:
            return importance(_as_model(inside, net))
    if finetune is not None:
        def finetune_(net: nn.Module) -> nn.Module:
            model = _as_model(inside, net)
            return finetune(model) or model
    table = job.importance(keys, evaluate=evaluate, finetune=finetune_)
    x = as_tuple(example_inputs)
    reference = merge_model(prune_inside(inside, Plan.identity(job.space), job.space))
    for _ in range(MODEL_SOLVES):  # the submodules' budget narrowed until the model's holds
        plan = job.solve(table, max(own, job.reach(method)), method=method, basis=basis,
                         levels=levels)
        pruned = job.prune(with_submodules(plan, inside))
        model = around(inside, pruned)
        measured = side_by_side(reference, merge_model(model), x, threads)["merged"]
        ratio, holds = measured.ratio, within(measured.ratio, measured.scatter, budget)
        if holds or basis is BudgetBasis.TABLE or own <= job.reach(method):
            break
        own *= (budget - measured.scatter) / ratio
    plan = replace(with_submodules(plan, inside), extra={
        **plan.extra, "model_budget": budget, "share": round(share, 4),
        "model_ratio": round(ratio, 4), "model_scatter": round(measured.scatter, 4)})
    if not holds and basis is BudgetBasis.MEASURED:
        raise InfeasibleBudget(
            f"no {method} plan measured within {budget:.1%} of the whole model's time: the "
            f"last of {MODEL_SOLVES} solves at most measured {ratio:.1%} ± "
            f"{measured.scatter:.1%} over fresh preparations (the submodules "
            f"take {share:.0%} of it); ask for a larger budget or pick more submodules",
            plan=replace(plan, extra={**plan.extra, "over_budget": True}))
    return CompressResult(plan, job.space, pruned, job.latency, table, model=model,
                          share=share)


MODEL_SOLVES = 3  # solves at most, each timing the whole model (`_compress_inside`)


def side_by_side(original: nn.Module, merged: nn.Module, x: tuple, threads: int | None,
                 repeat: int = 30) -> dict[str, Relative]:
    """`original` and `merged`, whole models taking `x`, timed side by side in this process
    over `PREPARATIONS` fresh copies (`time_against_reference`): `["merged"].ratio` is
    merged's time over original's."""
    def make() -> dict[str, nn.Module]:
        return {"original": copy.deepcopy(original).eval(),
                "merged": copy.deepcopy(merged).eval()}

    with using_threads(threads):
        return time_against_reference(make, x, repeat=repeat, preparations=PREPARATIONS)


def _as_model(inside: Inside, net: nn.Module) -> nn.Module:
    """The user's model around `net`, a bundle graph (the original, or a probe's pruned
    network); a model already (what the user's finetune returned) as it is."""
    if isinstance(net, fx.GraphModule) and not isinstance(net, type(inside.model)):
        return around(inside, net)
    return net


def submodules_share(inside: Inside, example_inputs: ExampleInputs, threads: int | None,
                     repeat: int = 30) -> float:
    """The captured submodules' share of the model's time, timed side by side (the model
    on `example_inputs`, the submodules on what they receive there), at most 1."""
    x = as_tuple(example_inputs)
    nets = {"model": lambda *_: inside.model(*x), "submodules": lambda *_: inside.bundle(
        *inside.inputs)}
    with using_threads(threads):
        t = time_interleaved(nets, x, repeat=repeat)
    return min(1.0, t["submodules"].ms / t["model"].ms)
