"""Convolutions of every spatial rank: 1-D (signals) and 3-D (video, volumes) through the
algebra and the whole pipeline, exactly as 2-D."""

import math

import pytest
import torch
import torchvision
from helpers import randomize_batchnorm
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import fxmerge
from fxmerge import MergeError, algebra
from fxmerge.models import TCN1d, VocoderStack
from fxmerge.sides import per_axis
from fxmerge.solve import METHODS

CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
NORM = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
SIDE = {1: 23, 3: 9}  # input side per rank: small enough for float64 3-D


@st.composite
def chains(draw):
    """A chain of 1-3 convs of one rank (groups, dilation, stride, BN; kernel, stride,
    dilation and padding per axis, R(2+1)D-style); the chain's padding on its first conv."""
    rank = draw(st.sampled_from([1, 3]))

    def sides(values):  # one for every axis, or one per axis
        return draw(st.one_of(st.sampled_from(values),
                              st.tuples(*[st.sampled_from(values)] * rank)))

    channels, layers = draw(st.sampled_from([2, 4])), []
    for idx in range(draw(st.integers(1, 3))):
        groups = draw(st.sampled_from([1, 2, channels]))
        out = channels * draw(st.sampled_from([1, 2])) if groups == channels else 4
        layers.append(dict(  # noqa: C408
            in_channels=channels, out_channels=out, groups=groups,
            kernel_size=sides([1, 3]), stride=sides([1, 2]), dilation=sides([1, 2]),
            padding=sides([0, 1, 2]) if idx == 0 else 0, bn=draw(st.booleans())))
        channels = out
    return rank, layers, draw(st.integers(0, 2**31 - 1))


