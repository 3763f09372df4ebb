"""Depth's activation choice where the network has none (its paper's MobileNetV2 variant):
the keys, the networks they score, the solve, and the pruned and merged networks."""

import json
import math

import pytest
import torch
from helpers import randomize_batchnorm, relative_error

import fxmerge
from fxmerge.estimate import agreement_importance
from fxmerge.models import DemoMobileNetV2
from fxmerge.solve.depth import (
    activation_choices,
    activation_options,
    depth_choices,
    depth_key,
    depth_keys,
    depth_plan,
)
from fxmerge.solve.layermerge import block_plan

X = torch.randn(2, 1, 16, 16)


@pytest.fixture(scope="module")
def spaces():
    gm = fxmerge.trace(randomize_batchnorm(DemoMobileNetV2()), X)
    on = fxmerge.analyze(gm, exclude=DemoMobileNetV2.EXCLUDE)
    off = fxmerge.analyze(gm, exclude=DemoMobileNetV2.EXCLUDE, add_activations=False)
    return gm, on, off


def spans_with(space, i, j):
    return sorted([(p - 1, p) for p in range(1, space.L + 1) if not i < p <= j] + [(i, j)])


def added_nodes(gm):
    return [n for n in gm.graph.nodes if str(n.target).startswith("fxmerge_added_act")]


def test_each_key_names_the_network_it_scores(spaces):
    _, space, off = spaces
    bare = [p for p in range(1, space.L + 1) if space.activation(p) is None]
    assert bare and space.add_activations
    assert all(activation_options(space, p) == (False, True) for p in bare)
    assert all(activation_options(off, p) == (False,) for p in bare) and not depth_keys(off)
    identity = fxmerge.Plan.identity(space).blocks
    everything = {c.name for c in space.convs}
    kinds = set()
    assert list(depth_choices(space)) == list(space.blocks)
    for i, j in space.blocks:
        choices = activation_choices(space, i, j)
        assert len(depth_choices(space)[(i, j)]) == len(choices)
        # the authors' restriction: a block starting without an activation chooses its start
        free = 0 if len(activation_options(space, i)) > 1 else 1
        assert len({c[free] for c in choices}) == len(choices) == len(set(
            activation_options(space, i) if free == 0 else activation_options(space, j)))
        for start, end in choices:
            plan = fxmerge.Plan.from_positions(space, spans_with(space, i, j), everything,
                                           activation={i: start, j: end})
            key = depth_key(space, i, j, start, end)
            assert (start, end, key) in depth_choices(space)[(i, j)]  # what the solver reads
            kinds.add(type(key).__name__)
            if key is None:  # the original network
                assert plan.blocks == identity
            elif isinstance(key, fxmerge.Entry):  # LayerMerge's full entry, same network
                assert plan.blocks == block_plan(space, key, space.conv_scores).blocks
            else:
                assert key in depth_keys(space)
                assert plan.blocks == depth_plan(space, key).blocks != identity
    assert kinds == {"NoneType", "Entry", "DepthKey"}


def test_a_key_adds_the_activations_it_names(spaces):
    gm, space, _ = spaces
    key = next(k for k in depth_keys(space) if k.start and k.end and k.i > 0
               and space.activation(k.i) is None and space.activation(k.j) is None)
    plan = depth_plan(space, key)
    pruned = fxmerge.prune(gm, plan).eval()
    added = added_nodes(pruned)
    assert len(added) == len(plan.added_activations(space)) == 2
    with torch.no_grad():
        assert relative_error(pruned(X), fxmerge.merge(pruned)(X)) <= 1e-5
        assert relative_error(pruned(X), gm(X)) > 1e-4  # the activations change the function


def test_importance_measures_the_depth_keys(spaces):
    gm, space, _ = spaces
    table = agreement_importance(space, gm, X, keys=[*space.entries, *depth_keys(space)])
    assert set(table.values) == set(space.entries) | set(depth_keys(space))
    assert all(table[k] < 1 for k in depth_keys(space))  # every such network differs
    only_lm = agreement_importance(space, gm, X, keys=space.entries)
    assert set(only_lm.values) == set(space.entries)
    again = fxmerge.ImportanceTable.from_json(table.to_json())
    assert again.values == table.values


