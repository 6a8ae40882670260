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

import itertools

import torch

MIN_CHUNK_ROWS = 4  # the fewest rows a chunk's product gets (see soft_embedding)


def soft_embedding(model, sc_logits: torch.Tensor, sc_mask: torch.Tensor | None = None,
                   chunk: int | None = None) -> torch.Tensor:
    """Expected embedding under the previous step's processed logits (spec §5).

    sc_logits [B,L,V] -> softmax in fp32, probabilities cast to the embedding dtype, times E, times
    sqrt(D) (cast to the weight dtype). sc_mask [B] bool zeroes the signal per row (training dropout).
    Cost: one [L,V]x[V,D] product, about the size of the LM head.

    chunk None: the whole canvas at once (the reference form; it holds the [B,L,V] fp32 probabilities).
    chunk k: the same ops, with the fp32 softmax taken k canvas positions (of the flattened B*L) at a time, so the
    fp32 probabilities never exist for the whole canvas; sc_logits is only read. Then
      * fp32 weights: each chunk's probabilities are multiplied by E on their own (E is read once per chunk, so
        k >= 64 keeps the CPU speed of one product: measured equal at 64, 2x slower at 16, V = 32768, D = 512);
      * lower-precision weights (bf16): the cast probabilities go into ONE [B*L, V] buffer of that dtype (half
        an fp32 one) and are multiplied by E once, exactly as the reference does (E is read once).
    Same bits as chunk None on CPU (MKL, fp32 and bf16, measured): softmax and casts are per position, and the
    chunk products equal the rows of the whole product as long as no chunk has fewer than MIN_CHUNK_ROWS rows
    (MKL takes small-M paths that round differently: M = 1 a matrix-vector product, and on an AMD EPYC also
    M = 2 and 3), so chunks have at least that many rows and a shorter remainder joins the previous chunk.

    `model.soft_product` (set by dgemma/quant/dynamic.py's int8 mode) replaces softmax-then-product, chunk by
    chunk (the whole canvas as one chunk when chunk is None)."""
    w = model.embed_tokens.weight
    scale = model.embed_scale(w.dtype)
    product = model.soft_product
    if chunk is None and product is not None:
        soft = product(sc_logits.reshape(-1, sc_logits.shape[-1])).view(*sc_logits.shape[:-1], -1) * scale
    elif chunk is None:
        # the reference casts ℓ̃ to the embedding dtype before the fp32 softmax; do the same (bf16 rounding included)
        probs = torch.softmax(sc_logits.to(w.dtype), dim=-1, dtype=torch.float32).to(w.dtype)
        soft = (probs @ w) * scale
    else:
        if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
            raise ValueError(f"chunk must be an int >= 1, got {chunk!r}")
        num_rows, length, vocab = sc_logits.shape
        flat = sc_logits.reshape(num_rows * length, vocab)
        bounds = list(range(0, flat.shape[0], max(chunk, MIN_CHUNK_ROWS))) + [flat.shape[0]]
        if len(bounds) > 2 and bounds[-1] - bounds[-2] < MIN_CHUNK_ROWS:
            del bounds[-2]
        low = None if w.dtype == torch.float32 else torch.empty(flat.shape, dtype=w.dtype, device=w.device)
        parts = []
        for start, end in itertools.pairwise(bounds):
            if product is not None:
                parts.append(product(flat[start:end]))
                continue
            probs = torch.softmax(flat[start:end].to(w.dtype), dim=-1, dtype=torch.float32)
            if low is None:
                parts.append(probs @ w)
            else:
                low[start:end] = probs  # the same round-to-nearest cast as .to(w.dtype)
            del probs  # free this chunk's probabilities before the next chunk allocates its own
        soft = (torch.cat(parts) if low is None else low @ w).view(num_rows, length, -1) * scale
    if sc_mask is not None:
        soft = soft * sc_mask.to(soft.dtype)[:, None, None]
    return soft


def context_positions(start, T: int, device) -> torch.Tensor:
    """Positions [1 or B, T] of T tokens after `start` cached ones: an int (made on the device directly, no copy
    from the host) or a [B] / [B,1] tensor of per-row lengths."""
    if isinstance(start, torch.Tensor):
        return start.to(device).reshape(-1, 1) + torch.arange(T, device=device)
    return torch.arange(start, start + T, device=device)[None]


def denoise(model, tokens: torch.Tensor, cache, soft: torch.Tensor | None = None,
            positions: torch.Tensor | None = None, canvas_kv: list | None = None,
            return_hidden: bool = False) -> torch.Tensor:
    """tokens [B,L] int64, soft [B,L,D] or None (first step) -> logits [B,L,V] fp32 (soft-capped); with
    return_hidden, the final-normed states [B,L,D] instead (the logits are then `model.head` of them).

    A subset of the canvas (engine/settle.py): tokens [B,M] and soft [B,M,D] of the canvas offsets `positions`
    [B,M] (each row's own, distinct, except L: a filler whose results nobody reads), with `canvas_kv` one (k, v)
    buffer pair [B,Hk,L+1,Dh] per layer (`canvas_kv_buffers`) holding the whole canvas's keys/values: the M
    positions' fresh k/v are written into the buffers and their queries attend to [context ; the L canvas
    entries], so positions left out are seen through the k/v they had when last computed. With every position
    given (once each) this is the plain forward."""
    B, L = tokens.shape
    assert tokens.dtype == torch.int64, f"tokens must be int64, got {tokens.dtype}"
    if (positions is None) != (canvas_kv is None):
        raise ValueError("give positions and canvas_kv together (a canvas subset) or neither")
    x = model.self_conditioning(model.embed(tokens), soft)
    # cache.length is an int, or a [B] / [B,1] tensor when rows' canvases start at different positions (training)
    if positions is None:
        positions_abs = context_positions(cache.length, L, tokens.device)
        width = L
    else:
        positions_abs = positions + context_positions(cache.length, 1, tokens.device)  # offsets + each row's start
        width = canvas_kv[0][0].shape[2] - 1
    rope = model.rope(positions_abs, x.dtype)
    for i, layer in enumerate(model.layers):
        context = cache.context(i)
        mask = None
        if context is not None and context[2] is not None:  # padded context slots only
            canvas = torch.ones(B, width, dtype=torch.bool, device=tokens.device)
            mask = torch.cat([context[2], canvas], dim=1)[:, None, None, :]
        cos, sin = rope[layer.is_sliding]
        buffers = None if canvas_kv is None else (*canvas_kv[i], positions)
        x, _ = layer(x, cos, sin, None if context is None else context[:2], mask, is_encoder=False, canvas=buffers)
    return model.norm(x) if return_hidden else model.logits(x)


def canvas_kv_buffers(model, batch: int, length: int, device=None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Empty (k, v) buffers [B,Hk,L+1,Dh] per layer (L canvas slots and a spare one for fillers), in the weight
    dtype, for `denoise` over canvas subsets. Memory: 2 * L * sum over layers of Hk * Dh values per row (at the
    26B config, L = 256: 55 MiB per row in bf16)."""
    w = model.embed_tokens.weight
    out = []
    for layer in model.layers:
        attn = layer.self_attn
        shape = (batch, attn.num_kv_heads, length + 1, attn.head_dim)
        out.append((torch.empty(shape, dtype=w.dtype, device=device or w.device),
                    torch.empty(shape, dtype=w.dtype, device=device or w.device)))
    return out
