import copy

import pytest
import torch
import torchvision
from helpers import randomize_batchnorm, relative_error
from hypothesis import given, settings
from hypothesis import strategies as st
from models import TinyUNet, small_net
from torch import nn

import fxmerge
from fxmerge.estimate import entry_layer
from fxmerge.estimate.agreement import CachedOutputs
from fxmerge.passes.prune import prune_graph

MBV2_EXCLUDE = ("features.0.0", "features.18.0")
CASES = {
    "resnet18": (lambda: torchvision.models.resnet18(), (), range(6)),
    "resnet34": (lambda: torchvision.models.resnet34(), ("conv1",), range(6)),
    "resnet50": (lambda: torchvision.models.resnet50(), (), [2, 5]),
    "mobilenet_v2": (lambda: torchvision.models.mobilenet_v2(), MBV2_EXCLUDE, range(8)),
    "mobilenet_v2_1.4": (lambda: torchvision.models.mobilenet_v2(width_mult=1.4), MBV2_EXCLUDE,
                         range(4)),
}
X = torch.randn(2, 3, 64, 64)


@pytest.fixture(scope="module", params=list(CASES))
def traced(request):
    factory, exclude, seeds = CASES[request.param]
    model = randomize_batchnorm(factory())
    gm = fxmerge.trace(model, X)
    return model, gm, fxmerge.analyze(gm, exclude=exclude), exclude, seeds


def merged_conv_names(gm):
    return {n.target for n in gm.graph.nodes
            if n.op == "call_module" and isinstance(gm.get_submodule(n.target), nn.Conv2d)}


def plan_merging_first_basic_block(space):
    """Every conv its own block, except layer1.0's two convs, merged (its ReLU removed)."""
    i = space.conv("layer1.0.conv1").index - 1
    spans = [(p - 1, p) for p in range(1, i + 1)] + [(i, i + 2)] + [
        (p - 1, p) for p in range(i + 3, space.L + 1)]
    return fxmerge.Plan.from_positions(space, spans, {c.name for c in space.convs})


def test_random_plans_merge_exactly(traced):
    _, gm, space, _, seeds = traced
    for seed in seeds:
        plan = fxmerge.Plan.random(space, seed)
        pruned = fxmerge.prune(gm, plan).eval()
        merged = fxmerge.merge(pruned)
        with torch.no_grad():
            assert relative_error(pruned(X), merged(X)) <= 1e-5, seed
        names = merged_conv_names(merged)
        searched = {c.name for c in space.convs}
        # one conv per block, named after the block's first kept conv
        assert names & searched == {b.kept[0] for b in plan.blocks}
        assert len(merged.graph.nodes) < len(pruned.graph.nodes)
        assert not any(isinstance(m, nn.BatchNorm2d) for m in merged.modules())


@pytest.mark.parametrize("seed", [0, 2])
def test_exact_stride_rule_merges_strided_projection_blocks(seed):
    """With stride_rule="exact" a block may hold a strided 3x3 followed by 3x3 convs and a
    whole downsampling residual block with its projection shortcut."""
    gm = fxmerge.trace(randomize_batchnorm(torchvision.models.resnet18()), X)
    space = fxmerge.analyze(gm, stride_rule="exact")
    plan = fxmerge.Plan.random(space, seed)
    pruned = fxmerge.prune(gm, plan).eval()
    merged = fxmerge.merge(pruned)
    with torch.no_grad():
        assert relative_error(pruned(X), merged(X)) <= 1e-5
    fused = [s for s in space.skips if s.projection and any(
        i <= s.source and s.target <= j for i, j in plan.positions(space))]
    assert fused  # these seeds merge a projection shortcut into a conv
    for s in fused:
        assert s.projection not in merged_conv_names(merged)


def test_identity_plan_reproduces_the_original(traced):
    model, gm, space, _, _ = traced
    merged = fxmerge.transform(gm, fxmerge.Plan.identity(space))
    with torch.no_grad():
        assert relative_error(model(X), merged(X)) <= 1e-5


