"""Measured budgets: the plan whose network, timed whole and side by side with the original
(BatchNorm folded), runs within a fraction of the original's measured latency.

The latency table predicts a plan's cost as a sum of isolated layers; the network also runs
what the search leaves out, and a layer costs something else in context. `solve_measured`
closes that gap by measurement: it solves at a table budget, transforms and times the plan
against the original, and re-solves at a corrected table budget (a secant step through the
measured points, bracketed) until the measured ratio lands in `[budget * (1 - tolerance),
budget]`. Every plan one `NetworkTimer` has measured calibrates the next solve's first
guess, and the model that predicts a plan's ratio from its table latency.

Whole networks are timed the way the user will run them (`Allocator`): in a process
started for each timing, none of the caller's malloc settings in it; by default one that
holds freed memory, as jemalloc, tcmalloc or glibc's variables do (`Allocator.HELD`), or a
plain glibc process (`Allocator.DEFAULT`, whose timings of large activations are bimodal:
docs/method.md §3b).
"""

from __future__ import annotations

import logging
import pickle
import warnings
from dataclasses import dataclass, replace
from itertools import pairwise

import torch
from torch import fx, nn

from ..backends.runtimes import Backend, get_backend, plan_runner, prepare
from ..backends.timing import (
    PREPARATIONS,
    Allocator,
    Relative,
    check_load,
    get_allocator,
    machine_description,
    time_against_reference,
    timing_inputs,
    using_threads,
    within,
)
from ..capture.trace import example_inputs
from ..errors import ArgumentError, InfeasibleBudget
from ..plan import Plan
from ..progress import Progress
from ..solve import fastest_latency, fastest_plan, solve
from ..space import MergeSpace, require_space_of
from ..tables import ImportanceTable, LatencyTable
from .worker import CannotRebuild, time_in_fresh_process

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Measurement:
    """One plan's network timed against the original: medians over fresh preparations,
    and the ratio's `scatter` over them (`Relative.scatter`)."""

    table_ms: float
    ms: float
    original_ms: float
    ratio: float
    spread: float
    scatter: float = 0.0

    def within(self, budget: float) -> bool:
        return within(self.ratio, self.scatter, budget)


NETWORK_REPEAT = 30  # interleaved rounds per whole-network timing, by default

