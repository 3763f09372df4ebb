"""The importance table on a real Dask cluster of worker processes, one of them killed."""

import json
import math
import os
import sys
from pathlib import Path

import pytest
import torch
from helpers import randomize_batchnorm
from models import small_net

import fxmerge
from fxmerge.estimate import OutputAgreement, estimate_importance

distributed = pytest.importorskip("distributed")
import cloudpickle  # comes with distributed

# the workers cannot import this test module by name: send its classes by value
cloudpickle.register_pickle_by_value(sys.modules[__name__])

SPEC = [("conv", 8, 3, 1, True, False), ("res", [("c", 3, False), ("c", 3, False)]),
        ("conv", 8, 3, 1, True, True), ("conv", 8, 1, 2, True, False)]


class KillsItsWorkerOnce:
    """An `evaluate` that, inside a worker, once at least `after` entries are in the cache,
    kills its own worker process (hard, mid-task) the first time it runs."""

    def __init__(self, inner, cache: Path, marker: Path, after: int) -> None:
        self.inner, self.cache, self.marker, self.after = inner, cache, marker, after

    def __call__(self, model) -> float:
        try:
            distributed.get_worker()
        except ValueError:  # the original's score, in the calling process
            return self.inner(model)
        finished = len(self.cache.read_text().splitlines()) - 1
        if finished >= self.after and not self.marker.exists():
            self.marker.write_text(str(os.getpid()))
            os._exit(1)
        return self.inner(model)


@pytest.fixture(scope="module")
def client():
    cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                       dashboard_address=None)
    with distributed.Client(cluster) as c:
        yield c
    cluster.close()


def test_dask_cluster_survives_a_killed_worker(client, tmp_path):
    gm = fxmerge.trace(randomize_batchnorm(small_net(SPEC)), torch.randn(2, 3, 12, 12))
    space = fxmerge.analyze(gm)
    agreement = OutputAgreement(gm, torch.randn(2, 3, 12, 12))
    cache, marker = tmp_path / "imp.jsonl", tmp_path / "killed"
    evaluate = KillsItsWorkerOnce(agreement, cache, marker, after=3)

    table = estimate_importance(space, gm, evaluate=evaluate, executor=client.get_executor(),
                                cache=cache)

    assert marker.exists(), "no worker was killed: the test did not test anything"
    serial = estimate_importance(space, gm, evaluate=agreement)
    assert table.values.keys() == serial.values.keys()
    for key, value in serial.values.items():
        assert math.isclose(table[key], value, rel_tol=1e-5), key
    # every key was written to the cache exactly once, those finished before the kill too
    keys = [json.dumps(json.loads(line)["key"]) for line in cache.read_text().splitlines()[1:]]
    assert len(keys) == len(set(keys)) == len(serial.values)
