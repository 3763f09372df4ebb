"""Bad input gets a clear fxmerge error naming the thing and the rule."""

import json
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
    with pytest.raises(fxmerge.SpaceError, match="no searchable conv"):
        fxmerge.analyze(gm)


def test_plans_that_do_not_tile_or_keep_foreign_convs(resnet):
    _, space = resnet
    plan = fxmerge.Plan.identity(space)
    with pytest.raises(fxmerge.PlanError, match="do not tile"):
        fxmerge.Plan(plan.blocks[1:], plan.signature).validate(space)
    first = plan.blocks[0]
    foreign = fxmerge.Block(first.convs, (*first.kept, "fc"), first.kernel, first.depthwise)
    with pytest.raises(fxmerge.PlanError, match="keeps"):
        fxmerge.Plan((foreign, *plan.blocks[1:]), plan.signature).validate(space)


def test_merging_a_merged_graph_changes_nothing(resnet):
    gm, space = resnet
    merged = fxmerge.transform(gm, fxmerge.Plan.identity(space))
    assert fxmerge.merge(merged) is merged


def test_solver_refuses_bad_budgets_methods_and_backends(resnet):
    _, space = resnet
    lat = fxmerge.LatencyTable.from_values(space, {e: 1.0 for e in space.entries})
    imp = fxmerge.ImportanceTable.from_values(space, {e: 1.0 for e in space.entries})
    with pytest.raises(ValueError, match="budget must be a positive finite number"):
        fxmerge.solve(space, lat, imp, budget=0)
    with pytest.raises(ValueError, match="unknown method"):
        fxmerge.solve(space, lat, imp, budget=0.5, method="magic")
    with pytest.raises(fxmerge.ArgumentError, match="unknown backend"):
        fxmerge.measure_latency(space, backend="tvm", warmup=0, repeat=1)


def test_importance_refuses_a_non_finite_original_score():
    gm = fxmerge.trace(small_net([("conv", 4, 3, 1, True, False)]), torch.randn(1, 3, 8, 8))
    with pytest.raises(fxmerge.TableError, match="original network returned nan"):
        fxmerge.estimate_importance(fxmerge.analyze(gm), gm, evaluate=lambda m: math.nan)


# ---- malformed plan and table files, bad arguments ---------------------------------------
def _plan_dict(space):
    return json.loads(fxmerge.Plan.identity(space).to_json())


@pytest.mark.parametrize("text, match", [
    ("", "invalid JSON"), ('{"blocks": [', "invalid JSON"), ("null", "expected a JSON object"),
    ("[]", "expected a JSON object"), ('{"signature": "x"}', "missing 'blocks'"),
])
def test_malformed_plan_files(text, match):
    with pytest.raises(fxmerge.PlanError, match=match):
        fxmerge.Plan.from_json(text)


@pytest.mark.parametrize("field, value, match", [
    ("kernel", 3.7, "'kernel' must be int"), ("kernel", "abc", "'kernel' must be int"),
    ("kernel", True, "'kernel' must be int"), ("activation", "no", "'activation' must be bool"),
    ("kept", "conv1", "'kept' must be list"), ("convs", [1, 2], "list of module names"),
    ("kernel", [], "int or a list of ints"), ("kernel", [1, "3", 3], "int or a list of ints"),
    ("kernel", [1, True, 3], "int or a list of ints"),
])
def test_wrongly_typed_plan_blocks(resnet, field, value, match):
    data = _plan_dict(resnet[1])
    data["blocks"][0][field] = value
    with pytest.raises(fxmerge.PlanError, match=match):
        fxmerge.Plan.from_json(json.dumps(data))


