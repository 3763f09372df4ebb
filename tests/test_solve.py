import itertools
import math
import random
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from models import small_net

import fxmerge
from fxmerge.solve import layeronly
from fxmerge.solve.depth import activation_choices, activation_options, depth_keys
from fxmerge.solve.dp import discretise


@st.composite
def small_spaces(draw):
    """Random conv chains of 2..8 convs: kernels, strides, depthwise, residual pairs."""
    spec, n = [], 0
    target = draw(st.integers(2, 8))
    while n < target:
        if target - n >= 2 and draw(st.integers(0, 3)) == 0:
            spec.append(("res", [("c", draw(st.sampled_from([1, 3])), draw(st.booleans()))
                                 for _ in range(2)]))
            n += 2
        else:
            spec.append(("conv", draw(st.sampled_from([4, 8])), draw(st.sampled_from([1, 3, 5])),
                         draw(st.sampled_from([1, 1, 1, 2])), draw(st.booleans()),
                         draw(st.booleans())))
            n += 1
    gm = fxmerge.trace(small_net(spec), torch.randn(1, 3, 16, 16))
    return fxmerge.analyze(gm)


def random_tables(space, seed):
    rng = random.Random(seed)
    lat = fxmerge.LatencyTable.from_values(
        space, {e: rng.uniform(0.8, 1.2) * (0.5 + 0.05 * e.k**2) for e in space.entries})
    values = {e: math.exp(-rng.uniform(0, 0.3) * (e.j - e.i - 1)) for e in space.entries}
    values.update({name: rng.uniform(0.5, 1.0) for name in layeronly.importance_keys(space)})
    # an added activation may help or hurt (Depth's choices at ends without one)
    values.update({key: math.exp(rng.uniform(-0.1, 0.3)) for key in depth_keys(space)})
    return lat, fxmerge.ImportanceTable.from_values(space, values)


def tilings(space, start=0):
    """Every sequence of legal blocks from `start` to L."""
    if start == space.L:
        yield []
        return
    for i, j in space.blocks:
        if i == start:
            for rest in tilings(space, j):
                yield [(i, j), *rest]


def brute_layermerge(space, lat, imp, unit, levels):
    """Best total importance of the discretised problem within `levels` units."""
    best = -math.inf
    for tiling in tilings(space):
        for choice in itertools.product(*[space.kernel_options(i, j) for i, j in tiling]):
            entries = [fxmerge.Entry(i, j, k, dw) for (i, j), (k, dw) in zip(tiling, choice)]
            if sum(discretise(lat[e], unit) for e in entries) <= levels:
                best = max(best, sum(imp[e] for e in entries))
    return best


def split_latencies(space, lat, i, j):
    """Latency of every way to run span (i, j) as consecutive legal merged blocks."""
    full = lat[space.full_entries[(i, j)]]
    yield full
    for m in range(i + 1, j):
        if (i, m) in space.blocks and (m, j) in space.blocks:
            for head in split_latencies(space, lat, i, m):
                yield head + lat[space.full_entries[(m, j)]]


def depth_value(space, imp, i, j, start, end):
    """The Depth paper's additive importance of span (i, j) with these end activations:
    log I of what it changes, 0 when it changes nothing."""
    as_is = (i == 0 or space.activation(i) is not None,
             space.activation(j) is not None or (j - i > 1 and space.add_activations))
    if (start, end) != as_is:
        return math.log(imp[fxmerge.DepthKey(i, j, start, end)])
    return 0.0 if j == i + 1 else math.log(imp[space.full_entries[(i, j)]])


def brute_depth(space, lat, imp, unit, levels):
    best = -math.inf
    for tiling in tilings(space):
        cost = sum(discretise(min(split_latencies(space, lat, i, j)), unit) for i, j in tiling)
        if cost > levels:
            continue
        ends = [j for _, j in tiling]
        for acts in itertools.product(*[activation_options(space, j) for j in ends]):
            after = {0: True} | dict(zip(ends, acts))
            if all((after[i], after[j]) in activation_choices(space, i, j) for i, j in tiling):
                best = max(best, sum(depth_value(space, imp, i, j, after[i], after[j])
                                     for i, j in tiling))
    return best


def brute_layeronly(space, lat, imp, unit, levels):
    reducible = [c for c in space.convs if not c.irreducible]
    best = -math.inf
    for removed in itertools.product([False, True], repeat=len(reducible)):
        gone = {c.name for c, r in zip(reducible, removed) if r}
        cost = sum(discretise(lat[space.full_entries[(c.index - 1, c.index)]], unit)
                   for c in space.convs if c.name not in gone)
        # the paper's problem (8): the sum over kept convs of exp(-Δ) = 1 / exp(Δ)
        value = sum(1.0 if c.irreducible else 1.0 / imp[c.name]
                    for c in space.convs if c.name not in gone)
        if cost <= levels:
            best = max(best, value)
    return best


BRUTE = {"layermerge": brute_layermerge, "depth": brute_depth, "layeronly": brute_layeronly}


@settings(max_examples=25, deadline=None)
@given(small_spaces(), st.integers(0, 10**6), st.sampled_from([0.3, 0.5, 0.8, 1.0]),
       st.sampled_from(list(BRUTE)))
