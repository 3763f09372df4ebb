"""What fxmerge finds and how exactly it merges in the model zoos users bring: timm CNNs of
many families, one model of each torchvision CNN family, and 1-D and 3-D networks (video,
3-D U-Nets, a TCN, a weight-normed vocoder stack), each captured via `symbolic_trace` and
via `torch.export`.

    python benchmarks/bench_zoo.py [--size 32] [--only resnet18 ...] [--source nd]

Per model and graph form: convs in the model, convs searched, regions of parallel branches
(each searched as one conv position), blocks, entries, blocks of two or more convs, and the
outcome. "exact" means: the identity plan's merged network equals the
model (BN folded) and two random plans' merged networks equal their pruned ones, all within
1e-9 relative error in float64 (the worst error is given, and the float32 one beside it);
"exact (within rounding)": above 1e-9 but below what float64 rounding alone can cause in
that network (`rounding_f64`: its output's sensitivity to a 1e-13 relative change of the
input, scaled to float64's epsilon, x10), which a random plan can make large;
random weights and BatchNorm statistics from a few training-mode passes over random data. A refusal is a clean fxmerge
error, with its reason. Where no block of two convs exists, the op that most often stops the
search is named.
"""

from __future__ import annotations

import argparse
import collections
import copy
import json
import time

import torch
import torchvision
from common import RESULTS, calibrate_batchnorm, write

import fxmerge
from fxmerge.models import TCN1d, VocoderStack

TIMM = ["resnet18", "seresnet18", "resnet26d", "resnext26ts", "repvgg_a0", "mobileone_s0",
        "repvit_m0_9", "gernet_s",
        "regnetx_002", "regnety_002", "mobilenetv2_100", "mnasnet_100", "efficientnet_b0",
        "tinynet_a", "mixnet_s", "mobilenetv3_small_100", "lcnet_050", "cspresnet50",
        "densenet121", "convnext_atto", "ghostnet_100", "dla34", "rexnet_100",
        "ese_vovnet19b_dw", "selecsls42b", "hardcorenas_a", "res2net50_14w_8s", "dpn68",
        "vgg11_bn", "nf_resnet26"]
TORCHVISION = ["alexnet", "vgg11_bn", "resnet18", "squeezenet1_0", "densenet121", "googlenet",
               "inception_v3", "shufflenet_v2_x0_5", "mobilenet_v2", "mobilenet_v3_small",
               "mnasnet0_5", "efficientnet_b0", "efficientnet_v2_s", "regnet_x_400mf",
               "convnext_tiny"]



def _monai(name: str, **kwargs):
    from monai.networks import nets

    return getattr(nets, name)(spatial_dims=3, in_channels=1, out_channels=2, norm="batch",
                               **kwargs)


VIDEO = torchvision.models.video
ND = {  # name: (factory, input shape): 1-D and 3-D networks
    "r3d_18": (VIDEO.r3d_18, (2, 3, 8, 32, 32)),
    "mc3_18": (VIDEO.mc3_18, (2, 3, 8, 32, 32)),
    "r2plus1d_18": (VIDEO.r2plus1d_18, (2, 3, 8, 32, 32)),
    "monai_UNet": (lambda: _monai("UNet", channels=(8, 16, 32), strides=(2, 2),
                                  num_res_units=2), (2, 1, 32, 32, 32)),
    "monai_BasicUNet": (lambda: _monai("BasicUNet", features=(8, 8, 16, 32, 64, 8)),
                        (2, 1, 32, 32, 32)),
    "TCN1d": (TCN1d, (2, 40, 101)),
    "VocoderStack": (VocoderStack, (2, 80, 64)),
}
TOLERANCE = 1e-9  # relative, in float64
MIN_SIZE = {"inception_v3": 96, "alexnet": 64}  # their pooling needs 75 and 63 pixels


def build(source: str, name: str) -> tuple[torch.nn.Module, str]:
    """The model with random weights, and its family."""
    if source == "timm":
        import timm

        model = timm.create_model(name, pretrained=False)
        return model, type(model).__module__.rsplit(".", 1)[-1]
    kwargs = {"aux_logits": False, "init_weights": False} if name in ("googlenet",
                                                                      "inception_v3") else {}
    model = getattr(torchvision.models, name)(**kwargs)
    return model, type(model).__module__.rsplit(".", 1)[-1]


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / a.abs().max().clamp_min(1e-12)).item()


def stopped_by(gm, space) -> str:
    """The op kind that most often stands between convs as a barrier."""
    names = set(space.barriers)
    kinds = collections.Counter(
        type(gm.get_submodule(n.target)).__name__ if n.op == "call_module"
        else getattr(n.target, "__name__", str(n.target))
        for n in gm.graph.nodes if n.name in names and n.op != "output")
    return ", ".join(f"{k} x{v}" for k, v in kinds.most_common(2))


def sensitivity(net, x: torch.Tensor) -> float:
    """The relative error rounding alone can cause in `net`'s output: its relative change
    under a relative input change of 1e-13, scaled to the dtype's rounding (x10 margin). A
    random plan can leave a network so ill-conditioned that float64 rounding shows."""
    step = 1e-13
    return relative_error(net(x), net(x * (1 + step))) / step \
        * torch.finfo(x.dtype).eps * 10


