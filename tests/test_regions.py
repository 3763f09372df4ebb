"""Regions of parallel linear branches: found from the graph alone, collapsed exactly by
`reparameterize`, searched as one conv position by `analyze`, kept branched by `prune` and
collapsed by `merge` (docs/method.md §4b)."""

import json
import operator

import pytest
import torch
from helpers import randomize_batchnorm, relative_error
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import fx, nn

import fxmerge
from fxmerge.capture import ops
from fxmerge.capture.regions import find_regions
from fxmerge.capture.registry import NodeKind, kind_of
from fxmerge.space import reach


def _random_bn(channels: int, gen: torch.Generator) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(channels, eps=1e-3)
    bn.running_mean = torch.randn(channels, generator=gen) * 0.5
    bn.running_var = torch.rand(channels, generator=gen) + 0.2
    bn.weight.data = torch.randn(channels, generator=gen)
    bn.bias.data = torch.randn(channels, generator=gen)
    return bn


class Branched(nn.Module):
    """A sum of branches of one input: each ("conv", kernel (h, w), groups, bn) or ("bn",),
    ("scale",) or ("input",)."""

    def __init__(self, channels: int, out: int, stride: int, branches: list[tuple],
                 seed: int) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.kinds = [b[0] for b in branches]
        self.branches = nn.ModuleList()
        for n, b in enumerate(branches):
            if b[0] == "conv":
                (kh, kw), groups, bn = b[1:]
                conv = nn.Conv2d(channels, out, (kh, kw), stride, (kh // 2, kw // 2),
                                 groups=groups, bias=not bn)
                conv.weight.data = torch.randn(conv.weight.shape, generator=gen)
                layers = [conv] + ([_random_bn(out, gen)] if bn else [])
                self.branches.append(nn.Sequential(*layers))
            elif b[0] == "bn":
                self.branches.append(_random_bn(channels, gen))
            elif b[0] == "scale":
                self.register_buffer(f"scale{n}", torch.randn(1, channels, 1, 1, generator=gen))
                self.branches.append(nn.Identity())
            else:
                self.branches.append(nn.Identity())

    def forward(self, x):
        out = 0
        for n, (kind, branch) in enumerate(zip(self.kinds, self.branches)):
            out = out + (x * getattr(self, f"scale{n}") if kind == "scale" else branch(x))
        return out


@st.composite
def regions(draw):
    """A random region: 2-4 branches, kernels 1/3/5 square or 1xk/kx1, groups equal or
    mixed (densified), BNs with random statistics, identity-like branches where the shapes
    allow, one stride for all."""
    channels = draw(st.sampled_from([2, 4, 6]))
    stride = draw(st.sampled_from([1, 1, 2]))
    out = channels if stride == 1 and draw(st.booleans()) else draw(st.sampled_from([2, 4]))
    plain = stride == 1 and out == channels
    kinds = ["conv"] + (["bn", "scale", "input"] if plain else [])
    n = draw(st.integers(2, 4))
    branches = [("conv",) + draw(conv_branch(channels, out))]
    for _ in range(n - 1):
        kind = draw(st.sampled_from(kinds + ["conv"]))
        if kind == "input" and any(b[0] == "input" for b in branches):
            kind = "conv"
        branches.append(("conv",) + draw(conv_branch(channels, out)) if kind == "conv"
                        else (kind,))
    return channels, out, stride, branches, draw(st.integers(0, 2**31 - 1))


@st.composite
def conv_branch(draw, channels: int, out: int):
    k = draw(st.sampled_from([1, 3, 5]))
    shape = draw(st.sampled_from([(k, k), (1, k), (k, 1)]))
    groups = draw(st.sampled_from([1, 2] + ([channels] if out == channels else [])))
    return shape, groups, draw(st.booleans())


def _traced(model: nn.Module, x: torch.Tensor) -> fx.GraphModule:
    return fxmerge.trace(model.double().eval(), x)


@settings(max_examples=60, deadline=None)
@given(regions())
def test_a_random_region_collapses_into_one_exact_conv(region):
    channels, out, stride, branches, seed = region
    model = Branched(channels, out, stride, branches, seed)
    x = torch.randn(2, channels, 9, 9, dtype=torch.float64)
    gm = _traced(model, x)
    assert len(find_regions(gm)) == 1
    collapsed = fxmerge.reparameterize(gm)
    convs = [n for n in collapsed.graph.nodes if kind_of(collapsed, n) is NodeKind.CONV]
    assert len(convs) == 1
    with torch.no_grad():
        assert (collapsed(x) - model(x)).abs().max() <= 1e-10 * model(x).abs().max().clamp_min(1)


class Stack(nn.Module):
    """Regions in a row, a ReLU after each (with a skip around all but the first, where
    the strides allow)."""

    def __init__(self, specs: list[tuple], skip: bool) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Branched(*spec) for spec in specs)
        self.skip = skip

    def forward(self, x):
        x = torch.relu(self.blocks[0](x))
        y = x
        for block in self.blocks[1:]:
            y = torch.relu(block(y))
        return y + x if self.skip else y


