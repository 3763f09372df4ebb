"""Architectures not in torchvision, used by the demo and the tests."""

from .demo import DemoMobileNetV2

__all__ = ["DemoMobileNetV2"]
