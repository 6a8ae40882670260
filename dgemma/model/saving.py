"""Writing a module back in the released checkpoint's Hugging Face layout (the trainer and the bundled
models use it), so `dgemma.load` and transformers 5.23 both read what we write."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..config import FULL, MODEL_TYPE, SLIDING, TEXT_MODEL_TYPE, ModelConfig
from .loading import checkpoint_key

# transformers always builds a vision tower for this architecture; a minimal one keeps configs loadable there
# (we never load or use vision weights; see loading.py).
_VISION_STUB = {"model_type": "gemma4_vision", "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                "num_attention_heads": 1, "num_key_value_heads": 1, "head_dim": 16, "patch_size": 4,
                "position_embedding_size": 16}


def config_to_hf(cfg: ModelConfig) -> dict:
    """ModelConfig -> a `config.json` dict in the checkpoint's own spelling (global_head_dim keys)."""
    raw = cfg.extra.get("raw")
    if raw is not None and raw.get("model_type") == MODEL_TYPE:
        return raw  # loaded from a checkpoint: write back exactly what we read
    text = {
        "model_type": TEXT_MODEL_TYPE, "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size, "moe_intermediate_size": cfg.moe_intermediate_size,
        "num_experts": cfg.num_experts, "top_k_experts": cfg.top_k_experts,
        "num_hidden_layers": cfg.num_hidden_layers, "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads, "head_dim": cfg.head_dim,
        "global_head_dim": cfg.global_head_dim, "num_global_key_value_heads": cfg.num_global_key_value_heads,
        "layer_types": list(cfg.layer_types), "sliding_window": cfg.sliding_window,
        "max_position_embeddings": cfg.max_position_embeddings,
        "rope_parameters": {
            SLIDING: {"rope_type": "default", "rope_theta": cfg.rope_theta_sliding},
            FULL: {"rope_type": "proportional", "partial_rotary_factor": cfg.partial_rotary_factor,
                   "rope_theta": cfg.rope_theta_full}},
        "hidden_activation": cfg.hidden_activation, "rms_norm_eps": cfg.rms_norm_eps,
        "final_logit_softcapping": cfg.final_logit_softcapping, "use_bidirectional_attention": "vision",
        "attention_bias": False, "attention_dropout": 0.0, "tie_word_embeddings": True,
        "pad_token_id": cfg.pad_token_id, "bos_token_id": cfg.bos_token_id, "eos_token_id": list(cfg.eos_token_id),
    }
    top = cfg.vocab_size - 1  # image ids must exist in the vocabulary; park them at the top
    return {"architectures": ["DiffusionGemmaForBlockDiffusion"], "model_type": MODEL_TYPE,
            "canvas_length": cfg.canvas_length, "tie_word_embeddings": True, "image_token_id": top,
            "boi_token_id": top - 2, "eoi_token_id": top - 1, "eos_token_id": list(cfg.eos_token_id),
            "pad_token_id": cfg.pad_token_id, "bos_token_id": cfg.bos_token_id, "text_config": text,
            "vision_config": dict(_VISION_STUB)}


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict | None = None) -> None:
    """safetensors' save_file, leaving the file with the permissions every other file we write gets (0666 less the
    umask): safetensors 0.8 creates it 0600, a model that a server account or another user cannot read."""
    save_file(tensors, path, metadata=metadata)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def save_checkpoint(module, directory: str | Path, *, generation_config: dict | None = None,
                    metadata: dict | None = None) -> Path:
    """Write config.json, model.safetensors (HF key names) and optionally generation_config.json."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {checkpoint_key(name): t.detach().contiguous().cpu() for name, t in module.state_dict().items()}
    save_safetensors(tensors, directory / "model.safetensors", metadata={"format": "pt", **(metadata or {})})
    (directory / "config.json").write_text(json.dumps(config_to_hf(module.config), indent=2) + "\n")
    if generation_config is not None:
        (directory / "generation_config.json").write_text(json.dumps(generation_config, indent=2) + "\n")
    return directory


def init_weights(module, generator: torch.Generator, std: float = 0.02) -> None:
    """Random initialisation for a module built on a real device: normal(0, std) matrices, unit norms/scales."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=generator) * std)
            else:
                p.fill_(1.0)
        for name, b in module.named_buffers():
            b.fill_(1.0)