@settings(max_examples=15, deadline=None)
@given(st.lists(regions(), min_size=2, max_size=3), st.integers(0, 100), st.booleans())
def test_random_plans_over_regions_merge_exactly(drawn, plan_seed, skip):
    channels = 4
    specs = []
    for n, (_, _, stride, branches, seed) in enumerate(drawn):  # one width throughout
        fixed = [b if b[0] != "conv" else ("conv", b[1], b[2] if b[2] in (1, 2) else channels,
                                           b[3]) for b in branches]
        specs.append((channels, channels, stride, fixed, seed + n))
    model = Stack(specs, skip and all(spec[2] == 1 for spec in specs))
    x = torch.randn(1, channels, 10, 10, dtype=torch.float64)
    gm = _traced(model, x)
    space = fxmerge.analyze(gm)
    assert len(space.regions) == len(specs)
    plan = fxmerge.Plan.random(space, plan_seed)
    pruned = fxmerge.prune(gm, plan, space).eval()
    merged = fxmerge.merge(pruned)
    with torch.no_grad():
        want = pruned(x)
        assert (merged(x) - want).abs().max() <= 1e-10 * want.abs().max().clamp_min(1)
        assert (fxmerge.transform(gm, fxmerge.Plan.identity(space), space)(x)
                - model(x)).abs().max() <= 1e-10 * model(x).abs().max().clamp_min(1)


def test_the_pruned_network_keeps_every_branch_trainable():
    spec = [("conv", (3, 3), 1, True), ("conv", (1, 3), 1, True), ("bn",), ("input",)]
    model = Stack([(4, 4, 1, spec, 0), (4, 4, 1, spec, 1)], skip=False)
    x = torch.randn(1, 4, 8, 8, dtype=torch.float64)
    gm = _traced(model, x)
    space = fxmerge.analyze(gm)
    plan = fxmerge.Plan.from_positions(space, [(0, 2)], {c.name for c in space.convs})
    pruned = fxmerge.prune(gm, plan, space)
    branch_convs = [n for n in pruned.graph.nodes if kind_of(pruned, n) is NodeKind.CONV]
    assert len(branch_convs) == 4  # both regions still branched, padding moved per branch
    merged = fxmerge.merge(pruned.eval())
    assert sum(kind_of(merged, n) is NodeKind.CONV for n in merged.graph.nodes) == 1
    with torch.no_grad():
        assert relative_error(pruned(x), merged(x)) <= 1e-10


def test_a_nonlinear_branch_is_no_region():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 1)

        def forward(self, x):
            return self.a(x) + torch.relu(self.b(x))

    gm = _traced(Net(), torch.randn(1, 4, 6, 6, dtype=torch.float64))
    assert find_regions(gm) == []
    assert fxmerge.reparameterize(gm).meta["fxmerge_reparameterized"] == 0