class NetworkTimer:
    """Times the networks plans make of `gm` against its original, side by side, on one
    backend, device and batch (by default those its latency table was measured with);
    remembers each plan's measurement.

    A network prepared afresh (new weight buffers, a new session) can run several percent
    faster or slower than the same network prepared before, so each measurement prepares
    the plan's network and the original `preparations` times, times each pair for
    `repeat / preparations` interleaved rounds (at least one) and takes the median of the
    pairs' ratios (`preparations=1` where preparing is slow, as compiling can be).
    """

    def __init__(self, gm: fx.GraphModule, space: MergeSpace, *,
                 backend: Backend | str = Backend.EAGER, device: str | torch.device = "cpu",
                 batch_size: int | None = None, repeat: int = NETWORK_REPEAT, warmup: int = 5,
                 preparations: int = PREPARATIONS, threads: int | None = None,
                 allocator: Allocator | str = Allocator.HELD, isolate: bool = True
                 ) -> None:
        if min(preparations, repeat) < 1:
            raise ArgumentError(f"repeat and preparations must be positive, got {repeat}, "
                             f"{preparations}")
        require_space_of(space, gm, "NetworkTimer")
        self.gm, self.space = gm, space
        self.backend, self.device = get_backend(backend), torch.device(device)
        self.inputs = timing_inputs(gm, batch_size, self.device)
        self.repeat, self.warmup = repeat, warmup
        self.preparations = min(preparations, repeat)  # at least one round each
        with using_threads(threads) as used:  # checked, and torch's number as the default
            self.threads = used
        self.identity = Plan.identity(space)
        self.allocator = get_allocator(allocator)
        # a worker process as `allocator` says (on a CPU), else here with memory held
        self.isolate = isolate and self.device.type == "cpu"
        self._graph: bytes | None = None  # the graph as the worker is sent it, made once
        self.measurements: dict[tuple, Measurement] = {}
        self.load_average: float | None = None  # after the last measurement

    @classmethod
    def for_table(cls, gm: fx.GraphModule, space: MergeSpace, latency: LatencyTable,
                  **kwargs) -> NetworkTimer:
        """A timer on the backend, device, batch and threads `latency` was measured with."""
        s = latency.settings
        kwargs.setdefault("threads", s.threads)
        return cls(gm, space, backend=s.backend, device=s.device, batch_size=s.batch_size,
                   **kwargs)

    @property
    def settings(self) -> dict:
        return {"backend": self.backend, "device": str(self.device),
                "machine": machine_description(self.device),
                "batch_size": self.inputs[0].shape[0] if self.inputs[0].dim() else 1,
                "threads": self.threads, "load_average": self.load_average,
                "allocator": str(self.allocator) if self.isolate else "this process, held",
                "repeat": self.repeat,
                "preparations": self.preparations,
                "statistic": "median over fresh preparations of the ratio of medians of "
                             "interleaved rounds"}

    def measure(self, plan: Plan) -> Measurement:
        """`plan`'s network and the original, timed side by side (once per plan)."""
        if plan.blocks not in self.measurements:
            t = self.compare({"plan": plan})
            self.measurements[plan.blocks] = Measurement(
                plan.predicted_latency_ms, t["plan"].ms, t["original"].ms, t["plan"].ratio,
                max(t["plan"].spread, t["original"].spread), t["plan"].scatter)
            self.load_average = check_load("network timing")
        return self.measurements[plan.blocks]

    def compare(self, networks: dict[str, Plan | nn.Module],
                allocator: Allocator | str | None = None, repeat: int | None = None
                ) -> dict[str, Relative]:
        """Each of `networks` (a plan of the graph, or a module taking the same inputs)
        timed side by side against the original (`"original"` in the result), in
        `allocator`'s conditions (default: the timer's)."""
        networks = {"original": self.identity, **networks}
        timing = {"repeat": repeat or self.repeat, "preparations": self.preparations,
                  "warmup": self.warmup}
        allocator = self.allocator if allocator is None else get_allocator(allocator)
        if self.isolate:
            if self._graph is None:
                self._graph = _ship(self.gm)
            nets = {name: net if isinstance(net, Plan) else _ship(net)
                    for name, net in networks.items()}
            if self._graph is None or None in nets.values():
                self._time_here(allocator, "a network cannot be pickled (a parametrized "
                                "weight travels only as a state_dict)")
            else:
                try:
                    return time_in_fresh_process(
                        allocator, self._graph, example_inputs(self.gm), nets, self.inputs,
                        self.backend, self.threads, timing)
                except CannotRebuild as exc:
                    self._time_here(allocator, f"the timing process cannot rebuild the "
                                    f"network ({exc})")
        with using_threads(self.threads):  # (a worker sets its own)
            return time_against_reference(
                lambda: {name: plan_runner(self.gm, net, self.backend, self.inputs,
                                           space=self.space) if isinstance(net, Plan)
                         else prepare(net, self.backend, self.inputs)
                         for name, net in networks.items()}, self.inputs, **timing)

    def _time_here(self, allocator: Allocator, why: str) -> None:
        """From now on, time in this process with freed memory held (and record so)."""
        warnings.warn(f"timing in this process, with freed memory held, not in a "
                      f"{allocator} one: {why}", stacklevel=3)
        self.isolate = False

    def points(self, original_table_ms: float, exclude: tuple | None = None
               ) -> list[tuple[float, float]]:
        """(table latency, measured ratio) of every plan measured but the one with blocks
        `exclude`, and of the original."""
        return sorted({(original_table_ms, 1.0),
                       *((m.table_ms, m.ratio) for blocks, m in self.measurements.items()
                         if blocks != exclude)})


def _ship(module: nn.Module) -> bytes | None:
    """`module` as bytes for a timing worker; None where it cannot be pickled (a
    parametrized weight can only travel as a state_dict)."""
    try:
        return pickle.dumps(module)
    except Exception as exc:  # noqa: BLE001 (whatever pickling refuses: timed here instead)
        log.info("timing in this process: %s", exc)
        return None


def interpolate(points: list[tuple[float, float]], x: float) -> float:
    """y at `x` on the piecewise-linear curve through `points` (x, y > 0): below the first
    point, the line from the origin to it (never negative), beyond the last, the last
    segment extended."""
    pts = sorted(points)
    if len(pts) == 1 or x <= pts[0][0]:
        return pts[0][1] * x / pts[0][0]
    for (x0, y0), (x1, y1) in pairwise(pts):
        if x <= x1:
            break  # else: the last segment, extended
    return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)