@settings(max_examples=60, deadline=None)
@given(chains())
def test_a_composed_nd_chain_equals_the_chain(chain):
    rank, layers, seed = chain
    gen = torch.Generator().manual_seed(seed)
    modules, affine = [], None
    for spec in layers:
        spec = dict(spec)
        with_bn = spec.pop("bn")
        conv = CONV[rank](**spec).double()
        conv.weight.data = torch.randn(conv.weight.shape, generator=gen, dtype=torch.float64)
        conv.bias.data = torch.randn(conv.bias.shape, generator=gen, dtype=torch.float64)
        step = algebra.from_conv(conv)
        modules.append(conv)
        if with_bn:
            bn = randomize_batchnorm(NORM[rank](conv.out_channels), seed).double()
            modules.append(bn)
            step = algebra.fold_bn(step, bn)
        affine = step if affine is None else algebra.compose(affine, step)
    side = [max(SIDE[rank], e - 2 * p + s)
            for e, p, s in zip(affine.extent, affine.padding, affine.stride)]
    x = torch.randn(2, layers[0]["in_channels"], *side, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        want = nn.Sequential(*modules).eval()(x)
    got = algebra.to_conv(affine, torch.float64)(x)
    assert type(algebra.to_conv(affine, torch.float64)) is CONV[rank]
    assert got.shape == want.shape
    assert (got - want).abs().max() <= 1e-10 * max(1.0, float(want.abs().max()))


class Net(nn.Module):
    """Stem, a residual block (dilated, grouped), a depthwise conv, a 1x1, a strided conv."""

    def __init__(self, rank: int, c: int = 8) -> None:
        super().__init__()
        conv, norm = CONV[rank], NORM[rank]
        self.stem = nn.Sequential(conv(3, c, 3, padding=1), norm(c), nn.ReLU())
        self.res = nn.Sequential(conv(c, c, 3, padding=1, bias=False), norm(c), nn.ReLU(),
                                 conv(c, c, 3, padding=2, dilation=2, groups=2), norm(c))
        self.tail = nn.Sequential(conv(c, c, 3, padding=1, groups=c), norm(c), nn.ReLU(),
                                  conv(c, c, 1), nn.ReLU(), conv(c, c, 3, stride=2, padding=1))

    def forward(self, x):
        x = self.stem(x)
        return self.tail(torch.relu(self.res(x) + x))


@pytest.mark.parametrize("rank", [1, 3])
def test_random_plans_merge_exactly_and_the_identity_keeps_every_conv_native(rank):
    x = torch.randn(2, 3, *[SIDE[rank]] * rank, dtype=torch.float64)
    model = randomize_batchnorm(Net(rank)).double()
    gm = fxmerge.trace(model, x)
    space = fxmerge.analyze(gm)
    assert space.L == 6 and {c.rank for c in space.convs} == {rank}
    assert any(e.j - e.i > 1 for e in space.entries) and space.skips
    assert _worst_error(gm, space, x, 8) <= 1e-10
    merged = fxmerge.transform(gm, fxmerge.Plan.identity(space), space)
    with torch.no_grad():
        assert torch.allclose(merged(x), model(x), rtol=0, atol=1e-12)
    native = [(m.kernel_size, m.dilation, m.groups, m.stride) for m in model.modules()
              if isinstance(m, CONV[rank])]
    assert [(m.kernel_size, m.dilation, m.groups, m.stride) for m in merged.modules()
            if isinstance(m, CONV[rank])] == native


def test_a_3d_composition_over_the_memory_bound_is_refused_by_name():
    """A merged 3-D kernel grows with the cube of its side: over `max_kernel_bytes` the
    space leaves the entry out and the algebra refuses to build it."""
    x = torch.randn(1, 3, 9, 9, 9, dtype=torch.float64)
    gm = fxmerge.trace(randomize_batchnorm(Net(3)).double(), x)
    full, small = fxmerge.analyze(gm), fxmerge.analyze(gm, max_kernel_bytes=40_000)
    assert max(full.merged_conv(e).bytes for e in full.entries) > 40_000
    assert small.num_entries < full.num_entries
    assert max(small.merged_conv(e).bytes for e in small.entries) <= 40_000
    a = algebra.from_conv(nn.Conv3d(64, 64, 5).double())
    with pytest.raises(MergeError, match="max_kernel_bytes"):
        algebra.compose(a, algebra.from_conv(nn.Conv3d(64, 64, 5).double()), 2**20)


def test_a_pre_activation_skip_is_no_block_input():
    """`x + conv(act(x))`: the block's first conv does not read the skip's source, so the
    skip is not fused (merging it ended in a MergeError on the vocoder's stacks)."""
    model = VocoderStack(mels=8, channels=8).double().eval()
    x = torch.randn(2, 8, 16, dtype=torch.float64)
    gm = fxmerge.trace(model, x)
    space = fxmerge.analyze(gm)
    assert not space.skips
    assert _worst_error(gm, space, x, 6) <= 1e-10


def _worst_error(gm, space, x: torch.Tensor, plans: int) -> float:
    """The worst error of random plans' merged networks against their pruned ones,
    relative to the output's size."""
    worst = 0.0
    for seed in range(plans):
        plan = fxmerge.Plan.random(space, seed)
        with torch.no_grad():
            want = fxmerge.prune(gm, plan, space).eval()(x)
            got = fxmerge.transform(gm, plan, space)(x)
        worst = max(worst, float((got - want).abs().max() / want.abs().max()))
    return worst


def _zoo(model: nn.Module, x: torch.Tensor, plans: int = 3) -> tuple[int, float]:
    """Multi-conv entries of the model's space and `_worst_error` (float64)."""
    model, x = randomize_batchnorm(model).double(), x.double()
    gm = fxmerge.trace(model, x)
    space = fxmerge.analyze(gm)
    return sum(e.j - e.i > 1 for e in space.entries), _worst_error(gm, space, x, plans)


def _monai_basic_unet():
    monai = pytest.importorskip("monai.networks.nets")
    return monai.BasicUNet(spatial_dims=3, in_channels=1, out_channels=2,
                           features=(8, 8, 16, 32, 64, 8), norm="batch")


def _monai_unet():
    monai = pytest.importorskip("monai.networks.nets")
    return monai.UNet(spatial_dims=3, in_channels=1, out_channels=2, channels=(8, 16, 32),
                      strides=(2, 2), num_res_units=2, norm="batch")


VIDEO = torchvision.models.video
ZOO = {
    "tcn1d": (TCN1d, (1, 40, 101)),
    "vocoder": (VocoderStack, (1, 80, 32)),
    "r3d_18": (VIDEO.r3d_18, (1, 3, 8, 32, 32)),
}
SLOW_ZOO = {
    "monai_basic_unet": (_monai_basic_unet, (1, 1, 32, 32, 32)),
    "mc3_18": (VIDEO.mc3_18, (1, 3, 8, 32, 32)),
    "monai_unet": (_monai_unet, (1, 1, 32, 32, 32)),
}


@pytest.mark.parametrize("name", list(ZOO))
def test_real_1d_and_3d_networks_offer_multi_conv_blocks_and_merge_exactly(name):
    factory, shape = ZOO[name]
    multi, worst = _zoo(factory(), torch.randn(shape))
    assert multi > 0 and worst < 1e-10, (multi, worst)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SLOW_ZOO))
