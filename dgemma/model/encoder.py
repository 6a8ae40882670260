"""Encoder mode: the causal pass over the prompt or a committed canvas; the ONLY writer of the KV cache.

It is an ordinary causal Gemma-4 forward (spec §4.7): query at position q sees key k iff k <= q, and on
sliding layers also k > q - window (1024 keys including itself). Padded key slots (left padding in a batch)
are masked. New tokens continue at positions cache.length .. cache.length+T-1, pad slots included, as the
reference does (spec §6.6); cache.length may be a [B] tensor (each row continues its own context). The same
function serves prompt prefill and canvas commits (stage, then commit). A long prompt's attention runs in query
chunks that skip the keys they cannot see (attention.chunk_queries: the same bits, a fraction of the work).
"""

from __future__ import annotations

import torch

from .attention import chunk_queries
from .decoder import context_positions


def encoder_mask(num_context: int, num_new: int, start, window: int | None,
                 key_valid: torch.Tensor | None, device) -> torch.Tensor:
    """bool [B or 1, 1, T, S+T], True = attend. Keys are the S cached entries (positions start-S..start-1)
    followed by the T new tokens. `start` is an int, or a [B] tensor when rows continue from different
    context lengths (a stacked batch of caches, engine/cache.py). A query always sees itself, so a fully padded
    row cannot produce NaNs (its output is never read: pad slots are masked as keys for every later query)."""
    q_pos = context_positions(start, num_new, device)  # [B or 1, T]
    k_pos = context_positions(start - num_context, num_context + num_new, device)  # [B or 1, S+T]
    allowed = k_pos[:, None, :] <= q_pos[:, :, None]
    if window is not None:
        allowed = allowed & (k_pos[:, None, :] > q_pos[:, :, None] - window)
    if key_valid is not None:
        allowed = allowed & key_valid[:, None, :]
        allowed = allowed | (k_pos[:, None, :] == q_pos[:, :, None])
    return allowed[:, None]


def encode(model, tokens: torch.Tensor, cache, valid: torch.Tensor | None = None, return_hidden: bool = False):
    """tokens [B,T] int64 (valid [B,T] bool, False = padding) -> writes K/V of every layer into `cache`.

    Returns the final-norm hidden states [B,T,D] when `return_hidden` (an autoregressive head for training
    or AR decoding), else None; then the last layer only projects its K/V, since nothing reads the rest of
    its output."""
    cfg = model.config
    B, T = tokens.shape
    assert tokens.dtype == torch.int64, f"tokens must be int64, got {tokens.dtype}"
    x = model.embed(tokens)
    # cache.length: an int, or [B] per-row lengths (rows continuing different contexts)
    positions = context_positions(cache.length, T, tokens.device)
    rope = model.rope(positions, x.dtype)
    masks = {}
    for i, layer in enumerate(model.layers):
        context = cache.context(i)
        num_context = 0 if context is None else context[0].shape[2]
        ctx_valid = None if context is None else context[2]
        key = (layer.is_sliding, num_context)
        if key not in masks:
            key_valid = None
            if valid is not None or ctx_valid is not None:  # some slot in the batch is padding
                ones = lambda n: torch.ones(B, n, dtype=torch.bool, device=tokens.device)  # noqa: E731
                key_valid = torch.cat([ones(num_context) if ctx_valid is None else ctx_valid,
                                       ones(T) if valid is None else valid], dim=1)
            window = cfg.sliding_window if layer.is_sliding else None
            masks[key] = chunk_queries(encoder_mask(num_context, T, cache.length, window, key_valid, tokens.device))
        cos, sin = rope[layer.is_sliding]
        if i == len(model.layers) - 1 and not return_hidden:
            cache.write(i, *layer.self_attn.project_kv(layer.input_layernorm(x), cos, sin))
            break
        x, kv = layer(x, cos, sin, None if context is None else context[:2], masks[key], is_encoder=True)
        cache.write(i, *kv)
    cache.extend(T, valid)
    return model.norm(x) if return_hidden else None
