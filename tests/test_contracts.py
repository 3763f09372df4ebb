"""The passes' contracts (requires / call / ensures, a PassManager pipeline), the canonical
graph invariants, the method registry and the error classes."""

import ast
import copy
import dataclasses
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torchvision
from helpers import randomize_batchnorm, relative_error
from torch import fx, nn
from torch.fx.passes.infra.pass_manager import PassManager

import fxmerge
from fxmerge import algebra
from fxmerge.backends.compile import registered_backend
from fxmerge.capture import check_canonical, propagate_shapes
from fxmerge.passes import MergePass, PrunePass, ReparameterizePass
from fxmerge.solve import METHODS, get_method, importance_keys
from fxmerge.space import choose_convs

X = torch.randn(2, 3, 32, 32)


@pytest.fixture(scope="module")
def resnet():
    gm = fxmerge.trace(randomize_batchnorm(torchvision.models.resnet18()), X)
    return gm, fxmerge.analyze(gm)


def test_a_pass_manager_runs_prune_then_merge(resnet):
    gm, space = resnet
    plan = fxmerge.Plan.random(space, 3)
    before = copy.deepcopy(gm.state_dict())
    result = PassManager([PrunePass(plan, space), MergePass(verify=True)])(gm)
    assert result.modified
    merged = result.graph_module
    reference = fxmerge.transform(gm, plan)
    convs = [n.target for n in merged.graph.nodes if n.op == "call_module"
             and isinstance(merged.get_submodule(n.target), nn.Conv2d)]
    assert convs == [n.target for n in reference.graph.nodes if n.op == "call_module"
                     and isinstance(reference.get_submodule(n.target), nn.Conv2d)]
    assert {b.kept[0] for b in plan.blocks if b.kept} <= set(convs)
    with torch.no_grad():
        assert relative_error(reference(X), merged(X)) <= 1e-6
    assert all(torch.equal(v, gm.state_dict()[k]) for k, v in before.items())  # unchanged


def test_prune_with_its_space_does_not_analyse_again(resnet, monkeypatch):
    gm, space = resnet
    plan = fxmerge.Plan.random(space, 1)
    monkeypatch.setattr(fxmerge.plan, "analyze", lambda *a, **k: pytest.fail("analysed"))
    pruned = fxmerge.prune(gm, plan, space)
    merged = fxmerge.transform(gm, plan, space)
    with torch.no_grad():
        assert relative_error(pruned.eval()(X), merged(X)) <= 1e-5


def test_prune_pass_requires_the_space_of_this_graph(resnet):
    _, space = resnet
    other = fxmerge.trace(torchvision.models.mobilenet_v2(), X)
    with pytest.raises(fxmerge.SpaceError, match="analysed from another graph"):
        PrunePass(fxmerge.Plan.identity(space), space)(other)


def test_merge_pass_verify_catches_a_wrong_merge(resnet, monkeypatch):
    gm, space = resnet
    pruned = fxmerge.prune(gm, fxmerge.Plan.random(space, 2), space).eval()
    monkeypatch.setattr(algebra, "fold_bn", lambda a, bn: a)  # forgets every BatchNorm
    with pytest.raises(fxmerge.MergeError, match="differs from the pruned one"):
        MergePass(verify=True)(pruned)


class FunctionalNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.skip = nn.Identity()

    def forward(self, x):
        return F.relu(self.skip(self.conv(x)))


def test_check_canonical_names_the_node_and_the_rule():
    check_canonical(fxmerge.trace(FunctionalNet(), X))  # canonical: nothing raised
    raw = fx.symbolic_trace(FunctionalNet())
    with pytest.raises(fxmerge.TraceError, match="no example inputs"):
        check_canonical(raw)
    propagate_shapes(raw, X)
    with pytest.raises(fxmerge.TraceError, match=r"node 'skip' .* identity left in the graph"):
        check_canonical(raw)
    for entry in (fxmerge.analyze, lambda g: fxmerge.prune(g, fxmerge.Plan.identity(
            fxmerge.analyze(fxmerge.trace(FunctionalNet(), X))))):
        with pytest.raises(fxmerge.TraceError, match="the graph is not canonical at node"):
            entry(raw)  # one mistake, one error, one text: analyse or prune
    with pytest.raises(fxmerge.ArgumentError, match="needs a GraphModule"):
        check_canonical(FunctionalNet())


