"""Architectures not in torchvision, used by the demo and the tests."""
