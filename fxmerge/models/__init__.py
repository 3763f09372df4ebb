"""Architectures not in torchvision, used by the demos and the tests."""

from .ddpm import DDPM_EXCLUDE, DDPMUNet
from .demo import DemoMobileNetV2

__all__ = ["DDPM_EXCLUDE", "DDPMUNet", "DemoMobileNetV2"]