def test_functional_activations_are_not_canonical():
    gm = fx.symbolic_trace(nn.Sequential(nn.Conv2d(3, 4, 3)))
    conv = next(n for n in gm.graph.nodes if n.op == "call_module")
    with gm.graph.inserting_after(conv):
        relu = gm.graph.call_function(F.relu, (conv,))
    conv.replace_all_uses_with(relu, delete_user_cb=lambda u: u is not relu)
    gm.recompile()
    propagate_shapes(gm, X)
    with pytest.raises(fxmerge.TraceError, match="functional activation"):
        check_canonical(gm)


def test_methods_are_registered_objects_that_name_their_keys(resnet):
    _, space = resnet
    assert set(METHODS) == {"layermerge", "depth", "layeronly"}
    every = set(importance_keys(space))
    latency = fxmerge.LatencyTable.from_values(
        space, {e: 1.0 + e.k for e in space.entries if e.k} | {
            e: 0.0 for e in space.entries if not e.k})
    for name, method in METHODS.items():
        keys = method.importance_keys(space)
        assert keys and set(keys) <= every
        importance = fxmerge.ImportanceTable.from_values(space, dict.fromkeys(keys, 0.9),
                                                         keys=keys)
        plan = fxmerge.solve(space, latency, importance, budget=0.9, method=name)
        assert plan.method == name
    assert get_method("depth").unit_ms == 0.05
    with pytest.raises(ValueError, match="unknown method 'fast'; choose from"):
        get_method("fast")


def test_argument_errors_are_fxmerge_errors_and_value_errors():
    with pytest.raises(fxmerge.ArgumentError) as info:
        get_method("fast")
    assert isinstance(info.value, ValueError) and isinstance(info.value, fxmerge.FxMergeError)


def test_the_cli_shows_a_bug_as_a_traceback(monkeypatch):
    from fxmerge import cli

    def bug(*args, **kwargs):
        raise ZeroDivisionError("a bug inside fxmerge")

    monkeypatch.setattr(fxmerge.job, "analyze", bug)
    with pytest.raises(ZeroDivisionError):
        cli.main(["analyze", "torchvision:resnet18", "--input-shape", "1,3,32,32"])


def test_the_compile_backend_keeps_the_exception_chain(resnet):
    gm, _ = resnet
    refusal = registered_backend(gm, [X], {})  # no plan: refused, raised when called
    with pytest.raises(fxmerge.ArgumentError, match="needs options") as info:
        refusal(X)
    assert isinstance(info.value.__cause__, fxmerge.ArgumentError)


def test_merge_copies_and_shares_no_tensor_with_its_input(resnet):
    gm, space = resnet
    pruned = fxmerge.prune(gm, fxmerge.Plan.random(space, 4), space).eval()
    before = [n.target for n in pruned.graph.nodes if n.op == "call_module"]
    merged = fxmerge.merge(pruned)
    assert merged is not pruned
    assert [n.target for n in pruned.graph.nodes if n.op == "call_module"] == before
    given = {t.data_ptr() for t in (*pruned.parameters(), *pruned.buffers())}
    assert not given & {t.data_ptr() for t in (*merged.parameters(), *merged.buffers())}
    assert fxmerge.merge(merged) is merged  # merged already: nothing to do


def test_every_pass_run_twice_in_a_pass_manager_converges(resnet):
    gm, space = resnet
    plan = fxmerge.Plan.random(space, 5)
    manager = PassManager([PrunePass(plan, space), MergePass(), ReparameterizePass()],
                          steps=2)
    result = manager(gm)
    assert result.modified
    again = manager(result.graph_module)  # a second run changes nothing
    assert not again.modified and again.graph_module is not None
    with torch.no_grad():
        assert relative_error(fxmerge.transform(gm, plan, space)(X),
                              again.graph_module(X)) <= 1e-6
    # each pass says when it changed nothing
    assert not PrunePass(fxmerge.Plan.identity(space), space)(gm).modified
    assert not ReparameterizePass()(gm).modified  # resnet18 has no region
    identity = fxmerge.transform(gm, fxmerge.Plan.identity(space), space)
    assert not MergePass()(identity).modified


def test_a_pass_instance_keeps_nothing_between_graphs(resnet):
    gm, space = resnet
    step = MergePass()
    plans = [fxmerge.Plan.random(space, seed) for seed in (6, 7)]
    for plan in plans:  # one instance, two graphs: each merged with its own plan
        pruned = fxmerge.prune(gm, plan, space).eval()
        merged = step(pruned).graph_module
        assert merged.meta["fxmerge_plan"] == plan
        with torch.no_grad():
            assert relative_error(pruned(X), merged(X)) <= 1e-5
    for p in (PrunePass(plans[0], space), step, ReparameterizePass()):
        state = dict(vars(p))
        p(fxmerge.prune(gm, plans[0], space).eval() if p is step else gm)
        assert vars(p) == state  # requires / call / ensures store nothing