def test_more_3d_networks_merge_exactly(name):
    factory, shape = SLOW_ZOO[name]
    multi, worst = _zoo(factory(), torch.randn(shape))
    assert multi > 0 and worst < 1e-10, (multi, worst)


def test_a_1d_latency_table_times_conv1d_layers():
    x = torch.randn(1, 3, 64)
    gm = fxmerge.trace(randomize_batchnorm(Net(1)), x)
    space = fxmerge.analyze(gm)
    table = fxmerge.measure_latency(space, gm, warmup=0, repeat=2, progress=False)
    layer = fxmerge.entry_layer(space, space.entries[0])
    assert len(layer.input_shape) == 3 and "1x3x64->" in layer.label
    assert isinstance(layer.module(torch.device("cpu"), torch.float32)[0]
                      if layer.activation else layer.module(torch.device("cpu"),
                                                            torch.float32), nn.Conv1d)
    assert len(table) == space.num_entries


def test_weight_normed_convs_are_searched_through_torch_export():
    """torch.export leaves a plain Conv1d holding the parametrizations' module: still a
    conv fxmerge searches (it was refused as 'not a plain conv')."""
    model = VocoderStack(mels=8, channels=8).eval()
    x = torch.randn(2, 8, 16)
    traced = fxmerge.analyze(fxmerge.trace(model, x))
    exported = fxmerge.analyze(fxmerge.trace(torch.export.export(model, (x,)), x))
    assert exported.L == traced.L == 14 and not exported.left_out


def test_a_merged_1d_network_saves_loads_exports_and_compiles(tmp_path):
    """Deploying works whatever the rank: safetensors round trip, ONNX (onnxruntime), and
    the torch.compile pre-pass giving the merged network's output."""
    model, x = TCN1d(widths=(16, 32)).eval(), torch.randn(1, 40, 48)
    gm = fxmerge.trace(model, x)
    space = fxmerge.analyze(gm)
    plan = fxmerge.Plan.random(space, 1)
    merged = fxmerge.transform(gm, plan, space)
    with torch.no_grad():
        want = merged(x)
        fxmerge.save(merged, tmp_path / "m.safetensors")
        back = fxmerge.load(tmp_path / "m.safetensors", model=TCN1d(widths=(16, 32)).eval())
        assert torch.equal(back(x), want)
        compiled = torch.compile(model, backend=fxmerge.backend(plan, then="eager"))
        assert torch.allclose(compiled(x), want, atol=1e-5)
    ort = pytest.importorskip("onnxruntime")
    fxmerge.export_onnx(merged, x, tmp_path / "m.onnx")
    session = ort.InferenceSession(str(tmp_path / "m.onnx"))
    out = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    assert abs(out - want.numpy()).max() < 1e-4


def test_a_weight_normed_conv_stays_trainable_as_weight_norm_in_the_pruned_network():
    """`parametrizations.weight_norm` convs are searched as they are: where the plan keeps
    a conv, the pruned network trains its magnitude and direction, not a folded weight."""
    model, x = VocoderStack(mels=8, channels=8).eval(), torch.randn(2, 8, 16)
    gm = fxmerge.trace(model, x)
    space = fxmerge.analyze(gm)
    pruned = fxmerge.prune(gm, fxmerge.Plan.identity(space), space).train()
    conv = pruned.get_submodule("pre")
    assert {n for n, _ in conv.named_parameters()} == {
        "bias", "parametrizations.weight.original0", "parametrizations.weight.original1"}
    pruned(x).square().sum().backward()
    assert conv.parametrizations.weight.original0.grad.abs().sum() > 0


