"""Autoregressive baseline: the encoder's causal pass plus the tied head is a next-token LM (spec §4.6, §7: the
training recipe puts an AR loss on exactly these logits), so the same weights decode one token at a time.

    hidden <- encode(prompt, cache, valid, return_hidden)       # prefill, writes K/V
    repeat max_new_tokens times (or until every row hit a stop id):
        next   <- pick(head(hidden[:, -1:]))                     # greedy, or temperature / top-k / top-p sampling
        hidden <- encode(next, cache, return_hidden)            # one position, reads + writes the cache

This is the encoder's mask and the encoder's layer scalars, not the denoiser's: a baseline to compare the
block-diffusion sampler against (quality, tokens per forward), with no canvas rounding of the length.
Left padding works as in the diffusion path: pad slots take positions (spec §6.6) and are masked as keys.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from .cache import KVCache


def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """logits [B,V] fp32 -> the same with everything outside the top-k / the top-p nucleus set to -inf.

    The nucleus keeps the smallest prefix of the sorted distribution whose mass reaches top_p (the token that
    crosses the threshold is kept, so at least one token always survives)."""
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        mass_before = probs.cumsum(-1) - probs  # mass of the strictly better tokens
        drop_sorted = mass_before >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def pick_next(logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
              generator: torch.Generator | None = None) -> torch.Tensor:
    """logits [B,V] fp32 -> next ids [B] int64; temperature 0 = argmax (top_k/top_p then do nothing; the decoding
    functions refuse them there)."""
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(filter_logits(logits / temperature, top_k, top_p), dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def _check(module, input_ids, max_new_tokens, temperature, top_k, top_p, attention_mask):
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be a non-empty [batch, prompt_length] tensor, got "
                         f"{getattr(input_ids, 'shape', type(input_ids))}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be an int >= 1 or None, got {top_k!r}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1] or None, got {top_p!r}")
    if temperature == 0 and (top_k is not None or top_p is not None):  # greedy: they would be silently unused
        raise ValueError(f"top_k / top_p (got {top_k!r} / {top_p!r}) filter the distribution that is sampled; at "
                         "temperature 0 decoding is greedy (argmax) and samples nothing: give a temperature > 0 or "
                         "drop them")
    if attention_mask is not None and tuple(attention_mask.shape) != tuple(input_ids.shape):
        raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} must equal input_ids shape "
                         f"{tuple(input_ids.shape)}")
    if attention_mask is not None and not bool(attention_mask[:, -1].all()):
        raise ValueError("attention_mask must be left-padded (every row's last prompt position real): the next "
                         "token is read from the last position")
    needed = input_ids.shape[1] + max_new_tokens
    if needed > module.config.max_position_embeddings:
        raise ValueError(f"prompt of {input_ids.shape[1]} tokens plus {max_new_tokens} new tokens exceeds this "
                         f"model's context of {module.config.max_position_embeddings} positions")


@torch.inference_mode()
def stream_autoregressive(module, input_ids: torch.Tensor, *, max_new_tokens: int, temperature: float = 0.0,
                          top_k: int | None = None, top_p: float | None = None,
                          eos_token_id: int | Sequence[int] | None = None, pad_token_id: int | None = None,
                          attention_mask: torch.Tensor | None = None, generator: torch.Generator | None = None,
                          cache: KVCache | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (next ids [B] int64, finished [B] bool) once per generated position (the one decoding loop).

    Rows finished BEFORE this position get `pad_token_id` (default: the model's pad id); a row's stop id itself is
    emitted and finishes it. Stops after max_new_tokens positions or as soon as every row has finished."""
    _check(module, input_ids, max_new_tokens, temperature, top_k, top_p, attention_mask)
    B = input_ids.shape[0]
    device = input_ids.device
    pad = module.config.pad_token_id if pad_token_id is None else pad_token_id
    stop_ids = [] if eos_token_id is None else [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    stop_ids = torch.tensor(stop_ids, dtype=torch.int64, device=device)
    valid = None if attention_mask is None or bool(attention_mask.all()) else attention_mask.to(torch.bool)
    cache = cache if cache is not None else KVCache(module.config, B)
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    if max_new_tokens == 0:
        return
    hidden = module.encode(input_ids.to(torch.int64), cache, valid=valid, return_hidden=True)
    for i in range(max_new_tokens):
        next_ids = pick_next(module.head(hidden[:, -1]), temperature, top_k, top_p, generator)  # already normed
        next_ids = torch.where(finished, pad, next_ids)
        finished = finished | torch.isin(next_ids, stop_ids)
        yield next_ids, finished
        if i == max_new_tokens - 1 or bool(finished.all()):  # one host sync per token, outside the model
            return
        hidden = module.encode(next_ids[:, None], cache, return_hidden=True)


def generate_autoregressive(module, input_ids: torch.Tensor, *, max_new_tokens: int, temperature: float = 0.0,
                            top_k: int | None = None, top_p: float | None = None,
                            eos_token_id: int | Sequence[int] | None = None, pad_token_id: int | None = None,
                            attention_mask: torch.Tensor | None = None,
                            generator: torch.Generator | None = None) -> torch.Tensor:
    """input_ids [B,T] (left-padded rows marked 0 in attention_mask) -> ids [B, T+n] including the prompt.

    n = max_new_tokens exactly, or fewer when every row emitted a stop id earlier. temperature 0 is greedy;
    temperature > 0 samples (after optional top_k / top_p filtering) from `generator` (None = global RNG).
    eos_token_id None never stops early. Positions after a row's stop id hold pad_token_id (default: the
    model's pad id)."""
    pieces = [ids for ids, _ in stream_autoregressive(
        module, input_ids, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
        eos_token_id=eos_token_id, pad_token_id=pad_token_id, attention_mask=attention_mask, generator=generator)]
    return torch.cat([input_ids.to(torch.int64)] + [p[:, None] for p in pieces], dim=1)