def test_table_settings_are_typed_and_unknown_fields_refused(resnet):
    _, space = resnet
    table = fxmerge.LatencyTable.from_values(space, {e: 1.0 for e in space.entries},
                                             backend="inductor", batch_size=8)
    assert table.settings.backend == "inductor" and table.settings.source == "user values"
    again = fxmerge.LatencyTable.from_json(table.to_json())
    assert again.settings == table.settings and again.values == table.values
    with pytest.raises(fxmerge.TableError, match="unknown setting.*'colour'"):
        fxmerge.LatencyTable.from_json(table.to_json().replace('"backend"', '"colour"'))
    # what an earlier fxmerge's tables recorded of the median's re-timing: read and dropped
    old = table.to_json().replace('"backend"', '"retimed": 2, "unsettled": 0, "backend"')
    assert fxmerge.LatencyTable.from_json(old).settings == table.settings
    with pytest.raises(fxmerge.TableError, match="unknown setting.*'retimed'"):
        fxmerge.ImportanceTable.from_json(fxmerge.ImportanceTable.from_values(
            space, {e: 1.0 for e in space.entries}).to_json().replace(
            '"source"', '"retimed": 2, "source"'))
    with pytest.raises(fxmerge.ArgumentError, match="importance table settings"):
        fxmerge.ImportanceTable.from_values(space, {e: 1.0 for e in space.entries}, backend="x")


def test_backends_have_one_spelling_each():
    from fxmerge.backends import BACKENDS, get_backend
    assert BACKENDS == ("eager", "inductor", "onnxruntime", "tensorrt")
    with pytest.raises(fxmerge.ArgumentError, match="unknown backend 'compile'"):
        get_backend("compile")


def test_the_space_is_frozen_plain_data_saved_and_compared(resnet):
    gm, space = resnet
    assert not hasattr(space, "gm")
    with pytest.raises(dataclasses.FrozenInstanceError):
        space.stride_rule = "exact"
    again = fxmerge.MergeSpace.from_json(space.to_json())
    assert again == space and again.signature == space.signature
    assert again.entries == space.entries and again.blocks == space.blocks
    multi = [e for e in space.entries if e.j - e.i > 1 and e.k > 0]
    assert all(choose_convs(again, *e) == choose_convs(space, *e) for e in multi)
    assert again.describes(gm) and fxmerge.prune(gm, fxmerge.Plan.random(again, 0), again)
    assert fxmerge.analyze(gm, stride_rule="exact") != space
    with pytest.raises(fxmerge.SpaceError, match="signature"):
        fxmerge.MergeSpace.from_json(space.to_json().replace(
            f'"signature": "{space.signature}"', '"signature": "0000"'))
    with pytest.raises(fxmerge.SpaceError, match="not a saved MergeSpace"):
        fxmerge.MergeSpace.from_json('{"kind": "space", "convs": 3}')


def test_tables_refuse_a_graph_the_space_was_not_analysed_from(resnet):
    gm, space = resnet
    other = fxmerge.trace(torchvision.models.resnet34(), X)
    with pytest.raises(fxmerge.SpaceError, match="analysed from another graph"):
        fxmerge.agreement_importance(space, other, X)
    with pytest.raises(fxmerge.ArgumentError, match="needs a GraphModule"):
        fxmerge.agreement_importance(space, X, gm)


# each stage imports only stages before it (docs/architecture.md), type-hint and deferred
# imports included: the tables are data the methods read; the estimators measure them
LAYERS = ["errors progress sides", "algebra models recipes datasets", "capture", "space", "plan",
          "passes", "backends deploy inside", "tables", "solve", "estimate", "job",
          "compress pipeline yolo", "demos", "cli"]


def _imports(root):
    """`{module: {module it imports}}` for every module of the package, every import
    statement counted (type hints and deferred imports too), by dotted name."""
    out = {}
    for path in root.rglob("*.py"):
        parts = path.relative_to(root).with_suffix("").parts
        package = parts[:-1]
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = list(package[:len(package) - node.level + 1])
                module = base + (node.module.split(".") if node.module else [])
                for a in node.names:
                    full = ".".join([*module, a.name])
                    out[name].add(full if (root / Path(*module, a.name)).exists()
                                  or (root / Path(*module, a.name + ".py")).exists()
                                  else ".".join(module))
    return out


