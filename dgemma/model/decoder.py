"""Decoder (denoiser) mode: the same layers run bidirectionally over a canvas; reads the cache, never writes it.

Geometry (spec §4.8, the reference's dynamic-cache semantics): canvas tokens sit at positions
P..P+L-1 (P = cache.length) and every canvas query attends, with no mask, to [cached context ; canvas].
Sliding layers see the cache's last min(P, window-1) entries, the SAME entries for every canvas query
(the window is not re-applied per query); full layers see the whole context. Only padded context slots
are masked. The canvas's own K/V are discarded: a canvas enters the cache only when it is committed
(re-encoded by encoder.encode).

Input embedding = scale-free rms(E[x]·sqrt(D) + self-conditioning MLP(soft)) on every step (spec §5).
"""

from __future__ import annotations

import torch


def soft_embedding(model, sc_logits: torch.Tensor, sc_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Expected embedding under the previous step's processed logits (spec §5).

    sc_logits [B,L,V] -> softmax in fp32, probabilities cast to the embedding dtype, times E, times
    sqrt(D) (cast to the weight dtype). sc_mask [B] bool zeroes the signal per row (training dropout).
    Cost: one [L,V]x[V,D] product, about the size of the LM head."""
    w = model.embed_tokens.weight
    # the reference casts ℓ̃ to the embedding dtype before the fp32 softmax; do the same (bf16 rounding included)
    probs = torch.softmax(sc_logits.to(w.dtype), dim=-1, dtype=torch.float32).to(w.dtype)
    soft = (probs @ w) * torch.tensor(model.config.embed_scale, dtype=w.dtype, device=w.device)
    if sc_mask is not None:
        soft = soft * sc_mask.to(soft.dtype)[:, None, None]
    return soft


def denoise(model, tokens: torch.Tensor, cache, soft: torch.Tensor | None = None) -> torch.Tensor:
    """tokens [B,L] int64, soft [B,L,D] or None (first step) -> logits [B,L,V] fp32 (soft-capped)."""
    B, L = tokens.shape
    assert tokens.dtype == torch.int64, f"tokens must be int64, got {tokens.dtype}"
    x = model.self_conditioning(model.embed(tokens), soft)
    # cache.length is an int, or a [B] / [B,1] tensor when rows' canvases start at different positions (training)
    start = torch.as_tensor(cache.length, device=tokens.device).reshape(-1, 1)
    positions = start + torch.arange(L, device=tokens.device)
    rope = model.rope(positions, x.dtype)
    for i, layer in enumerate(model.layers):
        context = cache.context(i)
        mask = None
        if context is not None and context[2] is not None:  # padded context slots only
            canvas = torch.ones(B, L, dtype=torch.bool, device=tokens.device)
            mask = torch.cat([context[2], canvas], dim=1)[:, None, None, :]
        cos, sin = rope[layer.is_sliding]
        x, _ = layer(x, cos, sin, None if context is None else context[:2], mask, is_encoder=False)
    return model.logits(x)
