"""The capture stage: every graph form gives a graph that computes what the model computes,
or a clean fxmerge refusal. One test per wrong network and crash seen before."""

import copy

import pytest
import torch
import torch.nn.functional as F
import torchvision
from helpers import randomize_batchnorm, relative_error
from models import conv_unit
from torch import nn

import fxmerge
from fxmerge.capture.trace import capture_by

X = torch.randn(2, 3, 16, 16)


def chain(*layers: nn.Module) -> nn.Sequential:
    return randomize_batchnorm(nn.Sequential(*layers))


def close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-5) -> bool:
    return relative_error(a, b) <= tol


def merged_equals_model(model: nn.Module, gm, inputs=(X,), plan=None) -> bool:
    plan = plan or fxmerge.Plan.identity(fxmerge.analyze(gm))
    with torch.no_grad():
        return close(model.eval()(*inputs), fxmerge.transform(gm, plan)(*inputs))


# ---- 1. export programs are captured in eval mode -----------------------------------------
def test_export_program_is_captured_in_eval_mode_and_leaves_statistics_alone():
    model = randomize_batchnorm(torchvision.models.resnet18())
    x = torch.randn(2, 3, 32, 32)
    gm = fxmerge.trace(torch.export.export(model, (x,)), x)
    assert not any(m.training for m in gm.modules())
    stats = [b.clone() for b in gm.buffers()]
    with torch.no_grad():
        assert close(model(x), gm(torch.randn(4, 3, 32, 32)[:2] * 0 + x))
    assert all(torch.equal(a, b) for a, b in zip(stats, gm.buffers()))
    space = fxmerge.analyze(gm)
    with torch.no_grad():
        for seed in range(2):
            plan = fxmerge.Plan.random(space, seed)
            pruned = fxmerge.prune(gm, plan).eval()
            assert close(pruned(x), fxmerge.merge(pruned)(x))
    assert merged_equals_model(model, gm, (x,))


# ---- 2. tanh GELU keeps its approximation -----------------------------------------------
def test_export_keeps_tanh_gelu():
    model = chain(*conv_unit(3, 8, 3, act=False), nn.GELU(approximate="tanh"),
                  *conv_unit(8, 8, 3, act=False), nn.GELU())
    gm = fxmerge.trace(torch.export.export(model, (X,)), X)
    gelus = [m.approximate for m in gm.modules() if isinstance(m, nn.GELU)]
    assert gelus == ["tanh", "none"]
    assert merged_equals_model(model, gm)


# ---- 3. a BatchNorm with a bias but no weight keeps its bias -------------------------------
class BiasOnlyNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.register_buffer("mean", torch.randn(8))
        self.register_buffer("var", torch.rand(8) + 0.5)
        self.bias = nn.Parameter(torch.randn(8))

    def forward(self, x):
        h = F.batch_norm(self.conv1(x), self.mean, self.var, None, self.bias, False)
        return self.conv2(F.relu(h))


@pytest.mark.parametrize("form", ["symbolic", "export"])
def test_batch_norm_without_weight_keeps_its_bias(form):
    model = BiasOnlyNorm().eval()
    gm = fxmerge.trace(torch.export.export(model, (X,)) if form == "export" else model, X)
    norms = [m for m in gm.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(norms) == 1 and torch.equal(norms[0].bias.detach(), model.bias.detach())
    assert torch.equal(norms[0].weight.detach(), torch.ones(8))
    assert merged_equals_model(model, gm)


# ---- 4. a weight that is a forward input stays an input ----------------------------------
class InputWeight(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x, w):
        return F.conv2d(F.relu(self.conv(x)), w, padding=1)


def test_conv_weight_given_as_input_is_not_frozen():
    model = InputWeight().eval()
    w1, w2 = torch.randn(5, 4, 3, 3), torch.randn(5, 4, 3, 3)
    gm = fxmerge.trace(torch.export.export(model, (X, w1)), (X, w1))
    assert fxmerge.analyze(gm).L == 1  # the functional conv is a barrier
    with torch.no_grad():
        assert close(gm(X, w2), model(X, w2))
        space = fxmerge.analyze(gm)
        assert close(fxmerge.transform(gm, fxmerge.Plan.identity(space))(X, w2), model(X, w2))
    gm_sym = fxmerge.trace(model, (X, w1))
    plan = fxmerge.Plan.identity(fxmerge.analyze(gm_sym))
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=fxmerge.backend(plan, then="eager"))
    with torch.no_grad():
        assert close(compiled(X, w1), model(X, w1))
        assert close(compiled(X, w2), model(X, w2))