def test_pruned_network_is_the_plan():
    model = randomize_batchnorm(torchvision.models.resnet18())
    gm = fxmerge.trace(model, X)
    space = fxmerge.analyze(gm)
    plan = fxmerge.Plan.random(space, 3)
    pruned = fxmerge.prune(gm, plan)
    modules = dict(pruned.named_modules())
    for name in plan.removed_convs:
        assert name not in modules
    for name in plan.kept_convs:
        assert isinstance(modules[name], nn.Conv2d)
    # padding sits on each block's first kept conv only
    for b in plan.blocks:
        for name in b.kept[1:]:
            assert modules[name].padding == (0, 0)
    relus = [n for n in pruned.graph.nodes if n.op == "call_module"
             and isinstance(modules[n.target], nn.ReLU)]
    expected = sum(1 for b in plan.blocks if space.conv(b.convs[-1]).activation == "relu")
    assert len(relus) == expected


def test_passes_never_mutate_their_input():
    gm = fxmerge.trace(randomize_batchnorm(torchvision.models.resnet18()), X)
    space = fxmerge.analyze(gm)
    code, state = gm.code, copy.deepcopy(gm.state_dict())
    pruned = fxmerge.prune(gm, fxmerge.Plan.random(space, 1)).eval()
    pruned_code = pruned.code
    fxmerge.merge(pruned)
    assert gm.code == code and pruned.code == pruned_code
    assert all(torch.equal(v, state[k]) for k, v in gm.state_dict().items())
    assert gm.get_submodule("layer1.0.conv2").padding == (1, 1)
    paddings = {c.name: gm.get_submodule(c.name).padding for c in space.convs}
    replaced = {}  # prune_graph keeps gm's modules, replacing some, changing none
    for seed in range(4):
        replaced |= prune_graph(gm, space, fxmerge.Plan.random(space, seed)).modules
    assert set(replaced) & set(paddings)
    assert all(m is not gm.get_submodule(t) for t, m in replaced.items() if t in paddings)
    assert {c.name: gm.get_submodule(c.name).padding for c in space.convs} == paddings
    assert gm.code == code


def test_shared_activation_module_survives():
    """torchvision's BasicBlock calls one `self.relu` twice; removing one use keeps the other."""
    gm = fxmerge.trace(randomize_batchnorm(torchvision.models.resnet18()), X)
    space = fxmerge.analyze(gm)
    plan = plan_merging_first_basic_block(space)
    pruned = fxmerge.prune(gm, plan)
    uses = [n for n in pruned.graph.nodes if n.target == "layer1.0.relu"]
    assert len(uses) == 1  # the one after the add is kept
    merged = fxmerge.merge(pruned.eval())
    assert merged.get_submodule("layer1.0.conv1").kernel_size == (5, 5)
    with torch.no_grad():
        assert relative_error(pruned(X), merged(X)) <= 1e-5


def test_add_activations_is_one_setting_of_the_space():
    """On by default for MobileNetV2 (as the authors): the latency entries, the plan and the
    pruned network all carry the same added ReLU6, the last searched position included."""
    gm = fxmerge.trace(randomize_batchnorm(torchvision.models.mobilenet_v2()), X)
    paper = ["features.0.0", "features.18.0"]  # the searched convs end at a projection
    space = fxmerge.analyze(gm, exclude=paper)
    off = fxmerge.analyze(gm, exclude=paper, add_activations=False)
    assert space.add_activations and not off.add_activations
    assert space.signature != off.signature  # tables of one setting are refused by the other
    multi = [e for e in space.entries if e.j - e.i > 1 and space.activation(e.j) is None]
    assert any(e.j == space.L for e in multi)
    for e in multi:
        assert entry_layer(space, e).activation == "relu6"
        assert entry_layer(off, e).activation is None
    for seed in range(3):
        plan = fxmerge.Plan.random(space, seed)
        assert plan.add_activations
        assert fxmerge.Plan.from_json(plan.to_json()) == plan
        pruned = fxmerge.prune(gm, plan).eval()
        added = [n for n in pruned.graph.nodes if str(n.target).startswith("fxmerge_added_act")]
        expected = [(i, j) for i, j in plan.positions(space)
                    if j - i > 1 and space.activation(j) is None]
        assert len(added) == len(expected)
        assert all(isinstance(pruned.get_submodule(n.target), nn.ReLU6) for n in added)
        merged = fxmerge.merge(pruned)
        with torch.no_grad():
            assert relative_error(pruned(X), merged(X)) <= 1e-5
    plan_off = fxmerge.Plan.random(off, 0)
    assert not any(str(n.target).startswith("fxmerge_added_act")
                   for n in fxmerge.prune(gm, plan_off).graph.nodes)
    with pytest.raises(fxmerge.PlanError, match="add_activations"):
        plan_off.validate(space)