def test_wrongly_typed_plan_fields_and_reversed_kept(resnet):
    gm, space = resnet
    data = _plan_dict(space)
    data["exclude"] = "conv1"
    with pytest.raises(fxmerge.PlanError, match="'exclude' must be list"):
        fxmerge.Plan.from_json(json.dumps(data))
    data = _plan_dict(space)
    data["budget"] = "0.5"
    with pytest.raises(fxmerge.PlanError, match="'budget' must be int or float or null"):
        fxmerge.Plan.from_json(json.dumps(data))
    i, j = next((i, j) for i, j in space.blocks if j - i >= 2)
    spans = sorted([(p - 1, p) for p in range(1, space.L + 1) if not i < p <= j] + [(i, j)])
    plan = fxmerge.Plan.from_positions(space, spans, {c.name for c in space.convs})
    data = json.loads(plan.to_json())
    data["blocks"][spans.index((i, j))]["kept"].reverse()
    with pytest.raises(fxmerge.PlanError, match="in network order"):
        fxmerge.prune(gm, fxmerge.Plan.from_json(json.dumps(data)))


def _table_json(space, value=1.0, kind="latency"):
    return json.dumps({"kind": kind, "signature": space.signature,
                       "values": [[list(e), value] for e in space.entries]})


@pytest.mark.parametrize("value, match", [
    (-1.0, "must be > 0"), (0, "must be > 0"), (1e300, "at most"), ("fast", "not a number"),
    (True, "not a number"), (None, "not a number"),
])
def test_bad_latency_values(resnet, value, match):
    with pytest.raises(fxmerge.TableError, match=match):
        fxmerge.LatencyTable.from_json(_table_json(resnet[1], value))


def test_malformed_tables(resnet):
    _, space = resnet
    assert fxmerge.ImportanceTable.from_json(_table_json(space, -0.5, "importance"))
    with pytest.raises(fxmerge.TableError, match="not a number"):
        fxmerge.ImportanceTable.from_json(_table_json(space, "high", "importance"))
    for text, match in [
        ("", "invalid JSON"), ("null", "expected a latency table"),
        ('{"kind": "latency", "signature": "x"}', "'values' must be a list"),
        ('{"kind": "latency", "signature": "x", "values": [[[1, 2], 1.0]]}', "neither"),
        ('{"kind": "latency", "signature": "x", "values": [[[1, 2, [], 0], 1.0]]}', "neither"),
        ('{"kind": "latency", "signature": "x", "values": [[[1, 2, [1, -3, 3], 0], 1.0]]}',
         "neither"),
        ('{"kind": "latency", "signature": "x", "values": [[[1, 2, [1, "3"], 0], 1.0]]}',
         "neither"),
        ('{"kind": "latency", "signature": "x", "values": [[[1, 2, 3, 0], 1.0, 2]]}',
         "'values' must be a list"),
        ('{"kind": "latency", "values": []}', "'signature' must be a string"),
    ]:
        with pytest.raises(fxmerge.TableError, match=match):
            fxmerge.LatencyTable.from_json(text)
    with pytest.raises(fxmerge.TableError, match="neither"):
        fxmerge.LatencyTable.from_values(space, {(1, 2): 1.0})


@pytest.mark.parametrize("kwargs, error, match", [
    ({"budget": math.inf}, ValueError, "budget must be a positive finite"),
    ({"budget": "0.5"}, TypeError, "budget must be a number"),
    ({"budget": -0.5}, ValueError, "budget must be a positive finite"),
    ({"budget_ms": 0}, ValueError, "budget_ms must be a positive finite"),
    ({"budget_ms": math.nan}, ValueError, "budget_ms must be a positive finite"),
    ({"budget_ms": math.inf}, ValueError, "budget_ms must be a positive finite"),
    ({"budget": 0.5, "levels": 0}, ValueError, "levels must be a positive integer"),
    ({"budget": 0.5, "levels": -3}, ValueError, "levels must be a positive integer"),
])
def test_bad_budgets_and_levels(resnet, kwargs, error, match):
    _, space = resnet
    lat = fxmerge.LatencyTable.from_values(space, {e: 1.0 for e in space.entries})
    imp = fxmerge.ImportanceTable.from_values(space, {e: 1.0 for e in space.entries})
    with pytest.raises(error, match=match):
        fxmerge.solve(space, lat, imp, **kwargs)


