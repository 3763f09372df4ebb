"""Models by name (`load_model`), and architectures not in torchvision that the demos and
tests use."""

from .ddpm import DDPM_EXCLUDE, DDPMUNet
from .demo import DemoMobileNetV2
from .hub import SPEC_FORMS, load_model
from .signal import TCN1d, VocoderStack

__all__ = ["DDPM_EXCLUDE", "SPEC_FORMS", "DDPMUNet", "DemoMobileNetV2", "TCN1d", "VocoderStack",
           "load_model"]
