"""Acceptance rules: which positions keep the denoiser's proposal this step (spec §6.3, §9.1).

Every rule is a pure function of per-position scores returning bool [B,L] (True = keep the proposal; the sampler
renoises the rest). Rows are independent and every rule accepts at least one position per row, so each step makes
progress. `StepConfig.accept` takes an `AcceptRule`: a named callable `(entropy, confidence, step) -> bool [B,L]` made
by `entropy_bound`, `confidence_threshold`, `quota` or `linear_quota`; `step` [B] is the 1-based step index of each row.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor


def entropy_bound_accept(entropy: Tensor, bound: float) -> Tensor:
    """entropy [B,L] fp32 (nats) -> bool [B,L]: the k lowest-entropy positions, k the largest with sum - max <= bound.

    Σ_{j≤k} H_(j) − H_(k) bounds the joint mutual information of the accepted set (arXiv 2505.24857, spec §6.3).
    For k = 1 the left side is exactly 0, so one position is always accepted. The test is evaluated element-wise on the
    sorted entropies, exactly like HF's EntropyBoundSampler.accept_canvas: we call the same `torch.sort` (ascending,
    stable=False) so that ties among equal entropies, which can split a tie group (all-equal H accepts only
    1 + floor(bound / H) of them), are broken by the same permutation as the reference on the same device.
    """
    sorted_h, order = torch.sort(entropy, dim=-1, descending=False)
    keep_sorted = torch.cumsum(sorted_h, dim=-1) - sorted_h <= bound
    return torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)


def confidence_threshold_accept(confidence: Tensor, threshold: float) -> Tensor:
    """confidence [B,L] (probability in [0,1]) -> bool [B,L]: confidence > threshold (strict), plus the row's maximum.

    The row's most confident position (first index among ties, as `argmax` picks) is always kept so a row whose every
    position is below the threshold still makes progress (LLaDA / Fast-dLLM use the same floor of one).
    """
    keep = confidence > threshold
    top = confidence.argmax(dim=-1, keepdim=True)
    return keep.scatter(-1, top, True)


def quota_accept(confidence: Tensor, num_accept: Tensor | int) -> Tensor:
    """confidence [B,L], num_accept int or int [B] -> bool [B,L]: each row's `num_accept` most confident positions.

    num_accept is clamped to [1, L]. Ties are broken by position (stable sort: the lower index wins), so the result
    is deterministic on every device.

    Choosing the quota: nothing is carried between steps here (non-accepted positions are renoised from scratch,
    §6.3), so a quota is how many proposal tokens survive into the NEXT decoder input, not an increment. To reach a
    fully accepted canvas by the last of N steps, pass the cumulative target ceil(n * L / N) at step n (what
    `linear_quota(N)` does; it matches diffusers' BlockRefinement quota, spec §9.1). A fixed ceil(L / N) per step
    (LLaDA's increment) only makes sense when the caller itself accumulates the accepted set.
    """
    num_rows, length = confidence.shape
    if isinstance(num_accept, int):  # clamp first: a Python int past int64 cannot become a tensor
        num_accept = max(1, min(num_accept, length))
    k = torch.as_tensor(num_accept, device=confidence.device).clamp(1, length).expand(num_rows)
    order = torch.argsort(confidence, dim=-1, descending=True, stable=True)
    ranks = torch.arange(length, device=confidence.device).expand(num_rows, length)
    # rank_of[b, order[b, r]] = r: the position's place in the row's confidence ranking.
    rank_of = torch.empty_like(ranks).scatter(-1, order, ranks)
    return rank_of < k[:, None]


@dataclass(frozen=True)
class AcceptRule:
    """A named acceptance rule with the sampler's call signature (entropy [B,L], confidence [B,L], step [B])."""

    fn: Callable[[Tensor, Tensor, Tensor], Tensor]
    name: str

    def __call__(self, entropy: Tensor, confidence: Tensor, step: Tensor) -> Tensor:
        return self.fn(entropy, confidence, step)

    def __repr__(self) -> str:
        return self.name


def _check_positive(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or math.isinf(value):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def entropy_bound(bound: float) -> AcceptRule:
    """The reference rule (HF default bound 0.1; a larger bound accepts more positions per step)."""
    _check_positive("entropy_bound", bound)
    return AcceptRule(lambda h, c, s: entropy_bound_accept(h, bound), f"entropy_bound({bound})")


def confidence_threshold(threshold: float) -> AcceptRule:
    """Keep the proposals whose confidence (a probability) exceeds `threshold`, in (0, 1]; 1 keeps only the
    row's most confident position."""
    _check_positive("confidence_threshold", threshold)
    if threshold > 1:
        raise ValueError(f"confidence_threshold is a probability: it must be in (0, 1], got {threshold!r} (a "
                         "proposal's confidence never exceeds 1)")
    return AcceptRule(lambda h, c, s: confidence_threshold_accept(c, threshold), f"confidence_threshold({threshold})")


def quota(num_accept: int) -> AcceptRule:
    """A fixed number of positions every step (see `quota_accept` for why a cumulative quota is usually wanted)."""
    if isinstance(num_accept, bool) or not isinstance(num_accept, int) or num_accept < 1:
        raise ValueError(f"quota num_accept must be an int >= 1, got {num_accept!r}")
    return AcceptRule(lambda h, c, s: quota_accept(c, num_accept), f"quota({num_accept})")


def linear_quota(num_steps: int) -> AcceptRule:
    """Cumulative quota ceil(step * L / num_steps): the whole canvas is accepted at step num_steps (spec §9.1)."""
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"linear_quota num_steps must be an int >= 1, got {num_steps!r}")

    def rule(entropy: Tensor, confidence: Tensor, step: Tensor) -> Tensor:
        length = confidence.shape[-1]
        return quota_accept(confidence, (step * length + num_steps - 1) // num_steps)  # integer ceil, no float

    return AcceptRule(rule, f"linear_quota({num_steps})")


def parse_accept(text: str, num_steps: int | None = None):
    """'entropy:B' | 'confidence:T' | 'quota:K' | 'linear-quota' -> an AcceptRule (B, T, K optional: 0.1, 0.9, 8).

    The one spelling of a rule as text: the CLI's --accept, the server's "acceptance" field and the library's
    `accept=` take it; raises ValueError with a clear message. linear-quota needs the step count: with num_steps
    None the string "linear-quota" is returned for the caller to resolve once the step count is known."""
    name, _, arg = text.partition(":")
    parse = {"entropy": (float, 0.1, entropy_bound), "confidence": (float, 0.9, confidence_threshold),
             "quota": (int, 8, quota)}
    if name in parse:
        kind, default, make = parse[name]
        try:
            value = kind(arg) if arg else default
        except ValueError:
            what = "a whole number" if kind is int else "a number"
            raise ValueError(f"acceptance rule {text!r}: {arg!r} is not {what}") from None
        return make(value)
    if name == "linear-quota":
        if arg:
            raise ValueError(f"acceptance rule {text!r}: linear-quota takes no number; its step count is the "
                             "call's max_denoising_steps (--steps), so write linear-quota and set the steps")
        return "linear-quota" if num_steps is None else linear_quota(num_steps)
    raise ValueError(f"unknown acceptance rule {text!r}; use entropy:B, confidence:T, quota:K or linear-quota")
