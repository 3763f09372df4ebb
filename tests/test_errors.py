"""Bad input gets a clear fxmerge error naming the thing and the rule."""

import math

import pytest
import torch
import torchvision
from models import small_net
from torch import nn

import fxmerge

X = torch.randn(1, 3, 32, 32)


@pytest.fixture(scope="module")
def resnet():
    gm = fxmerge.trace(torchvision.models.resnet18().eval(), X)
    return gm, fxmerge.analyze(gm)


def test_a_graph_without_convs_has_no_space():
    gm = fxmerge.trace(nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 2)), X)
    with pytest.raises(fxmerge.SpaceError, match="no searchable Conv2d"):
        fxmerge.analyze(gm)


def test_prune_needs_a_traced_graph_module(resnet):
    _, space = resnet
    with pytest.raises(fxmerge.PlanError, match="fxmerge.trace"):
        fxmerge.prune(torchvision.models.resnet18(), fxmerge.Plan.identity(space))


def test_plans_that_do_not_tile_or_keep_foreign_convs(resnet):
    _, space = resnet
    plan = fxmerge.Plan.identity(space)
    with pytest.raises(fxmerge.PlanError, match="do not tile"):
        fxmerge.Plan(plan.blocks[1:], plan.signature).validate(space)
    first = plan.blocks[0]
    foreign = fxmerge.Block(first.convs, (*first.kept, "fc"), first.kernel, first.depthwise)
    with pytest.raises(fxmerge.PlanError, match="keeps"):
        fxmerge.Plan((foreign, *plan.blocks[1:]), plan.signature).validate(space)


def test_merging_twice_is_refused(resnet):
    gm, space = resnet
    merged = fxmerge.transform(gm, fxmerge.Plan.identity(space))
    with pytest.raises(fxmerge.MergeError, match="already merged"):
        fxmerge.merge(merged)


def test_solver_refuses_bad_budgets_methods_and_backends(resnet):
    _, space = resnet
    lat = fxmerge.LatencyTable.from_values(space, {e: 1.0 for e in space.entries})
    imp = fxmerge.ImportanceTable.from_values(space, {e: 1.0 for e in space.entries})
    with pytest.raises(fxmerge.InfeasibleBudget, match="positive"):
        fxmerge.solve(space, lat, imp, budget=0)
    with pytest.raises(ValueError, match="unknown method"):
        fxmerge.solve(space, lat, imp, budget=0.5, method="magic")
    with pytest.raises(fxmerge.TableError, match="unknown latency backend"):
        fxmerge.measure_latency(space, backend="tvm", warmup=0, repeat=1)


def test_importance_refuses_a_non_finite_original_score():
    gm = fxmerge.trace(small_net([("conv", 4, 3, 1, True, False)]), torch.randn(1, 3, 8, 8))
    with pytest.raises(fxmerge.TableError, match="original network returned nan"):
        fxmerge.estimate_importance(fxmerge.analyze(gm), evaluate=lambda m: math.nan)