def test_unet_blocks_merge_and_barriers_stay():
    gm = fxmerge.trace(TinyUNet(), torch.randn(1, 3, 32, 32))
    space = fxmerge.analyze(gm)
    plan = fxmerge.Plan.random(space, 4)
    merged = fxmerge.transform(gm, plan)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert relative_error(fxmerge.prune(gm, plan)(x), merged(x)) <= 1e-5
    targets = [n.target for n in merged.graph.nodes]
    assert torch.cat in targets and "pool" in targets and "up" in targets


# ---- bad input --------------------------------------------------------------------------
def test_training_mode_batchnorm_is_refused():
    gm = fxmerge.trace(torchvision.models.resnet18(), X)
    pruned = fxmerge.prune(gm, fxmerge.Plan.identity(fxmerge.analyze(gm))).train()
    with pytest.raises(fxmerge.MergeError, match=r"BatchNorm 'bn1' is in training mode"):
        fxmerge.merge(pruned)


def test_merge_refuses_a_graph_not_pruned_by_fxmerge():
    gm = fxmerge.trace(torchvision.models.resnet18().eval(), X)
    with pytest.raises(fxmerge.MergeError, match="carries no fxmerge plan"):
        fxmerge.merge(gm)


def test_a_saved_and_reloaded_pruned_network_merges_with_its_plan(tmp_path):
    gm = fxmerge.trace(randomize_batchnorm(torchvision.models.resnet18()), X)
    plan = fxmerge.Plan.random(fxmerge.analyze(gm), 1)
    torch.save(fxmerge.prune(gm, plan), tmp_path / "pruned.pt")
    loaded = torch.load(tmp_path / "pruned.pt", weights_only=False).eval()
    with pytest.raises(fxmerge.MergeError, match="pass its plan"):
        fxmerge.merge(loaded)
    merged = fxmerge.merge(loaded, plan)
    with torch.no_grad():
        assert relative_error(loaded(X), merged(X)) <= 1e-5


def test_plan_for_another_graph_is_refused():
    a = fxmerge.trace(torchvision.models.resnet18(), X)
    b = fxmerge.trace(torchvision.models.resnet34(), X)
    plan = fxmerge.Plan.random(fxmerge.analyze(a), 0)
    with pytest.raises(fxmerge.PlanError, match="another graph"):
        fxmerge.prune(b, plan)


def test_plans_that_break_rules_are_refused():
    gm = fxmerge.trace(torchvision.models.resnet18(), X)
    space = fxmerge.analyze(gm)
    plan = fxmerge.Plan.identity(space)
    blocks = list(plan.blocks)
    strided = next(i for i, b in enumerate(blocks) if space.conv(b.convs[0]).stride == 2)
    blocks[strided] = fxmerge.Block(blocks[strided].convs, (), 1, False)
    bad = fxmerge.Plan(tuple(blocks), plan.signature)
    with pytest.raises(fxmerge.PlanError, match="irreducible"):
        fxmerge.prune(gm, bad)
    # merging conv1 (stem) with layer1.0.conv1 would cross the max-pool barrier
    crossing = fxmerge.Plan.from_positions(
        space, [(0, 2)] + [(p - 1, p) for p in range(3, space.L + 1)],
        {c.name for c in space.convs})
    with pytest.raises(fxmerge.PlanError, match="not legal"):
        crossing.validate(space)
    first = plan.blocks[0]
    wrong_kernel = fxmerge.Plan((fxmerge.Block(first.convs, first.kept, 3, False),
                                 *plan.blocks[1:]), plan.signature)
    with pytest.raises(fxmerge.PlanError, match="states kernel 3"):
        wrong_kernel.validate(space)


