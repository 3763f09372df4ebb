"""Importance tables: how much each candidate block costs the task, as exp(score change).

The paper's estimator (eq. 4): for each entry, prune the network with only that block
changed, fine-tune it briefly (the user's `finetune`), score it (the user's `evaluate`),
and store `exp(score - score of the original)`. Entries are independent, so they run on
any `concurrent.futures.Executor`; each finished entry is appended to a cache file at once.
"""

from __future__ import annotations

import copy
import itertools
import json
import logging
import math
import os
import pickle
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import Executor, as_completed
from dataclasses import dataclass
from pathlib import Path

from torch import fx, nn

from ..capture.registry import NodeKind
from ..capture.trace import ensure_shapes, example_inputs
from ..errors import TableError
from ..plan import Plan
from ..progress import Progress
from ..solve.depth import DepthKey, depth_keys
from ..solve.layermerge import Chosen, best_subsets, choose_convs
from ..space import IDENTITY, Entry, MergeSpace, require_space_of
from .base import (
    EntryTable,
    Key,
    TableSettings,
    _key_from_json,
    _key_to_json,
)

log = logging.getLogger(__name__)

Evaluate = Callable[[nn.Module], float]
Finetune = Callable[[nn.Module], nn.Module | None]


@dataclass(frozen=True)
class ImportanceSettings(TableSettings):
    """How an importance table was estimated."""

    estimator: str | None = None  # "finetune", "no fine-tuning", "output agreement ..."
    base_score: float | None = None  # evaluate() of the original network
    num_keys: int | None = None
    single_convs_reinitialised: bool | None = None
    calibration_batch: int | None = None  # the output-agreement proxy's batch
    calibration_shape: list[int] | None = None  # and its (first) input's shape


class ImportanceTable(EntryTable):
    """`I[i, j, k, dw] = exp(score(net with only this block changed) - score(original))`.

    For LayerOnly the keys are conv names: the importance of removing that conv alone.
    """

    kind = "importance"
    settings_type = ImportanceSettings


# ---- the network each key scores -------------------------------------------------------
def _singletons(space: MergeSpace, skip: range) -> list[tuple[int, int]]:
    return [(p - 1, p) for p in range(1, space.L + 1) if p not in skip]


def block_plan(space: MergeSpace, entry: Entry, scores: dict[str, float],
               chosen: tuple[str, ...] | None = None) -> Plan:
    """Only block `entry` changed: inner activations removed, convs kept by eq. 3 (`chosen`
    when the caller has it)."""
    i, j, k, dw = entry
    positions = sorted([*_singletons(space, range(i + 1, j + 1)), (i, j)])
    kept = {c.name for c in space.convs} - {c.name for c in space.convs[i:j]}
    kept |= set(choose_convs(space, i, j, k, dw, scores) if chosen is None else chosen)
    return Plan.from_positions(space, positions, kept, method=f"importance:{tuple(entry)}")


def depth_plan(space: MergeSpace, key: DepthKey) -> Plan:
    """Only block `(key.i, key.j)` changed, merged whole, its end activations as the key
    says (Depth's importance where its ends may change)."""
    positions = sorted([*_singletons(space, range(key.i + 1, key.j + 1)), (key.i, key.j)])
    return Plan.from_positions(space, positions, {c.name for c in space.convs},
                           activation={key.i: key.start, key.j: key.end},
                           method=f"importance:depth {key.i}-{key.j} "
                                  f"activations {int(key.start)}{int(key.end)}")


def removal_plan(space: MergeSpace, conv: str) -> Plan:
    """Only `conv` removed (LayerOnly's per-conv importance)."""
    kept = {c.name for c in space.convs} - {conv}
    return Plan.from_positions(space, _singletons(space, range(0)), kept,
                           method=f"importance:remove {conv}")


class ShippedGraph:
    """A GraphModule sent to an executor's worker as bytes and rebuilt inside the task.

    Unpickling a GraphModule re-traces it, and torch.fx tracing patches `nn.Module.__call__`
    for the whole process: a worker that unpickles the next task's arguments in one thread
    while a model runs in another (Dask does) breaks that model. So the graph is rebuilt,
    pruned, fine-tuned and scored under one process-wide lock."""

    def __init__(self, gm: fx.GraphModule) -> None:
        self.data = pickle.dumps(gm)

    def load(self) -> fx.GraphModule:
        return pickle.loads(self.data)  # bytes this process tree made itself


