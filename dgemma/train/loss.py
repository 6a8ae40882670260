"""The uniform-state diffusion objective (spec §7) as a pure function: (model, batch, generator, cfg) -> loss.

    clean prompt+response [B,T] --encode (causal; TrainingCache keeps EVERY K/V)--> hidden [B,T,D]
        |                                       '-- AR next-token CE through the tied head, weight ar_weight
        v
    per example: canvas b ~ U{0..n-1}; t ~ U(t_min, 1); each of its L positions -> a uniform id over the whole
    vocabulary with probability t (no mask token; the same renoise as at inference)
    CanvasContext: row r sees the clean keys at positions < s_r = prompt_len + b*L, sliding layers only the last
    window-1 of them: exactly what the inference cache holds when canvas b is denoised (the test proves it)
        v
    denoise(noised, ctx) under no_grad --> logits1 --> soft_embedding(logits1, sc_mask ~ Bernoulli(p))
    denoise(noised, ctx, soft)            --> logits2 --> CE over ALL L positions of the canvas (no 1/t weight)

The first pass is temperature 1 and gets no gradient; the soft embedding is computed from its (detached) logits
inside the second pass, which back-propagates into everything, the clean context K/V included (as NeMo's joint
clean+noised forward does).

Randomness: every draw of an example (canvas, t, corruption mask, noise ids, self-conditioning flag) comes from
that example's own generator, seeded by `batch.seeds[r]`. The trainer derives the seed from the example's slot in
the global batch, so the noise does not depend on how examples are split into micro-batches or across ranks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..model.decoder import denoise
from ..model.encoder import encode

METRICS = ("diffusion_sum", "diffusion_count", "ar_sum", "ar_count", "correct", "corrupted", "tokens")


@dataclass(frozen=True)
class LossConfig:
    ar_weight: float = 1.0  # weight of the encoder's next-token CE; 0 skips the AR head
    self_cond_prob: float = 0.5  # per example: feed the first pass's prediction to the second pass
    t_min: float = 1e-3  # corruption level t ~ U(t_min, 1)

    def __post_init__(self):
        if not 0 <= self.ar_weight < math.inf:
            raise ValueError(f"ar_weight must be a finite number >= 0, got {self.ar_weight}")
        if not 0.0 <= self.self_cond_prob <= 1.0:
            raise ValueError(f"self_cond_prob must be in [0, 1], got {self.self_cond_prob}")
        if not 0.0 <= self.t_min < 1.0:
            raise ValueError(f"t_min must be in [0, 1), got {self.t_min}")


class TrainingCache:
    """The encoder's cache during training: keeps ALL K/V (the inference cache trims sliding layers to the
    window, but different rows' canvases need different windows, which CanvasContext cuts out later)."""

    def __init__(self, num_layers: int):
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self.valid: torch.Tensor | None = None  # [B,length] bool, None = nothing padded
        self.length = 0

    def context(self, layer: int):
        k = self.keys[layer]
        return None if k is None else (k, self.values[layer], self.valid)

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        if self.keys[layer] is not None:
            k, v = torch.cat([self.keys[layer], k], dim=2), torch.cat([self.values[layer], v], dim=2)
        self.keys[layer], self.values[layer] = k, v

    def extend(self, num_new: int, valid: torch.Tensor | None) -> None:
        if valid is not None or self.valid is not None:
            def ones(n, like):
                return torch.ones(like.shape[0], n, dtype=torch.bool, device=like.device)
            old = self.valid if self.valid is not None else ones(self.length, valid)
            self.valid = torch.cat([old, valid.bool() if valid is not None else ones(num_new, old)], dim=1)
        self.length += num_new


class CanvasContext:
    """Read-only decoder view of a TrainingCache with a different canvas start per row (the cache interface of
    attention.py). `length` = starts [B]; `context(i)` = (k, v, key_valid [B,S]) where row r may use key j iff
    j < s_r, the slot is not padding, and on sliding layers j >= s_r - (window - 1)."""

    def __init__(self, config, cache: TrainingCache, starts: torch.Tensor):
        self.config, self.cache, self.length = config, cache, starts
        first, last = starts.min().item(), starts.max().item()  # one host sync per step, to slice keys
        self.hi = last  # no row sees a key at or after the latest start
        pos = torch.arange(last, device=starts.device)[None]
        before = pos < starts[:, None]
        if cache.valid is not None:
            before = before & cache.valid[:, :last]
        keep = config.sliding_window - 1  # what the inference cache keeps on a sliding layer
        lo = max(0, first - keep)
        sliding = (before & (pos >= starts[:, None] - keep))[:, lo:]
        self.views = {False: (0, before), True: (lo, sliding)}  # is_sliding -> (first key, key_valid)

    def context(self, layer: int):
        lo, key_valid = self.views[self.config.is_sliding(layer)]
        k, v = self.cache.keys[layer], self.cache.values[layer]
        return k[:, :, lo:self.hi], v[:, :, lo:self.hi], key_valid


@dataclass
class Noise:
    canvas: torch.Tensor  # [B] int64, which response canvas is trained
    t: torch.Tensor  # [B] fp32 corruption level
    corrupt: torch.Tensor  # [B,L] bool, positions replaced by noise
    noise_ids: torch.Tensor  # [B,L] int64, uniform ids over the vocabulary (used where corrupt)
    self_cond: torch.Tensor  # [B] bool, the second pass gets the first pass's prediction

    def to(self, device) -> "Noise":
        return Noise(*(getattr(self, k).to(device) for k in ("canvas", "t", "corrupt", "noise_ids", "self_cond")))


