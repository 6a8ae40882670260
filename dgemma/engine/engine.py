"""Engine: a loaded model plus everything that lives longer than one call (what `dgemma.load` returns)."""

from __future__ import annotations

from pathlib import Path

import torch

from ..config import ModelConfig
from ..model import DiffusionGemma, load_module
from .cache import KVCache


class Engine:
    def __init__(self, module: DiffusionGemma, directory: Path | None = None):
        self.module = module
        self.config: ModelConfig = module.config
        self.directory = directory

    @property
    def device(self) -> torch.device:
        return self.module.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.module.embed_tokens.weight.dtype

    def new_cache(self, batch_size: int) -> KVCache:
        return KVCache(self.config, batch_size)

    @torch.inference_mode()
    def encode(self, tokens, cache: KVCache, valid=None, return_hidden=False):
        """Causal pass over tokens [B,T]; appends their K/V to `cache` (the only cache writer)."""
        return self.module.encode(tokens, cache, valid=valid, return_hidden=return_hidden)

    @torch.inference_mode()
    def denoise(self, tokens, cache: KVCache, sc_logits=None):
        """One denoiser forward over a canvas [B,L]; sc_logits [B,L,V] = previous step's processed logits."""
        soft = None if sc_logits is None else self.module.soft_embedding(sc_logits)
        return self.module.denoise(tokens, cache, soft=soft)


def load(path: str | Path, *, dtype: torch.dtype | str | None = None, device=None, quiet: bool = False) -> Engine:
    """Load a DiffusionGemma model directory (Hugging Face layout) into an Engine."""
    if isinstance(dtype, str):
        dtype = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
                 "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}[dtype]
    module = load_module(path, dtype=dtype, device=device, quiet=quiet)
    return Engine(module, Path(path))