def test_unknown_op_inside_a_block_is_refused():
    """A graph edited after pruning (an op slipped inside a block) is never merged through."""
    gm = fxmerge.trace(randomize_batchnorm(torchvision.models.resnet18()), X)
    space = fxmerge.analyze(gm)
    plan = plan_merging_first_basic_block(space)
    pruned = fxmerge.prune(gm, plan).eval()
    bn1 = next(n for n in pruned.graph.nodes if n.target == "layer1.0.bn1")
    with pruned.graph.inserting_after(bn1):
        sig = pruned.graph.call_function(torch.sigmoid, (bn1,))
    bn1.replace_all_uses_with(sig, delete_user_cb=lambda u: u is not sig)
    pruned.recompile()
    with pytest.raises(fxmerge.MergeError, match="sigmoid"):
        fxmerge.merge(pruned)


def test_plan_json_round_trip_and_diff():
    gm = fxmerge.trace(torchvision.models.mobilenet_v2(), X)
    space = fxmerge.analyze(gm)
    plan = fxmerge.Plan.random(space, 2)
    again = fxmerge.Plan.from_json(plan.to_json())
    assert again == plan
    again.validate(space)
    with pytest.raises(fxmerge.PlanError, match="not a fxmerge plan"):
        fxmerge.Plan.from_json('{"signature": "x"}')
    pruned = fxmerge.prune(gm, plan).eval()
    merged = fxmerge.merge(pruned)
    d = fxmerge.diff(gm, merged)
    text = str(d)
    for name in plan.removed_convs:
        assert any(line.startswith(name + ":") for line in d.removed), name
    first = plan.blocks[0]
    assert any(a.startswith(first.kept[0] + ":") for a, _ in d.replaced) or len(first.kept) == 1
    assert f"{len(d.removed)} removed" in text


@st.composite
def random_nets(draw):
    """Conv chains with strides, depthwise convs, residual pairs (identity skips), BN."""
    spec = []
    for _ in range(draw(st.integers(2, 6))):
        if draw(st.integers(0, 2)) == 0:
            spec.append(("res", [("c", draw(st.sampled_from([1, 3])), draw(st.booleans()))
                                 for _ in range(draw(st.integers(1, 3)))]))
        else:
            spec.append(("conv", draw(st.sampled_from([4, 6])), draw(st.sampled_from([1, 3, 5])),
                         draw(st.sampled_from([1, 1, 2])), draw(st.booleans()),
                         draw(st.booleans())))
    return spec


@settings(max_examples=40, deadline=None)
@given(random_nets(), st.sampled_from(["paper", "exact"]), st.integers(0, 1000),
       st.booleans())
def test_random_nets_and_plans_merge_exactly(spec, stride_rule, seed, add_activations):
    model = randomize_batchnorm(small_net(spec), seed)
    x = torch.randn(2, 3, 20, 20)
    gm = fxmerge.trace(model, x)
    space = fxmerge.analyze(gm, stride_rule=stride_rule, add_activations=add_activations)
    plan = fxmerge.Plan.random(space, seed)
    pruned = fxmerge.prune(gm, plan).eval()
    merged = fxmerge.merge(pruned)
    with torch.no_grad():
        assert relative_error(pruned(x), merged(x)) <= 1e-5
        # what the importance proxy runs: prune_graph, from the original's cached values
        assert relative_error(pruned(x), CachedOutputs(gm, x).run(prune_graph(gm, space, plan))
                              ) <= 1e-10
    assert merged_conv_names(merged) & {c.name for c in space.convs} == {
        b.kept[0] for b in plan.blocks}