# ---- 5. a conv module called twice is kept out of the search -----------------------------
class SharedConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.shared = nn.Conv2d(8, 8, 3, padding=1)
        self.mid = nn.Conv2d(8, 8, 3, padding=1)
        self.out = nn.Conv2d(8, 8, 1)

    def forward(self, x):
        h = F.relu(self.stem(x))
        h = F.relu(self.shared(h))
        h = F.relu(self.mid(h))
        return self.out(F.relu(self.shared(h)))


@pytest.mark.parametrize("form", ["symbolic", "export"])
def test_shared_conv_is_kept_out_of_the_search(form):
    model = SharedConv().eval()
    gm = fxmerge.trace(torch.export.export(model, (X,)) if form == "export" else model, X)
    space = fxmerge.analyze(gm)
    assert "shared" not in [c.name for c in space.convs]
    assert "called from 2 places" in space.summary()
    for seed in range(4):
        plan = fxmerge.Plan.random(space, seed)
        pruned = fxmerge.prune(gm, plan).eval()
        with torch.no_grad():
            assert pruned(X).shape == model(X).shape
            assert close(pruned(X), fxmerge.merge(pruned)(X))
    assert merged_equals_model(model, gm)


# ---- 6. hooks are never merged away ------------------------------------------------------
@pytest.mark.parametrize("where", ["conv", "norm", "pre"])
def test_modules_with_hooks_are_barriers(where):
    model = chain(*conv_unit(3, 8, 3), *conv_unit(8, 8, 3), *conv_unit(8, 8, 3))
    if where == "conv":
        model[3].register_forward_hook(lambda m, i, o: o * 2)
    elif where == "norm":
        model[4].register_forward_hook(lambda m, i, o: o + 1)
    else:
        model[3].register_forward_pre_hook(lambda m, i: (i[0] * 3,))
    gm = fxmerge.trace(model, X)
    space = fxmerge.analyze(gm)
    if where != "norm":
        assert "has forward hooks" in space.summary() and "3" not in [c.name for c in space.convs]
    for seed in range(3):
        plan = fxmerge.Plan.random(space, seed)
        pruned = fxmerge.prune(gm, plan).eval()
        with torch.no_grad():
            assert close(pruned(X), fxmerge.merge(pruned)(X))
    assert merged_equals_model(model, gm)


# ---- 7. the captured graph is checked against the model ----------------------------------
class AliasedInPlaceAdd(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 3, 3, padding=1), nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x):
        h = self.conv1(x)
        alias = h
        h += self.conv2(h)
        return alias * 2  # the model sees the in-place update through the alias


def test_an_aliased_in_place_add_is_captured_right_or_refused():
    """symbolic_trace misses the update seen through the alias (its graph is refused);
    torch.export functionalises it, and that graph is the model's."""
    model = AliasedInPlaceAdd().eval()
    with pytest.raises(fxmerge.TraceError, match="computes something else than the model"):
        capture_by(copy.deepcopy(model), (X,), "AliasedInPlaceAdd", "symbolic_trace")
    gm = fxmerge.trace(model, X)
    assert fxmerge.capture.capture_path(gm) == "torch.export"
    assert merged_equals_model(model, gm)


