import importlib.util
import itertools
import json
import os
import platform
import random
import subprocess
import sys
import weakref

import pytest
import torch
import torchvision
from models import small_net

import fxmerge
from fxmerge.backends import timing
from fxmerge.backends import timing as harness
from fxmerge.backends.timing import Timing, time_against_reference, time_interleaved
from fxmerge.estimate import latency as latency_mod
from fxmerge.tables import Check

MBV2_EXCLUDE = ["features.0.0", "features.18.0"]


def tiny():
    """A traced small residual net and its space."""
    net = small_net([("conv", 4, 3, 1, True, False), ("res", [("c", 3, False), ("c", 3, False)]),
                     ("conv", 8, 1, 2, True, False)])
    gm = fxmerge.trace(net, torch.randn(1, 3, 16, 16))
    return gm, fxmerge.analyze(gm)


def tiny_space():
    return tiny()[1]


def test_signatures_are_deduplicated_on_mobilenet_v2():
    gm = fxmerge.trace(torchvision.models.mobilenet_v2(), torch.randn(1, 3, 224, 224))
    space = fxmerge.analyze(gm, exclude=MBV2_EXCLUDE)
    sigs = {e: latency_mod.entry_layer(space, e, batch_size=8) for e in space.entries}
    assert len(sigs) == 391
    distinct = set(sigs.values())
    assert len(distinct) < 200  # measured: 137 distinct convs
    first = sigs[fxmerge.Entry(5, 8, 3, False)]
    assert first.input_shape == (8, 24, 56, 56) and first.out_channels == 24
    # the block ends at a projection (no activation): timed with the added ReLU6, as the
    # authors do, unless add_activations is off
    assert first.activation == "relu6" and first.groups == 1
    off = fxmerge.analyze(gm, exclude=MBV2_EXCLUDE, add_activations=False)
    assert latency_mod.entry_layer(off, fxmerge.Entry(5, 8, 3, False)).activation is None
    dw = sigs[fxmerge.Entry(6, 7, 3, True)]
    assert dw.groups == 144 and dw.activation == "relu6"


class FakeMachine:
    """Stands in for `prepare` and `clock` in the layers' timing harness: each layer "runs"
    in a time set by its conv (its weight's size, in microseconds), times `factor(call)`,
    and nothing is computed; the whole network, timed by the table's check, runs for
    real."""

    def __init__(self, factor=lambda call: 1.0, stop_after=None):
        self.factor, self.stop_after = factor, stop_after
        self.calls, self.builds, self.last = 0, 0, None

    def prepare(self, module, backend, x):
        self.builds += 1
        conv = module[0] if isinstance(module, torch.nn.Sequential) else module
        return lambda x: setattr(self, "last", conv.weight.numel())

    def clock(self, fn, device):
        if self.calls == self.stop_after:
            raise KeyboardInterrupt
        fn()
        self.calls += 1
        return self.last / 1e3 * self.factor(self.calls)

    def install(self, monkeypatch):
        real = harness.clock

        def time_network(fn, device, *, warmup, repeat):
            return harness.Timing.of([real(fn, device) for _ in range(repeat)])

        monkeypatch.setattr(harness, "prepare", self.prepare)
        monkeypatch.setattr(harness, "clock", self.clock)
        monkeypatch.setattr(latency_mod, "time_callable", time_network)
        return self


def test_measure_latency_times_each_distinct_layer_side_by_side(tmp_path):
    space = tiny_space()
    cache = tmp_path / "lat.json"
    table = fxmerge.measure_latency(space, warmup=1, repeat=5, check=False, cache=cache)
    runs = json.loads(cache.read_text())["timings"]
    assert len(runs) == table.settings.num_layers < space.num_entries
    assert all(len(r) >= 5 for r in runs.values())  # tiny layers: every round, or more
    assert set(table.values) == set(space.entries)
    assert all(v > 0 for v in table.values.values())
    s = table.settings
    assert (s.backend, s.device, s.repeat, s.statistic) == ("eager", "cpu", 5,
                                                            latency_mod.STATISTIC)
    fxmerge.measure_latency(space, warmup=1, repeat=2, deduplicate=False, check=False,
                            cache=cache)
    assert len(json.loads(cache.read_text())["timings"]) == len(
        [e for e in space.entries if (e.k, e.dw) != fxmerge.space.IDENTITY])


