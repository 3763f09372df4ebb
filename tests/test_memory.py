"""Memory that scales: merges stay in the convs' native form (groups, dilation), a bound on
what is materialised is stated and enforced, and latency entries time the conv the merge
makes."""

import dataclasses
import math
import subprocess
import sys

import pytest
import torch
import torchvision
from helpers import randomize_batchnorm, relative_error
from hypothesis import given, settings
from hypothesis import strategies as st
from test_algebra import random_bn
from torch import nn

import fxmerge
from fxmerge import MergeError, algebra
from fxmerge.estimate import entry_layer
from fxmerge.space import choose_convs, merge_peak_bytes


def conv_attrs(gm):
    """(name, in, out, kernel, stride, padding, dilation, groups) of every conv called."""
    out = []
    for n in gm.graph.nodes:
        if n.op == "call_module" and isinstance(m := gm.get_submodule(n.target), nn.Conv2d):
            out.append((n.target, m.in_channels, m.out_channels, m.kernel_size, m.stride,
                        m.padding, m.dilation, m.groups))
    return out


@st.composite
def native_chains(draw):
    """A chain of 1-4 convs sharing groups and dilation (stride 1), padding on the first."""
    groups = draw(st.sampled_from([1, 2, 3]))
    per_group = draw(st.sampled_from([1, 2]))
    dilation = draw(st.sampled_from([1, 2, 3]))
    channels = groups * per_group
    layers = []
    for idx in range(draw(st.integers(1, 4))):
        c_out = groups * draw(st.sampled_from([1, 2]))
        layers.append(dict(  # noqa: C408
            in_channels=channels, out_channels=c_out, groups=groups,
            kernel_size=draw(st.sampled_from([1, 3, 5])), dilation=dilation,
            padding=draw(st.integers(0, 4)) if idx == 0 else 0,
            bias=draw(st.booleans()), bn=draw(st.booleans())))
        channels = c_out
    return layers, draw(st.integers(0, 2**31 - 1))


@settings(max_examples=120, deadline=None)
@given(native_chains())
def test_grouped_and_dilated_chains_compose_natively_and_exactly(chain):
    layers, seed = chain
    gen = torch.Generator().manual_seed(seed)
    total, reach, ref_modules = None, 1, []
    for spec in layers:
        spec = dict(spec)
        with_bn = spec.pop("bn")
        conv = nn.Conv2d(**spec).double()
        conv.weight.data = torch.randn(conv.weight.shape, generator=gen, dtype=torch.float64)
        bn = random_bn(conv.out_channels, gen) if with_bn else None
        ref_modules.append((conv, bn))
        step = algebra.from_conv(conv)
        step = algebra.fold_bn(step, bn) if bn is not None else step
        total = step if total is None else algebra.compose(total, step)
        reach += (spec["kernel_size"] - 1) * spec["dilation"]
    x = torch.randn(2, layers[0]["in_channels"], reach + 3, reach + 5, generator=gen,
                    dtype=torch.float64)
    ref = x
    for conv, bn in ref_modules:
        ref = conv(ref) if bn is None else bn(conv(ref))
    assert relative_error(ref, total(x)) <= 1e-10
    groups, dilation = layers[0]["groups"], layers[0]["dilation"]
    assert total.groups == groups  # never expanded to a dense kernel
    assert total.extent == (reach, reach)
    if reach > 1:  # the taps stay `dilation` apart: the merged conv is dilated
        assert total.dilation == (dilation, dilation)
        assert total.kernel == ((reach - 1) // dilation + 1,) * 2
    merged = algebra.to_conv(total, torch.float64)
    assert (merged.groups, merged.dilation) == (groups, total.dilation)
    assert relative_error(ref, merged(x)) <= 1e-10


def test_depthwise_chain_with_identity_skip_stays_depthwise():
    convs = [nn.Conv2d(6, 6, 3, groups=6, dilation=2, padding=p).double() for p in (4, 0)]
    chain = algebra.compose(*(algebra.from_conv(c) for c in convs))
    fused = algebra.add(chain, algebra.identity(6))
    assert (fused.groups, fused.dilation, fused.kernel) == (6, (2, 2), (5, 5))
    x = torch.randn(1, 6, 12, 12, dtype=torch.float64)
    torch.testing.assert_close(fused(x), convs[1](convs[0](x)) + x)


def test_a_composition_past_the_bound_is_refused_before_it_is_made():
    a = algebra.from_conv(nn.Conv2d(64, 64, 3, padding=2).double())
    b = algebra.from_conv(nn.Conv2d(64, 64, 3).double())
    with pytest.raises(MergeError, match=r"64x64x5x5 kernel of 819200 bytes, over the limit "
                                         r"of 294912 bytes"):
        algebra.compose(a, b, max_bytes=64 * 64 * 9 * 8)
    assert algebra.compose(a, b, max_bytes=64 * 64 * 25 * 8).kernel == (5, 5)


def dilated_net() -> nn.Sequential:
    """Dilated and grouped convs in a row, ending without an activation."""
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=2, dilation=2, groups=16), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=2, dilation=2, groups=16), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=4, dilation=4, groups=4), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=4, dilation=4, groups=4), nn.BatchNorm2d(32))


