"""Whole networks are timed as the user runs them: in a fresh process with the allocator
the user names (a plain one by default), never in the caller's, whose malloc the latency
table tuned."""

import gc
import os
import pickle
import time
import weakref
from pathlib import Path

import pytest
import torch
from models import small_net
from torch import nn

import fxmerge
from fxmerge import Allocator
from fxmerge.capture.trace import example_inputs
from fxmerge.estimate import worker
from fxmerge.estimate.measured import NetworkTimer
from fxmerge.estimate.worker import Worker

LAYERS = [("conv", 8, 3, 1, True, False), ("conv", 8, 3, 1, True, False),
          ("conv", 8, 3, 1, True, False)]


@pytest.fixture(scope="module")
def problem():
    gm = fxmerge.trace(small_net(LAYERS), torch.randn(1, 3, 32, 32))
    return gm, fxmerge.analyze(gm)


def _environment(pid: int) -> dict[str, str]:
    """The environment process `pid` was started with, once it runs the worker's code."""
    for _ in range(100):  # (until its exec has happened)
        if b"fxmerge.estimate.worker" in Path(f"/proc/{pid}/cmdline").read_bytes():
            break
        time.sleep(0.05)
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode().split("=", 1) for item in raw if b"=" in item)


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs /proc")
def test_each_allocator_times_in_a_fresh_process_of_its_own(problem, monkeypatch):
    gm, space = problem
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "4096")  # the caller's own tuning
    plan = fxmerge.Plan.random(space, 0)
    for allocator in Allocator:
        timer = NetworkTimer(gm, space, batch_size=2, repeat=2, warmup=1, allocator=allocator)
        m = timer.measure(plan)
        assert m.ms > 0 and 0.05 < m.ratio < 20
        assert timer.settings["allocator"] == str(allocator) and timer.isolate
        process = Worker(allocator)
        try:
            assert process.process.pid != os.getpid()
            env = _environment(process.process.pid)
        finally:
            process.close()
        if allocator is Allocator.HELD:
            assert env["MALLOC_MMAP_THRESHOLD_"] == env["MALLOC_TRIM_THRESHOLD_"] == str(1 << 30)
        else:  # a plain process: none of the caller's malloc settings
            assert "MALLOC_MMAP_THRESHOLD_" not in env and "MALLOC_TRIM_THRESHOLD_" not in env


class Doubled(nn.Module):
    """A module the timing process cannot import (defined in a test module)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return 2 * self.inner(x)


def test_a_network_the_process_cannot_rebuild_is_timed_here_and_said(problem):
    gm, space = problem
    timer = NetworkTimer(gm, space, batch_size=2, repeat=2, warmup=1)
    with pytest.warns(UserWarning, match="timing in this process, with freed memory held"):
        t = timer.compare({"doubled": Doubled(fxmerge.transform(gm, fxmerge.Plan.identity(
            space)))})
    assert t["doubled"].ms > 0 and not timer.isolate
    assert timer.settings["allocator"] == "this process, held"


def test_the_final_timing_gives_both_allocators(problem):
    gm, space = problem
    job = fxmerge.Job(gm, torch.randn(2, 3, 32, 32), latency={"warmup": 1, "repeat": 3},
                      timing={"repeat": 2, "allocator": "default"})
    merged = fxmerge.transform(gm, fxmerge.Plan.random(space, 1), space)
    t = job.time(merged)
    assert t["allocator"] == "default" and t["other"]["allocator"] == "held"
    assert t["merged_ms"] > 0 and t["other"]["merged_ms"] > 0
    with pytest.raises(fxmerge.ArgumentError,
                       match="allocator must be one of held, default, got 'tcmalloc'"):
        NetworkTimer(gm, space, allocator="tcmalloc")


def test_a_worker_frees_each_preparation_before_it_makes_the_next(problem, monkeypatch):
    """A prepared network is a reference cycle (a GraphModule and its graph): a worker that
    collected none between preparations held all three at once (1.7 GB for ResNet-50 at
    batch 1, 1.2 GB since)."""
    gm, space = problem
    alive: list[weakref.ref] = []

    def three_preparations(make, x, **timing):
        for _ in range(3):
            made = make()
            assert all(ref() is None for ref in alive), "the last preparation is still held"
            alive.extend(weakref.ref(net) for net in made.values())
            del made
        return {}

    monkeypatch.setattr(worker, "time_against_reference", three_preparations)
    enabled = gc.isenabled()
    gc.disable()  # only the worker's own collection may free them
    try:
        worker.time_networks(pickle.dumps(gm), example_inputs(gm),
                             {"original": fxmerge.Plan.identity(space),
                              "plan": fxmerge.Plan.random(space, seed=1)},
                             (torch.randn(1, 3, 32, 32),), "eager", 1, {})
    finally:
        if enabled:
            gc.enable()
    assert len(alive) == 6
