import json
import subprocess
import sys

import pytest
import torch

import fxmerge
from fxmerge.cli import main
from fxmerge.demos.shared import load_digits
from fxmerge.models import DemoMobileNetV2
from fxmerge.space import kernel_of

MODEL = ["fxmerge:DemoMobileNetV2", "--input-shape", "2,1,16,16", "--exclude", "stem.0",
         "head.0"]


def run(*argv):
    return main([str(a) for a in argv])


def test_help_and_usage_errors(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    assert "latency" in capsys.readouterr().out
    with pytest.raises(SystemExit) as info:
        main(["solve", *MODEL])  # --latency, --importance and a budget are required
    assert info.value.code == 2


def test_bad_model_spec_is_a_usage_error_listing_the_forms(capsys):
    assert run("analyze", "torchvision:not_a_net") == 2
    assert "torchvision.models has no 'not_a_net'" in capsys.readouterr().err
    assert run("analyze", "fxmerge:Nope") == 2
    assert "fxmerge.models has no 'Nope'" in capsys.readouterr().err
    for spec in ("timm", "resnet18", "timm:resnt18", "timm:resnet18:num_classes"):
        assert run("analyze", spec) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "timm:NAME[:key=value,...]" in err, err
    assert "did you mean resnet18" in (run("analyze", "timm:resnt18"), capsys.readouterr().err)[1]


def test_timm_models_by_name_with_keywords(capsys):
    pytest.importorskip("timm")
    assert run("analyze", "timm:resnet18:num_classes=10,drop_rate=0.1",
               "--input-shape", "1,3,32,32") == 0
    out = capsys.readouterr().out
    assert "L=17 convs" in out and "captured by symbolic_trace" in out
    model = fxmerge.models.load_model("timm:resnet18:num_classes=10")
    assert model.fc.out_features == 10


def test_model_keywords_read_python_words_as_python_does():
    """`weights=None` is None (it was the string 'None', which no builder takes), `True`
    and `False` are booleans, JSON's `null`/`true` too; other bare words stay strings."""
    model = fxmerge.models.load_model(
        "torchvision:resnet18:weights=None,num_classes=10,zero_init_residual=True")
    assert model.fc.out_features == 10
    assert all(b.bn2.weight.abs().sum() == 0 for b in model.layer1)  # zero_init_residual
    same = fxmerge.models.load_model("torchvision:resnet18:weights=null,num_classes=10")
    assert same.fc.out_features == 10


def test_random_weights_download_nothing(monkeypatch):
    """A segmentation builder's backbone would fetch ImageNet weights by default."""
    import torch.hub

    def no_download(*args, **kwargs):
        raise AssertionError("tried to download weights")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_download)
    model = fxmerge.models.load_model("torchvision:deeplabv3_mobilenet_v3_large")
    assert sum(p.numel() for p in model.parameters()) > 1e6


