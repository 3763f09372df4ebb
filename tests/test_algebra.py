import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from fxmerge import MergeError, algebra

torch.set_default_dtype(torch.float32)


def random_bn(channels: int, gen: torch.Generator) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(channels, eps=float(torch.rand(1, generator=gen)) * 1e-2 + 1e-5)
    bn.running_mean = torch.randn(channels, generator=gen, dtype=torch.float64)
    bn.running_var = torch.rand(channels, generator=gen, dtype=torch.float64) + 0.1
    bn.weight.data = torch.randn(channels, generator=gen, dtype=torch.float64)
    bn.bias.data = torch.randn(channels, generator=gen, dtype=torch.float64)
    return bn.double().eval()


@st.composite
def conv_chains(draw):
    """A chain of 1-4 convs; the whole chain's padding sits on its first conv."""
    n = draw(st.integers(1, 4))
    channels = draw(st.sampled_from([1, 2, 3, 4, 6]))
    layers = []
    for idx in range(n):
        kind = draw(st.sampled_from(["dense", "depthwise", "grouped", "multiplier"]))
        c_in = channels
        if kind == "depthwise":
            c_out, groups = c_in, c_in
        elif kind == "multiplier":
            c_out, groups = 2 * c_in, c_in
        elif kind == "grouped" and c_in % 2 == 0:
            c_out, groups = draw(st.sampled_from([2, 4, 6])), 2
        else:
            c_out, groups = draw(st.integers(1, 5)), 1
        layers.append(dict(  # noqa: C408
            in_channels=c_in, out_channels=c_out, groups=groups,
            kernel_size=draw(st.integers(1, 7)), stride=draw(st.integers(1, 2)),
            dilation=draw(st.sampled_from([1, 1, 2])),
            padding=draw(st.integers(0, 3)) if idx == 0 else 0,
            bias=draw(st.booleans()), bn=draw(st.booleans())))
        channels = c_out
    return layers, draw(st.integers(0, 2**31 - 1))


@settings(max_examples=150, deadline=None)
@given(conv_chains())
def test_composed_chain_equals_the_chain(chain):
    layers, seed = chain
    gen = torch.Generator().manual_seed(seed)
    modules = []
    for spec in layers:
        spec = dict(spec)
        with_bn = spec.pop("bn")
        conv = nn.Conv2d(**spec).double()
        conv.weight.data = torch.randn(conv.weight.shape, generator=gen, dtype=torch.float64)
        if conv.bias is not None:
            conv.bias.data = torch.randn(conv.bias.shape, generator=gen, dtype=torch.float64)
        modules.append((conv, random_bn(conv.out_channels, gen) if with_bn else None))

    reach, stride = 1, 1  # receptive field and stride of the whole chain
    for spec in layers:
        reach += (spec["kernel_size"] - 1) * spec["dilation"] * stride
        stride *= spec["stride"]
    size = reach + 3 * stride
    x = torch.randn(2, layers[0]["in_channels"], size, size + 3, generator=gen,
                    dtype=torch.float64)
    ref = x
    for conv, bn in modules:
        ref = conv(ref) if bn is None else bn(conv(ref))
    total = None
    for conv, bn in modules:
        step = algebra.from_conv(conv)
        step = algebra.fold_bn(step, bn) if bn is not None else step
        total = step if total is None else algebra.compose(total, step)
    out = total(x)
    assert out.shape == ref.shape
    err = (out - ref).abs().max() / ref.abs().max().clamp_min(1e-12)
    assert err <= 1e-10


def test_merged_kernel_size_and_stride():
    a = algebra.from_conv(nn.Conv2d(2, 2, 3, stride=2, padding=1).double())
    b = algebra.from_conv(nn.Conv2d(2, 2, 3).double())
    ab = algebra.compose(a, b)
    assert (ab.kernel, ab.stride, ab.padding) == ((7, 7), (2, 2), (1, 1))  # (3 - 1) * 2 + 3


def test_compose_refuses_a_padded_second_conv():
    a = algebra.from_conv(nn.Conv2d(2, 2, 3, padding=1).double())
    with pytest.raises(MergeError, match="move the padding"):
        algebra.compose(a, a)


def test_fold_bn_reads_eps():
    gen = torch.Generator().manual_seed(1)
    conv = nn.Conv2d(3, 4, 3, padding=1).double()
    bn = random_bn(4, gen)
    bn.eps = 0.5
    x = torch.randn(1, 3, 8, 8, dtype=torch.float64)
    folded = algebra.fold_bn(algebra.from_conv(conv), bn)
    torch.testing.assert_close(folded(x), bn(conv(x)), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("projection", [False, True])
def test_skip_fusion_identity_and_projection(projection):
    """relu-free residual block: bn2(conv2(bn1(conv1(x)))) + skip(x), padding moved."""
    gen = torch.Generator().manual_seed(2)
    c_in, c_out, stride = 4, (6 if projection else 4), (2 if projection else 1)
    conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1 + stride, bias=False).double()
    conv2 = nn.Conv2d(c_out, c_out, 3, padding=0, bias=False).double()
    bn1, bn2 = random_bn(c_out, gen), random_bn(c_out, gen)
    x = torch.randn(2, c_in, 16, 16, dtype=torch.float64)
    main = algebra.compose(algebra.fold_bn(algebra.from_conv(conv1), bn1),
                           algebra.fold_bn(algebra.from_conv(conv2), bn2))
    if projection:
        proj, bnp = nn.Conv2d(c_in, c_out, 1, stride=2, bias=False).double(), random_bn(c_out, gen)
        skip = algebra.fold_bn(algebra.from_conv(proj), bnp)
        ref = main(x) + bnp(proj(x))
    else:
        skip = algebra.identity(c_in)
        ref = main(x) + x
    fused = algebra.add(main, skip)
    assert fused.kernel == main.kernel
    torch.testing.assert_close(fused(x), ref, rtol=1e-10, atol=1e-10)


def test_add_refuses_misaligned_paths():
    a = algebra.from_conv(nn.Conv2d(2, 2, 3, padding=0).double())
    with pytest.raises(MergeError, match="centred"):
        algebra.add(a, algebra.identity(2))


def test_depthwise_chains_regroup():
    convs = [nn.Conv2d(4, 4, 3, groups=4, padding=p).double() for p in (2, 0)]
    merged = algebra.compose(*(algebra.from_conv(c) for c in convs))
    conv = algebra.to_conv(merged, torch.float64)
    assert conv.groups == 4 and conv.kernel_size == (5, 5)
    x = torch.randn(1, 4, 9, 9, dtype=torch.float64)
    torch.testing.assert_close(conv(x), convs[1](convs[0](x)))


def test_algebra_guards_name_what_is_wrong():
    a = algebra.from_conv(nn.Conv2d(2, 3, 1).double())
    with pytest.raises(MergeError, match="channel mismatch 3 -> 2"):
        algebra.compose(a, algebra.from_conv(nn.Conv2d(2, 2, 1).double()))
    strided = algebra.from_conv(nn.Conv2d(2, 2, 1, stride=2).double())
    with pytest.raises(MergeError, match="stride 2 and stride 1"):
        algebra.add(strided, algebra.identity(2))
    with pytest.raises(MergeError, match="no running statistics"):
        algebra.fold_bn(a, nn.BatchNorm2d(3, track_running_stats=False))
    with pytest.raises(MergeError, match="non-identity"):
        algebra.crop_output(a, -1)
    with pytest.raises(MergeError, match="negative padding"):
        algebra.to_conv(algebra.crop_output(a, 1), torch.float32)