def test_identity_plan_keeps_each_conv_as_it_is():
    model = randomize_batchnorm(dilated_net())
    x = torch.randn(2, 3, 24, 24)
    gm = fxmerge.trace(model, x)
    space = fxmerge.analyze(gm)
    merged = fxmerge.transform(gm, fxmerge.Plan.identity(space))
    before = [a[1:] for a in conv_attrs(gm)]
    assert [a[1:] for a in conv_attrs(merged)] == before
    with torch.no_grad():
        assert relative_error(model(x), merged(x)) <= 1e-5


def test_merged_dilated_blocks_stay_dilated_and_exact():
    model = randomize_batchnorm(dilated_net())
    x = torch.randn(2, 3, 24, 24)
    gm = fxmerge.trace(model, x)
    space = fxmerge.analyze(gm)
    plan = fxmerge.Plan.from_positions(space, [(0, 1), (1, 3), (3, 5)],
                                   {c.name for c in space.convs})
    pruned = fxmerge.prune(gm, plan).eval()
    merged = fxmerge.merge(pruned)
    convs = {a[0]: a for a in conv_attrs(merged)}
    # two 3x3 depthwise at dilation 2: a 5x5 depthwise at dilation 2 (not a dense 9x9)
    assert convs["3"][3:] == ((5, 5), (1, 1), (4, 4), (2, 2), 16)
    assert convs["9"][3:] == ((5, 5), (1, 1), (8, 8), (4, 4), 4)
    with torch.no_grad():
        assert relative_error(pruned(x), merged(x)) <= 1e-5
    # the latency table times exactly these convs
    for (i, j), name in (((1, 3), "3"), ((3, 5), "9")):
        entry = space.full_entries[(i, j)]
        sig = entry_layer(space, entry)
        k, p, d, g = convs[name][3], convs[name][5], convs[name][6], convs[name][7]
        assert (sig.kernel, sig.dilation, sig.groups, sig.padding) == (k[0], d[0], g, p[0])


def test_a_dilated_single_conv_entry_is_timed_as_itself():
    gm = fxmerge.trace(randomize_batchnorm(dilated_net()), torch.randn(1, 3, 24, 24))
    space = fxmerge.analyze(gm)
    sig = entry_layer(space, space.full_entries[(3, 4)])
    assert (sig.kernel, sig.dilation, sig.groups, sig.padding) == (3, 4, 4, 4)
    assert "k3 d4" in sig.label


def test_the_bound_limits_entries_and_merge_refuses_past_it():
    model = randomize_batchnorm(dilated_net())
    x = torch.randn(1, 3, 24, 24)
    gm = fxmerge.trace(model, x)
    full = fxmerge.analyze(gm)
    bound = 3000  # bytes: less than some single convs, which are offered all the same
    small = fxmerge.analyze(gm, max_kernel_bytes=bound)
    assert small.num_entries < full.num_entries

    def peak(space, e):  # what merging the entry's eq.-3 convs materialises
        kept = choose_convs(space, *e)
        return merge_peak_bytes(space, e.i, [space.conv(n).index for n in kept])

    assert all(peak(small, e) <= bound for e in small.entries if e.k)
    assert any(peak(full, e) > bound for e in full.entries if e.k)
    # a single conv is offered even when it is larger than the bound: it is never composed
    assert any(small.merged_conv(e).bytes > bound for e in small.entries)
    # only removals that no neighbour can absorb any more are new
    assert {e for e in set(small.entries) - set(full.entries) if e.k} == set()
    assert small.signature != full.signature
    assert "not offered" in small.summary()
    spans = [(0, 1), (1, 2), (2, 3), (3, 5)]
    with pytest.raises(fxmerge.PlanError, match=r"block 9\.\.12 would materialise a kernel of "
                                                r"25600 bytes to merge, over max_kernel_bytes="
                                                r"3000"):
        fxmerge.prune(gm, fxmerge.Plan.from_positions(small, spans, {c.name for c in small.convs}))
    # merge enforces the bound too, naming the block, the kernel's shape and its bytes
    plan = fxmerge.Plan.from_positions(full, spans, {c.name for c in full.convs})
    pruned = fxmerge.prune(gm, plan).eval()
    with pytest.raises(MergeError, match=r"block 9\.\.12: .*32x4x5x5 kernel of 25600 bytes, "
                                         r"over the limit of 3000 bytes \(max_kernel_bytes\)"):
        fxmerge.merge(pruned, dataclasses.replace(plan, max_kernel_bytes=bound))
    with pytest.raises(fxmerge.ArgumentError, match="max_kernel_bytes"):
        fxmerge.analyze(gm, max_kernel_bytes=0)


def test_plans_record_the_bound_in_json():
    gm = fxmerge.trace(randomize_batchnorm(dilated_net()), torch.randn(1, 3, 24, 24))
    space = fxmerge.analyze(gm, max_kernel_bytes=2**20)
    plan = fxmerge.Plan.identity(space)
    again = fxmerge.Plan.from_json(plan.to_json())
    assert again.max_kernel_bytes == 2**20
    fxmerge.prune(gm, again)  # analysed with the plan's own bound: the signature matches


