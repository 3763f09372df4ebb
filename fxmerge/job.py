"""`Job`: one model's compression in stages, the one pipeline every front end drives.

capture → space → latency → importance → solve → fine-tune → merge → deploy → report.
Each stage runs once per job: its result is kept on the job and, given an output folder,
in a file there, so a job run again over the same folder resumes where it stopped.
`fxmerge.compress`, `fxmerge compress` (`pipeline.run_job`), `fxmerge solve` and the demos
are front ends over it.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Executor
from dataclasses import asdict
from enum import Enum
from functools import cached_property
from pathlib import Path
from typing import Any

from torch import fx, nn

from .backends.runtimes import Backend, get_backend, plan_runner, prepare
from .backends.timing import at_batch, time_against_reference, using_threads
from .capture import ExampleInputs, trace
from .capture.trace import INPUTS_META
from .deploy import export_onnx, save
from .errors import ArgumentError, FxMergeError, InfeasibleBudget
from .estimate import (
    NetworkTimer,
    agreement_importance,
    estimate_importance,
    measure_latency,
    solve_measured,
)
from .passes import merge, prune
from .plan import Plan
from .solve import fastest_latency, get_method, solve
from .space import MergeSpace, analyze
from .tables import ImportanceTable, Key, LatencyTable

log = logging.getLogger(__name__)
AUTO = "auto"  # a method choice: LayerMerge and Depth both tried, the more accurate kept
AUTO_METHODS = ("layermerge", "depth")


class BudgetBasis(str, Enum):
    """What a budget is a fraction of."""

    MEASURED = "measured"  # the original network's latency, timed whole: plans are timed
    TABLE = "table"  # the latency table's sum for the original: no network is timed

    def __str__(self) -> str:
        return self.value


def basis_of(value: str | BudgetBasis) -> BudgetBasis:
    """The basis `value` names; `ArgumentError` for anything else."""
    try:
        return BudgetBasis(value)
    except ValueError:
        raise ArgumentError(f"budget_basis must be one of {', '.join(BudgetBasis)}, got "
                            f"{value!r}") from None


class Job:
    """Compress `model` (an nn.Module, or a GraphModule from `fxmerge.trace`) on
    `example` inputs, stage by stage.

    `out`: a folder for each stage's result (space.json, latency.json, importance-*.json,
    plan.json, fine-tune checkpoints), read back when it belongs to this graph. `analysis`:
    `analyze`'s options. `latency`: a `LatencyTable`, or `measure_latency`'s options (the
    backend, batch and threads also time whole networks). `timing`: `NetworkTimer`'s options
    (`repeat`). `quiet`: no stage lines on stdout; `progress`: bars as
    `fxmerge.progress` shows them."""

    def __init__(self, model: nn.Module | fx.GraphModule, example: ExampleInputs, *,
                 out: str | Path | None = None, analysis: Mapping[str, Any] | None = None,
                 latency: LatencyTable | Mapping[str, Any] | None = None,
                 importance: ImportanceTable | None = None,
                 timing: Mapping[str, Any] | None = None, threads: int | None = None,
                 quiet: bool = True, progress: bool | None = None) -> None:
        self.model, self.example = model, example
        self.out = Path(out) if out is not None else None
        if self.out is not None:
            self.out.mkdir(parents=True, exist_ok=True)
        self.analysis = dict(analysis or {})
        self.latency_options = {} if isinstance(latency, LatencyTable) else dict(latency or {})
        self.latency_options.setdefault("threads", threads)
        get_backend(self.latency_options.get("backend", Backend.EAGER))
        self.timing = dict(timing or {})
        self.quiet, self.progress = quiet, progress
        self.seconds: dict[str, float] = {}  # each stage's time
        self._given = {"latency": latency if isinstance(latency, LatencyTable) else None,
                       "importance": importance}
        self._reach: dict[str, float] = {}  # each method's `reach`

    # ---- stages ----------------------------------------------------------------------------
    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Time a stage into `seconds` and, unless quiet, say what it is doing."""
        started = time.perf_counter()
        if not self.quiet:
            print(f"[{name}]", flush=True)
        try:
            yield
        finally:
            self.seconds[name] = round(self.seconds.get(name, 0.0) + time.perf_counter()
                                       - started, 1)

    @cached_property
    def gm(self) -> fx.GraphModule:
        """capture: the canonical graph (the model given as one is used as it is)."""
        if isinstance(self.model, fx.GraphModule) and INPUTS_META in self.model.meta:
            return self.model
        with self.stage("capture"):
            return trace(self.model, self.example)

    @cached_property
    def space(self) -> MergeSpace:
        """space: the graph's merge space (written to space.json)."""
        with self.stage("space"):
            space = analyze(self.gm, **self.analysis)
        self._write("space.json", space.to_json())
        return space

    @cached_property
    def latency(self) -> LatencyTable:
        """latency: the table given, the one in latency.json when it fits, else measured."""
        table = self._given["latency"] or self._read("latency.json", LatencyTable.from_json)
        options = self.latency_options
        if table is not None and all(options.get(name) in (None, getattr(table.settings, name))
                                     for name in ("threads", "backend", "batch_size")):
            table.check(self.space)
            return table
        with self.stage("latency table"):
            cache = self.out / "latency-cache.json" if self.out else None
            table = measure_latency(self.space, self.gm, cache=cache, progress=self.progress,
                                    **options)
        self._write("latency.json", table.to_json())
        return table

    def importance(self, keys: Iterable[Key] | None = None, *,
                   evaluate: Callable[[nn.Module], float] | None = None,
                   finetune: Callable[[nn.Module], nn.Module | None] | None = None,
                   batch: ExampleInputs | None = None, executor: Executor | None = None,
                   name: str | None = None, **options: Any) -> ImportanceTable:
        """importance: the table given, or the one in importance-NAME.json holding `keys`,
        else estimated: the paper's estimator with `evaluate` (and `finetune`), else the
        output-agreement proxy on `batch` (default: the example inputs)."""
        keys = list(self.space.entries if keys is None else keys)
        given = self._given["importance"]
        if given is not None:
            given.check(self.space, keys)
            return given
        name = name or ("finetune" if evaluate is not None else "proxy")
        path = f"importance-{name}.json"
        table = self._read(path, ImportanceTable.from_json)
        if table is not None and all(k in table for k in keys):
            return table
        with self.stage(f"importance ({name})"):
            if evaluate is None:
                table = agreement_importance(self.space, self.gm,
                                             self.example if batch is None else batch,
                                             keys=keys, progress=self.progress, **options)
            else:
                cache = self.out / f"importance-{name}.jsonl" if self.out else None
                table = estimate_importance(self.space, self.gm, evaluate=evaluate,
                                            finetune=finetune, keys=keys, executor=executor,
                                            cache=cache, progress=self.progress, **options)
        self._write(path, table.to_json())
        return table

    def reach(self, method: str) -> float:
        """The smallest table latency any `method` plan reaches, as a fraction of the
        original's: what the latency table alone says is reachable (no importance is needed
        to know it, so a budget below it is refused before any is measured). Once a job."""
        if method not in self._reach:
            keys = get_method(method).importance_keys(self.space)
            flat = ImportanceTable.from_values(self.space, dict.fromkeys(keys, 1.0), keys=keys)
            self._reach[method] = (fastest_latency(self.space, self.latency, flat, method)
                                   / self.latency.identity_latency(self.space))
        return self._reach[method]

    def reachable(self, budget: float, methods: Iterable[str], option: str = "budget"
                  ) -> tuple[str, ...]:
        """The `methods` whose fastest plan the latency table allows within `budget` (a
        fraction of the original's); `InfeasibleBudget` when none does, naming each one's
        figure and a budget that works (`option` names the budget in the message)."""
        floors = {m: self.reach(m) for m in methods}
        fits = tuple(m for m, floor in floors.items() if floor <= budget)
        if not fits:
            best = min(floors.values())
            raise InfeasibleBudget(
                f"{option} {budget:g} is below what the latency table allows: the fastest "
                f"plan is {best:.0%} of the original's latency ("
                + ", ".join(f"{m} {f:.0%}" for m, f in floors.items())
                + f"); ask for {option} {math.ceil(best * 100 + 1) / 100:g} or more")
        return fits

    @cached_property
    def timer(self) -> NetworkTimer:
        """Whole networks timed on the latency table's backend, device, batch and threads."""
        return NetworkTimer.for_table(self.gm, self.space, self.latency, **self.timing,
                                      **({"threads": t} if (t := self.latency_options.get(
                                          "threads")) else {}))

    def solve(self, importance: ImportanceTable, budget: float | None = None, *,
              method: str = "layermerge", basis: str | BudgetBasis = BudgetBasis.MEASURED,
              budget_ms: float | None = None, levels: int | None = None,
              save_to: str | Path | None = None) -> Plan:
        """solve: the best `method` plan at `budget` of the original's latency, measured
        (plans timed whole until one fits) or on the table's sum (`basis="table"`, or an
        absolute `budget_ms`). The plan is written to `save_to` (default: plan.json in the
        job's folder, reused when it is this solve's); a budget no plan meets writes the
        fastest plan found there, marked over budget, and raises `InfeasibleBudget`."""
        get_method(method)
        path = Path(save_to) if save_to else (self.out / "plan.json" if self.out else None)
        measured = basis_of(basis) is BudgetBasis.MEASURED and budget is not None
        if path is not None and self.out is not None and path.parent == self.out:
            plan = self._read(path.name, Plan.from_json)
            if plan is not None and plan.method == method and plan.budget == budget \
                    and bool(plan.measured) == measured and not plan.extra.get("over_budget"):
                return plan
        with self.stage("solve"):
            try:
                if measured:
                    plan = solve_measured(self.space, self.latency, importance, self.timer,
                                          budget=budget, method=method, levels=levels,
                                          progress=self.progress)
                else:
                    plan = solve(self.space, self.latency, importance, budget=budget,
                                 budget_ms=budget_ms, method=method, levels=levels)
            except InfeasibleBudget as exc:
                if path is None:
                    raise
                if exc.plan is None:
                    raise InfeasibleBudget(f"{exc} (nothing written to {path})") from None
                _write_file(path, exc.plan.to_json())
                raise InfeasibleBudget(f"{exc} (the fastest plan found, over the budget, is "
                                       f"in {path})", plan=exc.plan) from None
        if path is not None:
            _write_file(path, plan.to_json())
        return plan

    def prune(self, plan: Plan) -> fx.GraphModule:
        """The plan's pruned network, to fine-tune."""
        return prune(self.gm, plan, self.space)

    def finetune(self, plan: Plan, train: Callable[..., nn.Module]) -> fx.GraphModule:
        """fine-tune: the plan's pruned network trained by `train(pruned, checkpoint=...)`
        (a checkpoint per plan in the job's folder, so an interrupted run resumes)."""
        with self.stage("fine-tune"):
            tag = hashlib.sha1(json.dumps([asdict(b) for b in plan.blocks]).encode()
                               ).hexdigest()[:10]
            checkpoint = self.out / f"finetune-{tag}.pt" if self.out else None
            return train(self.prune(plan), checkpoint=checkpoint)

    def merge(self, pruned: fx.GraphModule) -> fx.GraphModule:
        """merge: one conv per block, in eval mode."""
        with self.stage("merge"):
            return merge(pruned.eval())

    def deploy(self, merged: fx.GraphModule, spec: str = "") -> dict[str, str]:
        """deploy: merged.safetensors (`fxmerge.load`) and merged.onnx in the job's
        folder; what was written, or why the ONNX export was not."""
        if self.out is None:
            raise ArgumentError("deploy writes to the job's folder: give the Job an out folder")
        with self.stage("deploy"):
            save(merged, self.out / "merged.safetensors", model=spec)
            files = {"network": "merged.safetensors"}
            try:
                export_onnx(merged, self.example, self.out / "merged.onnx")
                files["onnx"] = "merged.onnx"
            except Exception as exc:  # noqa: BLE001 (the exporter's: the network is saved)
                files["onnx"] = f"not exported ({type(exc).__name__}: {exc})"
        return files

    def time(self, merged: fx.GraphModule, repeat: int | None = None) -> dict[str, Any]:
        """The original (BatchNorm folded) and `merged`, timed side by side on the latency
        table's backend, batch and threads."""
        s = self.latency.settings
        inputs = at_batch(self.example, s.batch_size)
        repeat = repeat or self.timing.get("repeat", 30)
        with self.stage("final timing"), using_threads(s.threads) as threads:
            t = time_against_reference(
                lambda: {"original": plan_runner(self.gm, Plan.identity(self.space),
                                                 s.backend, inputs),
                         "merged": prepare(copy.deepcopy(merged), s.backend, inputs)},
                inputs, repeat=repeat, preparations=3)
        return {"backend": str(s.backend), "batch": s.batch_size, "threads": threads,
                "original_ms": round(t["original"].ms, 4), "merged_ms": round(t["merged"].ms, 4),
                "ratio": round(t["merged"].ratio, 4), "speedup": round(1 / t["merged"].ratio, 3)}

    # ---- the folder ------------------------------------------------------------------------
    def _read(self, name: str, load: Callable[[str], Any]) -> Any:
        """The table or plan in the job's folder when it belongs to this graph, else None."""
        path = self.out / name if self.out else None
        if path is None or not path.is_file():
            return None
        try:
            item = load(path.read_text())
        except FxMergeError:
            return None
        return item if item.signature == self.space.signature else None

    def _write(self, name: str, text: str) -> None:
        if self.out is not None:
            _write_file(self.out / name, text)


def _write_file(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


__all__ = ["AUTO", "AUTO_METHODS", "BudgetBasis", "Job", "basis_of"]