def test_no_stage_imports_a_later_one_and_no_module_is_in_a_cycle():
    import networkx as nx

    rank = {name: r for r, names in enumerate(LAYERS) for name in names.split()}
    root = Path(fxmerge.__file__).parent
    graph = _imports(root)
    wrong = []
    for module, targets in graph.items():
        if not module:  # the package's own __init__ exports everything
            continue
        here = rank[module.split(".")[0]]
        wrong += [f"{module} imports {t}" for t in targets
                  if t and rank.get(t.split(".")[0], -1) > here]
    assert not wrong, wrong
    g = nx.DiGraph([(m, t) for m, ts in graph.items() if m for t in ts if t and t != m])
    # a package's __init__ re-exporting its modules is not a cycle of theirs
    g.remove_edges_from([(m, t) for m, t in list(g.edges) if t.startswith(m + ".")])
    cycles = list(nx.simple_cycles(g))
    assert not cycles, cycles


def test_benchmarks_use_the_public_api_only():
    """Benchmarks import names the public packages export (`__all__`), nothing inside."""

    import fxmerge.datasets
    import fxmerge.demos
    import fxmerge.models
    import fxmerge.pipeline
    import fxmerge.recipes
    import fxmerge.yolo

    public = {name: set(module.__all__) for name, module in (
        ("fxmerge", fxmerge), ("fxmerge.models", fxmerge.models),
        ("fxmerge.demos", fxmerge.demos), ("fxmerge.pipeline", fxmerge.pipeline),
        ("fxmerge.yolo", fxmerge.yolo), ("fxmerge.datasets", fxmerge.datasets),
        ("fxmerge.recipes", fxmerge.recipes))}
    root = Path(__file__).parent.parent / "benchmarks"
    wrong = []
    for path in sorted(root.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("fxmerge"):
                names = {a.name for a in node.names}
                if node.module not in public or names - public[node.module]:
                    wrong.append(f"{path.name}: from {node.module} import {sorted(names)}")
            elif isinstance(node, ast.Import):
                wrong += [f"{path.name}: import {a.name}" for a in node.names
                          if a.name.startswith("fxmerge.")]
            elif isinstance(node, ast.Attribute) and getattr(node.value, "id", "") == "fxmerge" \
                    and node.attr not in public["fxmerge"]:
                wrong.append(f"{path.name}: fxmerge.{node.attr}")
    assert not wrong, wrong


@dataclasses.dataclass(frozen=True)
class WidthKey:
    """A toy method's own kind of key: conv `name` kept at half its importance."""

    name: str


def test_a_new_method_with_its_own_keys_is_added_without_touching_the_tables(resnet):
    """A toy method, registered from here: its keys (a kind of its own, with its JSON form),
    the network each scores, its edges; estimated, saved, read back and solved."""
    from fxmerge.solve import layeronly

    gm, space = resnet
    convs = [c.name for c in space.convs if not c.irreducible]

    def keys(space):
        return [WidthKey(name) for name in convs]

    def probes(space, keys):
        return {k: fxmerge.Probe(layeronly.removal_plan(space, k.name), (),
                                 space.conv(k.name).index) for k in keys}

    def edges(space, latency, importance):
        return layeronly.edges(space, latency, fxmerge.ImportanceTable.from_values(
            space, {k.name: importance[k] for k in keys(space)}, keys=convs))

    toy = fxmerge.Method("toy", keys, probes, edges, layeronly.blocks)
    kind = fxmerge.register_key_kind(fxmerge.KeyKind(
        WidthKey, lambda raw: isinstance(raw, dict) and "width_of" in raw,
        lambda k: {"width_of": k.name}, lambda raw: WidthKey(raw["width_of"])))
    METHODS["toy"] = toy
    try:
        table = fxmerge.agreement_importance(space, gm, X, keys=fxmerge.importance_keys(
            space, ["toy"]))
        assert set(table.values) == set(keys(space))
        again = fxmerge.ImportanceTable.from_json(table.to_json())
        assert again.values == table.values
        latency = fxmerge.LatencyTable.from_values(
            space, {e: 1.0 + e.k for e in space.entries if e.k}
            | {e: 0.0 for e in space.entries if not e.k})
        plan = fxmerge.solve(space, latency, again, budget=0.8, method="toy")
        assert plan.method == "toy" and plan.removed_convs
    finally:
        del METHODS["toy"]
        fxmerge.tables.KEY_KINDS.pop(kind.type)
