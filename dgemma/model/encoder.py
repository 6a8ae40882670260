"""Encoder mode: the causal pass over the prompt or a committed canvas; the ONLY writer of the KV cache.

It is an ordinary causal Gemma-4 forward (spec §4.7): query at position q sees key k iff k <= q, and on
sliding layers also k > q - window (1024 keys including itself). Padded key slots (left padding in a batch)
are masked. New tokens continue at positions cache.length .. cache.length+T-1, pad slots included, as the
reference does (spec §6.6); cache.length may be a [B] tensor (each row continues its own context). The same
function serves prompt prefill and canvas commits (stage, then commit). A long prompt's attention runs in query
chunks that skip the keys they cannot see (attention.chunk_queries: the same bits, a fraction of the work), each
building only its own block of the mask (EncoderMask); as an option, a long prompt goes in pieces (`encode`'s
`piece`: one piece's activations at a time).
"""

from __future__ import annotations

import torch

from .attention import chunk_queries
from .decoder import context_positions


class EncoderMask:
    """Which keys each query of an encoder pass attends to (True = attend), kept as its rule and built into bool
    blocks on demand, so a long pass never holds a [T, S] mask: `dense()` is the whole [B or 1, 1, T, S], and
    `block(q0, q1, k0, k1)` the part for queries [q0, q1) and keys [k0, k1) (attention.chunk_queries builds one
    chunk's at a time: O(T x chunk) memory instead of O(T^2), 1 GB per layer kind at a 32K-token prompt).

    Keys are the S cached entries (positions start-S..start-1) followed by the T new tokens. `start` is an int, or
    a [B] tensor when rows continue from different context lengths (a stacked batch of caches, engine/cache.py).
    A query always sees itself, so a fully padded row cannot produce NaNs (its output is never read: pad slots are
    masked as keys for every later query)."""

    def __init__(self, num_context: int, num_new: int, start, window: int | None,
                 key_valid: torch.Tensor | None, device):
        self.num_context, self.start, self.window, self.key_valid, self.device = (
            num_context, start, window, key_valid, device)
        self.shape = (num_new, num_context + num_new)  # (T, S+T): queries, keys
        self._any_valid = None if key_valid is None else key_valid.any(dim=0)  # [S+T]: a key some row has

    def block(self, q0: int, q1: int, k0: int, k1: int) -> torch.Tensor:
        """bool [B or 1, 1, q1-q0, k1-k0]: queries q0..q1-1 (of the T new ones) against keys k0..k1-1."""
        q_pos = context_positions(self.start + q0, q1 - q0, self.device)  # [B or 1, q]
        k_pos = context_positions(self.start - self.num_context + k0, k1 - k0, self.device)  # [B or 1, k]
        allowed = k_pos[:, None, :] <= q_pos[:, :, None]
        if self.window is not None:
            allowed = allowed & (k_pos[:, None, :] > q_pos[:, :, None] - self.window)
        if self.key_valid is not None:
            allowed = allowed & self.key_valid[:, None, k0:k1]
            allowed = allowed | (k_pos[:, None, :] == q_pos[:, :, None])
        return allowed[:, None]

    def dense(self) -> torch.Tensor:
        T, S = self.shape
        return self.block(0, T, 0, S)

    def key_range(self, q0: int, q1: int) -> tuple[int, int]:
        """[first, last + 1) of the keys that some query in q0..q1-1 attends to in some row, from the rule alone:
        query i is at key index num_context + i whatever the row's start, sees itself and no later key, and on a
        sliding layer nothing before index num_context + i - window + 1; padding only takes keys away."""
        own = self.num_context + q0  # the chunk's first query, as a key
        first = 0 if self.window is None else own - self.window + 1
        first = max(first, 0)
        if self._any_valid is not None:  # skip keys that are padding in every row (it sees itself at `own`)
            valid = self._any_valid[first:own].nonzero()
            first = first + int(valid[0]) if valid.numel() else own
        return first, self.num_context + q1


def encode(model, tokens: torch.Tensor, cache, valid: torch.Tensor | None = None, return_hidden: bool = False,
           piece: int | None = None):
    """tokens [B,T] int64 (valid [B,T] bool, False = padding) -> writes K/V of every layer into `cache`.

    Returns the final-norm hidden states [B,T,D] when `return_hidden` (an autoregressive head for training
    or AR decoding), else None; then the last layer only projects its K/V, since nothing reads the rest of
    its output.

    piece: run a pass longer than this as consecutive passes of at most `piece` tokens, each attending to the cache
    the ones before it wrote (a prompt prefilled in pieces, `Engine.prefill_chunk`). The same math, with the
    working set of one piece instead of the whole prompt (the experts' routed copies of every token, K per token,
    are most of a long prefill's activations); not the same bits as one pass (other matrix shapes and key blocks),
    so it is an option, never the default."""
    T = tokens.shape[1]
    # a right-padded batch of caches (engine/cache.py StackedCaches with `counts`) counts its rows' tokens whole
    if piece is None or T <= piece or getattr(cache, "counts", None) is not None:
        return encode_pass(model, tokens, cache, valid, return_hidden)
    hidden = [encode_pass(model, tokens[:, t0:t0 + piece], cache, None if valid is None else valid[:, t0:t0 + piece],
                          return_hidden) for t0 in range(0, T, piece)]
    return torch.cat(hidden, dim=1) if return_hidden else None


def encode_pass(model, tokens: torch.Tensor, cache, valid: torch.Tensor | None, return_hidden: bool):
    """One causal pass over all of `tokens` (see `encode`)."""
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
            masks[key] = chunk_queries(EncoderMask(num_context, T, cache.length, window, key_valid, tokens.device))
        cos, sin = rope[layer.is_sliding]
        if i == len(model.layers) - 1 and not return_hidden:
            cache.write(i, *layer.self_attn.project_kv(layer.input_layernorm(x), cos, sin))
            break
        x, kv = layer(x, cos, sin, None if context is None else context[:2], masks[key], is_encoder=True)
        cache.write(i, *kv)
    cache.extend(T, valid)
    return model.norm(x) if return_hidden else None
