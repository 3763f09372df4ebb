"""Where fxmerge meets runtimes and compilers: the latency backends networks are timed on
(`runtimes`, `timing`) and the torch.compile pre-pass (`compile`)."""

from .compile import backend, register
from .runtimes import BACKENDS, Backend, get_backend, plan_runner, prepare

__all__ = ["BACKENDS", "Backend", "backend", "get_backend", "plan_runner", "prepare", "register"]
