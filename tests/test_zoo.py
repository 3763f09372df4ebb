"""timm models (random weights and BatchNorm statistics) via symbolic_trace and export:
their norm-act layers are understood, and random plans merge exactly."""

import pytest
import torch
from helpers import randomize_batchnorm, relative_error

import fxmerge

timm = pytest.importorskip("timm")
X = torch.randn(1, 3, 32, 32)


@pytest.mark.parametrize("name", ["regnetx_002", "lcnet_050", "mnasnet_100"])
@pytest.mark.parametrize("form", ["symbolic", "export"])
def test_timm_models_have_mergeable_blocks_and_merge_exactly(name, form):
    model = randomize_batchnorm(timm.create_model(name, pretrained=False))
    gm = fxmerge.trace(torch.export.export(model, (X,)) if form == "export" else model, X)
    space = fxmerge.analyze(gm)
    assert sum(j - i >= 2 for i, j in space.blocks) >= 10
    with torch.no_grad():
        identity = fxmerge.transform(gm, fxmerge.Plan.identity(space))
        assert relative_error(model(X), identity(X)) <= 1e-5
        for seed in range(2):
            pruned = fxmerge.prune(gm, fxmerge.Plan.random(space, seed)).eval()
            assert relative_error(pruned(X), fxmerge.merge(pruned)(X)) <= 1e-4


ZOO = ["timm:resnet18", "timm:repvgg_a0", "timm:mobileone_s0", "timm:repvit_m0_9",
       "timm:ghostnet_100", "timm:efficientnet_b0", "timm:res2net50_14w_8s",
       "torchvision:mobilenet_v3_small", "torchvision:shufflenet_v2_x0_5",
       "torchvision:regnet_x_400mf", "torchvision:googlenet"]


@pytest.mark.parametrize("spec", ZOO)
def test_the_identity_plan_merges_every_zoo_model(spec):
    model = randomize_batchnorm(fxmerge.models.load_model(spec))
    gm = fxmerge.trace(model, X)
    space = fxmerge.analyze(gm)
    with torch.no_grad():
        identity = fxmerge.transform(gm, fxmerge.Plan.identity(space), space)
        out = model(X)
        assert relative_error(out[0] if isinstance(out, tuple) else out, identity(X)) <= 1e-5