def assert_true_values(space, table):
    """Every entry at the time `FakeMachine` runs its layer at (its weight's size in us)."""
    for e in space.entries:
        if (e.k, e.dw) != fxmerge.space.IDENTITY:
            layer = latency_mod.entry_layer(space, e).module(torch.device("cpu"), torch.float32)
            conv = layer[0] if isinstance(layer, torch.nn.Sequential) else layer
            assert table[e] == pytest.approx(conv.weight.numel() / 1e3)


def test_a_stall_of_the_machine_reaches_every_layer_alike(monkeypatch):
    """The machine runs 5x slower for a stretch of runs: timed side by side, each layer
    gets a few of the stalled runs among many, and every entry keeps its true value (timed
    one layer after another, the stall decided whole entries: once 5x between two tables)."""
    space = tiny_space()
    machine = FakeMachine(lambda call: 5.0 if 30 <= call < 45 else 1.0).install(monkeypatch)
    table = fxmerge.measure_latency(space, warmup=1, repeat=20, check=False)
    assert_true_values(space, table)
    assert machine.builds == table.settings.num_layers  # one group, built once


def test_each_round_runs_the_layers_in_a_new_order(monkeypatch):
    """A small layer's time depends on what ran before it (the cache it leaves), so no
    layer keeps the same neighbours: the rounds' orders differ, beyond one order and its
    reverse, and each layer follows several others."""
    space = tiny_space()
    machine = FakeMachine().install(monkeypatch)
    order = []

    def clock(fn, device):
        order.append(fn)
        return machine.clock(fn, device)

    monkeypatch.setattr(harness, "clock", clock)
    table = fxmerge.measure_latency(space, warmup=1, repeat=12, check=False)
    n = table.settings.num_layers
    order = [fn for fn in order if order.count(fn) > 1]  # not a build's first, untimed run
    assert n >= 4 and len(order) == 12 * n  # every layer in every round
    rounds = [tuple(order[r * n:(r + 1) * n]) for r in range(12)]
    assert len(set(rounds)) > 2
    follows = {}
    for before, fn in itertools.pairwise(order):
        follows.setdefault(fn, set()).add(before)
    assert all(len(f) >= 3 for f in follows.values())


def test_layers_of_one_input_shape_share_one_input(monkeypatch):
    """A group holds one input per input shape (and `_group_bytes` counts it once), so
    MobileNetV2's table at batch 8 is one group of 741 MiB, not two of 1,466."""
    space = tiny_space()
    machine = FakeMachine().install(monkeypatch)
    seen = {}

    def prepare(module, backend, x):
        seen.setdefault(tuple(x.shape), set()).add(x.data_ptr())
        return machine.prepare(module, backend, x)

    monkeypatch.setattr(harness, "prepare", prepare)
    table = fxmerge.measure_latency(space, warmup=1, repeat=3, check=False)
    assert len(seen) < table.settings.num_layers  # layers that share a shape
    assert all(len(inputs) == 1 for inputs in seen.values())


def test_a_layer_slowed_in_most_of_its_runs_keeps_its_own_time(monkeypatch):
    """A shared machine's noise only slows runs: three runs in four slowed up to 3x (the
    median moves by about 1.5x), and every entry keeps its true value, its fastest runs'."""
    space = tiny_space()
    FakeMachine(lambda call: 1.0 if call % 4 == 0 else random.Random(call).uniform(1.05, 3.0)
                ).install(monkeypatch)
    table = fxmerge.measure_latency(space, warmup=1, repeat=60, check=False)
    assert_true_values(space, table)
    assert table.settings.spread > 0.3  # what a median would have carried