def test_pipeline_analyze_latency_importance_solve_transform(tmp_path, capsys):
    assert run("analyze", *MODEL, "--out", tmp_path / "space.json") == 0
    space_json = json.loads((tmp_path / "space.json").read_text())
    assert space_json["num_entries"] == 89 and "58 blocks" in capsys.readouterr().out

    assert run("latency", *MODEL, "--warmup", 0, "--repeat", 2, "--out", tmp_path / "lat.json",
               "--cache", tmp_path / "lat-cache.json") == 0
    lat = fxmerge.LatencyTable.from_json((tmp_path / "lat.json").read_text())
    assert len(lat) == 89 and lat.settings.batch_size == 2

    assert run("importance", *MODEL, "--out", tmp_path / "imp.json") == 0
    imp = fxmerge.ImportanceTable.from_json((tmp_path / "imp.json").read_text())
    assert len(imp) == 89 + 48 + 6  # entries, Depth's activation choices, LayerOnly's convs
    assert imp.settings.estimator == "output agreement (no fine-tuning)"
    assert imp.settings.calibration_shape == [1, 1, 16, 16]  # below --calibration-size
    assert run("importance", *MODEL, "--cache", tmp_path / "imp.jsonl") == 1
    assert "--cache need --evaluate" in capsys.readouterr().err
    assert run("importance", *MODEL, "--finetune", tmp_path / "ft.py:finetune") == 1
    assert "--cache need --evaluate" in capsys.readouterr().err

    assert run("solve", *MODEL, "--latency", tmp_path / "lat.json", "--importance",
               tmp_path / "imp.json", "--budget", 0.8, "--budget-basis", "table", "--out",
               tmp_path / "plan.json", "--frontier", tmp_path / "front.json", "--plot",
               tmp_path / "front.png") == 0
    plan = fxmerge.Plan.from_json((tmp_path / "plan.json").read_text())
    assert plan.method == "layermerge" and plan.predicted_latency_ms <= 0.8 * sum(
        lat[fxmerge.Entry(p - 1, p, *_kernel(plan, p))] for p in range(1, 24)) + 1e-9
    assert json.loads((tmp_path / "front.json").read_text())["points"]
    assert (tmp_path / "front.png").stat().st_size > 1000

    # by default a budget is measured: the plan's network is timed against the original
    assert run("solve", *MODEL, "--latency", tmp_path / "lat.json", "--importance",
               tmp_path / "imp.json", "--budget", 0.95, "--timing-repeat", 5, "--out",
               tmp_path / "measured.json") == 0
    measured = fxmerge.Plan.from_json((tmp_path / "measured.json").read_text()).measured
    assert measured["ratio"] <= 0.95 and measured["batch_size"] == 2
    assert "measured (eager, batch 2, " in capsys.readouterr().out

    assert run("transform", *MODEL, "--plan", tmp_path / "plan.json",
               "--out", tmp_path / "merged.safetensors") == 0
    assert "removed" in capsys.readouterr().out
    merged = fxmerge.load(tmp_path / "merged.safetensors")
    x = torch.randn(2, 1, 16, 16)
    # the CLI's model is randomly initialised: rebuild it the same way to compare
    assert merged(x).shape == (2, 10)

    # an impossible budget is refused before anything is timed; --out gets the fastest plan
    assert run("solve", *MODEL, "--latency", tmp_path / "lat.json", "--importance",
               tmp_path / "imp.json", "--budget", 0.01, "--out", tmp_path / "over.json") == 1
    captured = capsys.readouterr()
    assert "no layermerge plan can measure within 1.0%" in captured.err
    assert "reach: the fastest layermerge plan's table latency is" in captured.out
    over = fxmerge.Plan.from_json((tmp_path / "over.json").read_text())
    assert over.extra["over_budget"] and not over.measured
    assert run("solve", *MODEL, "--latency", tmp_path / "lat.json", "--importance",
               tmp_path / "imp.json", "--budget", 0.01, "--budget-basis", "table") == 1
    assert "smallest achievable" in capsys.readouterr().err


def _kernel(plan, p):
    """(k, dw) of conv p alone in the demo net (for the original table latency)."""
    gm = fxmerge.trace(DemoMobileNetV2(), torch.randn(2, 1, 16, 16))
    opt = kernel_of(fxmerge.analyze(gm, exclude=DemoMobileNetV2.EXCLUDE), [p])
    return opt.kernel, opt.depthwise


