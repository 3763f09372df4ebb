"""Where fxmerge meets compilers: the torch.compile pre-pass backend."""

from .compile import backend, register

__all__ = ["backend", "register"]
