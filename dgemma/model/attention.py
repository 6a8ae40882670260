"""One attention module for both layer kinds and both passes (spec §4.4).

Departures from vanilla attention, all from the checkpoint:
* scale 1.0 (no 1/sqrt(D)): the per-head q/k RMSNorms already fix the logit scale;
* q and k get a weighted per-head RMSNorm before RoPE; v gets a scale-free one;
* full-attention layers have no v_proj: the value is the raw k_proj output (before k-norm and RoPE);
* full layers use a bigger head (512) and fewer KV heads (2) with partial RoPE (see layers.py).

The KV cache is reached through a three-method structural interface, so `model/` never imports `engine/`:
    cache.context(layer) -> (k [B,Hk,S,D], v [B,Hk,S,D], key_valid [B,S] bool | None) | None
    cache.write(layer, k [B,Hk,T,D], v [B,Hk,T,D])      # encoder only
    cache.length -> int                                  # positions consumed so far (incl. pad slots)
Keys/values are stored post-norm and post-RoPE, exactly what attention consumes.
"""

from __future__ import annotations

import itertools
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .layers import RMSNorm, apply_rope, norm


class Attention(nn.Module):
    def __init__(self, hidden: int, num_heads: int, num_kv_heads: int, head_dim: int, has_v_proj: bool, eps: float):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim, self.eps = num_heads, num_kv_heads, head_dim, eps
        self.q_proj = nn.Linear(hidden, num_heads * head_dim, bias=False)
        self.k_proj = nn.Linear(hidden, num_kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(hidden, num_kv_heads * head_dim, bias=False) if has_v_proj else None
        self.o_proj = nn.Linear(num_heads * head_dim, hidden, bias=False)
        self.q_norm = RMSNorm(head_dim, eps)
        self.k_norm = RMSNorm(head_dim, eps)

    def project_kv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """x [B,T,D] -> k, v [B,Hk,T,Dh] as stored in the cache."""
        B, T, _ = x.shape
        raw_k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim)
        raw_v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim) if self.v_proj is not None else raw_k
        k = apply_rope(self.k_norm(raw_k), cos, sin)
        v = norm(raw_v, None, self.eps)  # scale-free "v_norm" (rms_norm itself at inference)
        return k.transpose(1, 2), v.transpose(1, 2)

    def forward(self, x, cos, sin, context, mask, canvas=None):
        """x [B,T,D]; context (k, v) [B,Hk,S,Dh] or None; mask bool [B,1,T,S+T] (True = attend), that mask as a
        ChunkedMask (`chunk_queries`), or None.
        canvas: None, or (k_buf, v_buf [B,Hk,L+1,Dh], index [B,T]) when x holds only T of a canvas's L positions
        (decoder over a subset, engine/settle.py): the new k/v are written into the buffers at `index` (index L,
        the spare last slot, takes what nobody reads) and the queries attend to [context ; the L canvas entries]
        (mask then [B,1,T,S+L]).

        Returns (out [B,T,D], (k, v) of the T new tokens)."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim)
        q = apply_rope(self.q_norm(q), cos, sin).transpose(1, 2)
        k_new, v_new = self.project_kv(x, cos, sin)
        k, v = k_new, v_new
        if canvas is not None:
            k_buf, v_buf, index = canvas
            where = index[:, None, :, None].expand(-1, k_new.shape[1], -1, k_new.shape[3])
            k, v = k_buf.scatter_(2, where, k_new)[:, :, :-1], v_buf.scatter_(2, where, v_new)[:, :, :-1]
        if context is not None:
            k = torch.cat([context[0], k], dim=2)
            v = torch.cat([context[1], v], dim=2)
        out = attend(q, k, v, mask)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1)), (k_new, v_new)


QUERY_CHUNK = 1024  # queries per chunk of a long masked pass (`chunk_queries`); None turns chunking off
MIN_QUERY_CHUNK = 768  # the shortest chunk: from 768 queries on, torch's CPU kernel takes 256-query blocks
KEY_BLOCK = 512  # the key block of torch's CPU flash-attention kernel: chunks' key ranges start and end on them


REPEAT_HEADS_ON_CUDA = True  # False: enable_gqa everywhere, as before 2026-11-28 (bench/long_prompt.py's gqa-math)


class ChunkedMask(NamedTuple):
    """An encoder pass's mask in query chunks: `chunks` holds (q0, q1, k0, k1) per chunk, and every key outside
    [k0, k1) is masked for every query in [q0, q1), so attention runs chunk by chunk on those keys only, each
    chunk's bool block built from `rule` (encoder.EncoderMask) when it runs."""
    rule: object  # .block(q0, q1, k0, k1) -> bool [B or 1, 1, q1-q0, k1-k0]
    chunks: tuple[tuple[int, int, int, int], ...]