def solve_measured(
    space: MergeSpace,
    latency: LatencyTable,
    importance: ImportanceTable,
    timer: NetworkTimer,
    *,
    budget: float,
    method: str = "layermerge",
    levels: int | None = None,
    tolerance: float = 0.1,
    rounds: int = 8,
    progress: bool | None = None,
) -> Plan:
    """The best `method` plan whose network measures within `budget` (a fraction of the
    original's measured latency), its ratio's scatter over fresh preparations included
    (`Measurement.within`), and, where the plans allow, above `budget * (1 - tolerance)`.
    The plan records its measurement in `plan.measured`."""
    if not 0 < tolerance < 1:
        raise ArgumentError(f"tolerance must be in (0, 1), got {tolerance}")
    if not 0 < budget:
        raise ArgumentError(f"budget must be positive, got {budget}")
    if latency.settings.threads is not None and latency.settings.threads != timer.threads:
        raise ArgumentError(
            f"the latency table was timed with {latency.settings.threads} threads and the "
            f"timer times with {timer.threads}: a budget holds only at the thread count it "
            "was measured with; use NetworkTimer.for_table, or time the table again")
    original = latency.identity_latency(space)
    low, aim = budget * (1 - tolerance), budget * (1 - tolerance / 2)
    floor = fastest_latency(space, latency, importance, method)
    if budget < floor / original:  # the table alone shows it: refuse before timing
        raise InfeasibleBudget(
            f"no {method} plan can measure within {budget:.1%} of the original: the fastest "
            f"one's table latency is {floor / original:.1%} of the original's ({floor:.4g} "
            f"of {original:.4g} ms), and what the search cannot change only adds to it",
            plan=fastest_plan(space, latency, importance, method))
    below, above = (0.0, 0.0), (float("inf"), float("inf"))  # own (table ms, ratio) bracket
    tried: list[tuple[Plan, Measurement, float]] = []
    table_ms = _guess(timer.points(original), aim)
    bar = Progress(rounds, f"measured budget ({method} at {budget:.0%})", "timing", progress)
    for _ in range(rounds):
        table_ms = min(max(table_ms, floor), original * max(1.0, budget))
        try:
            plan = solve(space, latency, importance, budget_ms=table_ms * (1 + 1e-9),
                         method=method, levels=levels)
        except InfeasibleBudget:  # levels too coarse this close to the fastest plan
            floor = table_ms * 1.01
            continue
        # the calibration's prediction, from the other plans' timings
        predicted = interpolate(timer.points(original, exclude=plan.blocks),
                                plan.predicted_latency_ms)
        m = timer.measure(plan)
        tried.append((plan, m, predicted))
        bar.update(note=f"a plan measured {m.ratio:.1%}")
        log.info("%s: table %.4g ms -> measured %.1f%% (aim %.1f%%)", method, m.table_ms,
                 100 * m.ratio, 100 * aim)
        aim = min(aim, (low + budget - m.scatter) / 2)  # the middle of the window left
        fits = m.within(budget)
        if fits and low <= m.ratio:
            break
        if not fits:
            above = min(above, (m.table_ms, m.ratio))
        else:
            below = max(below, (m.table_ms, m.ratio))
        if above[0] <= floor * (1 + 1e-9):
            break  # the fastest plan is too slow
        pts = [p for p in (below, above) if 0 < p[0] < float("inf")]
        table_ms = _guess(pts if len(pts) == 2 else timer.points(original), aim)
        # the next plan must lie strictly between the bracket's plans
        gap = 1e-3 * original
        if above[0] - below[0] <= 2 * gap:
            break
        table_ms = min(max(table_ms, below[0] + gap), above[0] - gap)
    bar.close()
    fitting = [t for t in tried if t[1].within(budget)]
    if not tried:
        raise InfeasibleBudget(f"no {method} plan found near its fastest table latency "
                               f"{floor:.4g} ms: use more levels")
    if not fitting:
        over = min(tried, key=lambda t: t[1].ratio)
        scatter = f" ± {over[1].scatter:.1%}" if over[1].scatter else ""
        raise InfeasibleBudget(
            f"no {method} plan measured within {budget:.1%} of the original's latency on "
            f"{timer.backend} (the fastest plan tried measures {over[1].ratio:.1%}{scatter} "
            "over fresh preparations; the lowest "
            f"table latency tried is {min(t[1].table_ms for t in tried) / original:.1%} of "
            "the original's)",
            plan=_record(over[0], over[1], over[2], timer, budget, tolerance, len(tried),
                         over_budget=True))
    plan, m, predicted = max(fitting, key=lambda t: t[1].ratio)
    return _record(plan, m, predicted, timer, budget, tolerance, len(tried))


def _record(plan: Plan, m: Measurement, predicted: float, timer: NetworkTimer, budget: float,
            tolerance: float, rounds: int, over_budget: bool = False) -> Plan:
    """`plan` with its measurement (`plan.measured`) and measured budget."""
    measured = {**timer.settings, "budget": budget, "tolerance": tolerance,
                "ratio": round(m.ratio, 4), "ms": round(m.ms, 6),
                "original_ms": round(m.original_ms, 6), "spread": round(m.spread, 4),
                "scatter": round(m.scatter, 4), "predicted_ratio": round(predicted, 4),
                "rounds": rounds,
                "in_window": budget * (1 - tolerance) <= m.ratio and m.within(budget)}
    extra = {**plan.extra, "over_budget": True} if over_budget else plan.extra
    return replace(plan, budget=budget, budget_ms=round(budget * m.original_ms, 6),
                   measured=measured, extra=extra)


def _guess(points: list[tuple[float, float]], aim: float) -> float:
    """The table latency at which the (table ms, ratio) curve through `points` reaches
    `aim`: the inverse of `interpolate`, on points ordered by ratio."""
    return interpolate([(r, t) for t, r in points], aim)


__all__ = ["Measurement", "NetworkTimer", "solve_measured"]