SEGMENTATION = {
    "deeplabv3_mobilenet_v3_large": torchvision.models.segmentation.deeplabv3_mobilenet_v3_large,
    "lraspp_mobilenet_v3_large": torchvision.models.segmentation.lraspp_mobilenet_v3_large,
}


def _smp_unet():
    smp = pytest.importorskip("segmentation_models_pytorch")
    return smp.Unet("resnet34", encoder_weights=None, classes=5)


SEGMENTATION = {
    **{name: lambda f=f: f(weights=None, weights_backbone=None, num_classes=5)
       for name, f in SEGMENTATION.items()},
    "smp_unet_resnet34": _smp_unet,
}


@pytest.mark.parametrize("name", list(SEGMENTATION))
def test_segmentation_nets_merge_exactly_in_native_form(name):
    model = randomize_batchnorm(SEGMENTATION[name]())
    x = torch.randn(1, 3, 64, 64)
    gm = fxmerge.trace(model, x)
    space = fxmerge.analyze(gm)
    identity = fxmerge.transform(gm, fxmerge.Plan.identity(space))
    original = {a[0]: a[1:] for a in conv_attrs(gm)}
    for name_, *attrs in conv_attrs(identity):  # same convs, BN folded into them
        assert tuple(attrs) == original[name_]
    for seed in range(2):
        plan = fxmerge.Plan.random(space, seed)
        pruned = fxmerge.prune(gm, plan).eval()
        merged = fxmerge.merge(pruned)
        with torch.no_grad():
            want, got = (torch.utils._pytree.tree_leaves(net(x))[0] for net in (pruned, merged))
            assert relative_error(want, got) <= 1e-4


def test_deeplab_identity_merge_stays_small_in_a_fresh_process():
    """The identity plan's merge of DeepLabV3 once tried to allocate 1.2 GB for an ASPP conv
    of 9 MB (and grew past 20 GB): its whole transform now fits in a few hundred MB."""
    code = (
        "import resource, torch, torchvision, fxmerge\n"
        "m = torchvision.models.segmentation.deeplabv3_mobilenet_v3_large(weights=None,"
        " weights_backbone=None, num_classes=5, aux_loss=False).eval()\n"
        "x = torch.randn(1, 3, 96, 96)\n"
        "gm = fxmerge.trace(m, x)\n"
        "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "fxmerge.transform(gm, fxmerge.Plan.identity(fxmerge.analyze(gm)))\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    grown_mib = int(out.stdout.split()[-1]) / 1024
    assert grown_mib < 400, grown_mib
    assert math.isfinite(grown_mib)


def test_the_bound_counts_what_merging_makes_on_the_way_not_only_the_result():
    """FCN-ResNet50's head merged with the backbone ends in a small 21-class kernel, but the
    merge composes left to right through 2048x1024x7x7 on the way: that is what counts."""
    model = randomize_batchnorm(nn.Sequential(
        nn.Conv2d(4, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
        nn.Conv2d(64, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
        nn.Conv2d(64, 2, 1)))
    gm = fxmerge.trace(model, torch.randn(1, 4, 12, 12))
    bound = 20000  # the final 2x4x5x5 kernel fits (1600 bytes); 64x4x5x5 (51200) does not
    space = fxmerge.analyze(gm, max_kernel_bytes=bound)
    assert (0, 3) not in space.full_entries  # all three merged: not offered
    assert fxmerge.Entry(0, 3, 3, False) in space.entries  # without the middle conv: fine
    assert choose_convs(space, 0, 3, 3, False) == ("0", "6")
    spans, kept = [(0, 3)], {"0", "3", "6"}
    with pytest.raises(fxmerge.PlanError, match="51200 bytes to merge"):
        fxmerge.prune(gm, fxmerge.Plan.from_positions(space, spans, kept))
    unbounded = fxmerge.analyze(gm)
    plan = fxmerge.Plan.from_positions(unbounded, spans, kept)
    pruned = fxmerge.prune(gm, plan).eval()
    with pytest.raises(MergeError, match=r"64x4x5x5 kernel of 51200 bytes"):
        fxmerge.merge(pruned, dataclasses.replace(plan, max_kernel_bytes=bound))
    with torch.no_grad():
        x = torch.randn(2, 4, 12, 12)
        assert relative_error(pruned(x), fxmerge.merge(pruned)(x)) <= 1e-5


def test_each_job_stage_gives_the_memory_it_freed_back(monkeypatch):
    """The latency table's held blocks and the proxy's networks stayed with a ResNet-50
    job through its measured timings (1.3-1.6 GB between stages, 0.9-1.1 GB since)."""
    given: list[str] = []
    job = fxmerge.Job(nn.Sequential(nn.Conv2d(3, 4, 3)).eval(), torch.randn(1, 3, 8, 8))
    monkeypatch.setattr(fxmerge.job, "give_back_memory", lambda: given.append("trim"))
    with job.stage("a stage"):
        assert given == []
    assert given == ["trim"]