def chunk_queries(rule) -> torch.Tensor | ChunkedMask:
    """The long encoder pass (a prompt of thousands of tokens) in query chunks that skip the keys they cannot see.

    `rule` is an encoder.EncoderMask (.shape (T, S), .key_range, .block, .dense). With one [T, S] mask SDPA
    computes every query against every key: at a 4,096-token prompt a sliding layer (window 512) does 8x the work
    its window needs, and a causal full layer twice; and the mask alone is T x S bytes (1 GB at 32K tokens). Chunks
    of QUERY_CHUNK queries see only the keys some query of theirs attends to, widened to KEY_BLOCK boundaries, and
    build only their own block of the mask.

    Same bits as the one call on the CPU (tests/test_attention_chunks.py checks fp32 and bf16): torch's CPU
    flash-attention kernel goes through the keys in blocks of 512 from the first with an online softmax, so a
    block masked for every query leaves a row's running sums exactly as they were, and blocks on the same
    boundaries are the same sums; queries go in blocks of 256 once a call has at least 768 of them, so chunks
    start on multiples of 256 and have at least MIN_QUERY_CHUNK queries. Measured with bench/long_prompt.py
    (`small`, fp32, 2-core EPYC): a 4,096-token prefill 6.44 -> 3.97 s, 8,192 tokens 21.4 -> 10.1 s.

    Returns the dense mask when chunks would save nothing (fewer than two chunks' worth of queries, or every
    chunk sees every key)."""
    T, S = rule.shape
    if QUERY_CHUNK is None or T < QUERY_CHUNK + MIN_QUERY_CHUNK:
        return rule.dense()
    bounds = list(range(0, T, QUERY_CHUNK)) + [T]
    if bounds[-1] - bounds[-2] < MIN_QUERY_CHUNK:
        del bounds[-2]
    chunks = []
    for q0, q1 in itertools.pairwise(bounds):
        first, end = rule.key_range(q0, q1)
        chunks.append((q0, q1, first // KEY_BLOCK * KEY_BLOCK, min(S, -(-end // KEY_BLOCK) * KEY_BLOCK)))
    if all(k0 == 0 and k1 == S for _, _, k0, k1 in chunks):
        return rule.dense()
    return ChunkedMask(rule, tuple(chunks))


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
           mask: torch.Tensor | ChunkedMask | None) -> torch.Tensor:
    """softmax(q kᵀ · 1.0 + mask) v with grouped-query heads. q [B,H,T,D]; k, v [B,Hk,S,D] -> [B,H,T,D].

    SDPA's enable_gqa reads each K/V head for its group of query heads in place: no repeat_interleave copy of the
    cache (measured on CPU: the same bits, ~4x faster for a 256-query step against 288 keys). On CUDA only the
    flash kernel takes enable_gqa, and it takes no mask, no head over 256 wide and no fp32; SDPA would then fall
    back to its math kernel, which materialises the [B,H,T,S] scores in fp32 (the encoder's masked passes, the
    512-wide full-attention heads). There the K/V heads are repeated instead, as the reference does
    (transformers' `use_gqa_in_sdpa`), so the memory-efficient kernel runs. A ChunkedMask runs chunk by chunk."""
    if isinstance(mask, ChunkedMask):
        return torch.cat([attend(q[:, :, q0:q1], k[:, :, k0:k1], v[:, :, k0:k1], mask.rule.block(q0, q1, k0, k1))
                          for q0, q1, k0, k1 in mask.chunks], dim=2)
    grouped = k.shape[1] != q.shape[1]
    if grouped and REPEAT_HEADS_ON_CUDA and q.device.type == "cuda" and not flash_takes_gqa(q, v, mask):
        k, v = repeat_heads(k, q.shape[1]), repeat_heads(v, q.shape[1])
        grouped = False
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0, enable_gqa=grouped)


def flash_takes_gqa(q: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> bool:
    """Whether CUDA's flash kernel takes this grouped-query call (else SDPA's math kernel would run it)."""
    return flash_takes(q.dtype in (torch.bfloat16, torch.float16), max(q.shape[-1], v.shape[-1]), mask is not None)


def flash_takes(half: bool, head_dim: int, masked: bool) -> bool:
    """The rule of `flash_takes_gqa` from sizes alone (dgemma plan uses it): 16-bit, heads up to 256, no mask."""
    return half and head_dim <= 256 and not masked


def repeat_heads(kv: torch.Tensor, num_heads: int) -> torch.Tensor:
    """[B,Hk,S,D] -> [B,H,S,D], each K/V head repeated for its group of H/Hk query heads (query head h reads
    K/V head h // (H/Hk), SDPA's enable_gqa layout)."""
    B, Hk, S, D = kv.shape
    return kv[:, :, None].expand(B, Hk, num_heads // Hk, S, D).reshape(B, num_heads, S, D)


def attend_reference(q, k, v, mask):
    """Slow, explicit fp32 softmax attention (the test oracle for `attend`)."""
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1).float()
    v = v.repeat_interleave(group, dim=1).float()
    scores = q.float() @ k.transpose(-1, -2)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return (scores.softmax(-1) @ v).to(q.dtype)
