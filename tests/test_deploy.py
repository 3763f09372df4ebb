"""Deploying a merged network: saved without pickle and rebuilt in a fresh process, and
exported to ONNX, equal to the merged network."""

import importlib.util
import subprocess
import sys

import pytest
import torch
from helpers import randomize_batchnorm, relative_error

import fxmerge

X = torch.randn(2, 3, 32, 32)


@pytest.fixture(scope="module")
def merged():
    model = randomize_batchnorm(fxmerge.models.load_model("torchvision:resnet18"))
    gm = fxmerge.trace(model, X)
    plan = fxmerge.Plan.random(fxmerge.analyze(gm), 3)
    return fxmerge.transform(gm, plan)


def test_saved_network_loads_in_a_fresh_process_without_pickle(merged, tmp_path):
    path = fxmerge.save(merged, tmp_path / "net.safetensors", model="torchvision:resnet18")
    with open(path, "rb") as f:
        assert b"pickle" not in f.read(64) and path.stat().st_size > 1e6
    torch.save(X, tmp_path / "x.pt")
    with torch.no_grad():
        torch.save(merged(X), tmp_path / "want.pt")
    code = (f"import torch, fxmerge; net = fxmerge.load({str(path)!r}); "
            f"x = torch.load({str(tmp_path / 'x.pt')!r}); "
            f"want = torch.load({str(tmp_path / 'want.pt')!r}); "
            "got = net(x); print(((got - want).abs().max() / want.abs().max()).item())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert float(out.stdout.strip().splitlines()[-1]) <= 1e-6


def test_load_checks_the_file_and_the_model(merged, tmp_path):
    path = fxmerge.save(merged, tmp_path / "net.safetensors")  # no spec recorded
    with pytest.raises(fxmerge.ArgumentError, match="records no model spec"):
        fxmerge.load(path)
    with torch.no_grad():
        again = fxmerge.load(path, model=fxmerge.models.load_model("torchvision:resnet18"))
        assert relative_error(merged(X), again(X)) <= 1e-6
    with pytest.raises(fxmerge.PlanError, match="another"):
        fxmerge.load(path, model=fxmerge.models.load_model("torchvision:resnet34"))
    (tmp_path / "junk.safetensors").write_bytes(b"\x80\x04junk")
    with pytest.raises(fxmerge.ArgumentError, match="not a safetensors file"):
        fxmerge.load(tmp_path / "junk.safetensors")
    with pytest.raises(fxmerge.ArgumentError, match="give a merged GraphModule"):
        fxmerge.save(fxmerge.trace(torch.nn.Conv2d(3, 3, 1), X), tmp_path / "x.safetensors")


@pytest.mark.skipif(importlib.util.find_spec("onnxruntime") is None,
                    reason="onnxruntime is not installed (pip install 'fxmerge[onnx]')")
def test_onnx_export_runs_in_onnxruntime_equal_to_the_merged_network(merged, tmp_path):
    import onnxruntime as ort

    path = fxmerge.export_onnx(merged, X, tmp_path / "net.onnx")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = torch.randn(5, 3, 32, 32)  # another batch: the batch is dynamic
    got = torch.from_numpy(session.run(None, {"x0": x.numpy()})[0])
    with torch.no_grad():
        assert relative_error(merged(x), got) <= 1e-5


def test_load_never_runs_a_file_the_saved_metadata_names(tmp_path):
    """A `.py` planted beside a `.safetensors` whose metadata names it is not run, unless
    the caller says so."""
    (tmp_path / "net.py").write_text(
        "import pathlib, torch\n"
        f"pathlib.Path({str(tmp_path / 'ran')!r}).write_text('ran')\n"
        "def Net():\n    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(),\n"
        "                               torch.nn.Conv2d(4, 4, 3))\n")
    spec = f"{tmp_path / 'net.py'}:Net"
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Conv2d(4, 4, 3))
    gm = fxmerge.trace(model.eval(), X)
    merged = fxmerge.transform(gm, fxmerge.Plan.identity(fxmerge.analyze(gm)))
    path = fxmerge.save(merged, tmp_path / "net.safetensors", model=spec)
    with pytest.raises(fxmerge.ArgumentError, match="a file fxmerge would have to run"):
        fxmerge.load(path)
    assert not (tmp_path / "ran").exists()
    loaded = fxmerge.load(path, model=model)  # the caller's model: nothing run either
    assert not (tmp_path / "ran").exists()
    trusted = fxmerge.load(path, trust_code=True)
    assert (tmp_path / "ran").exists()
    with torch.no_grad():
        assert torch.allclose(loaded(X), merged(X)) and torch.allclose(trusted(X), merged(X))
