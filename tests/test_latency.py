import importlib.util
import json

import pytest
import torch
import torchvision
from models import small_net

import fxmerge
from fxmerge.backends import timing
from fxmerge.backends.timing import Timing, time_against_reference, time_interleaved
from fxmerge.tables import latency as latency_mod
from fxmerge.tables.latency import Check

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


def test_measure_latency_times_each_signature_in_two_passes(monkeypatch):
    space = tiny_space()
    calls = []
    real = latency_mod.time_layer
    monkeypatch.setattr(latency_mod, "time_layer",
                        lambda sig, **kw: calls.append(sig) or real(sig, **kw))
    table = fxmerge.measure_latency(space, warmup=1, repeat=2, check=False)
    assert len(set(calls)) == table.settings.num_layers
    assert all(2 <= calls.count(c) <= latency_mod.MAX_PASSES for c in set(calls))
    assert set(table.values) == set(space.entries)
    assert all(v > 0 for v in table.values.values())
    s = table.settings
    assert (s.backend, s.device, s.repeat, s.statistic) == ("eager", "cpu", 2, "median")
    calls.clear()
    fxmerge.measure_latency(space, warmup=1, repeat=2, deduplicate=False, check=False)
    assert len(calls) >= 2 * space.num_entries


def test_a_layer_whose_passes_disagree_is_timed_until_two_agree(monkeypatch):
    """A stall of the machine during one pass (5x) does not decide the entry: the layer is
    timed again until two of its timings agree within 10%, and their mean is its value."""
    space = tiny_space()
    stalled = latency_mod.entry_layer(space, space.entries[0])
    seen: dict = {}

    def timed(sig, **kw):
        n = seen[sig] = seen.get(sig, 0) + 1
        ms = ({1: 1.0, 2: 5.0, 3: 1.04}[n] if sig == stalled else 2.0)
        return fxmerge.backends.timing.Timing(ms, ms, ms, 3)

    monkeypatch.setattr(latency_mod, "time_layer", timed)
    table = fxmerge.measure_latency(space, warmup=1, repeat=2, check=False)
    assert seen[stalled] == 3 and all(n == 2 for sig, n in seen.items() if sig != stalled)
    assert table[space.entries[0]] == pytest.approx(1.02)
    assert table.settings.retimed == 1 and table.settings.unsettled == 0


def test_interrupted_measurement_resumes_from_its_cache(monkeypatch, tmp_path):
    space = tiny_space()
    cache = tmp_path / "lat.json"
    real, calls = latency_mod.time_layer, []

    def flaky(sig, **kw):
        if len(calls) == 3:
            raise KeyboardInterrupt
        calls.append(sig)
        return real(sig, **kw)

    monkeypatch.setattr(latency_mod, "time_layer", flaky)
    with pytest.raises(KeyboardInterrupt):
        fxmerge.measure_latency(space, warmup=1, repeat=2, cache=cache, check=False)
    assert len(json.loads(cache.read_text())["timings"]) == 3
    done = list(calls)
    calls.clear()
    monkeypatch.setattr(latency_mod, "time_layer",
                        lambda sig, **kw: calls.append(sig) or real(sig, **kw))
    table = fxmerge.measure_latency(space, warmup=1, repeat=2, cache=cache, check=False)
    first_pass = calls[:table.settings.num_layers - len(done)]
    assert not set(first_pass) & set(done)  # the first pass resumed where it stopped
    assert len(set(calls)) == table.settings.num_layers
    # other settings: the cache is not reused
    calls.clear()
    fxmerge.measure_latency(space, warmup=1, repeat=3, cache=cache, check=False)
    assert len(calls) >= 2 * table.settings.num_layers


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
    calls = []

    def loaded(sig, **kw):
        calls.append(sig)
        return fxmerge.backends.timing.Timing(1000.0, 1000.0, 1000.0, 1)

    monkeypatch.setattr(latency_mod, "time_layer", loaded)
    with pytest.warns(UserWarning, match=r"table sums to .*x the whole original network"):
        table = fxmerge.measure_latency(space, gm, warmup=1, repeat=2)
    assert len(calls) == 2 * 2 * table.settings.num_layers  # the table timed twice (2 passes)
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

    def fake(nets, x, *, repeat, warmup):
        rounds.append(repeat)
        p, o = next(plan_ms), next(original_ms)
        return {"plan": Timing(p, p * 0.9, p * 1.1, repeat), "original": Timing(o, o, o, repeat)}

    monkeypatch.setattr(timing, "time_interleaved", fake)
    out = time_against_reference(lambda: made.append(1) or {"plan": None, "original": None},
                                 torch.zeros(1), repeat=10, preparations=3)
    assert len(made) == 3 and rounds == [4, 4, 4]
    assert out["plan"].ms == 6.0 and out["original"].ms == 10.0
    assert out["plan"].ratio == 0.5  # median of 0.5, 0.9, 0.3; not 6 / 10
    assert out["original"].ratio == 1.0
    assert out["plan"].spread == pytest.approx(0.2)


def test_each_layer_is_timed_to_a_time_budget(monkeypatch):
    """A slow layer gets a few runs, a fast one all of them: the table's cost follows the
    convs that matter, not the huge merged kernels no budget would pick."""
    clock = {"now": 0.0, "calls": 0}
    monkeypatch.setattr(timing.time, "perf_counter", lambda: clock["now"])

    def layer(ms):
        def run():
            clock["now"] += ms / 1e3
            clock["calls"] += 1
        return run

    slow = timing.time_callable(layer(100.0), torch.device("cpu"), warmup=10, repeat=30,
                                seconds=0.3)
    assert slow.n == timing.MIN_TIMED_RUNS and slow.ms == pytest.approx(100.0)
    assert clock["calls"] <= 1 + 1 + timing.MIN_TIMED_RUNS  # a first run, a warm-up, 3 timed
    clock["calls"] = 0
    fast = timing.time_callable(layer(0.1), torch.device("cpu"), warmup=10, repeat=30,
                                seconds=0.3)
    assert fast.n == 30 and clock["calls"] == 1 + 9 + 30
    few = timing.time_callable(layer(0.1), torch.device("cpu"), warmup=0, repeat=2,
                               seconds=0.3)
    assert few.n == 2  # never more runs than asked


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
