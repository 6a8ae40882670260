"""Architecture summary and parameter census, computed on the meta device (no weights allocated).

Counting convention: parameters only, each once (the embedding is tied to the head; encoder and decoder share
the stack), i.e. `sum(p.numel() for p in module.parameters())` of the loaded model, what transformers'
`num_parameters()` and the checkpoint index's `total_parameters` count. The per-layer `layer_scalar` values
(one per layer for the decoder, one for the encoder) are buffers, not parameters: reported apart. For 26B-A4B
that is 25,250,986,752 text parameters, the index's 25,823,778,864 less the vision tower's 572,792,112 (spec
§2.5, whose 25,250,986,782 adds the 30 decoder scalars). "Active per token" counts top_k of the num_experts
experts per layer, everything else in full.
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import torch

from ..config import ModelConfig, adapter_base, model_chain, read_adapter_config
from .blocks import DiffusionGemma
from .checkpoint import DTYPE_NAMES, read_header


def census(cfg: ModelConfig) -> dict:
    with torch.device("meta"):
        module = DiffusionGemma(cfg)
    groups = Counter()
    for name, p in module.named_parameters():
        if name.startswith("embed_tokens"):
            groups["embedding (tied head)"] += p.numel()
        elif ".experts." in name:
            groups["experts"] += p.numel()
        elif ".self_attn." in name:
            groups["attention"] += p.numel()
        elif ".mlp." in name:
            groups["dense MLP"] += p.numel()
        elif ".router." in name:
            groups["router"] += p.numel()
        elif name.startswith("self_conditioning"):
            groups["self-conditioning"] += p.numel()
        else:
            groups["norms"] += p.numel()
    total = sum(groups.values())
    active = total - groups["experts"] + groups["experts"] * cfg.top_k_experts // cfg.num_experts
    return {"total": total, "active_per_token": active, "by_component": dict(groups),
            "layer_scalar_buffers": sum(b.numel() for name, b in module.named_buffers() if "layer_scalar" in name)}


def stored_bytes(infos: dict) -> dict[str, int]:
    """Bytes per stored dtype of tensors described by safetensors headers (checkpoint.list_tensors / read_header:
    nothing is read beyond them)."""
    out = Counter()
    for info in infos.values():
        out[DTYPE_NAMES[info.dtype]] += info.end - info.begin
    return dict(out)


def describe(cfg: ModelConfig) -> list[str]:
    n_full = sum(not cfg.is_sliding(i) for i in range(cfg.num_hidden_layers))
    full_at = [i for i in range(cfg.num_hidden_layers) if not cfg.is_sliding(i)]
    return [
        f"layers            {cfg.num_hidden_layers} ({cfg.num_hidden_layers - n_full} sliding, "
        f"{n_full} full at {full_at})",
        f"hidden            {cfg.hidden_size}; dense MLP / self-cond width {cfg.intermediate_size}",
        f"experts           {cfg.num_experts} x width {cfg.moe_intermediate_size}, top-{cfg.top_k_experts} per token",
        f"attention         {cfg.num_attention_heads} query heads; sliding {cfg.num_key_value_heads} KV x "
        f"{cfg.head_dim} (window {cfg.sliding_window}); full {cfg.num_global_key_value_heads} KV x "
        f"{cfg.global_head_dim} (K=V, {cfg.partial_rotary_factor:g} RoPE)",
        f"vocabulary        {cfg.vocab_size}; canvas {cfg.canvas_length}; soft-cap {cfg.final_logit_softcapping}",
    ]


def describe_adapter(directory: Path) -> dict:
    """What a LoRA adapter directory holds, from adapter_config.json and its tensor header: the base model it
    records, the model directory its weights start from (the base, or the end of a chain of adapters), rank,
    alpha, targets, parameter count and stored bytes."""
    from .lora import ADAPTER_FILE

    meta = read_adapter_config(directory)
    infos, _ = read_header(directory / ADAPTER_FILE)
    return {"base_model": str(adapter_base(directory)), "model": str(model_chain(directory)[-1]),
            "rank": meta["rank"], "alpha": meta["alpha"], "targets": list(meta["targets"]), "dropout": meta["dropout"],
            "parameters": sum(math.prod(info.shape) for info in infos.values()), "stored_bytes_by_dtype": stored_bytes(infos)}
