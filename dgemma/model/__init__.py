"""The DiffusionGemma text model: plain eager PyTorch, one set of weights, two passes (encode, denoise)."""

from .blocks import DiffusionGemma
from .checkpoint import CheckpointError
from .loading import load_module

__all__ = ["DiffusionGemma", "CheckpointError", "load_module"]