def tables(space, reward):
    """Latency from the kernel size; importance that rewards (or punishes) every added
    activation and mildly punishes merging."""
    lat = fxmerge.LatencyTable.from_values(space, {e: 0.5 + 0.05 * e.k ** 2
                                                   for e in space.entries})
    values = {e: math.exp(-0.01 * (e.j - e.i - 1)
                          + reward * (space.end_activation(e.i, e.j) != space.activation(e.j)))
              for e in space.entries}  # a full entry adds one at a bare end (the rule)
    for key in depth_keys(space):
        added = sum(space.activation(p) is None and on
                    for p, on in ((key.i, key.start), (key.j, key.end)) if p > 0)
        values[key] = math.exp(reward * added - 0.01 * (key.j - key.i - 1))
    return lat, fxmerge.ImportanceTable.from_values(space, values)


@pytest.mark.parametrize("reward", [0.5, -0.5])
def test_depth_chooses_activations_by_importance_and_the_merge_is_exact(spaces, reward):
    gm, space, _ = spaces
    lat, imp = tables(space, reward)
    plan = fxmerge.solve(space, lat, imp, budget=0.8, method="depth")
    plan.validate(space)
    assert fxmerge.Plan.from_json(plan.to_json()) == plan
    added = plan.added_activations(space)
    assert bool(added) == (reward > 0)
    assert plan.predicted_latency_ms <= 0.8 * lat.identity_latency(space) + 1e-9
    pruned = fxmerge.prune(gm, plan).eval()
    assert len(added_nodes(pruned)) == len(added)
    with torch.no_grad():
        assert relative_error(pruned(X), fxmerge.merge(pruned)(X)) <= 1e-5


def test_plans_that_add_activations_need_the_setting(spaces):
    gm, space, off = spaces
    lat, imp = tables(space, 0.5)
    data = json.loads(fxmerge.solve(space, lat, imp, budget=0.8, method="depth").to_json())
    data["add_activations"], data["signature"] = False, off.signature
    with pytest.raises(fxmerge.PlanError, match="adds an activation after .* add_activations"):
        fxmerge.prune(gm, fxmerge.Plan.from_json(json.dumps(data)))


def test_plans_of_the_old_format_are_refused(spaces):
    _, space, _ = spaces
    data = json.loads(fxmerge.Plan.identity(space).to_json())
    del data["format"]
    with pytest.raises(fxmerge.PlanError, match="format 1 .* solve again"):
        fxmerge.Plan.from_json(json.dumps(data))
    data = json.loads(fxmerge.Plan.identity(space).to_json())
    del data["blocks"][0]["activation"]
    with pytest.raises(fxmerge.PlanError, match="missing 'activation'"):
        fxmerge.Plan.from_json(json.dumps(data))


@pytest.mark.parametrize("raw", [
    {"block": [1, 3], "start_activation": True},
    {"block": [1], "start_activation": True, "end_activation": False},
    {"block": [1, -3], "start_activation": True, "end_activation": False},
    {"block": [1, True], "start_activation": True, "end_activation": False},
    {"block": [1, 3], "start_activation": 1, "end_activation": False},
    {"block": [1, 3], "start_activation": True, "end_activation": False, "k": 3},
])
def test_malformed_depth_keys_are_refused_by_name(raw):
    text = json.dumps({"kind": "importance", "signature": "x", "values": [[raw, 1.0]]})
    with pytest.raises(fxmerge.TableError, match="is not a Depth key"):
        fxmerge.ImportanceTable.from_json(text)
    good = {"block": [1, 3], "start_activation": True, "end_activation": False}
    table = fxmerge.ImportanceTable.from_json(json.dumps(
        {"kind": "importance", "signature": "x", "values": [[good, 1.0]]}))
    assert list(table.values) == [fxmerge.DepthKey(1, 3, True, False)]
