"""The model commands use when no --model is given: the packaged default model (`dgemma/models/default`, trained by
dgemma on the Python standard library; its card is the README there).

If a build of the package lacks it, the fallback is a tiny DiffusionGemma-architecture model with RANDOM weights,
created on first use in the user cache directory in the released checkpoint's layout (config.json,
model.safetensors, generation_config.json, tokenizer files). It exercises the whole real path (loading, chat
template, sampler, streaming) offline; its text is noise, and the commands say so. Tests build such random models
too (`build_random_model`). The Sudoku model (`dgemma/models/sudoku`) is the default of `dgemma sudoku` only.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import torch

PACKAGED = Path(__file__).parent / "models" / "default"
RANDOM_NAME = "random-tiny-v1"

# words for the placeholder tokenizer; any text works, these just make the vocabulary readable
_CORPUS = """A causal encoder caches the prompt; the same weights, run bidirectionally, denoise a canvas of
tokens in parallel. Each step samples every position, keeps the most certain ones and renoises the rest.
When the canvas is stable and confident it is committed to the cache and the next canvas starts.
The quick brown fox jumps over the lazy dog. Hello, world! How are you today? def main(): return 0
Numbers 0 1 2 3 4 5 6 7 8 9 and punctuation . , ; : ! ? ( ) [ ] { } " ' - + = * / < > # @ & % $"""


def cache_root() -> Path:
    base = os.environ.get("DGEMMA_CACHE") or os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "dgemma"


def default_model_path(*, quiet: bool = False) -> Path:
    """The bundled model if the package has one, else the random placeholder (created once)."""
    if (PACKAGED / "config.json").exists():
        return PACKAGED
    target = cache_root() / RANDOM_NAME
    if not (target / "model.safetensors").exists():
        build_random_model(target)
    if not quiet:
        print(f"dgemma: no trained model is bundled yet; using a RANDOM-weight placeholder at {target} "
              "(its output is noise; pass --model DIR for a real checkpoint)", file=sys.stderr)
    return target


def build_random_model(target: str | Path, *, seed: int = 0) -> Path:
    """Write a tiny random DiffusionGemma model with a trained placeholder tokenizer into `target` (a path)."""
    from .config import ModelConfig
    from .model import DiffusionGemma
    from .model.saving import init_weights, save_checkpoint
    from .text import save_tokenizer_files, train_tokenizer

    target = Path(target)
    tmp = target.with_name(target.name + ".partial")
    tokenizer = train_tokenizer([_CORPUS] * 4, vocab_size=640)
    vocab = max(640, tokenizer.get_vocab_size())
    cfg = ModelConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                      num_experts=4, top_k_experts=2, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=16, global_head_dim=32, num_global_key_value_heads=1,
                      layer_types=("sliding_attention", "full_attention", "sliding_attention", "full_attention"),
                      sliding_window=64, canvas_length=64, max_position_embeddings=8192,
                      eos_token_id=(1, 106))
    module = DiffusionGemma(cfg)
    init_weights(module, torch.Generator().manual_seed(seed))
    generation = {"max_new_tokens": 64, "max_denoising_steps": 16, "eos_token_id": [1, 106, 50], "pad_token_id": 0,
                  "sampler_config": {"_cls_name": "EntropyBoundSamplerConfig", "entropy_bound": 0.1},
                  "t_min": 0.4, "t_max": 0.8, "stability_threshold": 1, "confidence_threshold": 0.005}
    save_checkpoint(module, tmp, generation_config=generation, metadata={"dgemma": "random-placeholder"})
    save_tokenizer_files(tokenizer, tmp)
    if target.exists():  # an earlier interrupted build
        shutil.rmtree(target)
    tmp.rename(target)
    return target