def test_solvers_match_brute_force(space, seed, budget, method):
    lat, imp = random_tables(space, seed)
    levels = 40
    budget_ms = budget * lat.identity_latency(space)
    unit = budget_ms / levels
    try:
        plan = fxmerge.solve(space, lat, imp, budget_ms=budget_ms, method=method, levels=levels)
    except fxmerge.InfeasibleBudget as exc:
        if "more levels" not in str(exc):
            lowest = float(str(exc).split("latency is ")[1].split(" ms")[0])
            assert lowest > budget_ms * (1 - 1e-3)
        return
    plan.validate(space)
    assert plan.predicted_latency_ms <= budget_ms * (1 + 1e-9)
    # exactly optimal for the discretised problem at the level it was taken from
    units = plan.extra["units"]
    expected = BRUTE[method](space, lat, imp, unit, units)
    assert plan.predicted_importance == pytest.approx(expected, abs=1e-5)
    # and no level above it had a plan that truly fits with a higher value
    assert BRUTE[method](space, lat, imp, unit, levels) >= expected - 1e-9


def resnet_space():
    import torchvision

    gm = fxmerge.trace(torchvision.models.resnet18(), torch.randn(1, 3, 32, 32))
    return gm, fxmerge.analyze(gm)


def test_plans_from_every_method_transform_exactly():
    gm, space = resnet_space()
    lat, imp = random_tables(space, 0)
    x = torch.randn(1, 3, 32, 32)
    for method, budget in [("layermerge", 0.8), ("depth", 0.98), ("layeronly", 0.8)]:
        plan = fxmerge.solve(space, lat, imp, budget=budget, method=method)
        assert plan.method == method and plan.budget == pytest.approx(budget)
        pruned = fxmerge.prune(gm, plan).eval()
        with torch.no_grad():
            a, b = pruned(x), fxmerge.merge(pruned)(x)
        assert ((a - b).abs().max() / a.abs().max()).item() < 1e-5
    assert any(not b.kept for b in fxmerge.solve(space, lat, imp, budget=0.8,
                                                  method="layeronly").blocks)


def test_frontier_is_monotone_and_matches_solve():
    _, space = resnet_space()
    lat, imp = random_tables(space, 1)
    front = fxmerge.frontier(space, lat, imp, levels=200)
    points = front.points
    assert len(points) > 3
    assert all(a["importance"] < b["importance"] for a, b in itertools.pairwise(points))
    full = fxmerge.solve(space, lat, imp, budget=1.0, levels=200)
    assert points[-1]["importance"] == pytest.approx(full.predicted_importance)
    middle = points[len(points) // 2]
    plan = front.plan(middle["budget"])
    assert plan.predicted_importance == pytest.approx(middle["importance"])
    assert plan.predicted_latency_ms <= middle["budget"] * lat.identity_latency(space) + 1e-9
    with pytest.raises(fxmerge.InfeasibleBudget):
        front.plan(points[0]["budget"] / 2)


def test_bad_tables_are_refused_by_name():
    _, space = resnet_space()
    lat, imp = random_tables(space, 2)
    entry = space.entries[3]
    values = dict(imp.values)
    values[entry] = float("nan")
    with pytest.raises(fxmerge.TableError, match=re.escape(f"{tuple(entry)} is nan")):
        fxmerge.ImportanceTable.from_values(space, values)
    del values[entry]
    with pytest.raises(fxmerge.TableError, match="no value for entry"):
        fxmerge.ImportanceTable.from_values(space, values)
    other = fxmerge.analyze(fxmerge.trace(small_net([("conv", 4, 3, 1, True, False)]),
                                          torch.randn(1, 3, 8, 8)))
    with pytest.raises(fxmerge.TableError, match="another graph"):
        fxmerge.solve(other, lat, imp, budget=0.5)


def test_impossible_budget_states_the_smallest_latency():
    _, space = resnet_space()
    lat, imp = random_tables(space, 3)
    with pytest.raises(fxmerge.InfeasibleBudget, match=r"smallest achievable table latency"):
        fxmerge.solve(space, lat, imp, budget=0.01)
    with pytest.raises(ValueError, match="exactly one"):
        fxmerge.solve(space, lat, imp)


def test_tables_round_trip_json():
    _, space = resnet_space()
    lat, imp = random_tables(space, 4)
    again = fxmerge.LatencyTable.from_json(lat.to_json())
    assert again.values == lat.values and again.signature == lat.signature
    imp2 = fxmerge.ImportanceTable.from_json(imp.to_json())
    assert imp2.values == imp.values
    with pytest.raises(fxmerge.TableError, match="expected a latency table"):
        fxmerge.LatencyTable.from_json(imp.to_json())


def test_depth_discretises_in_units_of_0_05_ms_by_default():
    _, space = resnet_space()
    lat, imp = random_tables(space, 0)
    budget_ms = lat.identity_latency(space)  # Depth can always keep the original
    plan = fxmerge.solve(space, lat, imp, budget_ms=budget_ms, method="depth")
    assert plan.extra["levels"] == math.ceil(budget_ms / 0.05 - 1e-9)
    assert fxmerge.solve(space, lat, imp, budget=0.9).extra["levels"] == 1000