# ---- one error per kind of mistake (docs/architecture.md, "Errors") --------------------
def _entry_points(gm, space, plan, tmp_path):
    """Every public entry point that takes a traced graph, as `name: call(graph, space)`."""
    from fxmerge.passes import MergePass, PrunePass, ReparameterizePass

    return {
        "analyze": lambda g, s: fxmerge.analyze(g),
        "check_canonical": lambda g, s: fxmerge.check_canonical(g),
        "prune": lambda g, s: fxmerge.prune(g, plan, s),
        "transform": lambda g, s: fxmerge.transform(g, plan, s),
        "merge": lambda g, s: fxmerge.merge(g),
        "reparameterize": lambda g, s: fxmerge.reparameterize(g),
        "diff": lambda g, s: fxmerge.diff(g, g),
        "save": lambda g, s: fxmerge.save(g, tmp_path / "net.safetensors"),
        "export_onnx": lambda g, s: fxmerge.export_onnx(g, X, tmp_path / "net.onnx"),
        "measure_latency": lambda g, s: fxmerge.measure_latency(s, g),
        "agreement_importance": lambda g, s: fxmerge.agreement_importance(s, g, X),
        "estimate_importance": lambda g, s: fxmerge.estimate_importance(
            s, g, evaluate=lambda m: 1.0),
        "NetworkTimer": lambda g, s: fxmerge.NetworkTimer(g, s),
        "PrunePass": lambda g, s: PrunePass(plan, s)(g),
        "MergePass": lambda g, s: MergePass()(g),
        "ReparameterizePass": lambda g, s: ReparameterizePass()(g),
    }


def test_every_entry_point_refuses_a_model_that_is_not_a_graph_module(resnet, tmp_path):
    gm, space = resnet
    calls = _entry_points(gm, space, fxmerge.Plan.identity(space), tmp_path)
    model = torchvision.models.resnet18()
    for name, call in calls.items():
        with pytest.raises(fxmerge.ArgumentError) as info:
            call(model, space)
        who = "transform" if name == "transform" else name.removesuffix("Pass").lower() \
            if name.endswith("Pass") else name
        assert str(info.value) == (f"{who} needs a GraphModule from fxmerge.trace, got ResNet: "
                                   "trace the model first"), name


def test_every_entry_point_refuses_the_space_of_another_graph(resnet, tmp_path):
    _, space = resnet
    other = fxmerge.trace(torchvision.models.mobilenet_v2().eval(), X)
    calls = _entry_points(other, space, fxmerge.Plan.identity(space), tmp_path)
    for name in ("prune", "transform", "measure_latency", "agreement_importance",
                 "estimate_importance", "NetworkTimer", "PrunePass"):
        with pytest.raises(fxmerge.SpaceError) as info:
            calls[name](other, space)
        assert str(info.value) == (
            "the space was analysed from another graph (no node 'conv1' in the graph): "
            "analyse this graph, or pass the graph the space came from"), name


def test_every_entry_point_refuses_an_unknown_backend(resnet):
    gm, space = resnet
    plan = fxmerge.Plan.identity(space)
    calls = {
        "measure_latency": lambda: fxmerge.measure_latency(space, gm, backend="tvm"),
        "NetworkTimer": lambda: fxmerge.NetworkTimer(gm, space, backend="tvm"),
        "LatencyTable.from_values": lambda: fxmerge.LatencyTable.from_values(
            space, {e: 1.0 for e in space.entries}, backend="tvm"),
        "backend": lambda: fxmerge.backend(plan, then="tvm"),
    }
    for call in calls.values():
        with pytest.raises(fxmerge.ArgumentError, match=r"^unknown backend 'tvm' \(one of: "):
            call()
