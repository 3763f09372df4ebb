"""LayerMerge on the DDPM U-Net, derived from the graph: conditioning adds, relocatable
GroupNorms, and identity entries for convs nothing else can absorb."""

import pytest
import torch
from helpers import relative_error

import fxmerge
from fxmerge.models import DDPM_EXCLUDE, DDPMUNet

X, T = torch.randn(2, 3, 32, 32), torch.tensor([10, 700])


@pytest.fixture(scope="module")
def small():
    """The same block structure with fewer channels."""
    torch.manual_seed(0)
    model = DDPMUNet(ch=32, groups=8).eval()
    gm = fxmerge.trace(model, (X, T))
    return model, gm, fxmerge.analyze(gm, exclude=DDPM_EXCLUDE)


def test_the_cifar10_network_has_the_authors_search_space():
    model = DDPMUNet().eval()
    assert sum(p.numel() for p in model.parameters()) == 35_746_307
    gm = fxmerge.trace(model, (X[:1], T[:1]))
    space = fxmerge.analyze(gm, exclude=DDPM_EXCLUDE)
    assert (space.L, space.num_blocks, space.num_entries) == (51, 73, 98)
    options = {(i, j): [(o.kernel, o.depthwise) for o in space.kernel_options(i, j)]
               for i, j in space.blocks}
    name = lambda p: space.conv(p).name
    resnet = [c.index for c in space.convs if c.name.endswith("conv1")]
    assert len(resnet) == 22
    for p in resnet:  # conv1 alone, conv2 alone, both (one kept: 3, both kept: 5)
        assert name(p + 1).endswith("conv2")
        assert options[(p - 1, p)] == [(3, False)] and options[(p, p + 1)] == [(3, False)]
        assert options[(p - 1, p + 1)] == [(3, False), (5, False)]
        assert space.conv(p).relocatable_norm.endswith("norm2")
    ups = [c.index for c in space.convs if "upsample" in c.name]
    assert len(ups) == 3 and all(options[(p - 1, p)] == [(0, False), (3, False)] for p in ups)
    downs = [c.index for c in space.convs if "downsample" in c.name]
    assert len(downs) == 3 and all(options[(p - 1, p)] == [(3, False)] for p in downs)
    assert options[(0, 1)] == [(3, False)] and name(1) == "conv_in"


def test_identity_plan_is_the_model(small):
    model, gm, space = small
    with torch.no_grad():
        assert relative_error(model(X, T), fxmerge.transform(gm, fxmerge.Plan.identity(
            space))(X, T)) <= 1e-5


@pytest.mark.parametrize("seed", range(4))
def test_random_plans_merge_exactly_after_fine_tuning(small, seed):
    _, gm, space = small
    plan = fxmerge.Plan.random(space, seed)
    pruned = fxmerge.prune(gm, plan)
    relocated = [m for n, m in pruned.named_modules() if n.endswith("_norm")]
    merged_blocks = [b for b in plan.blocks if len(b.convs) == 2]
    assert len(relocated) == len(merged_blocks)
    assert all(isinstance(m, torch.nn.GroupNorm) for m in relocated)
    with torch.no_grad():  # stands for fine-tuning: the fresh norms move, so do the weights
        for m in relocated:
            m.weight.uniform_(0.5, 1.5)
            m.bias.normal_()
        for p in pruned.parameters():
            p.add_(0.01 * torch.randn_like(p))
    pruned.eval()
    merged = fxmerge.merge(pruned)
    with torch.no_grad():
        assert relative_error(pruned(X, T), merged(X, T)) <= 1e-5
        assert relative_error(pruned(X, T[[1, 0]]), merged(X, T[[1, 0]])) <= 1e-5
    convs = lambda g: sum(isinstance(m, torch.nn.Conv2d) and not n.endswith("_condition0")
                          for n, m in g.named_modules())
    assert convs(merged) == convs(pruned) - sum(len(b.kept) == 2 for b in plan.blocks)


def test_the_time_embedding_is_carried_through_the_merged_conv(small):
    _, gm, space = small
    p = next(c.index for c in space.convs if c.name == "down.0.block.0.conv1")
    spans = sorted([(q - 1, q) for q in range(1, space.L + 1) if q not in (p, p + 1)]
                   + [(p - 1, p + 1)])
    plan = fxmerge.Plan.from_positions(space, spans, {c.name for c in space.convs})
    merged = fxmerge.transform(gm, plan)
    assert isinstance(merged.get_submodule("down.0.block.0.conv1_condition0"), torch.nn.Conv2d)
    assert merged.get_submodule("down.0.block.0.conv1").kernel_size == (5, 5)
    with torch.no_grad():
        pruned = fxmerge.prune(gm, plan).eval()
        assert relative_error(pruned(X, T), merged(X, T)) <= 1e-5


