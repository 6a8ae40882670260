"""Sampling: tensors + an explicit torch.Generator in, tensors out. Imports nothing from dgemma.model or dgemma.engine.

One denoising step (`step`; `step_lean`: the same bits with one [chunk,V] buffer in fast mode) and the pure rules it
composes (spec §6): temperature schedule, acceptance, stop rules, end-of-sequence truncation. The canvas loop itself
(how many steps, when to commit) belongs to the engine.
"""

from .acceptance import (
    AcceptRule,
    confidence_threshold,
    confidence_threshold_accept,
    entropy_bound,
    entropy_bound_accept,
    linear_quota,
    parse_accept,
    quota,
    quota_accept,
)
from .constraints import CanvasConstraints, clamped_logprob, free_constraints
from .lean import default_chunk, step_lean
from .sampler import (DenoiseState, StepConfig, entropy_from_probs, init_canvas, init_state, sample_inverse_cdf,
                      sample_reference, step, token_entropy)
from .schedules import linear_temperature
from .stopping import StopRule, all_of, any_of, mean_entropy_below, token_stable, truncate_at_stop_ids

__all__ = [
    "AcceptRule", "CanvasConstraints", "DenoiseState", "StepConfig", "StopRule", "all_of", "any_of", "clamped_logprob",
    "confidence_threshold", "confidence_threshold_accept", "default_chunk", "entropy_bound", "entropy_bound_accept",
    "entropy_from_probs", "free_constraints", "init_canvas", "init_state", "linear_quota", "linear_temperature",
    "mean_entropy_below", "parse_accept", "quota", "quota_accept", "sample_inverse_cdf", "sample_reference", "step",
    "step_lean",
    "token_entropy", "token_stable", "truncate_at_stop_ids",
]