class PythonState(nn.Module):
    """Python state read in forward is baked into a trace as a constant."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.calls = nn.Conv2d(3, 3, 3, padding=1), 0

    def forward(self, x):
        self.calls += 1
        return self.conv(x) * self.calls


def test_a_capture_that_differs_from_the_model_is_refused():
    with pytest.raises(fxmerge.TraceError, match="computes something else"):
        fxmerge.trace(PythonState().eval(), X)


# ---- crashes that became clean behaviour ------------------------------------------------
class Conditioned(nn.Module):
    """A conditioning add (B, C, 1, 1) from an integer input, and a learned offset."""

    def __init__(self) -> None:
        super().__init__()
        self.body = chain(*conv_unit(3, 8, 3), *conv_unit(8, 8, 3), *conv_unit(8, 8, 3))
        self.embed = nn.Embedding(10, 8)
        self.offset = nn.Parameter(torch.randn(1, 8, 1, 1))
        self.tail = chain(*conv_unit(8, 8, 3), *conv_unit(8, 8, 3), nn.Conv2d(8, 3, 1))

    def forward(self, x, t):
        h = self.body(x) + self.embed(t)[:, :, None, None]
        return self.tail(h + self.offset)


def test_integer_inputs_and_broadcast_adds_are_understood():
    model = Conditioned().eval()
    inputs = (X, torch.tensor([3, 7]))
    gm = fxmerge.trace(model, inputs)
    space = fxmerge.analyze(gm)
    assert space.L == 6 and any(j - i >= 2 for i, j in space.blocks)
    for seed in range(4):
        pruned = fxmerge.prune(gm, fxmerge.Plan.random(space, seed)).eval()
        with torch.no_grad():
            assert close(pruned(*inputs), fxmerge.merge(pruned)(*inputs))
    assert merged_equals_model(model, gm, inputs)


@pytest.mark.parametrize("kind", ["weight_norm", "spectral_norm", "old_weight_norm"])
def test_weight_and_spectral_norm_convs(kind):
    model = chain(*conv_unit(3, 8, 3), *conv_unit(8, 8, 3), *conv_unit(8, 8, 3))
    if kind == "old_weight_norm":
        with pytest.warns(FutureWarning):
            torch.nn.utils.weight_norm(model[3])
    else:
        getattr(torch.nn.utils.parametrizations, kind)(model[3])
    model.eval()
    gm = fxmerge.trace(model, X)
    space = fxmerge.analyze(gm)
    assert ("3" in [c.name for c in space.convs]) == (kind != "old_weight_norm")
    spans = [(0, 3)] if kind != "old_weight_norm" else [(0, 1), (1, 2)]  # hooked: a barrier
    plan = fxmerge.Plan.from_positions(space, spans, {c.name for c in space.convs})
    pruned = fxmerge.prune(gm, plan)
    with torch.no_grad():  # fine-tuning moves the parametrisation's own tensors
        for name, p in pruned.named_parameters():
            if "parametrizations" in name or name.endswith(("weight_g", "weight_v")):
                p.mul_(1.5)
    pruned.eval()
    with torch.no_grad():
        assert not close(pruned(X), gm(X))
        assert close(pruned(X), fxmerge.merge(pruned)(X))


def test_compiled_plan_applies_at_any_batch_size():
    model = randomize_batchnorm(torchvision.models.resnet18())
    gm = fxmerge.trace(model, torch.randn(1, 3, 32, 32))
    plan = fxmerge.Plan.random(fxmerge.analyze(gm), 2)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="fxmerge", options={"plan": plan, "then": "eager"})
    with torch.no_grad():
        for batch in (1, 3, 5):
            x = torch.randn(batch, 3, 32, 32)
            assert close(compiled(x), fxmerge.transform(gm, plan)(x))


class WithGraphBreak(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = chain(*conv_unit(3, 8, 3), *conv_unit(8, 8, 3))
        self.b = chain(*conv_unit(8, 8, 3), *conv_unit(8, 8, 3))

    def forward(self, x):
        h = self.a(x)
        torch._dynamo.graph_break()
        return self.b(h)


def test_plan_applies_across_graph_breaks():
    model = WithGraphBreak().eval()
    gm = fxmerge.trace(model, X)
    space = fxmerge.analyze(gm)
    plan = fxmerge.Plan.from_positions(space, [(0, 2), (2, 4)], {"a.0", "a.3", "b.0", "b.3"})
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=fxmerge.backend(plan, then="eager"))
    with torch.no_grad():
        assert close(compiled(X), fxmerge.transform(gm, plan)(X))
    across = fxmerge.Plan.from_positions(space, [(0, 1), (1, 3), (3, 4)],
                                     {"a.0", "a.3", "b.0", "b.3"})
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=fxmerge.backend(across, then="eager"))
    with pytest.raises(fxmerge.PlanError, match="split between graphs"):
        compiled(X)


def test_backend_errors_reach_the_user_as_fxmerge_errors():
    model = torchvision.models.resnet18().eval()
    other = fxmerge.trace(torchvision.models.resnet34(), torch.randn(1, 3, 32, 32))
    plan = fxmerge.Plan.random(fxmerge.analyze(other), 0)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=fxmerge.backend(plan, then="eager"))
    with pytest.raises(fxmerge.PlanError):
        compiled(torch.randn(1, 3, 32, 32))


def test_exclude_takes_globs_and_an_excluded_projection_is_never_merged():
    model = randomize_batchnorm(torchvision.models.resnet18())
    x = torch.randn(1, 3, 32, 32)
    gm = fxmerge.trace(model, x)
    space = fxmerge.analyze(gm, stride_rule="exact", exclude=["conv1", "*.downsample.0"])
    assert not any("downsample" in c.name for c in space.convs)
    assert {s.projection for s in space.skips} == {None}
    for seed in range(3):
        plan = fxmerge.Plan.random(space, seed)
        merged = fxmerge.transform(gm, plan)
        names = {n.target for n in merged.graph.nodes if n.op == "call_module"}
        assert {"layer2.0.downsample.0", "layer3.0.downsample.0"} <= names
        with torch.no_grad():
            assert close(fxmerge.prune(gm, plan).eval()(x), merged(x))
    with pytest.raises(TypeError, match="exclude must be a list"):
        fxmerge.analyze(gm, exclude="conv1")
    with pytest.raises(fxmerge.ArgumentError, match="matches no conv"):
        fxmerge.analyze(gm, exclude=["nope.*"])


# ---- the layer vocabulary of the zoos -----------------------------------------------------
class ZooLayers(nn.Module):
    """Identities, a 'same'-padded conv, and activations in functional and method form."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, padding="same")
        self.c3 = nn.Conv2d(8, 8, 3, padding=1)
        self.c4 = nn.Conv2d(8, 8, 1)
        self.skip, self.drop = nn.Identity(), nn.Dropout(0.3)

    def forward(self, x):
        h = self.drop(self.c1(x)).relu()
        h = F.relu6(self.skip(self.c2(h)))
        h = self.c3(h)
        h = h * torch.sigmoid(h)
        return F.dropout(self.c4(h) / 1.0, 0.5, training=False)


