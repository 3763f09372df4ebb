"""`Job`: one model's compression in stages, the one pipeline every front end drives.

capture → space → latency → importance → solve → fine-tune → merge → deploy → report.
Each stage runs once per job: its result is kept on the job and, given an output folder,
in a file there, so a job run again over the same folder resumes where it stopped.
`fxmerge.compress`, `fxmerge compress` (`pipeline.run_job`), `fxmerge solve` and the demos
are front ends over it.

A result in the folder is reused only when what made it is the same: each records its
inputs' fingerprints (`made_from`: the graph, the model's weights, the data and protocol a
front end names, the stage's settings, the tables a plan was solved on); any other is
made again, with one line saying which input changed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Executor
from dataclasses import asdict, dataclass, replace
from enum import Enum
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn

from .backends.runtimes import Backend, get_backend
from .backends.timing import Allocator, give_back_memory
from .capture import ExampleInputs, trace
from .capture.trace import INPUTS_META
from .deploy import export_onnx, save
from .errors import ArgumentError, FxMergeError, InfeasibleBudget, one_of
from .estimate import (
    NetworkTimer,
    agreement_importance,
    estimate_importance,
    measure_latency,
    solve_measured,
)
from .passes import merge, prune
from .plan import Plan
from .solve import MethodName, fastest_latency, get_method, solve
from .space import MergeSpace, analyze
from .tables import ImportanceTable, Key, LatencyTable

log = logging.getLogger(__name__)


class Strategy(str, Enum):
    """A method choice besides the methods themselves."""

    AUTO = "auto"  # `AUTO_METHODS` both tried, one kept by `choose`

    def __str__(self) -> str:
        return self.value


AUTO = Strategy.AUTO
AUTO_METHODS = (MethodName.LAYERMERGE, MethodName.DEPTH)


class BudgetBasis(str, Enum):
    """What a budget is a fraction of."""

    MEASURED = "measured"  # the original network's latency, timed whole: plans are timed
    TABLE = "table"  # the latency table's sum for the original: no network is timed

    def __str__(self) -> str:
        return self.value


def basis_of(value: str | BudgetBasis) -> BudgetBasis:
    """The basis `value` names; `ArgumentError` for anything else."""
    return one_of(BudgetBasis, value, "budget_basis")


@dataclass
class Candidate:
    """One method's plan at the budget, fine-tuned, merged and scored on held-out data
    (`score`; `before`: the pruned network's score before fine-tuning; `timing`: `Job.time`
    of the merged network, where measured)."""

    method: str
    plan: Plan
    pruned: fx.GraphModule
    merged: fx.GraphModule
    score: float
    before: float
    timing: dict[str, Any] | None = None

    @property
    def speedup(self) -> float:
        return self.timing["speedup"] if self.timing else 0.0


def choose(scores: Mapping[str, float], speedups: Mapping[str, float] | None = None,
           resolution: float = 0.0) -> tuple[str, str]:
    """The one rule that keeps a method (docs/method.md §6): the best held-out score; the
    methods within `resolution` of it (what one held-out example is worth) are a tie,
    broken by measured speed-up. The method kept and the reason, in words."""
    if not scores:
        raise ArgumentError("choose needs at least one candidate")
    speedups = speedups or {}
    best = max(scores.values())
    tied = [m for m, s in scores.items() if s >= best - resolution]
    chosen = max(tied, key=lambda m: (speedups.get(m, 0.0), scores[m]))
    if len(scores) == 1:
        return chosen, f"{chosen} was the only candidate"
    others = ", ".join(f"{m} {s:.4g}" for m, s in scores.items() if m != chosen)
    reason = f"{chosen} scored {scores[chosen]:.4g} on the held-out data against {others}"
    if len(tied) > 1:
        reason += (f" (within the held-out resolution {resolution:.3g}: a tie, kept for its "
                   f"measured speed-up {speedups.get(chosen, 0.0):.2f}x)")
    return chosen, reason


class Job:
    """Compress `model` (an nn.Module, or a GraphModule from `fxmerge.trace`) on
    `example` inputs, stage by stage.

    `out`: a folder for each stage's result (space.json, latency.json, importance-*.json,
    plan.json, fine-tune checkpoints), read back when it belongs to this graph. `analysis`:
    `analyze`'s options. `latency`: a `LatencyTable`, or `measure_latency`'s options (the
    backend, batch and threads also time whole networks). `timing`: `NetworkTimer`'s options
    (`repeat`). `inputs`: fingerprints of what the front end brings besides the model
    (`{"data": ..., "protocol": ...}`: its data's file list and sizes, its evaluate and
    fine-tune settings), recorded with every result they shape. `plan`: a plan to apply
    (`prune`, `merge`), whose analysis settings the space is made with. `quiet`: no stage lines on
    stdout; `progress`: bars as `fxmerge.progress` shows them. The inputs are fixed once the
    job is made."""

    def __init__(self, model: nn.Module | fx.GraphModule, example: ExampleInputs, *,
                 out: str | Path | None = None, analysis: Mapping[str, Any] | None = None,
                 latency: LatencyTable | Mapping[str, Any] | None = None,
                 importance: ImportanceTable | None = None,
                 timing: Mapping[str, Any] | None = None, threads: int | None = None,
                 inputs: Mapping[str, str] | None = None, plan: Plan | None = None,
                 quiet: bool = True, progress: bool | None = None) -> None:
        self.model, self.example = model, example
        self.inputs = dict(inputs or {})
        self.plan = plan
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
        self.dropped: dict[str, str] = {}  # methods left out, and why

    FROZEN = frozenset({"model", "example", "out", "analysis", "latency_options", "timing",
                        "inputs", "plan", "quiet", "progress"})

    def __setattr__(self, name: str, value: Any) -> None:
        """The job's inputs are fixed once it is made (results are kept by what made them)."""
        if name in self.FROZEN and name in self.__dict__:
            raise ArgumentError(f"Job.{name} is fixed once the job is made: make a new Job")
        super().__setattr__(name, value)

    # ---- stages ----------------------------------------------------------------------------
    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Time a stage into `seconds` and, unless quiet, say what it is doing; the memory
        the stage freed is given back to the system after it."""
        started = time.perf_counter()
        if not self.quiet:
            print(f"[{name}]", flush=True)
        try:
            yield
        finally:
            give_back_memory()
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
        """space: the graph's merge space (written to space.json); a job given a `plan`
        analyses with the plan's settings (`PlanError` where they do not fit the model)."""
        with self.stage("space"):
            space = (self.plan.space_of(self.gm) if self.plan is not None
                     else analyze(self.gm, **self.analysis))
        self._write("space.json", space.to_json())
        return space

    @cached_property
    def weights(self) -> str:
        """The fingerprint of the captured model's weights and buffers."""
        return fingerprint(dict(sorted(self.gm.state_dict().items())))

    def made_from(self, settings: Mapping[str, Any], *parts: str) -> dict[str, str]:
        """What a result is made from: the graph, the named `parts` (`weights`, or inputs
        the front end gave: `data`, `protocol`) and the stage's `settings`, each as a
        fingerprint."""
        out = {"graph": self.space.signature}
        for part in parts:
            out[part] = self.weights if part == "weights" else self.inputs.get(part, "")
        out["settings"] = fingerprint(settings)
        return out

    def _reuse(self, name: str, item: Any, made_from: dict[str, str]) -> bool:
        """Whether `item`, read from `name` in the folder, was made from `made_from`; one
        line naming what changed where it was not."""
        if item is None:
            return False
        recorded = (item.extra.get("made_from") if isinstance(item, Plan)
                    else item.settings.made_from) or {}
        if recorded == made_from:
            return True
        changed = [k for k in made_from if recorded.get(k) != made_from[k]] or ["format"]
        self._say(f"{name}: made from another {', '.join(changed)}; making it again")
        return False

    @cached_property
    def latency(self) -> LatencyTable:
        """latency: the table given, the one in latency.json when the same graph and
        settings made it, else measured."""
        if self._given["latency"] is not None:
            self._given["latency"].check(self.space)
            return self._given["latency"]
        options = dict(self.latency_options)
        cache = options.pop("cache", None) or (self.out / "latency-cache.json" if self.out
                                               else None)
        made_from = self.made_from(options)
        table = self._read("latency.json", LatencyTable.from_json)
        if self._reuse("latency.json", table, made_from):
            return table
        with self.stage("latency table"):
            table = measure_latency(self.space, self.gm, cache=cache, progress=self.progress,
                                    **options)
        table.settings = replace(table.settings, made_from=made_from)
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
        batch = self.example if batch is None else batch
        cache = options.pop("cache", None)  # the caller's own cache file, if any
        settings = {"estimator": name, **options,
                    **({"batch": fingerprint(batch)} if evaluate is None else {})}
        made_from = self.made_from(settings, "weights", "data", "protocol")
        table = self._read(path, ImportanceTable.from_json)
        if self._reuse(path, table, made_from) and all(k in table for k in keys):
            return table
        with self.stage(f"importance ({name})"):
            if evaluate is None:
                table = agreement_importance(self.space, self.gm, batch, keys=keys,
                                             progress=self.progress, **options)
            else:  # finished keys are cached by what made them
                if cache is None and self.out is not None:
                    cache = self.out / f"importance-{name}-{fingerprint(made_from)}.jsonl"
                table = estimate_importance(self.space, self.gm, evaluate=evaluate,
                                            finetune=finetune, keys=keys, executor=executor,
                                            cache=cache, progress=self.progress, **options)
        table.settings = replace(table.settings, made_from=made_from)
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
        for m, floor in floors.items():
            if m not in fits and fits:
                self.dropped[m] = (f"{m} cannot reach {option} {budget:g}: its fastest plan "
                                   f"is {floor:.0%} of the original's latency on the table")
                self._say(f"{self.dropped[m]}; trying the others")
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
        method = get_method(method).name
        path = Path(save_to) if save_to else (self.out / "plan.json" if self.out else None)
        measured = basis_of(basis) is BudgetBasis.MEASURED and budget is not None
        made_from = {"latency": fingerprint(self.latency.to_json()),
                     "importance": fingerprint(importance.to_json()),
                     "settings": fingerprint({"method": method, "budget": budget,
                                              "budget_ms": budget_ms, "measured": measured,
                                              "levels": levels, "timing": self.timing})}
        if path is not None and self.out is not None and path.parent == self.out:
            plan = self._read(path.name, Plan.from_json)
            if self._reuse(path.name, plan, made_from) and not plan.extra.get("over_budget"):
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
        plan = replace(plan, extra={**plan.extra, "made_from": made_from})
        if path is not None:
            _write_file(path, plan.to_json())
        return plan

    def candidates(self, importance: ImportanceTable, budget: float,
                   methods: Iterable[str], *, train: Callable[..., nn.Module],
                   evaluate: Callable[[nn.Module], float],
                   basis: str | BudgetBasis = BudgetBasis.MEASURED, levels: int | None = None,
                   plan_file: Callable[[str], Path] | None = None, timed: bool = True,
                   settings: Mapping[str, Any] | None = None) -> dict[str, Candidate]:
        """Each method's plan at `budget`, fine-tuned by `train(pruned, checkpoint=...)`,
        merged and scored by `evaluate` (held-out data; never what a result is reported
        on), its merged network timed when `timed`. A method whose plan cannot meet the
        budget is dropped with a line (`dropped`), unless it is the only one."""
        methods, out = list(methods), {}
        for method in methods:
            try:
                plan = self.solve(importance, budget, method=method, basis=basis,
                                  levels=levels, save_to=plan_file(method) if plan_file else None)
            except InfeasibleBudget as exc:
                if len(methods) == 1:
                    raise
                self.dropped[method] = str(exc)
                self._say(f"{method} dropped: {exc}")
                continue
            before = float(evaluate(self.prune(plan).eval()))
            pruned = self.finetune(plan, train, settings)
            merged = self.merge(pruned)
            out[method] = Candidate(method, plan, pruned, merged, float(evaluate(merged)),
                                    before, self.time(merged) if timed else None)
        if not out:
            raise InfeasibleBudget("no method meets the budget: " + "; ".join(
                self.dropped.get(m, m) for m in methods))
        return out

    def choose(self, candidates: Mapping[str, Candidate], resolution: float = 0.0
               ) -> tuple[str, str]:
        """`choose`, timing the tied candidates first where they were not."""
        best = max(c.score for c in candidates.values())
        for c in candidates.values():
            if c.timing is None and c.score >= best - resolution and len(candidates) > 1:
                c.timing = self.time(c.merged)
        return choose({m: c.score for m, c in candidates.items()},
                      {m: c.speedup for m, c in candidates.items()}, resolution)

    def prune(self, plan: Plan) -> fx.GraphModule:
        """The plan's pruned network, to fine-tune."""
        return prune(self.gm, plan, self.space)

    def finetune(self, plan: Plan, train: Callable[..., nn.Module],
                 settings: Mapping[str, Any] | None = None) -> fx.GraphModule:
        """fine-tune: the plan's pruned network trained by `train(pruned, checkpoint=...)`
        (a checkpoint per plan, weights, data, protocol and training `settings` in the
        job's folder, so an interrupted run resumes and any other input starts afresh)."""
        with self.stage("fine-tune"):
            tag = fingerprint({"blocks": [asdict(b) for b in plan.blocks],
                               **self.made_from(settings or {}, "weights", "data",
                                                "protocol")})
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
        table's backend, batch and threads, in the allocator the budget was measured for
        (`timing["allocator"]`, by default a plain process's) and, for the report, in the
        other one."""
        s, timer = self.latency.settings, self.timer
        with self.stage("final timing"):
            t = timer.compare({"merged": merged}, repeat=repeat)
            other = next(a for a in Allocator if a is not timer.allocator)
            o = timer.compare({"merged": merged}, allocator=other, repeat=repeat) \
                if timer.isolate else None
        out = {"backend": str(s.backend), "batch": timer.settings["batch_size"],
               "threads": timer.threads, "allocator": timer.settings["allocator"],
               "original_ms": round(t["original"].ms, 4), "merged_ms": round(t["merged"].ms, 4),
               "ratio": round(t["merged"].ratio, 4), "speedup": round(1 / t["merged"].ratio, 3)}
        if o is not None:  # the same networks as another allocator runs them
            out["other"] = {"allocator": str(other), "original_ms": round(o["original"].ms, 4),
                            "merged_ms": round(o["merged"].ms, 4),
                            "ratio": round(o["merged"].ratio, 4)}
        return out

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

    def _say(self, line: str) -> None:
        log.info(line)
        if not self.quiet:
            print(line, flush=True)


def fingerprint(value: Any) -> str:
    """A short hash of `value`: text as it is, tensors by their bytes, anything else by
    its JSON (keys sorted; what JSON cannot hold by its `repr`)."""
    digest = hashlib.sha1()

    def feed(v: Any) -> Any:
        if isinstance(v, torch.Tensor):
            digest.update(v.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
                          .tobytes())
            return str((v.dtype, tuple(v.shape)))
        if isinstance(v, (list, tuple)):
            return [feed(x) for x in v]
        if isinstance(v, Mapping):
            return {str(k): feed(x) for k, x in v.items()}
        return v if isinstance(v, (str, int, float, bool, type(None))) else repr(v)

    digest.update((value if isinstance(value, str)
                   else json.dumps(feed(value), sort_keys=True)).encode())
    return digest.hexdigest()[:16]


def _write_file(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


__all__ = ["AUTO", "AUTO_METHODS", "BudgetBasis", "Candidate", "Job", "Strategy", "basis_of",
           "choose", "fingerprint"]