def test_a_vector_computed_from_the_block_input_is_not_a_condition():
    class Gate(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.Conv2d(8, 8, 3,
                                                                                  padding=1)

        def forward(self, x):
            h = self.a(x)
            h = h + h.mean((2, 3), keepdim=True)  # depends on the input: not a bias
            return self.b(torch.relu(h))

    gm = fxmerge.trace(Gate().eval(), X)
    space = fxmerge.analyze(gm)
    assert space.L == 2 and (0, 2) not in space.blocks


def test_diffusers_unet_via_export_merges_its_resnet_blocks_exactly():
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    model = diffusers.UNet2DModel(
        sample_size=16, in_channels=3, out_channels=3, layers_per_block=2,
        block_out_channels=(32, 64), norm_num_groups=8,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D")).eval()
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([10, 500])
    gm = fxmerge.trace(torch.export.export(model, (x, t)), (x, t))
    space = fxmerge.analyze(gm, exclude=["*conv_shortcut", "conv_out"])
    pairs = [(i, j) for i, j in space.blocks if j - i == 2]
    assert len(pairs) == 12  # every ResNet block: conv1 and conv2 merge
    assert all(space.conv(j).name.endswith("conv2") for _, j in pairs)
    up = next(c.index for c in space.convs if "upsamplers" in c.name)
    assert space.kernel_options(up - 1, up)[0].kernel == 0  # removable
    with torch.no_grad():
        identity = fxmerge.transform(gm, fxmerge.Plan.identity(space))
        assert relative_error(model(x, t).sample, identity(x, t).sample) <= 1e-5
        for seed in range(2):
            pruned = fxmerge.prune(gm, fxmerge.Plan.random(space, seed)).eval()
            assert relative_error(pruned(x, t).sample, fxmerge.merge(pruned)(x, t).sample) <= 1e-5


def test_tables_and_solve_on_the_unet(small):
    _, gm, space = small
    latency = fxmerge.measure_latency(space, gm, warmup=0, repeat=1)
    removals = [e for e in space.entries if e.k == 0]
    assert len(removals) == 3 and all(latency[e] == 0.0 for e in removals)
    importance = fxmerge.agreement_importance(space, gm, (X, T))
    assert all(e in importance for e in space.entries)
    for budget in (0.73, 0.58):
        plan = fxmerge.solve(space, latency, importance, budget=budget)
        assert plan.predicted_latency_ms <= budget * latency.identity_latency(space) + 1e-9
        pruned = fxmerge.prune(gm, plan).eval()
        with torch.no_grad():
            assert relative_error(pruned(X, T), fxmerge.merge(pruned)(X, T)) <= 1e-5


def test_frechet_distance_is_zero_for_one_set_and_grows_with_a_shift():
    from fxmerge.demos.ddpm import frechet_distance

    feats = torch.randn(400, 8, generator=torch.Generator().manual_seed(0))
    assert abs(frechet_distance(feats, feats)) < 1e-6
    # the same covariance, means 0.5 apart in each of 8 dimensions: 8 * 0.25
    assert frechet_distance(feats, feats + 0.5) == pytest.approx(2.0, rel=1e-6)
    assert frechet_distance(feats, 2 * feats) > 1.0


def test_the_sampler_follows_the_forward_process_with_a_perfect_noise_predictor():
    """Given the true noise of a fixed image at every step, each x_t the sampler visits must
    be distributed as the forward process says, sqrt(abar_t) x0 + sqrt(1 - abar_t) N(0, 1),
    and the last step returns the image."""
    from fxmerge.demos.ddpm import Diffusion

    diffusion = Diffusion(30)
    target = torch.rand(1, 1, 4, 4) * 1.6 - 0.8
    visited = {}

    def oracle(x, t):
        a = diffusion.alpha_bar[t][:, None, None, None]
        visited[int(t[0])] = x.clone()
        return (x - a.sqrt() * target) / (1 - a).sqrt()

    out = diffusion.sample(oracle, 2000, 4, seed=0)
    assert torch.allclose(out, target.expand_as(out), atol=1e-4)
    assert len(visited) == 30
    for step, x in visited.items():
        a = diffusion.alpha_bar[step]
        z = (x - a.sqrt() * target) / (1 - a).sqrt()
        assert abs(z.mean().item()) < 0.05 and abs(z.std().item() - 1) < 0.05, step