@pytest.mark.parametrize("form", ["symbolic", "export"])
def test_zoo_layers_are_understood(form):
    model = ZooLayers().eval()
    gm = fxmerge.trace(torch.export.export(model, (X,)) if form == "export" else model, X)
    space = fxmerge.analyze(gm)
    assert [c.activation for c in space.convs] == ["relu", "relu6", "silu", None]
    assert (0, 4) in space.blocks and set(space.barriers) <= {"_guards_fn"}  # export checks
    plan = fxmerge.Plan.from_positions(space, [(0, 4)], {"c1", "c2", "c3", "c4"})
    pruned = fxmerge.prune(gm, plan).eval()
    merged = fxmerge.merge(pruned)
    assert sum(isinstance(m, nn.Conv2d) for m in merged.modules()) == 1
    with torch.no_grad():
        assert close(pruned(X), merged(X))
    assert merged_equals_model(model, gm)


def test_a_graph_module_in_training_mode_is_captured_in_eval_mode():
    model = randomize_batchnorm(torchvision.models.resnet18())
    x = torch.randn(1, 3, 32, 32)
    gm = fxmerge.trace(torch.fx.symbolic_trace(copy.deepcopy(model)).train(), x)
    assert not any(m.training for m in gm.modules())
    with torch.no_grad():
        assert close(model(x), gm(x))