def test_branches_off_one_grid_are_no_region():
    class Net(nn.Module):  # a 3x3 unpadded and a 1x1 cropped: equal shapes, other grids
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(4, 4, 3), nn.Conv2d(4, 4, 1)

        def forward(self, x):
            return self.a(x) + self.b(x)[..., 2:, 2:]

    gm = _traced(Net(), torch.randn(1, 4, 6, 6, dtype=torch.float64))
    assert find_regions(gm) == []


def test_reparameterize_refuses_training_mode_batchnorm_and_leaves_its_input_alone():
    model = Branched(4, 4, 1, [("conv", (3, 3), 1, True), ("bn",)], 0)
    gm = _traced(model, torch.randn(1, 4, 6, 6, dtype=torch.float64))
    before = [n.name for n in gm.graph.nodes]
    fxmerge.reparameterize(gm)
    assert [n.name for n in gm.graph.nodes] == before
    gm.train()
    with pytest.raises(fxmerge.MergeError, match="training mode"):
        fxmerge.reparameterize(gm)
    with pytest.raises(fxmerge.ArgumentError, match="trace the model"):
        fxmerge.reparameterize(model)


def test_the_space_saves_its_regions():
    model = Branched(4, 4, 1, [("conv", (3, 3), 1, True), ("conv", (3, 1), 1, False),
                               ("scale",)], 0)
    gm = _traced(model, torch.randn(1, 4, 6, 6, dtype=torch.float64))
    space = fxmerge.analyze(gm)
    assert fxmerge.MergeSpace.from_json(space.to_json()) == space
    assert reach(space)["regions"] == 1 and "1 regions of parallel" in space.summary()


# ---- timm's re-parameterisable families ----------------------------------------------------
timm = pytest.importorskip("timm")
X = torch.randn(1, 3, 32, 32)
# multi-conv entries of the branchy network at 64x64, with no kernel bound, as the space of
# timm's own re-parameterised network has them
FAMILIES = {"repvgg_a0": (564, 586, 120), "mobileone_s0": (2415, 2458, 360),
            "repvit_m0_9": None}


@pytest.mark.parametrize("name", list(FAMILIES))
def test_timm_reparameterizable_families(name):
    from timm.utils.model import reparameterize_model

    model = randomize_batchnorm(timm.create_model(name, pretrained=False))
    gm = fxmerge.trace(model, X)
    collapsed = fxmerge.reparameterize(gm)
    reference = reparameterize_model(model)
    count = lambda m: sum(isinstance(c, nn.Conv2d) for c in m.modules())
    assert count(collapsed) == count(reference) < count(model)
    space = fxmerge.analyze(gm)
    with torch.no_grad():
        assert relative_error(model(X), collapsed(X)) <= 1e-5  # (the identity plan: test_zoo)
        pruned = fxmerge.prune(gm, fxmerge.Plan.random(space, 0), space).eval()
        assert relative_error(pruned(X), fxmerge.merge(pruned)(X)) <= 1e-4
    big = torch.randn(1, 3, 64, 64)
    ours = fxmerge.analyze(fxmerge.trace(model, big), max_kernel_bytes=2**40)
    theirs = fxmerge.analyze(fxmerge.trace(reference, big), max_kernel_bytes=2**40)
    assert ours.entries == theirs.entries and ours.blocks == theirs.blocks
    if FAMILIES[name] is not None:
        multi = sum(e.j - e.i >= 2 for e in ours.entries)
        assert (multi, ours.num_entries, ours.num_blocks) == FAMILIES[name]


def test_an_add_of_zero_is_no_op():
    class Net(nn.Module):
        def forward(self, x):
            return torch.relu(0 + (x + 0))

    gm = fxmerge.trace(Net(), torch.randn(1, 2, 4, 4))
    assert not [n for n in gm.graph.nodes if n.target in (operator.add, torch.add)]


