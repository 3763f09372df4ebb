import json
import math
import multiprocessing
from concurrent.futures import ProcessPoolExecutor

import pytest
import torch
from helpers import randomize_batchnorm
from models import small_net
from torch import nn

import fxmerge
from fxmerge.estimate import OutputAgreement, agreement_importance, estimate_importance
from fxmerge.estimate.agreement import CachedOutputs
from fxmerge.models.demo import DemoMobileNetV2
from fxmerge.passes.prune import prune_graph
from fxmerge.solve.depth import depth_keys
from fxmerge.solve.layermerge import block_plan
from fxmerge.space import kernel_of

SPEC = [("conv", 8, 3, 1, True, False), ("res", [("c", 3, False), ("c", 3, False)]),
        ("conv", 8, 3, 1, True, True), ("conv", 8, 1, 2, True, False)]


@pytest.fixture
def gm():
    return fxmerge.trace(randomize_batchnorm(small_net(SPEC)), torch.randn(2, 3, 12, 12))


@pytest.fixture
def space(gm):
    return fxmerge.analyze(gm)


def no_layeronly(space):
    """Every key but LayerOnly's per-conv ones."""
    return [*space.entries, *depth_keys(space)]


def has_kernel(model, k):
    return any(isinstance(m, nn.Conv2d) and m.kernel_size[0] == k for m in model.modules())


def merges_to_5x5(model):
    """A pruned block that will merge into a 5x5 conv has 2 padding on its first conv."""
    return any(isinstance(m, nn.Conv2d) and m.padding[0] == 2 for m in model.modules())


def test_table_covers_every_entry_and_unchanged_blocks_score_one(space, gm):
    table = agreement_importance(space, gm, torch.randn(4, 3, 12, 12))
    reducible = [c.name for c in space.convs if not c.irreducible]
    assert set(table.values) == set(space.entries) | set(reducible)
    assert all(0 < v <= 1 + 1e-9 for v in table.values.values())
    for c in space.convs:  # a single-conv block with its conv kept changes nothing
        opt = kernel_of(space, [c.index])
        assert table[fxmerge.Entry(c.index - 1, c.index, opt.kernel, opt.depthwise)] == 1.0
    merged = [v for e, v in table.values.items() if isinstance(e, tuple) and e.j - e.i > 1]
    assert min(merged) < 1.0


def test_finetune_is_called_on_a_trainable_copy(space, gm):
    seen = []

    def finetune(model):
        seen.append(model.training)

    estimate_importance(space, gm, evaluate=lambda m: 0.0, finetune=finetune,
                        keys=no_layeronly(space))
    assert len(seen) == space.num_entries and all(seen)


def test_killed_run_resumes_from_its_cache(space, gm, tmp_path):
    cache = tmp_path / "imp.jsonl"
    batch = torch.randn(2, 3, 12, 12)
    agree = OutputAgreement(gm, batch)
    calls = []

    def dying(model):
        if len(calls) == 6:
            raise KeyboardInterrupt  # the run is killed after the base and 5 entries
        calls.append(1)
        return agree(model)

    with pytest.raises(KeyboardInterrupt):
        estimate_importance(space, gm, evaluate=dying, cache=cache)
    lines = cache.read_text().splitlines()
    assert len(lines) == 6  # header + 5 finished entries
    finished = {tuple(json.loads(line)["key"]) if isinstance(json.loads(line)["key"], list)
                else json.loads(line)["key"] for line in lines[1:]}

    rerun = []

    def counting(model):
        rerun.append(1)
        return agree(model)

    table = estimate_importance(space, gm, evaluate=counting, cache=cache)
    total = len(table)
    assert len(rerun) == total - len(finished)  # nothing finished is recomputed, base cached
    fresh = agreement_importance(space, gm, batch)
    for key, value in fresh.values.items():
        assert table[key] == pytest.approx(value)


def test_failing_entries_are_named_retried_and_the_others_kept(space, gm, tmp_path):
    cache = tmp_path / "imp.jsonl"
    agree = OutputAgreement(gm, torch.randn(2, 3, 12, 12))
    flaky_seen, calls = set(), []

    def evaluate(model):
        calls.append(1)
        if merges_to_5x5(model):
            raise RuntimeError("out of memory (simulated)")
        key = str(model.code)
        if len(calls) > 1 and has_kernel(model, 1) and key not in flaky_seen:  # once, then OK
            flaky_seen.add(key)
            raise RuntimeError("transient")
        return agree(model)

    with pytest.raises(fxmerge.TableError, match=r"failed after 2 attempts") as info:
        estimate_importance(space, gm, evaluate=evaluate, cache=cache, retries=1)
    failing = [e for e in space.entries if e.k == 5]
    assert failing
    for e in failing:
        assert str(e) in str(info.value)
    records = [json.loads(line) for line in cache.read_text().splitlines()[1:]]
    expected = space.num_entries + sum(not c.irreducible for c in space.convs) - len(failing)
    assert len(records) == expected  # every other entry is kept, transient ones included


def test_process_pool_executor(space, gm):
    batch = torch.randn(2, 3, 12, 12)
    # spawn, not fork: a forked child can deadlock in torch's thread pools
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=2, mp_context=spawn) as pool:
        table = estimate_importance(space, gm, evaluate=OutputAgreement(gm, batch),
                                    executor=pool, keys=no_layeronly(space))
    serial = estimate_importance(space, gm, evaluate=OutputAgreement(gm, batch),
                                 keys=no_layeronly(space))
    assert table.values.keys() == serial.values.keys()
    for k, v in serial.values.items():
        assert math.isclose(table[k], v, rel_tol=1e-5)