class FunctionalPReLU(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv3d(2, 4, 3, padding=1), nn.Conv3d(4, 4, 3, padding=1)
        self.slope = nn.Parameter(torch.full((4,), 0.2))

    def forward(self, x):
        return self.b(nn.functional.prelu(self.a(x), self.slope))


@pytest.mark.parametrize("form", ["symbolic_trace", "export"])
def test_a_functional_prelu_is_an_activation_module(form):
    """`F.prelu` (what torch.export leaves of `nn.PReLU`, MONAI's default) becomes a PReLU
    module: removable between convs, not a barrier."""
    model, x = FunctionalPReLU().eval(), torch.randn(1, 2, 6, 6, 6)
    gm = fxmerge.trace(torch.export.export(model, (x,)) if form == "export" else model, x)
    assert any(isinstance(m, nn.PReLU) and m.num_parameters == 4 for m in gm.modules())
    space = fxmerge.analyze(gm)
    assert (0, 2) in space.blocks
    plan = fxmerge.Plan.random(space, 0)
    with torch.no_grad():
        assert torch.allclose(fxmerge.transform(gm, plan, space)(x),
                              fxmerge.prune(gm, plan, space).eval()(x), atol=1e-5)


class RepBlock3d(nn.Module):
    """RepVGG-style in 3-D: 3x3x3 + BN, 1x1x1 + BN and BN identity, summed, then ReLU."""

    def __init__(self, c: int = 4) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Conv3d(c, c, 3, padding=1, bias=False), nn.BatchNorm3d(c))
        self.b = nn.Sequential(nn.Conv3d(c, c, 1, bias=False), nn.BatchNorm3d(c))
        self.i = nn.BatchNorm3d(c)

    def forward(self, x):
        return torch.relu(self.a(x) + self.b(x) + self.i(x))


def test_3d_regions_with_an_identity_branch_move_their_padding_on_every_side():
    """A region's branch without a conv reads a zero-padded input when the block's padding
    moves: on all three sides in 3-D (it padded two)."""
    model = randomize_batchnorm(nn.Sequential(nn.Conv3d(2, 4, 3, padding=1), nn.ReLU(),
                                              RepBlock3d(), RepBlock3d())).double()
    x = torch.randn(1, 2, 7, 7, 7, dtype=torch.float64)
    gm = fxmerge.trace(model, x)
    space = fxmerge.analyze(gm)
    assert len(space.regions) == 2 and any(e.j - e.i > 1 for e in space.entries)
    assert _worst_error(gm, space, x, 6) <= 1e-10


class Factorised(nn.Module):
    """R(2+1)D's factorised 3-D convs: a `1x3x3` spatial conv then a `3x1x1` temporal one,
    in a stem, a residual block and a stage strided per axis (`1x2x2`, then `2x1x1`)."""

    def __init__(self, c: int = 6, mid: int = 8) -> None:
        super().__init__()

        def pair(cin, cmid, cout, stride=1, last_act=True):
            return [nn.Conv3d(cin, cmid, (1, 3, 3), (1, stride, stride), (0, 1, 1)),
                    nn.BatchNorm3d(cmid), nn.ReLU(),
                    nn.Conv3d(cmid, cout, (3, 1, 1), (stride, 1, 1), (1, 0, 0)),
                    nn.BatchNorm3d(cout), *([nn.ReLU()] if last_act else [])]

        self.stem = nn.Sequential(*pair(3, c, c))
        self.block = nn.Sequential(*pair(c, mid, c, last_act=False))
        self.down = nn.Sequential(*pair(c, mid, mid, stride=2))

    def forward(self, x):
        x = self.stem(x)
        return self.down(torch.relu(self.block(x) + x))


