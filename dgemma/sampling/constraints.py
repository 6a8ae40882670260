"""Constrained canvases: clamped positions and per-position allowed-token sets, applied inside the one step.

A `CanvasConstraints` describes one canvas [B,L]:

    clamp   [B,L] int64  -1 = free; otherwise the token this position holds for the whole canvas. A clamped
                         position starts as that token, is never renoised and never changes: the step writes the
                         clamp into the next canvas, the argmax (the commit candidate) and the proposal.
    allowed [C,V] bool   a small table of token classes (C is a handful: "no special tokens", "JSON string
                         content", ...), so the per-position masks cost [B,L] ints, not a [B,L,V] tensor.
    classes [B,L] int64  index into `allowed` for every free position (ignored where clamped).
    start   [B,L] int64  -1 = the usual uniform noise at canvas start; otherwise the free position STARTS from
                         this token (an in-place edit seeds the canvas with the old text) and may change.

How the step uses them (`sampler.step` and `lean.step_lean` call the same functions, so they stay bit-equal):
  1. `mask_logits`: ℓ at a free position is set to -inf outside its class BEFORE the temperature (spec §6.2: logits
     processors run before it). Softmax, sampling, argmax, entropy and self-conditioning then only ever see allowed
     tokens, so the argmax committed at a free position is always in its class. -inf / T = -inf, and entropy's clamp
     of log-probs makes 0·log 0 = 0, so the masked numbers are exact, not approximations.
  2. `rule_scores`: acceptance rules see clamped positions as the WORST candidates (entropy +inf, confidence -inf),
     so their "at least one position per row" progress guarantee and any quota are spent on free positions only;
     clamped positions are then accepted unconditionally (`accept`).
     Stop rules see every clamped position's entropy replaced by the mean entropy of the row's free positions: the
     mean, the max and the min over the canvas are then exactly those over the free positions, so a canvas that
     is mostly scaffold does not look confident just because its clamps have zero entropy. Stability is unaffected
     (a clamp never changes).
  3. `apply_clamps`: proposal, argmax and the next canvas are overwritten with the clamp, the recorded entropy is 0
     and the confidence 1 (what a drafts view should shade).
Renoising a free position still draws from the WHOLE vocabulary, as in training (uniform corruption), even where
its class is narrower: the denoiser's input noise keeps the distribution it was trained on.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True, eq=False)  # eq=False: tensor fields
class CanvasConstraints:
    clamp: Tensor  # [B,L] int64, -1 = free
    allowed: Tensor | None = None  # [C,V] bool token classes
    classes: Tensor | None = None  # [B,L] int64 into allowed (free positions)
    start: Tensor | None = None  # [B,L] int64, -1 = uniform noise at canvas start

    def __post_init__(self):
        clamp = self.clamp
        if not isinstance(clamp, Tensor) or clamp.dim() != 2 or clamp.dtype != torch.int64:
            raise ValueError(f"clamp must be an int64 tensor [B,L] (-1 = free), got {getattr(clamp, 'shape', clamp)}")
        if (self.allowed is None) != (self.classes is None):
            raise ValueError("give allowed [C,V] and classes [B,L] together (or neither)")
        if self.allowed is not None:
            if self.allowed.dim() != 2 or self.allowed.dtype != torch.bool:
                raise ValueError(f"allowed must be a bool tensor [C,V], got {self.allowed.dtype} "
                                 f"{tuple(self.allowed.shape)}")
            if not bool(self.allowed.any(dim=-1).all()):
                empty = (~self.allowed.any(dim=-1)).nonzero().flatten().tolist()
                raise ValueError(f"token classes {empty} allow no token at all; every class needs at least one")
            if self.classes.shape != clamp.shape or self.classes.dtype != torch.int64:
                raise ValueError(f"classes must be int64 {tuple(clamp.shape)}, got {self.classes.dtype} "
                                 f"{tuple(self.classes.shape)}")
            if int(self.classes.min()) < 0 or int(self.classes.max()) >= self.allowed.shape[0]:
                raise ValueError(f"classes must index the {self.allowed.shape[0]} rows of allowed")
        if self.start is not None and (self.start.shape != clamp.shape or self.start.dtype != torch.int64):
            raise ValueError(f"start must be int64 {tuple(clamp.shape)} (-1 = noise), got {self.start.dtype} "
                             f"{tuple(self.start.shape)}")

    @property
    def clamped(self) -> Tensor:
        """bool [B,L]: positions held fixed."""
        return self.clamp >= 0

    def check(self, shape: tuple[int, int], vocab: int) -> None:
        """Raise if these constraints do not fit a canvas of `shape` [B,L] over `vocab` tokens (shapes only: no
        host sync, so the step can afford it; `check_ids` checks the values once per canvas)."""
        if tuple(self.clamp.shape) != tuple(shape):
            raise ValueError(f"constraints are for a canvas {tuple(self.clamp.shape)}, the canvas is {tuple(shape)}")
        if self.allowed is not None and self.allowed.shape[1] != vocab:
            raise ValueError(f"allowed has {self.allowed.shape[1]} columns, the vocabulary has {vocab}")

    def check_ids(self, vocab: int) -> None:
        """Raise if clamp/start hold ids outside [0, vocab)."""
        for name, ids in (("clamp", self.clamp), ("start", self.start)):
            if ids is not None and int(ids.max()) >= vocab:
                raise ValueError(f"{name} holds token id {int(ids.max())}, outside this model's vocabulary of {vocab}")

    def start_canvas(self, noise: Tensor) -> Tensor:
        """noise [B,L] (init_canvas's uniform draw) -> the canvas the first step reads: clamps, then seeds."""
        tokens = noise if self.start is None else torch.where(self.start >= 0, self.start, noise)
        return torch.where(self.clamped, self.clamp, tokens)

    def fully_clamped(self) -> Tensor:
        """bool [B]: rows with no free position (nothing to denoise)."""
        return self.clamped.all(dim=-1)


def free_constraints(batch: int, length: int, device=None) -> CanvasConstraints:
    """Nothing clamped, nothing restricted (the same step as no constraints)."""
    return CanvasConstraints(torch.full((batch, length), -1, dtype=torch.long, device=device))


def position_mask(c: CanvasConstraints, positions: slice | None = None) -> Tensor | None:
    """bool [n,V] allowed tokens for the flattened B*L positions in `positions` (all when None); clamped positions
    allow everything (their logits are left as the model made them). None when there are no classes."""
    if c.allowed is None:
        return None
    classes, clamped = c.classes.reshape(-1), c.clamped.reshape(-1)
    if positions is not None:
        classes, clamped = classes[positions], clamped[positions]
    return c.allowed[classes] | clamped[:, None]


def mask_logits(logits: Tensor, c: CanvasConstraints | None, *, inplace: bool = False) -> Tensor:
    """logits [B,L,V] -> the same with -inf outside each free position's class (the lean step uses `mask_rows`)."""
    if c is None or c.allowed is None:
        return logits
    mask = position_mask(c).view(logits.shape)
    return logits.masked_fill_(~mask, float("-inf")) if inplace else logits.masked_fill(~mask, float("-inf"))


def mask_rows(rows: Tensor, c: CanvasConstraints | None, start: int, end: int) -> None:
    """In place: rows [end-start, V] are flattened positions start..end-1 of the canvas (the lean step's chunk)."""
    if c is None or c.allowed is None:
        return
    rows.masked_fill_(~position_mask(c, slice(start, end)), float("-inf"))


def rule_scores(entropy: Tensor, confidence: Tensor, c: CanvasConstraints | None) -> tuple[Tensor, Tensor]:
    """(entropy, confidence) [B,L] as acceptance rules should see them: clamped positions ranked last."""
    if c is None:
        return entropy, confidence
    clamped = c.clamped
    return (entropy.masked_fill(clamped, float("inf")), confidence.masked_fill(clamped, float("-inf")))


def accept(rule_accepted: Tensor, c: CanvasConstraints | None) -> Tensor:
    """The rule's bool [B,L] on free positions, OR every clamped position (it always keeps its token)."""
    return rule_accepted if c is None else rule_accepted | c.clamped


def stop_entropy(entropy: Tensor, c: CanvasConstraints | None) -> Tensor:
    """entropy [B,L] for stop rules: clamped positions get the mean over the row's free positions (0 if none)."""
    if c is None:
        return entropy
    free = ~c.clamped
    num_free = free.sum(dim=-1, keepdim=True)
    free_mean = torch.where(free, entropy, 0.0).sum(dim=-1, keepdim=True) / num_free.clamp(min=1)
    return torch.where(free, entropy, free_mean)


def apply_clamps(c: CanvasConstraints | None, proposal: Tensor, argmax: Tensor, entropy: Tensor,
                 confidence: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Overwrite the step's per-position results at clamped positions (token = clamp, entropy 0, confidence 1)."""
    if c is None:
        return proposal, argmax, entropy, confidence
    clamped = c.clamped
    return (torch.where(clamped, c.clamp, proposal), torch.where(clamped, c.clamp, argmax),
            entropy.masked_fill(clamped, 0.0), confidence.masked_fill(clamped, 1.0))


def clamped_logprob(processed_logits: Tensor, c: CanvasConstraints) -> Tensor:
    """log softmax(ℓ̃)[clamp] [B,L] fp32 at clamped positions (0 elsewhere): how much the denoiser, which was trained
    on uniformly corrupted canvases and so never knows which tokens are given, agrees with each clamped token.
    Read from a state's sc_logits (the last step's ℓ̃; clamped positions are never masked)."""
    logp = processed_logits.float().log_softmax(dim=-1)
    picked = logp.gather(-1, c.clamp.clamp(min=0)[..., None]).squeeze(-1)
    return torch.where(c.clamped, picked, 0.0)
