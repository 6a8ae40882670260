"""dgemma: a from-scratch PyTorch engine for DiffusionGemma (block-diffusion MoE language model)."""

from .config import ConfigError, ModelConfig
from .engine.engine import Engine, load
from .model.checkpoint import CheckpointError

__all__ = ["load", "Engine", "ModelConfig", "ConfigError", "CheckpointError"]
__version__ = "0.1.0"