def test_a_region_entry_resets_every_branch_before_its_fine_tune():
    from fxmerge.solve.layermerge import reset_modules

    model = Branched(4, 4, 1, [("conv", (3, 3), 1, True), ("conv", (1, 1), 1, False),
                               ("bn",)], 0)
    gm = _traced(model, torch.randn(1, 4, 6, 6, dtype=torch.float64))
    space = fxmerge.analyze(gm)
    (entry,) = [e for e in space.entries if e.k]
    assert sorted(reset_modules(space, entry)) == ["branches.0.0", "branches.0.1",
                                                   "branches.1.0", "branches.2"]


@pytest.mark.parametrize("identity", [True, False])
def test_ultralytics_repconv_collapses_as_its_own_fuse(identity):
    conv = pytest.importorskip("ultralytics.nn.modules.conv")
    import copy

    block = randomize_batchnorm(conv.RepConv(8, 8, bn=identity), seed=3)
    x = torch.randn(2, 8, 12, 12)
    collapsed = fxmerge.reparameterize(fxmerge.trace(block, x))
    fused = copy.deepcopy(block)
    fused.fuse_convs()  # ultralytics' own re-parameterisation of this block
    with torch.no_grad():
        assert relative_error(block(x), collapsed(x)) <= 1e-5
        assert relative_error(fused.forward_fuse(x), collapsed(x)) <= 1e-5
    assert sum(isinstance(m, nn.Conv2d) for m in collapsed.modules()) == 1


def test_the_torch_compile_pre_pass_applies_a_plan_over_regions():
    model = randomize_batchnorm(timm.create_model("repvgg_a0", pretrained=False))
    gm = fxmerge.trace(model, X)
    space = fxmerge.analyze(gm)
    plan = fxmerge.Plan.random(space, 1)
    compiled = torch.compile(model, backend=fxmerge.backend(plan, then="eager"))
    with torch.no_grad():
        assert relative_error(fxmerge.transform(gm, plan, space)(X), compiled(X)) <= 1e-6


def test_regions_back_to_back_collapse_one_after_the_other():
    first = Branched(4, 4, 1, [("conv", (3, 3), 1, True), ("bn",)], 0)
    second = Branched(4, 4, 1, [("conv", (1, 3), 1, False), ("input",)], 1)
    model = nn.Sequential(first, second)  # the second region reads the first's output
    x = torch.randn(1, 4, 7, 7, dtype=torch.float64)
    collapsed = fxmerge.reparameterize(_traced(model, x))
    assert sum(kind_of(collapsed, n) is NodeKind.CONV for n in collapsed.graph.nodes) == 2
    with torch.no_grad():
        assert relative_error(model(x), collapsed(x)) <= 1e-10


def test_a_kernel_off_a_square_grid_is_read_in_its_own_form():
    """Kernel, padding and dilation are per axis: a 3x1 padded (2, 1) (rows reach 0,
    columns -2) is no cube, and needs none."""
    conv = nn.Conv2d(4, 4, (3, 1), padding=(2, 1), dilation=2).double()
    assert ops.conv_refusal(conv) is None
    affine = fxmerge.algebra.from_conv(conv)
    assert (affine.kernel, affine.padding, affine.dilation) == ((3, 1), (2, 1), (2, 2))
    x = torch.randn(1, 4, 7, 7, dtype=torch.float64)
    with torch.no_grad():
        assert relative_error(conv(x), affine(x)) <= 1e-12


def test_a_space_saved_with_one_padding_per_region_reads_back():
    """Before paddings were per axis a region's was one int: such a saved space loads."""
    model = Branched(4, 4, 1, [("conv", (3, 3), 1, True), ("conv", (1, 1), 1, False)], 0)
    space = fxmerge.analyze(_traced(model, torch.randn(1, 4, 7, 7, dtype=torch.float64)))
    data = json.loads(space.to_json())
    assert data["regions"][0]["padding"] == [1, 1]
    data["regions"][0]["padding"] = 1
    assert fxmerge.MergeSpace.from_json(json.dumps(data)) == space
