"""Stop rules for the denoising loop and end-of-sequence truncation of a committed canvas (spec §6.3, §6.5).

Every stop rule has one signature, `rule(argmax [B,L], entropy [B,L], history [H,B,L]) -> bool [B]`, and they compose
with `all_of` / `any_of` (habit 3). All inputs come from the temperature-processed logits ℓ̃ (§6.2), as in HF's
StableAndConfidentStoppingCriteria. `history` holds the argmax canvases of the previous H steps, oldest first, filled
with -1 before the first step (so nothing is "stable" on step 1); the sampler pushes the current argmax AFTER the rule
has run. A rule says how many past canvases it reads through `num_history`, and the sampler allocates H = that.
HF default (§6.1): all_of(token_stable(1), mean_entropy_below(0.005)).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class StopRule:
    """A named stop predicate plus the number of past argmax canvases it needs in `history`."""

    fn: Callable[[Tensor, Tensor, Tensor], Tensor]
    num_history: int
    name: str

    def __call__(self, argmax: Tensor, entropy: Tensor, history: Tensor) -> Tensor:
        return self.fn(argmax, entropy, history)

    def __repr__(self) -> str:
        return self.name


def token_stable(num_steps: int) -> StopRule:
    """Stable: this step's argmax equals each of the last `num_steps` argmax canvases (every position).

    num_steps = 0 means "always stable" (HF's stability_threshold = 0). HF keeps exactly `stability_threshold`
    past canvases initialised to -1, so with num_steps >= 1 a row can first be stable on step num_steps + 1.
    """
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 0:
        raise ValueError(f"stability_threshold must be an int >= 0, got {num_steps!r}")

    def rule(argmax: Tensor, entropy: Tensor, history: Tensor) -> Tensor:
        if num_steps == 0:  # note history[-0:] would be the WHOLE history, so this case is explicit
            return torch.ones(argmax.shape[0], dtype=torch.bool, device=argmax.device)
        recent = history[history.shape[0] - num_steps :]  # [s,B,L]
        return (recent == argmax[None]).all(dim=-1).all(dim=0)

    return StopRule(rule, num_steps, f"token_stable({num_steps})")


def mean_entropy_below(threshold: float) -> StopRule:
    """Confident: the canvas mean of the per-position entropy (nats, of softmax ℓ̃) is STRICTLY below threshold."""
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not threshold > 0:
        raise ValueError(f"confidence_threshold must be a number > 0, got {threshold!r}")
    return StopRule(lambda a, h, hist: h.mean(dim=-1) < threshold, 0, f"mean_entropy_below({threshold})")


def _combine(op: Callable[[Tensor, Tensor], Tensor], word: str, rules: tuple[StopRule, ...]) -> StopRule:
    if not rules:
        raise ValueError(f"{word} needs at least one rule")

    def rule(argmax: Tensor, entropy: Tensor, history: Tensor) -> Tensor:
        out = rules[0](argmax, entropy, history)
        for r in rules[1:]:
            out = op(out, r(argmax, entropy, history))
        return out

    # Every sub-rule reads the most recent canvases, so the longest requirement serves all of them.
    return StopRule(rule, max(r.num_history for r in rules), f"{word}({', '.join(map(repr, rules))})")


def all_of(*rules: StopRule) -> StopRule:
    return _combine(torch.logical_and, "all_of", rules)


def any_of(*rules: StopRule) -> StopRule:
    return _combine(torch.logical_or, "any_of", rules)


def truncate_at_stop_ids(
    tokens: Tensor, stop_ids: Sequence[int] | Tensor, pad_id: int | None, was_finished: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Finalise a committed canvas (spec §6.5, HF `_finalize_canvas`). tokens [B,L] -> (tokens [B,L], finished [B]).

    A row finishes if any stop id occurs ANYWHERE in its canvas. In such a row the first stop id is kept and every later
    position becomes pad_id. Rows in `was_finished` [B] (finished in an earlier canvas) become all pad. pad_id None
    leaves the tokens untouched (HF only pads when pad_token_id is set). Returns a new tensor; the input is not changed.
    """
    ids = torch.as_tensor(stop_ids, dtype=tokens.dtype, device=tokens.device).reshape(-1)
    is_stop = torch.isin(tokens, ids)
    finished = is_stop.any(dim=-1)
    if was_finished is None:
        was_finished = torch.zeros_like(finished)
    if pad_id is not None:
        seen = is_stop.long().cumsum(dim=-1)
        after_first = (seen > 0) & ~((seen == 1) & is_stop)  # strictly after the first stop id
        tokens = torch.where(after_first | was_finished[:, None], torch.full_like(tokens, pad_id), tokens)
    return tokens, finished | was_finished