# ---- capture that finds its way: symbolic_trace, else torch.export --------------------
class SplitBlock(nn.Module):
    """YOLO's C2f pattern: a conv's output split in two and unpacked (symbolic_trace cannot
    iterate a Proxy), then a head that caches a tensor computed from the input's shape (as
    a detection head's anchors)."""

    def __init__(self) -> None:
        super().__init__()
        self.cv1 = nn.Sequential(*conv_unit(3, 8, 1))
        self.m = nn.Sequential(*conv_unit(4, 4, 3), *conv_unit(4, 4, 3))
        self.cv2 = nn.Sequential(*conv_unit(12, 8, 1))
        self.head = nn.Conv2d(8, 4, 1)
        self.shape, self.grid = None, torch.empty(0)

    def forward(self, x):
        a, b = self.cv1(x).chunk(2, 1)
        y = self.cv2(torch.cat([a, b, self.m(b)], 1))
        out = self.head(y)
        if self.shape != out.shape:
            self.shape = out.shape
            self.grid = torch.arange(out.shape[-1], dtype=out.dtype).view(1, 1, 1, -1)
        return out + self.grid


class OptionalSkip(nn.Module):
    """MONAI's UpCat pattern: a concatenation taken only `if isinstance(skip, Tensor)`;
    symbolic_trace sees a Proxy, skips it, and captures a graph of the wrong width."""

    def __init__(self) -> None:
        super().__init__()
        self.down = nn.Sequential(*conv_unit(3, 4, 3))
        self.up = nn.Sequential(*conv_unit(8, 8, 3), *conv_unit(8, 8, 3))

    def forward(self, x):
        skip = self.down(x)
        h = skip
        if isinstance(skip, torch.Tensor):
            h = torch.cat([h, skip], 1)
        return self.up(h)


@pytest.mark.parametrize("model", [SplitBlock, OptionalSkip])
def test_what_symbolic_trace_cannot_capture_is_exported_and_merges_exactly(model):
    net = randomize_batchnorm(model())
    gm = fxmerge.trace(net, X)
    space = fxmerge.analyze(gm)
    assert fxmerge.capture.capture_path(gm) == "torch.export"
    assert "captured by torch.export" in space.summary()
    assert any(j - i >= 2 for i, j in space.blocks)
    with torch.no_grad():
        assert close(net(X), fxmerge.transform(gm, fxmerge.Plan.identity(space))(X))
        for seed in range(3):
            pruned = fxmerge.prune(gm, fxmerge.Plan.random(space, seed), space).eval()
            assert close(pruned(X), fxmerge.merge(pruned)(X))


def test_a_refusal_gives_each_paths_reason():
    from models import DataDependent

    with pytest.raises(fxmerge.TraceError, match="symbolic_trace: .*; torch.export: "):
        fxmerge.trace(DataDependent(), torch.randn(1, 3, 8, 8))


def _real(factory, x):
    net = randomize_batchnorm(factory())
    gm = fxmerge.trace(net, x)
    space = fxmerge.analyze(gm)
    assert fxmerge.capture.capture_path(gm) == "torch.export"
    with torch.no_grad():
        want = torch.utils._pytree.tree_leaves(net(x))
        for plan in (fxmerge.Plan.identity(space), fxmerge.Plan.random(space, 0)):
            pruned = fxmerge.prune(gm, plan, space).eval()
            got = torch.utils._pytree.tree_leaves(fxmerge.merge(pruned)(x))
            ref = torch.utils._pytree.tree_leaves(pruned(x)) if plan.method != "identity" \
                else want
            assert all(close(a, b) for a, b in zip(ref, got) if a.is_floating_point())
    return space


@pytest.mark.parametrize("name", ["yolov8n", "yolo11n"])
def test_ultralytics_yolo_is_captured_and_merges_exactly(name):
    tasks = pytest.importorskip("ultralytics.nn.tasks")
    space = _real(lambda: tasks.DetectionModel(f"{name}.yaml", verbose=False),
                  torch.randn(1, 3, 64, 64))
    assert sum(j - i >= 2 for i, j in space.blocks) >= 30


def test_monai_basic_unet_and_smp_fpn_are_captured_and_merge_exactly():
    nets = pytest.importorskip("monai.networks.nets")
    smp = pytest.importorskip("segmentation_models_pytorch")
    _real(lambda: nets.BasicUNet(spatial_dims=2, in_channels=1, out_channels=2,
                                 features=(8, 8, 16, 32, 64, 8)), torch.randn(1, 1, 32, 32))
    space = _real(lambda: smp.FPN(encoder_name="resnet18", encoder_weights=None),
                  torch.randn(1, 3, 64, 64))
    assert sum(j - i >= 2 for i, j in space.blocks) >= 5