_FX_LOCK = threading.Lock()


def score_plan(gm: fx.GraphModule | ShippedGraph, plan: Plan, evaluate: Evaluate,
               finetune: Finetune | None = None, inputs: tuple | None = None,
               reset: tuple[str, ...] = (), space: MergeSpace | None = None) -> float:
    """Prune `gm` by `plan` (made on `space`, when given: `gm` is not analysed again),
    re-initialise the `reset` modules, fine-tune (if asked), and score the network in eval
    mode."""
    from ..passes.prune import prune

    with _FX_LOCK:
        if isinstance(gm, ShippedGraph):
            gm = gm.load()
        if inputs is not None:
            ensure_shapes(gm, inputs)
        model = prune(gm, plan, space)
        for name in reset:
            model.get_submodule(name).reset_parameters()
        if finetune is not None:
            model.train()
            model = finetune(model) or model
        return float(evaluate(model.eval()))


# ---- the estimator ------------------------------------------------------------------------
def _outcomes(executor: Executor | None, jobs: dict, run: Callable) -> Iterable:
    """`(key, score or exception)` as each job finishes; in this process, one by one, when
    there is no executor (so a killed run has saved everything finished before it)."""
    if executor is None:
        for key, args in jobs.items():
            try:
                yield key, run(*args)
            except Exception as exc:  # noqa: BLE001  (any failure is reported by name)
                yield key, exc
        return
    futures = {executor.submit(run, *args): key for key, args in jobs.items()}
    for future in as_completed(futures):
        exc = future.exception()
        yield futures[future], exc if exc is not None else future.result()


def _load_cache(path: Path | None, signature: str, reset_single: bool
                ) -> tuple[float | None, dict[Key, float]]:
    if path is None or not path.is_file():
        return None, {}
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not lines or lines[0].get("signature") != signature:
        raise TableError(f"importance cache {path} belongs to another graph; remove it")
    if lines[0].get("reset_single", False) != reset_single:
        raise TableError(f"importance cache {path} was made with reset_single="
                         f"{not reset_single}; remove it or pass the same setting")
    scores = {_key_from_json(rec["key"]): rec["score"] for rec in lines[1:]}
    return lines[0]["base_score"], scores


def _append(path: Path | None, record: dict) -> None:
    if path is None:
        return
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def reset_modules(space: MergeSpace, entry: Entry) -> tuple[str, ...]:
    """The conv (and its norm; a region's every branch) of a single-conv entry that keeps
    the conv: the authors re-initialise them before the short fine-tune, so that the entry
    measures how much the task needs that layer rather than scoring "no change"."""
    i, j, k, _ = entry
    if j != i + 1 or k == 0:
        return ()
    conv = space.convs[i]
    region = space.region(conv.name)
    if region is None:
        layers = (conv.name,)
    else:  # every branch's conv and norm
        nodes = {n.name: n for n in space.nodes}
        layers = tuple(nodes[n].target for n in region.nodes
                       if nodes[n].kind in (NodeKind.CONV, NodeKind.NORM))
    return (*layers, conv.norm) if conv.norm else layers


def importance_keys(space: MergeSpace) -> list[Key]:
    """Every key a table of `space` can hold, of each kind: the entries (LayerMerge's),
    Depth's keys where a block's end activations may change (`solve.depth.depth_keys`), and the
    name of each reducible conv (LayerOnly's removal of it). A method's own keys are
    `fxmerge.solve.get_method(name).importance_keys(space)`."""
    return [*space.entries, *depth_keys(space),
            *(c.name for c in space.convs if not c.irreducible)]


