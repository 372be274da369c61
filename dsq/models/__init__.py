"""Float models to quantize (torchvision, CIFAR ResNets, EfficientNet-Lite), from weights files or names."""

from .loader import LoadedModel, load_model
from .registry import build_model, known_archs, state_size

__all__ = ["LoadedModel", "build_model", "known_archs", "load_model", "state_size"]
