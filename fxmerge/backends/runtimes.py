"""Latency backends: what a network or one layer runs on when it is timed (eager PyTorch,
torch.compile's inductor, ONNX Runtime, TensorRT), one registered name each."""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable
from enum import Enum

import torch
from torch import fx, nn

from ..capture.trace import ExampleInputs, as_tuple
from ..errors import ArgumentError, BackendError
from ..passes import transform
from ..plan import Plan
from ..space import MergeSpace


class Backend(str, Enum):
    """A latency backend, by its one spelling."""

    EAGER = "eager"
    INDUCTOR = "inductor"  # torch.compile(backend="inductor")
    ONNXRUNTIME = "onnxruntime"
    TENSORRT = "tensorrt"  # torch-tensorrt, imported when used

    def __str__(self) -> str:
        return self.value


BACKENDS = tuple(b.value for b in Backend)


def get_backend(name: str | Backend, allowed: tuple[Backend, ...] = tuple(Backend)
                ) -> Backend:
    """The backend called `name`, one of `allowed`; an `ArgumentError` listing their names
    for anything else."""
    try:
        backend = Backend(name)
    except ValueError:
        backend = None
    if backend not in allowed:
        raise ArgumentError(f"unknown backend {name!r} (one of: "
                            f"{', '.join(b.value for b in allowed)})")
    return backend


def prepare(module: nn.Module, backend: str | Backend, example: ExampleInputs) -> Callable:
    """`module` (in eval mode, on its device) ready to run on a backend: the callable takes
    the same tensors as the module."""
    backend = get_backend(backend)
    if backend is Backend.EAGER:
        return module
    if backend is Backend.INDUCTOR:
        return torch.compile(module, backend="inductor")
    if backend is Backend.ONNXRUNTIME:
        return _onnxruntime_session(module, as_tuple(example))
    try:
        import torch_tensorrt
    except ImportError as exc:
        raise BackendError("the tensorrt backend needs torch-tensorrt: "
                           "pip install 'fxmerge[trt]'") from exc
    return torch_tensorrt.compile(module, inputs=list(as_tuple(example)))


def _onnxruntime_session(module: nn.Module, inputs: tuple) -> Callable:
    """Export to ONNX in memory and open an InferenceSession (all graph optimisations, as
    many intra-op threads as torch uses); the callable converts tensors to and from numpy."""
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise BackendError("the onnxruntime backend needs onnxruntime: "
                           "pip install 'fxmerge[onnx]'") from exc
    if any(x.device.type != "cpu" for x in inputs):
        raise BackendError("the onnxruntime backend runs on the CPU: use device='cpu'")
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(module, inputs, buffer, dynamo=False,
                          input_names=[f"x{i}" for i in range(len(inputs))])
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    # idle sessions must not spin on the cores while another network is timed
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(buffer.getvalue(), options,
                                   providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]

    def run(*xs: torch.Tensor):
        return session.run(None, {n: x.numpy() for n, x in zip(names, xs)})

    return run


def plan_runner(gm: fx.GraphModule, plan: Plan, backend: str, inputs: tuple,
                dtype: torch.dtype = torch.float32, space: MergeSpace | None = None
                ) -> Callable:
    """The network `plan` makes of `gm` (merged, eval mode; the identity plan gives the
    original with BatchNorm folded), on the inputs' device, prepared for `backend` (`space`:
    the one the plan was made on, where the caller has it)."""
    net = transform(gm, plan, space).to(device=inputs[0].device, dtype=dtype).eval()
    return prepare(net, backend, inputs)