def test_cache_of_another_graph_is_refused(space, gm, tmp_path):
    cache = tmp_path / "imp.jsonl"
    cache.write_text(json.dumps({"signature": "other", "base_score": 0.0}) + "\n")
    with pytest.raises(fxmerge.TableError, match="another graph"):
        estimate_importance(space, gm, evaluate=lambda m: 0.0, cache=cache)


def test_single_conv_entries_are_reinitialised_before_the_finetune(space, gm):
    """The authors re-initialise the conv (and norm) of a single-conv entry before the short
    fine-tune; with a fine-tune that changes nothing, what is measured is that reset."""
    evaluate = OutputAgreement(gm, torch.randn(4, 3, 12, 12))

    def unchanged(model):
        return model

    table = estimate_importance(space, gm, evaluate=evaluate, finetune=unchanged,
                                keys=no_layeronly(space))
    assert table.settings.single_convs_reinitialised
    singles = [e for e in space.entries if e.j == e.i + 1 and e.k > 0]
    plain = estimate_importance(space, gm, evaluate=evaluate, finetune=unchanged,
                                keys=no_layeronly(space),
                                reset_single=False)
    assert singles and all(plain[e] == pytest.approx(1.0) for e in singles)
    assert all(table[e] < 0.999 for e in singles)
    # entries of several convs are never reset: both tables agree on them
    for e in space.entries:
        if e.j > e.i + 1:
            assert table[e] == pytest.approx(plain[e])


def test_a_cache_made_with_another_reset_setting_is_refused(space, gm, tmp_path):
    evaluate = OutputAgreement(gm, torch.randn(4, 3, 12, 12))
    cache = tmp_path / "imp.jsonl"
    estimate_importance(space, gm, evaluate=evaluate, cache=cache, keys=[])
    with pytest.raises(fxmerge.TableError, match="reset_single"):
        estimate_importance(space, gm, evaluate=evaluate, cache=cache, reset_single=True)


def test_fast_proxy_equals_scoring_each_pruned_network():
    """agreement_importance re-uses the original's values where a plan changes nothing; it
    must give what OutputAgreement gives on each key's whole pruned network, for LayerMerge
    entries, Depth's activation choices and LayerOnly's removals alike."""
    x = torch.randn(4, 1, 16, 16)
    gm = fxmerge.trace(randomize_batchnorm(DemoMobileNetV2()), x)
    space = fxmerge.analyze(gm, exclude=DemoMobileNetV2.EXCLUDE)
    assert space.add_activations and depth_keys(space)
    fast = agreement_importance(space, gm, x)
    keys = [*list(space.entries)[::4], *depth_keys(space)[::3],
            *[c.name for c in space.convs if not c.irreducible][:3]]
    slow = estimate_importance(space, gm, evaluate=OutputAgreement(gm, x), keys=keys)
    assert set(slow.values) == set(keys) and set(keys) <= set(fast.values)
    assert min(slow.values.values()) < 0.99
    for key, value in slow.values.items():
        assert fast[key] == pytest.approx(value, rel=1e-5, abs=1e-9), key
    assert fast.settings.calibration_batch == 4


def test_only_what_a_plan_changes_is_recomputed(space, gm):
    """A plan's window holds the nodes it edits and those reading them, no more; the rest
    is the original's graph, run on the window's values (stacked for keys ending together)."""
    x = torch.randn(2, 3, 12, 12)
    cache = CachedOutputs(gm, x)
    identity = prune_graph(gm, space, fxmerge.Plan.identity(space))
    assert len(identity.graph.nodes) == 1 and cache.run(identity) is cache.output
    last = max((e for e in space.entries if e.j - e.i > 1), key=lambda e: e.i)
    plan = block_plan(space, last, space.conv_scores)
    changed = prune_graph(gm, space, plan)
    order = [n.name for n in gm.graph.nodes]
    window = order[changed.start:changed.stop]
    assert space.units[last.i].input not in window  # the block's input: computed before it
    assert {u.output for u in space.units[last.i:last.j - 1]} <= set(window)
    assert 0 < len(window) < len(order) // 2
    with torch.no_grad():
        full = fxmerge.prune(gm, plan).eval()(x)
    assert torch.allclose(cache.run(changed), full, rtol=1e-6, atol=1e-7)
    assert cache.batchable()
    stacked = cache.outputs([cache.cut(changed)] * 3)
    for out in stacked:
        assert torch.allclose(out, full, rtol=1e-6, atol=1e-7)

class MixesSamples(nn.Module):
    """A conv stack whose middle subtracts the batch mean: samples are not independent."""

    def __init__(self):
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
                               nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                               nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                               nn.Conv2d(8, 4, 3, padding=1))

    def forward(self, x):
        x = self.a(x)
        return self.b(x - x.mean(0, keepdim=True))


def test_keys_ending_together_share_the_rest_only_where_samples_stay_apart():
    """Stacking keys on the batch needs a graph that keeps samples apart; where it does not
    (a batch mean), each key runs alone, and the values still equal scoring each whole
    pruned network."""
    x = torch.randn(3, 3, 10, 10)
    gm = fxmerge.trace(MixesSamples(), x)
    space = fxmerge.analyze(gm)
    assert not CachedOutputs(gm, x).batchable()
    fast = agreement_importance(space, gm, x)
    slow = estimate_importance(space, gm, evaluate=OutputAgreement(gm, x))
    assert min(slow.values.values()) < 0.99
    for key, value in slow.values.items():
        assert fast[key] == pytest.approx(value, rel=1e-5, abs=1e-9), key