def sample_noise(seeds, num_canvases, canvas_length: int, vocab_size: int, cfg: LossConfig) -> Noise:
    """One generator per example (seeded by `seeds[r]`), draws in a fixed order; CPU tensors."""
    rows = []
    for seed, n in zip(seeds, num_canvases):
        g = torch.Generator().manual_seed(int(seed))
        canvas = torch.randint(0, int(n), (1,), generator=g)
        t = cfg.t_min + (1.0 - cfg.t_min) * torch.rand(1, generator=g)
        corrupt = torch.rand(canvas_length, generator=g) < t
        ids = torch.randint(0, vocab_size, (canvas_length,), generator=g)
        sc = torch.rand(1, generator=g) < cfg.self_cond_prob
        rows.append((canvas, t, corrupt, ids, sc))
    canvas, t, corrupt, ids, sc = zip(*rows)
    return Noise(torch.cat(canvas), torch.cat(t), torch.stack(corrupt), torch.stack(ids), torch.cat(sc))


def canvas_logits(model, batch, noise: Noise, return_hidden: bool = False):
    """Encoder pass over the clean batch, then the two decoder passes over each row's noised canvas.

    -> (logits [B,L,V] fp32 of the self-conditioned pass, clean canvas [B,L], encoder hidden [B,T,D] or None)."""
    cfg = model.config
    L = cfg.canvas_length
    cache = TrainingCache(cfg.num_hidden_layers)
    # Right padding sits after every valid token, so the causal mask already hides it from valid queries:
    # no `valid` needed here. CanvasContext masks the padded K/V for the decoder (they are after every start anyway).
    hidden = encode(model, batch.tokens, cache, None, return_hidden=return_hidden)
    cache.valid = batch.valid
    starts = batch.prompt_len + noise.canvas * L
    clean = batch.tokens.gather(1, starts[:, None] + torch.arange(L, device=starts.device))
    noised = torch.where(noise.corrupt, noise.noise_ids, clean)
    ctx = CanvasContext(cfg, cache, starts)
    if noise.self_cond.any():
        with torch.no_grad():
            first = denoise(model, noised, ctx)
        soft = model.soft_embedding(first, noise.self_cond)
    else:  # the same output as soft=None (the MLP maps 0 to 0), but every parameter joins the graph (DDP needs it)
        w = model.embed_tokens.weight
        soft = torch.zeros(*noised.shape, cfg.hidden_size, dtype=w.dtype, device=w.device)
    return denoise(model, noised, ctx, soft), clean, hidden


def diffusion_loss(model, batch, generator: torch.Generator | None = None, cfg: LossConfig = LossConfig()):
    """-> (loss, metrics). loss = diffusion CE + ar_weight * AR CE, each a mean over its targets (over the whole
    optimizer step when the batch carries denominators). metrics: detached sums named in METRICS (add them up
    across micro-batches and ranks, then `summarize`). Noise: batch.noise when drawn ahead, else drawn here from the
    seeds batch.seeds, else from `generator`."""
    mc = model.config
    B = batch.tokens.shape[0]
    noise = batch.noise
    if noise is None:
        seeds = batch.seeds if batch.seeds is not None else torch.randint(0, 2**62, (B,), generator=generator)
        noise = sample_noise(seeds.tolist(), batch.num_canvases.tolist(), mc.canvas_length, mc.vocab_size, cfg)
    noise = noise.to(batch.tokens.device)
    logits, clean, hidden = canvas_logits(model, batch, noise, return_hidden=cfg.ar_weight > 0)
    diffusion_sum = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), clean.reshape(-1), reduction="sum")
    loss = diffusion_sum / (batch.diffusion_denominator or clean.numel())
    zero = torch.zeros((), device=logits.device)
    ar_sum, ar_count = zero, zero
    if cfg.ar_weight > 0:
        keep = batch.valid[:, 1:]
        # encode returned final-norm states: apply only the tied head and the soft-cap (model.logits would norm again)
        ar_logits = model.head(hidden[:, :-1][keep])  # hidden is already final-normed
        ar_sum = F.cross_entropy(ar_logits, batch.tokens[:, 1:][keep], reduction="sum")
        ar_count = keep.sum()
        loss = loss + cfg.ar_weight * ar_sum / (batch.ar_denominator or ar_count)
    with torch.no_grad():
        correct = ((logits.argmax(-1) == clean) & noise.corrupt).sum()
    values = (diffusion_sum, clean.numel(), ar_sum, ar_count, correct, noise.corrupt.sum(), batch.valid.sum())
    metrics = {k: torch.as_tensor(v, device=logits.device).detach().double() for k, v in zip(METRICS, values)}
    return loss, metrics


def summarize(sums: dict, ar_weight: float = 1.0) -> dict[str, float]:
    """Metric sums -> means: loss, diffusion_loss, ar_loss, accuracy (on corrupted positions), tokens."""
    s = {k: float(v) for k, v in sums.items()}
    diffusion = s["diffusion_sum"] / max(s["diffusion_count"], 1)
    ar = s["ar_sum"] / s["ar_count"] if s["ar_count"] else 0.0
    return {"loss": diffusion + ar_weight * ar, "diffusion_loss": diffusion, "ar_loss": ar,
            "accuracy": s["correct"] / max(s["corrupted"], 1), "tokens": int(s["tokens"])}