def test_factorised_convs_merge_per_axis_and_stay_native_alone():
    """`1x3x3` and `3x1x1` convs (R(2+1)D) are searched with their kernel, stride and
    padding per axis: a pair merges into a `3x3x3`; one conv alone keeps its own form, in
    the identity plan and in the latency layer that times it; plans, spaces and tables
    keep per-axis kernels through JSON."""
    model = randomize_batchnorm(Factorised()).double()
    x = torch.randn(2, 3, 5, 9, 9, dtype=torch.float64)
    gm = fxmerge.trace(model, x)
    space = fxmerge.analyze(gm, stride_rule="exact")
    assert space.L == 6 and not space.left_out and space.skips
    assert space.convs[0].kernel == (1, 3, 3) and space.convs[5].stride == (2, 1, 1)
    assert fxmerge.Entry(0, 2, 3, False) in space.entries  # the stem's pair: 3x3x3
    assert fxmerge.Entry(0, 1, (1, 3, 3), False) in space.entries
    alone = fxmerge.entry_layer(space, fxmerge.Entry(0, 1, (1, 3, 3), False))
    assert (alone.kernel, alone.padding, alone.stride) == ((1, 3, 3), (0, 1, 1), 1)
    strided = next(e for e in space.entries if (e.i, e.j) == (4, 6))  # 1x2x2 then 2x1x1
    layer = fxmerge.entry_layer(space, strided)
    assert (layer.kernel, layer.stride) == (3, 2)
    assert _worst_error(gm, space, x, 8) <= 1e-10
    merged = fxmerge.transform(gm, fxmerge.Plan.identity(space), space)
    native = [(m.kernel_size, m.stride, m.padding) for m in model.modules()
              if isinstance(m, nn.Conv3d)]
    assert [(m.kernel_size, m.stride, m.padding) for m in merged.modules()
            if isinstance(m, nn.Conv3d)] == native
    plan = fxmerge.Plan.random(space, 3)
    assert fxmerge.Plan.from_json(plan.to_json()) == plan
    assert fxmerge.MergeSpace.from_json(space.to_json()) == space
    table = fxmerge.LatencyTable({e: 1.0 for e in space.entries}, space.signature)
    assert fxmerge.LatencyTable.from_json(table.to_json()).values == table.values
    assert _solved_error(gm, space, x) <= 1e-10


def _solved_error(gm, space, x: torch.Tensor) -> float:
    """The worst error, merged against pruned, of LayerMerge's, Depth's and LayerOnly's
    plans at 80% of a table that charges a merged kernel by its taps (the fastest plan
    where that is out of reach)."""
    latency = fxmerge.LatencyTable.from_values(space, {
        e: 0.0 if e.k == 0 else 1.0 + 0.01 * math.prod(per_axis(e.k, x.dim() - 2))
        for e in space.entries})
    keys = {k for m in METHODS.values() for k in m.importance_keys(space)}
    importance = fxmerge.ImportanceTable.from_values(space, {k: 1.0 for k in keys})
    worst = 0.0
    for method in METHODS:
        try:
            plan = fxmerge.solve(space, latency, importance, budget=0.8, method=method)
        except fxmerge.InfeasibleBudget as exc:
            plan = exc.plan
        with torch.no_grad():
            want = fxmerge.prune(gm, plan, space).eval()(x)
            got = fxmerge.transform(gm, plan, space)(x)
        worst = max(worst, float((got - want).abs().max() / want.abs().max()))
    return worst


@pytest.mark.slow
def test_r2plus1d_offers_factorised_blocks_and_merges_exactly():
    """torchvision's R(2+1)D: every conv searched (3 were, before kernels per axis)."""
    model, x = randomize_batchnorm(VIDEO.r2plus1d_18()).double(), torch.randn(
        1, 3, 8, 32, 32, dtype=torch.float64)
    multi, worst = _zoo(model, x)
    assert multi >= 30 and worst < 1e-10, (multi, worst)
    gm = fxmerge.trace(model, x)
    assert _solved_error(gm, fxmerge.analyze(gm, stride_rule="exact"), x) < 1e-10