def importance_jobs(space: MergeSpace, keys: Iterable[Key] | None, reset_single: bool
                    ) -> dict[Key, tuple[Plan, tuple[str, ...]]]:
    """The plan to score for each key (default: `importance_keys`), and the modules to
    re-initialise; `TableError` for a key that is not one of the space's."""
    every = importance_keys(space)
    keys = every if keys is None else list(keys)
    known = set(every)
    unknown = [k for k in keys if k not in known]
    if unknown:
        raise TableError(f"importance key {unknown[0]!r} is not one of this space's")
    scores = space.conv_scores
    eq3: dict[int, list[Chosen]] = {}  # by block start: best_subsets, by block end
    for key in keys:
        if isinstance(key, Entry) and key.j - key.i > len(eq3.get(key.i, ())):
            eq3[key.i] = list(itertools.islice(best_subsets(space, key.i, scores),
                                               key.j - key.i))
    jobs: dict[Key, tuple[Plan, tuple[str, ...]]] = {}
    for key in keys:
        if isinstance(key, Entry):
            option = (key.k, key.dw)
            chosen = () if option == IDENTITY else eq3[key.i][key.j - key.i - 1][option][1]
            jobs[key] = (block_plan(space, key, scores, chosen),
                         reset_modules(space, key) if reset_single else ())
        elif isinstance(key, DepthKey):
            jobs[key] = (depth_plan(space, key), ())
        else:
            jobs[key] = (removal_plan(space, key), ())
    return jobs


def estimate_importance(
    space: MergeSpace,
    gm: fx.GraphModule,
    *,
    evaluate: Evaluate,
    finetune: Finetune | None = None,
    executor: Executor | None = None,
    cache: str | Path | None = None,
    retries: int = 1,
    keys: Iterable[Key] | None = None,
    reset_single: bool | None = None,
    progress: bool | None = None,
) -> ImportanceTable:
    """The paper's importance table: one pruned, briefly fine-tuned, scored network per key.

    `gm` is the graph `space` was analysed from. `evaluate(model) -> float` (higher is
    better) and `finetune(model)` are the user's. With
    `executor` (a process pool, a dask client's executor, ...) the entries run in parallel;
    they must then be picklable. `cache` is a JSON-lines file: each finished entry is
    appended at once, and a rerun skips what it holds. A failing entry is logged by name and
    retried `retries` times; the others are kept. `keys`: the keys to measure, by default
    every key of the space (`importance_keys`); a method's own are
    `fxmerge.solve.get_method(name).importance_keys(space)`.
    `reset_single` re-initialises the conv (and norm) of each single-conv entry before the
    fine-tune, as the authors do; by default it is on exactly when there is a `finetune`.
    """
    require_space_of(space, gm, "estimate_importance")
    path = Path(cache) if cache is not None else None
    if reset_single is None:
        reset_single = finetune is not None
    base, done = _load_cache(path, space.signature, reset_single)
    if base is None:
        base = float(evaluate(copy.deepcopy(gm).eval()))
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("")
        _append(path, {"signature": space.signature, "base_score": base,
                       "reset_single": reset_single})
    if not math.isfinite(base):
        raise TableError(f"evaluate() of the original network returned {base}")
    jobs = importance_jobs(space, keys, reset_single)
    inputs = example_inputs(gm)
    todo = {k: job for k, job in jobs.items() if k not in done}
    log.info("importance: %d keys, %d cached, %d to run", len(jobs), len(jobs) - len(todo),
             len(todo))
    failures: dict[Key, str] = {}
    bar = Progress(len(todo), "importance", "key", progress)
    graph = gm if executor is None else ShippedGraph(gm)
    for attempt in range(retries + 1):
        failures = {}
        local = space if executor is None else None  # a worker analyses its own copy
        args = {key: (graph, plan, evaluate, finetune, inputs, reset, local)
                for key, (plan, reset) in todo.items()}
        for key, outcome in _outcomes(executor, args, score_plan):
            if not isinstance(outcome, Exception) and not math.isfinite(outcome):
                outcome = ValueError(f"evaluate() returned {outcome}")
            if isinstance(outcome, Exception):
                failures[key] = f"{type(outcome).__name__}: {outcome}"
                log.warning("importance entry %s failed (attempt %d): %s", key, attempt + 1,
                            failures[key])
                continue
            done[key] = outcome
            _append(path, {"key": _key_to_json(key), "score": outcome})
            bar.update()
        todo = {k: todo[k] for k in failures}
        if not todo:
            break
    bar.close()
    if failures:
        listed = "; ".join(f"{k}: {why}" for k, why in failures.items())
        raise TableError(f"{len(failures)} importance entries failed after {retries + 1} "
                         f"attempts (the others are cached): {listed}")
    values = {k: math.exp(done[k] - base) for k in jobs}
    settings = ImportanceSettings(estimator="finetune" if finetune else "no fine-tuning",
                                  base_score=base, num_keys=len(values),
                                  single_convs_reinitialised=reset_single)
    return ImportanceTable(values, space.signature, settings, space.input_shapes)