def test_transform_with_weights_matches_the_python_api(tmp_path):
    torch.manual_seed(0)
    model = DemoMobileNetV2().eval()
    torch.save(model.state_dict(), tmp_path / "w.pt")
    gm = fxmerge.trace(model, torch.randn(2, 1, 16, 16))
    space = fxmerge.analyze(gm, exclude=DemoMobileNetV2.EXCLUDE)
    plan = fxmerge.Plan.random(space, 3)
    (tmp_path / "plan.json").write_text(plan.to_json())
    assert run("transform", *MODEL, "--weights", tmp_path / "w.pt", "--plan",
               tmp_path / "plan.json", "--out", tmp_path / "merged.safetensors",
               "--pruned-out", tmp_path / "pruned.pt") == 0
    merged = fxmerge.load(tmp_path / "merged.safetensors")
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(merged(x), fxmerge.transform(gm, plan)(x))
    # the fine-tuning round trip: pruned weights -> training -> merge command, no pickle
    pruned = fxmerge.prune(gm, plan)
    pruned.load_state_dict(torch.load(tmp_path / "pruned.pt", weights_only=True))
    with torch.no_grad():
        for p in pruned.parameters():  # stands for fine-tuning
            p.add_(0.01 * torch.randn_like(p))
    torch.save(pruned.state_dict(), tmp_path / "tuned.pt")
    assert run("merge", *MODEL, "--weights", tmp_path / "tuned.pt", "--plan",
               tmp_path / "plan.json", "--out", tmp_path / "merged2.safetensors") == 0
    merged2 = fxmerge.load(tmp_path / "merged2.safetensors")
    assert run("merge", *MODEL, "--weights", tmp_path / "tuned.pt", "--plan",
               tmp_path / "plan.json", "--out", tmp_path / "merged2.onnx") == 0
    assert (tmp_path / "merged2.onnx").stat().st_size > 1000
    assert run("export", tmp_path / "merged2.safetensors", "--out", tmp_path / "m.onnx") == 0
    assert (tmp_path / "m.onnx").read_bytes() == (tmp_path / "merged2.onnx").read_bytes()
    with torch.no_grad():
        torch.testing.assert_close(merged2(x), fxmerge.merge(pruned.eval())(x))
        assert not torch.allclose(merged2(x), merged(x))


def test_merge_refuses_a_pickled_module_without_running_it(tmp_path, capsys):
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"x": Payload()}, tmp_path / "evil.pt")
    gm = fxmerge.trace(DemoMobileNetV2(), torch.randn(2, 1, 16, 16))
    plan = fxmerge.Plan.identity(fxmerge.analyze(gm, exclude=DemoMobileNetV2.EXCLUDE))
    (tmp_path / "plan.json").write_text(plan.to_json())
    assert run("merge", *MODEL, "--weights", tmp_path / "evil.pt", "--plan",
               tmp_path / "plan.json") == 1
    err = capsys.readouterr().err
    assert "never unpickles code" in err and len(err.strip().splitlines()) == 1
    assert not marker.exists()


def test_plan_for_another_model_exits_1(tmp_path, capsys):
    gm = fxmerge.trace(DemoMobileNetV2(), torch.randn(2, 1, 16, 16))
    plan = fxmerge.Plan.random(fxmerge.analyze(gm, exclude=DemoMobileNetV2.EXCLUDE), 0)
    (tmp_path / "plan.json").write_text(plan.to_json())
    assert run("transform", "torchvision:resnet18", "--input-shape", "1,3,32,32", "--plan",
               tmp_path / "plan.json") == 1
    assert "another graph" in capsys.readouterr().err


def quick_demo(out, *args):
    """`fxmerge demo --quick ARGS --out OUT` in a fresh process; its output and results."""
    proc = subprocess.run([sys.executable, "-m", "fxmerge.cli", "demo", "--quick", *args,
                           "--out", str(out)], capture_output=True, text=True, timeout=600,
                          check=False)
    assert proc.returncode == 0, proc.stderr
    return proc, json.loads((out / "results.json").read_text())


@pytest.mark.slow
def test_demo_quick_over_two_seeds_writes_results(tmp_path):
    proc, result = quick_demo(tmp_path, "--seeds", "2")
    runs, rows = result["runs"], result["rows"]
    assert {r["seed"] for r in runs} == {0, 1}
    assert runs and {"method", "budget", "accuracy", "latency_ms", "measured_ratio",
                     "predicted_ratio", "solve_ratio", "speedup"} <= set(runs[0])
    assert all(r["solve_ratio"] <= r["budget"] for r in runs)  # measured budgets
    for row in rows:
        assert {"method", "budget", "accuracy_mean", "accuracy_std", "speedup",
                "seeds"} <= set(row)
        accs = [r["accuracy"] for r in runs
                if (r["method"], r["budget"]) == (row["method"], row["budget"])]
        assert row["seeds"] == len(accs)
        assert row["accuracy_mean"] == pytest.approx(sum(accs) / len(accs), abs=1e-3)
    assert (tmp_path / "pareto.png").stat().st_size > 1000
    assert "over 2 seeds" in proc.stdout


