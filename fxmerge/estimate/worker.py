"""The processes whole networks are timed in, one per timing: a fresh interpreter
(running `fxmerge.estimate.worker.main`), started with the environment a deploy in those
conditions has (a plain one; or glibc told to hold freed memory), so that none of this
process's malloc settings (the latency table's `steady_memory`) reach the timings. Requests
and answers are pickled over its standard input and output: bytes this process made."""

from __future__ import annotations

import atexit
import copy
import gc
import os
import pickle
import subprocess
import sys
from typing import Any

import torch

from ..backends.runtimes import Backend, plan_runner, prepare
from ..backends.timing import HELD_ENVIRONMENT, Allocator, Relative, time_against_reference
from ..capture.trace import ensure_shapes
from ..errors import BackendError
from ..plan import Plan


class CannotRebuild(Exception):
    """The worker cannot rebuild a network it was sent (a class it cannot import: one
    defined in the caller's `__main__`); the caller times it in its own process."""


def _send(stream: Any, value: Any) -> None:
    """`value` pickled straight onto the stream (no copy of a large graph's bytes)."""
    pickle.dump(value, stream, protocol=pickle.HIGHEST_PROTOCOL)
    stream.flush()


def _receive(stream: Any) -> Any:
    return pickle.load(stream)  # (bytes we made); EOFError once the stream ends


class Worker:
    """One timing process in `allocator`'s conditions (its own, from start to end: glibc
    adjusts its default thresholds as a process runs, so each timing starts afresh)."""

    def __init__(self, allocator: Allocator) -> None:
        env = {k: v for k, v in os.environ.items() if k not in HELD_ENVIRONMENT}
        if allocator is Allocator.HELD:
            env.update(HELD_ENVIRONMENT)
        self.allocator = allocator
        self.process = subprocess.Popen(
            [sys.executable, "-c", f"from {__name__} import main; main()"], env=env,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE)

    def call(self, *args: Any) -> dict[str, Relative]:
        """`time_networks(*args)` in the worker; its exception raised here."""
        try:
            _send(self.process.stdin, args)
            ok, value = _receive(self.process.stdout)
        except (EOFError, OSError):
            code = self.process.poll()
            raise BackendError(f"the {self.allocator} timing process stopped (exit code "
                               f"{code}); its error is above") from None
        if not ok:
            raise value
        return value

    def close(self) -> None:
        self.process.stdin.close()
        if self.process.wait(timeout=60) is None:
            self.process.kill()


_RUNNING: set[Worker] = set()


def time_in_fresh_process(allocator: Allocator, *args: Any) -> dict[str, Relative]:
    """`time_networks(*args)` in a process started for it, in `allocator`'s conditions."""
    w = Worker(allocator)
    _RUNNING.add(w)
    try:
        return w.call(*args)
    finally:
        w.close()
        _RUNNING.discard(w)


@atexit.register
def _stop() -> None:
    for w in _RUNNING:
        w.process.kill()




def time_networks(graph: bytes, example: tuple, networks: dict[str, Any], inputs: tuple,
                  backend: Backend, threads: int, timing: dict) -> dict[str, Relative]:
    """In a worker: the networks (a `Plan` of the graph, or a pickled module) timed side by
    side against `"original"`, as this process's allocator runs them."""
    gm = ensure_shapes(_rebuild(graph), example)  # (pickling renames nodes: analysed here)
    space = networks["original"].space_of(gm)
    modules = {name: _rebuild(net) for name, net in networks.items() if isinstance(net, bytes)}

    def make() -> dict[str, Any]:
        gc.collect()  # the last preparation's networks, reference cycles (GraphModules)
        return {name: plan_runner(gm, net, backend, inputs, space=space)
                if isinstance(net, Plan) else prepare(copy.deepcopy(modules[name]).eval(),
                                                      backend, inputs)
                for name, net in networks.items()}

    torch.set_num_threads(threads)
    return time_against_reference(make, inputs, hold=False, **timing)


def _rebuild(data: bytes) -> Any:
    try:
        return pickle.loads(data)  # (bytes the caller made)
    except (AttributeError, ImportError, pickle.UnpicklingError) as exc:
        raise CannotRebuild(f"{type(exc).__name__}: {exc}") from None


def main() -> None:
    """The worker's loop: a request in, its answer (or exception) out, until stdin ends."""
    requests, answers = sys.stdin.buffer, os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # prints go to stderr
    while True:
        try:
            args = _receive(requests)
        except EOFError:
            return
        try:
            _send(answers, (True, time_networks(*args)))
        except Exception as exc:  # noqa: BLE001 (sent back and raised in the caller)
            _send(answers, (False, exc))


if __name__ == "__main__":
    main()
