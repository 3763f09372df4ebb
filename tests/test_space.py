import pytest
import torch
import torchvision
from models import DataDependent, TinyUNet

import fxmerge
from fxmerge.space import Entry

X64 = torch.randn(1, 3, 64, 64)
MBV2_EXCLUDE = ["features.0.0", "features.18.0"]


def space_of(model, x=X64, **kw):
    return fxmerge.analyze(fxmerge.trace(model, x), **kw)


def test_resnet34_counts_match_the_authors_tables():
    space = space_of(torchvision.models.resnet34(), exclude=["conv1"])
    assert (space.L, space.num_blocks, space.num_entries) == (32, 62, 150)
    assert len(space.skips) == 16
    assert sorted(s.projection for s in space.skips if s.projection) == [
        "layer2.0.downsample.0", "layer3.0.downsample.0", "layer4.0.downsample.0"]


@pytest.mark.parametrize("width", [1.0, 1.4])
def test_mobilenet_v2_counts_match_the_authors_tables(width):
    space = space_of(torchvision.models.mobilenet_v2(width_mult=width), exclude=MBV2_EXCLUDE)
    assert (space.L, space.num_blocks, space.num_entries) == (50, 171, 391)
    # only stride-1 depthwise convs may be removed
    reducible = [c for c in space.convs if not c.irreducible]
    assert reducible and all(c.depthwise and c.stride == 1 for c in reducible)


def test_counts_do_not_depend_on_resolution():
    a = space_of(torchvision.models.resnet34(), torch.randn(1, 3, 224, 224), exclude=["conv1"])
    b = space_of(torchvision.models.resnet34(), torch.randn(1, 3, 32, 32), exclude=["conv1"])
    assert a.entries == b.entries
    assert a.input_shape(0) == (1, 64, 56, 56)  # after the max-pool, not before it


def test_conv_fields_are_read_from_the_modules():
    space = space_of(torchvision.models.mobilenet_v2(), exclude=MBV2_EXCLUDE)
    dw = space.conv("features.2.conv.1.0")
    assert (dw.kernel, dw.stride, dw.padding, dw.groups, dw.depthwise) == (3, 2, 1, 96, True)
    assert dw.norm == "features.2.conv.1.1" and dw.activation == "relu6"
    assert space.conv("features.2.conv.2").activation is None
    assert dw.irreducible and not space.conv("features.3.conv.1.0").irreducible


def _block_paths_are_clean(space):
    """Every node between a block's input and its output is a known, mergeable op: checked
    on a NetworkX view of the space's nodes, apart from the analysis's own walk."""
    import networkx as nx

    g = nx.DiGraph()
    for n in space.nodes:
        g.add_node(n.name, kind=n.kind)
        g.add_edges_from((a, n.name) for a in n.inputs)
    for i, j in space.blocks:
        src = space.units[i].input
        dst = space.units[j - 1].pre_activation
        between = nx.descendants(g, src) & nx.ancestors(g, dst)
        kinds = {g.nodes[n]["kind"] for n in between}
        assert "barrier" not in kinds, (i, j, kinds)


@pytest.mark.parametrize("name", [
    "resnet18", "resnet50", "mobilenet_v3_small", "efficientnet_b0", "vgg11_bn", "mobilenet_v2"])
def test_torchvision_models_analyse_and_no_block_crosses_a_barrier(name):
    space = space_of(getattr(torchvision.models, name)())
    assert space.num_blocks > 0 and space.num_entries >= space.num_blocks
    _block_paths_are_clean(space)
    for e in space.entries:  # odd kernels; 0 (remove it) only for a lone reducible conv
        assert isinstance(e, Entry) and (e.k % 2 == 1 or (
            e.k == 0 and e.j == e.i + 1 and not space.conv(e.j).irreducible
            and [b for b in space.blocks if b[0] < e.j <= b[1]] == [(e.i, e.j)]))


def test_unet_concatenation_and_upsampling_are_barriers():
    space = space_of(TinyUNet())
    names = [c.name for c in space.convs]
    assert names == ["enc1.0", "enc1.2", "mid.0", "mid.2", "dec.0", "dec.2", "dec.4"]
    # enc1 output feeds the concat too; pool, upsample and cat separate the regions
    assert {2, 4} <= space.breaks
    _block_paths_are_clean(space)
    assert (1, 3) not in space.blocks and (3, 5) not in space.blocks
    assert (0, 2) in space.blocks and (4, 7) in space.blocks


def test_kernel_options_track_identity_and_depthwise():
    space = space_of(torchvision.models.mobilenet_v2(), exclude=MBV2_EXCLUDE)
    # features.3: expand 1x1 (R), depthwise 3x3 (reducible), project 1x1 (R)
    assert space.kernel_options(5, 8) == ((1, False), (3, False))
    assert space.kernel_options(6, 7) == ((3, True),)
    assert space.kernel_options(0, 9) == ()  # crosses the stride break after conv 5


def test_residual_rule():
    space = space_of(torchvision.models.resnet34(), exclude=["conv1"])
    # segment (0, 2): a block may not swallow its source and stop inside it
    assert (1, 3) not in space.blocks  # 0 < 1 < 2 < 3 leaves segment (0,2) half-merged
    assert (0, 2) in space.blocks and (0, 4) in space.blocks
    assert space.kernel_options(0, 2) == ((3, False), (5, False))


def test_exact_stride_rule_allows_more_blocks():
    paper = space_of(torchvision.models.resnet18())
    exact = space_of(torchvision.models.resnet18(), stride_rule="exact")
    assert set(paper.entries) < set(exact.entries)
    # a strided 3x3 followed by a 3x3: (3 - 1) * 2 + 3 = 7
    strided = next(c for c in exact.convs if c.stride == 2 and c.kernel == 3)
    i = strided.index - 1
    assert (7, False) in exact.kernel_options(i, i + 2)


def test_summary_and_nodes():
    gm = fxmerge.trace(torchvision.models.resnet18(), X64)
    space = fxmerge.analyze(gm)
    text = space.summary()
    assert "layer2.0.conv1" in text and f"{space.num_entries} entries" in text
    assert [n.name for n in space.nodes] == [n.name for n in gm.graph.nodes]
    assert "2 pooling, 1 reshapes, 1 linear layers" in text  # the barriers, by family


def test_untraceable_model_gets_a_trace_error():
    with pytest.raises(fxmerge.TraceError, match="DataDependent"):
        fxmerge.trace(DataDependent(), torch.randn(1, 3, 8, 8))


def test_shape_errors_name_the_node():
    with pytest.raises(fxmerge.TraceError, match="node 'conv1'"):
        fxmerge.trace(torchvision.models.resnet18(), torch.randn(1, 5, 32, 32))


def test_bad_exclude_and_untraced_graph_are_refused():
    gm = fxmerge.trace(torchvision.models.resnet18(), X64)
    with pytest.raises(fxmerge.ArgumentError, match="not_a_conv"):
        fxmerge.analyze(gm, exclude=["not_a_conv"])
    with pytest.raises(fxmerge.TraceError, match="fxmerge.trace"):
        fxmerge.analyze(torch.fx.symbolic_trace(torchvision.models.resnet18()))
    with pytest.raises(fxmerge.ArgumentError, match="stride_rule"):
        fxmerge.analyze(gm, stride_rule="loose")


def test_trace_does_not_mutate_the_model():
    model = torchvision.models.resnet18().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fxmerge.trace(model, X64)
    assert model.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