@pytest.mark.slow
def test_demo_ddpm_quick_writes_results(tmp_path):
    proc, result = quick_demo(tmp_path, "--task", "ddpm")
    rows = result["rows"]
    # which methods reach 90% measured depends on the (short, noisy) timing; Depth rarely does
    assert rows and {r["method"] for r in rows} <= {"layermerge", "depth", "layeronly"}
    assert all(r["solve_ratio"] <= r["budget"] for r in rows)  # measured budgets
    assert {"method", "budget", "speedup", "loss", "frechet", "measured_ratio"} <= set(rows[0])
    assert all(r["merge_error"] < 1e-4 and r["speedup"] > 0 for r in rows)
    assert result["original"]["frechet"] >= 0
    for png in ("samples.png", "quality.png"):
        assert (tmp_path / png).stat().st_size > 1000
    assert "Frechet" in proc.stdout


def test_distorted_digits_are_a_harder_seeded_variant(capsys):
    plain = load_digits(16, seed=0)
    hard, again, other = (load_digits(16, seed=s, distorted=True) for s in (0, 0, 1))
    assert torch.equal(hard.test[1], plain.test[1])  # the same split and labels
    assert hard.test[0].shape == plain.test[0].shape
    assert torch.equal(hard.train[1], plain.train[1].repeat(4))  # four views of each
    views = hard.train[0].view(4, 1000, 1, 16, 16)
    assert not torch.equal(views[0], views[1])
    assert torch.equal(hard.test[0], again.test[0])  # seeded
    assert not torch.equal(hard.test[0], plain.test[0])
    assert not torch.equal(hard.test[0], other.test[0])
    assert run("demo", "--task", "ddpm", "--distorted") == 1
    assert "for the classify task" in capsys.readouterr().err


def test_several_inputs_integer_ones_included(capsys):
    ddpm = ["fxmerge:DDPMUNet", "--input-shape", "1,3,32,32", "--input-shape", "1:int:1000",
            "--exclude", "*attn*", "*.shortcut", "conv_out"]
    assert run("analyze", *ddpm) == 0
    assert "73 blocks, 98 entries" in capsys.readouterr().out
    with pytest.raises(SystemExit) as info:
        main(["analyze", "fxmerge:DDPMUNet", "--input-shape", "1:float:3"])
    assert info.value.code == 2
    assert "SHAPE:int:HIGH" in capsys.readouterr().err


def test_bad_inputs_exit_1_with_one_line(tmp_path, capsys):
    (tmp_path / "nets.py").write_text(
        "def broken():\n    raise RuntimeError('no such weights')\n"
        "def not_a_model():\n    return 42\n")
    (tmp_path / "garbage.pt").write_bytes(b"\x00garbage" * 10)
    torch.save(torch.nn.Linear(2, 2).state_dict(), tmp_path / "other.pt")
    (tmp_path / "plan.json").write_text('{"blocks": [')
    (tmp_path / "folder").mkdir()
    cases = [
        (["analyze", f"{tmp_path / 'nets.py'}:broken"], "no such weights"),
        (["analyze", f"{tmp_path / 'nets.py'}:not_a_model"], "not an nn.Module"),
        (["analyze", "torchvision:resnet18:wings=2"], "could not be built"),
        (["analyze", "torchvision:resnet18:depth=abc"], "could not be built"),
        (["analyze", *MODEL, "--weights", tmp_path / "garbage.pt"], "not a file of tensors"),
        (["analyze", *MODEL, "--weights", tmp_path / "other.pt"], "does not fit the model"),
        (["analyze", *MODEL, "--weights", tmp_path / "missing.pt"], "missing.pt"),
        (["analyze", *MODEL, "--out", tmp_path / "folder"], "folder"),
        (["transform", *MODEL, "--plan", tmp_path / "plan.json"], "invalid JSON"),
        (["analyze", *MODEL[:3], "--exclude", "nothing.*"], "matches no conv"),
        (["demo", "--seeds", "0"], "--seeds must be at least 1"),
        (["demo", "--task", "ddpm", "--seeds", "2"], "are for the classify task"),
    ]
    for argv, match in cases:
        assert run(*argv) == 1, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and match in err[0], (argv, err)


