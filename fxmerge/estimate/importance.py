"""The paper's importance estimator (eq. 4): for each key, prune the network as the key's
method says (its `Probe`), fine-tune it briefly (the user's `finetune`), score it (the
user's `evaluate`), and store `exp(score - score of the original)`. Keys are independent,
so they run on any `concurrent.futures.Executor`; each finished key is appended to a cache
file at once.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import pickle
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import Executor, as_completed
from pathlib import Path

from torch import fx, nn

from ..capture.trace import ensure_shapes, example_inputs
from ..errors import TableError
from ..plan import Plan
from ..progress import Progress
from ..solve import probes
from ..space import MergeSpace, require_space_of
from ..tables import ImportanceSettings, ImportanceTable, Key
from ..tables.base import key_from_json, key_to_json

log = logging.getLogger(__name__)

Evaluate = Callable[[nn.Module], float]
Finetune = Callable[[nn.Module], nn.Module | None]


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
    scores = {key_from_json(rec["key"]): rec["score"] for rec in lines[1:]}
    return lines[0]["base_score"], scores


def _append(path: Path | None, record: dict) -> None:
    if path is None:
        return
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


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
    every method's (`fxmerge.solve.importance_keys(space)`; one method's own:
    `importance_keys(space, [name])`); each is scored on its method's `Probe`.
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
    jobs = {key: (p.plan, p.reset if reset_single else ())
            for key, p in probes(space, keys).items()}
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
            _append(path, {"key": key_to_json(key), "score": outcome})
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