def errors(model: torch.nn.Module, form: str, x: torch.Tensor
           ) -> tuple[dict, list[float], float]:
    """The space's sizes, the relative errors of the identity plan (merged vs model) and of
    two random plans (merged vs pruned), and the largest rounding bound of the references."""
    subject = torch.export.export(model, (x,)) if form == "export" else model
    gm = fxmerge.trace(subject, x)
    space = fxmerge.analyze(gm)
    sizes = {"searched": space.L, "regions": len(space.regions), "blocks": space.num_blocks,
             "entries": space.num_entries,
             "multi": sum(j - i >= 2 for i, j in space.blocks)}
    with torch.no_grad():
        found = [relative_error(model(x), fxmerge.transform(gm, fxmerge.Plan.identity(
            space))(x))]
        bound = sensitivity(model, x)
        for seed in range(2):
            pruned = fxmerge.prune(gm, fxmerge.Plan.random(space, seed)).eval()
            found.append(relative_error(pruned(x), fxmerge.merge(pruned)(x)))
            bound = max(bound, sensitivity(pruned, x))
    if sizes["multi"] == 0:
        sizes["stopped_by"] = stopped_by(gm, space)
    return sizes, found, bound


def measure(model: torch.nn.Module, form: str, x: torch.Tensor) -> dict:
    """Exactness is judged in float64 (rounding cannot hide a wrong merge there); the float32
    error is what a user sees."""
    row: dict = {"convs": sum(isinstance(m, torch.nn.modules.conv._ConvNd)
                              for m in model.modules())}
    try:
        sizes, f32, _ = errors(model, form, x)
        _, f64, bound = errors(copy.deepcopy(model).double(), form, x.double())
    except fxmerge.FxMergeError as exc:
        return {**row, "outcome": f"refused: {type(exc).__name__}: {str(exc)[:90]}"}
    except Exception as exc:  # torch.export's own failures, reported as such
        if form != "export":
            raise
        return {**row, "outcome": f"export failed: {type(exc).__name__}"}
    row.update(sizes, error_f64=max(f64), error_f32=max(f32), rounding_f64=bound)
    row["outcome"] = ("exact" if row["error_f64"] <= TOLERANCE else
                      "exact (within rounding)" if row["error_f64"] <= bound else "WRONG")
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=32, help="input resolution")
    parser.add_argument("--only", nargs="*", help="model names to run")
    parser.add_argument("--source", choices=["timm", "torchvision", "nd"], help="one zoo only")
    parser.add_argument("--update", action="store_true", help="replace only the rows run "
                        "(with --only) in the recorded results, keeping the others")
    args = parser.parse_args()
    rows = []
    for source, names in (("timm", TIMM), ("torchvision", TORCHVISION), ("nd", list(ND))):
        if args.source and source != args.source:
            continue
        for name in names:
            if args.only and name not in args.only:
                continue
            torch.manual_seed(0)
            size = max(args.size, MIN_SIZE.get(name, 0))
            x = torch.randn(ND[name][1] if source == "nd" else (2, 3, size, size))
            model, family = (ND[name][0](), f"{x.dim() - 2}-D") if source == "nd" \
                else build(source, name)
            model = calibrate_batchnorm(model, x)
            for form in ("symbolic_trace", "export"):
                start = time.perf_counter()
                row = {"source": source, "model": name, "family": family, "form": form,
                       "size": "x".join(map(str, x.shape[2:])), **measure(model, form, x)}
                row["seconds"] = round(time.perf_counter() - start, 1)
                print(row, flush=True)
                rows.append(row)
    if args.update:  # the rows run replace theirs; the others stay as recorded
        new = {(r["source"], r["model"], r["form"]): r for r in rows}
        old = json.loads((RESULTS / "zoo.json").read_text())["rows"]
        rows = [new.pop((o["source"], o["model"], o["form"]), o) for o in old]
        rows += new.values()
    report(rows, args.size)


def report(rows: list[dict], size: int) -> None:
    """Write results/zoo.{json,md} with the headline counts."""
    models = {(r["source"], r["model"]) for r in rows}
    mergeable = {(r["source"], r["model"]) for r in rows if r.get("multi", 0) > 0}
    wrong = sum(r["outcome"] == "WRONG" for r in rows)
    rounding = sum(r["outcome"] == "exact (within rounding)" for r in rows)
    families = {(r["source"], r["family"]) for r in rows}
    meta = {"input": f"2x3x{size}x{size} (larger where a model needs it; 1-D and 3-D "
                      "networks at their own: size)",
            "tolerance": f"{TOLERANCE} relative, float64",
            "models": len(models), "families": len(families),
            "mergeable_models": f"{len(mergeable)}/{len(models)} "
                                f"({len(mergeable) / max(len(models), 1):.0%}) with a block of "
                                "two or more convs via some form",
            "wrong_networks": wrong, "exact_within_rounding": rounding}
    write("zoo", meta, rows, ["source", "model", "family", "form", "size", "convs", "searched",
                              "regions", "blocks", "entries", "multi", "outcome", "error_f64",
                              "error_f32", "rounding_f64",
                              "stopped_by", "seconds"],
          "fxmerge on the model zoos: what is found, and whether it merges exactly")


if __name__ == "__main__":
    main()