def test_groups_of_layers_are_linked_by_anchors_timed_in_each(monkeypatch):
    """Over `GROUP_BYTES`, layers are built a group at a time, the smallest few (anchors)
    in every group: the machine running 2x slower from some point on, during a later group,
    is divided out, and every entry keeps its true value at one speed, the table's typical."""
    space = tiny_space()
    machine = FakeMachine(lambda call: 2.0 if call > 80 else 1.0).install(monkeypatch)
    monkeypatch.setattr(harness, "GROUP_BYTES", 1)  # one layer per group, with anchors
    table = fxmerge.measure_latency(space, warmup=1, repeat=8, check=False)
    n, anchors = table.settings.num_layers, harness.ANCHORS
    assert machine.builds == (n - anchors) * (anchors + 1)
    speeds = set()
    for e in space.entries:
        if (e.k, e.dw) != fxmerge.space.IDENTITY:
            layer = latency_mod.entry_layer(space, e).module(torch.device("cpu"), torch.float32)
            conv = layer[0] if isinstance(layer, torch.nn.Sequential) else layer
            speeds.add(round(table[e] / (conv.weight.numel() / 1e3), 9))
    assert len(speeds) == 1 and speeds <= {1.0, 2.0}


def test_interrupted_measurement_resumes_from_its_cache(monkeypatch, tmp_path):
    space = tiny_space()
    cache = tmp_path / "lat.json"
    FakeMachine(stop_after=40).install(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        fxmerge.measure_latency(space, warmup=1, repeat=8, cache=cache, check=False)
    saved = json.loads(cache.read_text())
    assert 0 < sum(map(len, saved["timings"].values())) < sum(saved["targets"].values())
    machine = FakeMachine().install(monkeypatch)
    table = fxmerge.measure_latency(space, warmup=1, repeat=8, cache=cache, check=False)
    done = json.loads(cache.read_text())
    timed = sum(map(len, done["timings"].values())) - sum(map(len, saved["timings"].values()))
    unfinished = table.settings.num_layers - sum(
        len(r) == saved["targets"][k] for k, r in saved["timings"].items())
    assert timed == machine.calls - unfinished  # each run timed once in all
    assert all(done["timings"][k][:len(r)] == r for k, r in saved["timings"].items())
    assert all(len(r) == done["targets"][k] == 8 for k, r in done["timings"].items())
    assert len(done["timings"]) == table.settings.num_layers
    # other settings: the cache is not reused
    machine = FakeMachine().install(monkeypatch)
    fxmerge.measure_latency(space, warmup=1, repeat=3, cache=cache, check=False)
    assert machine.calls == (1 + 3) * table.settings.num_layers
    # nor one whose layers were summed up by another statistic (an earlier fxmerge's median)
    earlier = json.loads(cache.read_text())
    assert earlier["settings"]["statistic"] == latency_mod.STATISTIC
    earlier["settings"]["statistic"] = "median"
    cache.write_text(json.dumps(earlier))
    machine = FakeMachine().install(monkeypatch)
    fxmerge.measure_latency(space, warmup=1, repeat=3, cache=cache, check=False)
    assert machine.calls == (1 + 3) * table.settings.num_layers


def test_table_is_refused_for_another_graph():
    table = fxmerge.measure_latency(tiny_space(), warmup=0, repeat=1)
    other = fxmerge.analyze(fxmerge.trace(small_net([("conv", 4, 3, 1, True, False)]),
                                          torch.randn(1, 3, 8, 8)))
    with pytest.raises(fxmerge.TableError, match="another graph"):
        table.check(other)


@pytest.mark.skipif(importlib.util.find_spec("torch_tensorrt") is not None,
                    reason="torch-tensorrt is installed")
def test_tensorrt_backend_says_how_to_install():
    with pytest.raises(fxmerge.BackendError, match=r"fxmerge\[trt\]"):
        fxmerge.measure_latency(tiny_space(), backend="tensorrt", warmup=0, repeat=1)


def test_compile_backend_runs():
    net = small_net([("conv", 4, 3, 1, True, False), ("conv", 4, 3, 1, True, False)])
    gm = fxmerge.trace(net, torch.randn(1, 3, 8, 8))
    space = fxmerge.analyze(gm)
    table = fxmerge.measure_latency(space, gm, backend="inductor", warmup=1, repeat=2)
    assert table.settings.backend == "inductor" and len(table) == space.num_entries


def test_timing_statistics_are_robust_to_an_outlier():
    t = fxmerge.backends.timing.Timing.of([1.0, 1.1, 0.9, 1.0, 50.0])
    assert t.ms == 1.0 and t.n == 5 and t.q1 <= 1.0 <= t.q3 and t.spread < 30
    assert fxmerge.backends.timing.Timing.of([2.0]).spread == 0.0


def test_interleaved_rounds_reverse_the_order_every_other_round():
    calls = []
    nets = {name: (lambda x, n=name: calls.append(n)) for name in ("a", "b", "c")}
    timings = time_interleaved(nets, torch.zeros(1), repeat=3, warmup=1)
    assert calls == [*"abc", *"abc", *"cba", *"abc"]  # warm-up, then three rounds
    assert {name: t.n for name, t in timings.items()} == {"a": 3, "b": 3, "c": 3}


def test_table_is_checked_against_the_whole_network():
    gm, space = tiny()
    table = fxmerge.measure_latency(space, gm, warmup=1, repeat=3)
    s = table.settings
    low, high = latency_mod.PLAUSIBLE_TABLE_SHARE
    assert s.network_ms > 0 and s.spread is not None
    # (a table of layers this small can be flagged: call overhead; the record must agree)
    assert (s.check is Check.OK) == (low <= s.table_share <= high)
    assert s.table_share == pytest.approx(
        table.identity_latency(space) / s.network_ms, rel=1e-3)


def test_a_table_timed_under_load_is_retimed_then_flagged(monkeypatch):
    """Convs that time 100x slower than the network they make up cannot be right: the table
    is timed again, and when it stays wrong the warning and the record say so, and solve
    repeats the warning."""
    gm, space = tiny()
    machine = FakeMachine(lambda call: 1e6).install(monkeypatch)
    with pytest.warns(UserWarning, match=r"table sums to .*x the whole original network"):
        table = fxmerge.measure_latency(space, gm, warmup=1, repeat=2)
    assert machine.builds == 2 * table.settings.num_layers  # the table timed twice
    assert table.settings.check is Check.FAILED
    again = fxmerge.LatencyTable.from_json(table.to_json())
    imp = fxmerge.ImportanceTable.from_values(space, {e: 1.0 for e in space.entries})
    with pytest.warns(UserWarning, match="failed its check"):
        fxmerge.solve(space, again, imp, budget=0.9)


@pytest.mark.skipif(importlib.util.find_spec("onnxruntime") is None,
                    reason="onnxruntime is not installed (pip install 'fxmerge[onnx]')")
# each of this tiny table's layers pays a session call that the whole network pays once, so
# its share of the network can fall outside the plausible range: the check may warn here
@pytest.mark.filterwarnings("ignore:latency table. the table sums to")
def test_onnxruntime_backend_times_layers_and_runs_networks_exactly():
    from helpers import randomize_batchnorm, relative_error

    gm, space = tiny()
    table = fxmerge.measure_latency(space, gm, backend="onnxruntime", warmup=1, repeat=2)
    assert table.settings.backend == "onnxruntime" and table.settings.network_ms > 0
    assert len(table) == space.num_entries
    net = randomize_batchnorm(small_net([("conv", 4, 3, 1, True, False),
                                         ("conv", 4, 3, 1, True, False)]))
    x = torch.randn(2, 3, 8, 8)
    gm = fxmerge.trace(net, x)
    plan = fxmerge.Plan.random(fxmerge.analyze(gm), seed=1)
    run = fxmerge.backends.plan_runner(gm, plan, "onnxruntime", (x,))
    with torch.no_grad():
        expected = fxmerge.transform(gm, plan)(x)
    assert relative_error(expected, torch.from_numpy(run(x)[0])) < 1e-5


def test_time_against_reference_prepares_afresh_and_takes_medians(monkeypatch):
    """Each preparation is a fresh `make()`, timed for repeat / preparations rounds; the
    result is the median latency, the median of the per-preparation ratios and the largest
    spread."""
    made, rounds = [], []
    plan_ms = iter([5.0, 9.0, 6.0])  # the plan's median in each preparation
    original_ms = iter([10.0, 10.0, 20.0])

    def fake(nets, x, *, repeat, warmup, hold):
        rounds.append(repeat)
        p, o = next(plan_ms), next(original_ms)
        return {"plan": Timing(p, p * 0.9, p * 1.1, repeat), "original": Timing(o, o, o, repeat)}

    monkeypatch.setattr(timing, "time_interleaved", fake)
    out = time_against_reference(lambda: made.append(1) or {"plan": None, "original": None},
                                 torch.zeros(1), repeat=10, preparations=3)
    assert len(made) == 3 and rounds == [4, 4, 4]
    assert out["plan"].ms == 6.0 and out["original"].ms == 10.0
    assert out["plan"].ratio == 0.5  # median of 0.5, 0.9, 0.3; not 6 / 10
    assert out["plan"].scatter == pytest.approx(0.3)  # half their range
    assert out["original"].ratio == 1.0 and out["original"].scatter == 0.0
    assert out["plan"].spread == pytest.approx(0.2)


def test_each_layer_is_timed_to_a_time_budget(monkeypatch):
    """A slow layer gets a few runs, a fast one every round: the table's cost follows the
    convs that matter, not the huge merged kernels no budget would pick."""
    layers = {name: latency_mod.LayerSpec((1, 2, 4, 4), 2, 1, 1, 0, 1, None)
              for name in ("slow", "fast")}
    cost = {"slow": 100.0, "fast": 0.1}  # ms per run
    names, running = iter(layers), []

    def prepare(module, backend, x):
        name = next(names)
        return lambda x: running.append(name)

    def clock(fn, device):
        fn()
        return cost[running[-1]]

    monkeypatch.setattr(harness, "prepare", prepare)
    monkeypatch.setattr(harness, "clock", clock)
    samples, targets = {}, {}
    harness.time_layers(layers, samples, targets, backend="eager",
                            device=torch.device("cpu"), dtype=torch.float32, warmup=10,
                            repeat=30, seconds=0.3, desc="", progress=False, save=lambda: None)
    assert len(samples["slow"]) == harness.MIN_TIMED_RUNS and len(samples["fast"]) == 30
    assert targets == {"slow": harness.MIN_TIMED_RUNS, "fast": 30}


def test_timed_layers_are_freed_before_held_memory_is_given_back(monkeypatch):
    """`steady_memory` trims malloc on exit: the layers must be gone by then, or what
    they held stays with the process (450 MB after ResNet-50's table)."""
    layers = {name: latency_mod.LayerSpec((1, 2, 4, 4), 2, 1, 1, 0, 1, None)
              for name in ("a", "b")}
    modules: list[weakref.ref] = []
    alive_at_trim: list[int] = []

    def prepare(module, backend, x):
        modules.append(weakref.ref(module))
        return module

    def glibc(function):
        if function == "malloc_trim":
            return lambda pad: alive_at_trim.append(sum(m() is not None for m in modules))
        return lambda *args: 1

    monkeypatch.setattr(harness, "prepare", prepare)
    monkeypatch.setattr(harness, "_glibc", glibc)
    harness.time_layers(layers, {}, {}, backend="eager", device=torch.device("cpu"),
                        dtype=torch.float32, warmup=1, repeat=3, seconds=0.01, desc="",
                        progress=False, save=lambda: None)
    assert len(modules) == 2 and alive_at_trim == [0]


def test_timed_layers_are_built_without_random_initialisation(monkeypatch):
    real = torch.nn.init.kaiming_uniform_

    def only_on_meta(tensor, *args, **kwargs):  # a meta tensor holds no data: free
        if tensor.device.type != "meta":
            pytest.fail("a timed layer was randomly initialised")
        return real(tensor, *args, **kwargs)

    monkeypatch.setattr(torch.nn.init, "kaiming_uniform_", only_on_meta)
    sig = latency_mod.LayerSpec((1, 8, 12, 12), 8, 3, 1, 4, 8, "relu", dilation=4)
    module = sig.module(torch.device("cpu"), torch.float32)
    conv = module[0]
    assert (conv.dilation, conv.groups, conv.padding) == ((4, 4), 8, (4, 4))
    assert module(torch.randn(1, 8, 12, 12)).shape == (1, 8, 12, 12)
    assert "k3 d4 s1 p4 g8 relu" in sig.label


def test_fastest_takes_the_fastest_tenth_and_groups_are_linked_by_their_anchors():
    """Group 1 ran 2x slower (the machine, in its stretch of time): the anchor "a", timed in
    both, links them, and "b", timed in group 1 only, is divided back to group 0's speed."""
    assert harness.fastest([5.0, 1.0, 9.0]) == 1.0  # at least one run
    assert harness.fastest([float(n) for n in range(20, 0, -1)]) == 1.5
    samples = {"a": [harness.Run(0, 0, 1.0), harness.Run(0, 1, 1.2), harness.Run(1, 2, 2.0),
                     harness.Run(1, 3, 2.4)],
               "b": [harness.Run(1, 2, 6.0), harness.Run(1, 3, 8.0)]}
    runs = harness.link_groups(samples)
    assert harness.fastest(runs["a"]) == 1.0 and runs["b"] == [3.0, 4.0]


def test_large_weights_share_one_buffer_and_are_counted_once():
    """Weights over `SHARED_BYTES` are views of one constant buffer (a group holds its
    largest once), smaller ones their own."""
    big = latency_mod.LayerSpec((1, 1024, 7, 7), 2048, 5, 1, 2, 1, "relu")
    bigger = latency_mod.LayerSpec((1, 2048, 7, 7), 2048, 5, 1, 2, 1, "relu")
    small = latency_mod.LayerSpec((1, 16, 7, 7), 16, 3, 1, 1, 1, None)
    layers = [big, bigger, small]
    assert big.weight_bytes(torch.float32) > harness.SHARED_BYTES
    weights = harness.ConstantWeights(torch.device("cpu"), torch.float32, max(
        layer.weight_bytes(torch.float32) // 4 for layer in layers))
    a, b, c = (layer.module(torch.device("cpu"), torch.float32, weights) for layer in layers)
    assert a[0].weight.untyped_storage().data_ptr() == b[0].weight.untyped_storage().data_ptr()
    assert c.weight.untyped_storage().data_ptr() != a[0].weight.untyped_storage().data_ptr()
    assert torch.all(a[0].weight == harness.WEIGHT) and torch.all(c.weight == harness.WEIGHT)
    assert harness._group_bytes(layers, torch.float32) == (
        bigger.weight_bytes(torch.float32) + small.weight_bytes(torch.float32)
        + (1024 + 2048 + 16) * 49 * 4 + 2048 * 49 * 4)


FAULTS = """
import contextlib, resource, sys, torch
from fxmerge.backends.timing import steady_memory
torch.set_num_threads(2)
conv, x = torch.nn.Conv2d(32, 96, 1), torch.randn(8, 32, 112, 112)
faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt
with torch.inference_mode(), (steady_memory() if sys.argv[1] == "held"
                                  else contextlib.nullcontext()):
    for _ in range(3):  # the heap settles
        conv(x)
    counts = []
    for _ in range(5):
        before = faults()
        conv(x)
        counts.append(faults() - before)
print(sorted(counts)[2])
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc")
def test_timing_holds_memory_so_a_large_output_page_faults_once(tmp_path):
    """A conv's 38.5 MB output (9,408 pages): by default glibc maps it afresh, and faults
    it, on every run (what made one build of a layer up to 4x slower than the next); under
    `steady_memory` it is faulted on the first run only. Each in a fresh process."""
    script = tmp_path / "faults.py"
    script.write_text(FAULTS)
    env = {k: v for k, v in os.environ.items()  # as a fresh shell has it (Dask sets
           if not k.startswith(("MALLOC_", "OMP_", "MKL_"))}  # some in its process)
    faults = {mode: int(subprocess.run([sys.executable, str(script), mode], check=True,
                                       capture_output=True, text=True, env=env
                                       ).stdout.split()[-1])
              for mode in ("default", "held")}
    assert faults["default"] > 5000 and faults["held"] < 500, faults
