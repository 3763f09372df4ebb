"""`fxmerge.compress`: the whole pipeline in one call, from a model to a plan and a pruned
network to fine-tune."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from torch import fx, nn

from .capture import ExampleInputs, trace
from .errors import ArgumentError
from .passes import merge, prune
from .plan import Plan
from .solve import get_method, solve
from .solve.measured import NetworkTimer, solve_measured
from .space import MergeSpace, analyze
from .tables.agreement import agreement_importance
from .tables.importance import ImportanceTable, estimate_importance
from .tables.latency import LatencyTable, measure_latency


@dataclass
class CompressResult:
    """The plan, the pruned network to fine-tune, and how it was decided."""

    plan: Plan
    space: MergeSpace
    pruned: fx.GraphModule
    latency: LatencyTable
    importance: ImportanceTable

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
    exclude: tuple[str, ...] = (),
    stride_rule: str = "paper",
    levels: int | None = None,
    add_activations: bool | None = None,
    budget_basis: str = "measured",
    timing: Mapping[str, Any] | None = None,
    threads: int | None = None,
) -> CompressResult:
    """Trace, analyse, build the tables, solve at `budget` and prune. `model` is not
    changed.

    `budget` is a fraction of the original network's measured latency (BatchNorm folded) on
    the backend, device and batch of the latency table: plans are transformed and timed
    against the original until one measures within it (`solve_measured`; `timing`: keyword
    arguments for its `NetworkTimer`, such as `repeat`). `budget_basis="table"` makes it a
    fraction of the table's sum instead, with no network timed.

    `latency`: a `LatencyTable`, or keyword arguments for `measure_latency` (default: eager
    on the CPU at the example batch). `importance`: an `ImportanceTable`, or an
    `evaluate(model) -> float` for the paper's estimator (with `finetune`), or None for the
    cheap output-agreement proxy on `example_inputs`. `threads`: the intra-op threads both
    the latency table and the network timings use (default: torch's), recorded in both.
    """
    if budget_basis not in ("measured", "table"):
        raise ArgumentError(f"budget_basis must be 'measured' or 'table', got {budget_basis!r}")
    gm = trace(model, example_inputs)
    space = analyze(gm, stride_rule=stride_rule, exclude=exclude,
                    add_activations=add_activations)
    keys = get_method(method).importance_keys(space)  # only the keys `method` reads
    if not isinstance(latency, LatencyTable):
        latency = measure_latency(space, gm, **{"threads": threads, **dict(latency or {})})
    if importance is None:
        importance = agreement_importance(space, gm, example_inputs, keys=keys)
    elif not isinstance(importance, ImportanceTable):
        importance = estimate_importance(space, gm, evaluate=importance, finetune=finetune,
                                         keys=keys)
    if budget_basis == "measured":
        timer = NetworkTimer.for_table(gm, space, latency, **dict(timing or {}),
                                       **({"threads": threads} if threads else {}))
        plan = solve_measured(space, latency, importance, timer, budget=budget, method=method,
                              levels=levels)
    else:
        plan = solve(space, latency, importance, budget=budget, method=method, levels=levels)
    pruned = prune(gm, plan, space)
    return CompressResult(plan, space, pruned, latency, importance)