def test_every_option_has_help():
    import argparse

    from fxmerge.cli import build_parser

    commands = build_parser()._subparsers._group_actions[0].choices
    bare = [f"{name} {a.option_strings or a.dest}" for name, sub in commands.items()
            for a in sub._actions if not a.help and not isinstance(a, argparse._HelpAction)]
    assert not bare, bare


def test_progress_is_a_periodic_line_when_not_a_terminal(capsys, monkeypatch):
    from fxmerge import progress

    monkeypatch.setattr(progress.os, "isatty", lambda fd: False)
    assert list(progress.progress(range(3), "latency table", "layer")) == [0, 1, 2]
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "latency table: 3/3 layers (100%)" in err
    bar = progress.Progress(4, "importance", "key", interval=0.0)
    for _ in range(4):
        bar.update()
    assert capsys.readouterr().err.count("importance: ") == 4
    assert list(progress.progress(range(3), "quiet", enabled=False)) == [0, 1, 2]
    assert capsys.readouterr().err == ""
    assert run("latency", *MODEL, "--warmup", 0, "--repeat", 1, "--seconds", 0.01) == 0
    assert "latency table: " in capsys.readouterr().err
    assert run("latency", *MODEL, "--warmup", 0, "--repeat", 1, "--seconds", 0.01,
               "--quiet") == 0
    assert "latency table: " not in capsys.readouterr().err


def test_reparameterize_writes_a_collapsed_network_that_loads(tmp_path, capsys):
    pytest.importorskip("timm")
    out = tmp_path / "repvgg.safetensors"
    assert run("reparameterize", "timm:repvgg_a0", "--input-shape", "1,3,32,32", "-q",
               "--out", out) == 0
    assert "collapsed 22 regions of parallel branches: 22 convs (the model had 44)" \
        in capsys.readouterr().out
    from safetensors.torch import load_file

    net = fxmerge.load(out)  # rebuilt from the spec by trace and reparameterize
    assert sum(isinstance(m, torch.nn.Conv2d) for m in net.modules()) == 22
    saved = load_file(str(out))
    assert all(torch.equal(saved[k], v) for k, v in net.state_dict().items())
    assert run("analyze", "timm:repvgg_a0", "--input-shape", "1,3,32,32", "-q") == 0
    assert "22 regions of parallel branches (44 convs) each searched as one conv" \
        in capsys.readouterr().out


def test_proxy_calibrates_at_a_smaller_size_where_the_model_runs_there(tmp_path, capsys):
    """The output-agreement default calibrates on one image at most 64 pixels a side; a
    graph that runs only at its traced size (a flatten into a Linear) is calibrated there,
    with a line saying so."""
    big = ["fxmerge:DemoMobileNetV2", "--input-shape", "1,1,80,80", "--exclude", "stem.0",
           "head.0"]
    assert run("importance", *big, "--out", tmp_path / "imp.json") == 0
    imp = fxmerge.ImportanceTable.from_json((tmp_path / "imp.json").read_text())
    assert imp.settings.calibration_shape == [1, 1, 64, 64]
    assert "calibrating at" not in capsys.readouterr().out
    (tmp_path / "fixed.py").write_text(
        "import torch\n"
        "def net():\n"
        "    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(),\n"
        "        torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),\n"
        "        torch.nn.Linear(8 * 72 * 72, 10))\n")
    assert run("importance", f"{tmp_path / 'fixed.py'}:net", "--input-shape", "1,3,72,72",
               "--out", tmp_path / "fixed.json") == 0
    assert "does not run at 64 pixels a side" in capsys.readouterr().out
    fixed = fxmerge.ImportanceTable.from_json((tmp_path / "fixed.json").read_text())
    assert fixed.settings.calibration_shape == [1, 3, 72, 72]


def test_random_weights_are_the_same_network_in_every_command():
    """Each command builds the model anew: its random weights are seeded, so the tables
    and plans of separate commands describe one network; the caller's RNG is left alone."""
    from fxmerge.models.hub import load_model

    state = torch.random.get_rng_state()
    a, b = (load_model("torchvision:resnet18").state_dict() for _ in range(2))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(torch.random.get_rng_state(), state)
