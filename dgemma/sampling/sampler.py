"""One denoising step of the block-diffusion sampler (spec §6.3, §6.5) for a batch of rows, maybe at different steps.

    ℓ̃ = ℓ / T(n) -> p = softmax_f32(ℓ̃) -> proposal y ~ p -> argmax, entropy, confidence -> accept mask
      -> next canvas x = y where accepted, else a FRESH uniform id over the whole vocabulary -> stop rule
Rows already done keep tokens, argmax and self-conditioning logits (torch.where; no loop over rows, habit 14).

Bit parity with HF (transformers 5.23 `_denoising_step`) under the same seed needs the same random calls in the same
order, on the same shapes, for EVERY row, frozen ones included (their draws are made and then discarded):
  canvas init:  torch.randint(0, V, (B, L))
  each step:    torch.multinomial(p.view(B*L, V), 1)   then   torch.randint(0, V, (B, L))
The proposal primitive is `StepConfig.sample`, swappable for a faster exact one; the renoise draw stays here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ..config import check_temperatures
from . import constraints as con
from .acceptance import AcceptRule, entropy_bound as entropy_bound_rule
from .schedules import linear_temperature
from .stopping import StopRule, all_of, mean_entropy_below, token_stable

SampleFn = Callable[[Tensor, "torch.Generator | None"], Tensor]  # probs [B,L,V] fp32, generator -> ids [B,L] int64


def init_canvas(batch: int, length: int, vocab_size: int, generator: torch.Generator | None = None,
                device: torch.device | str | None = None) -> Tensor:
    """Uniform random canvas [B,L] int64 over the WHOLE vocabulary (special tokens included), HF's exact draw."""
    return torch.randint(0, vocab_size, (batch, length), generator=generator, device=device)


def sample_reference(probs: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """probs [B,L,V] fp32 -> one categorical draw per position [B,L] int64; the reference's exact RNG stream.

    torch.multinomial only takes 2-D input, so HF flattens to [B*L, V]; doing the same keeps the stream identical.
    """
    num_rows, length, vocab = probs.shape
    return torch.multinomial(probs.reshape(-1, vocab), 1, generator=generator).view(num_rows, length)


def sample_inverse_cdf(probs: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """probs [B,L,V] fp32 -> one categorical draw per position [B,L] int64 with ONE uniform number per position.

    The same distribution as `sample_reference` (an exact sampler, not an approximation: x is the first index
    whose cumulative probability exceeds u*total), but it draws B*L random numbers instead of the reference's
    B*L*V exponential noise, which dominates the sampler at a 262k vocabulary. Different random stream, so not
    bit-compatible with the reference. Cumulative sums run in fp32 over the row, as the probabilities do."""
    num_rows, length, vocab = probs.shape
    cdf = probs.cumsum(dim=-1)
    u = torch.rand(num_rows, length, 1, generator=generator, device=probs.device) * cdf[..., -1:]
    # clamp: u*total can round to exactly the last cdf value; never pick past the vocabulary
    return torch.searchsorted(cdf, u, right=True).squeeze(-1).clamp_(max=vocab - 1)


def token_entropy(logits: Tensor) -> Tensor:
    """logits [B,L,V] fp32 -> entropy [B,L] in nats, with torch Categorical(logits=...).entropy()'s op sequence.

    Same ops, same bits: normalise by logsumexp, softmax THAT, clamp log-probs to the dtype minimum (so 0·(-inf)
    cannot produce NaN), sum. Thresholds (entropy bound, confidence threshold) then see the reference's exact values.
    """
    log_p = logits - logits.logsumexp(dim=-1, keepdim=True)
    p = torch.softmax(log_p, dim=-1)
    return -(log_p.clamp_(min=torch.finfo(log_p.dtype).min) * p).sum(dim=-1)  # in place: p is already computed


# vocabulary columns per block of `entropy_from_probs`, by device type: fixed per device, because the bits follow
# the blocks. CPU: 16,384 (bench/sampler_ops.py, 2-core EPYC: 4,096 made 8,716 operator calls a step at V = 262,144
# and was no faster at 32,768; the scratch is 1 MiB for lean.py's 16-position chunks there); an accelerator: each
# block is ~5 kernel launches, so few blocks (4 at V = 262,144; [128, 65536] is lean.py's 32 MiB block budget).
ENTROPY_COLUMNS = {"cpu": 16384, "accelerator": 65536}


def device_kind(device: torch.device | str | None) -> str:
    """The key of the per-device tables (ENTROPY_COLUMNS; lean.py's CHUNK_BYTES / BLOCK_BYTES) for `device`
    (None = CPU): "cpu" or "accelerator"."""
    return "cpu" if device is None or torch.device(device).type == "cpu" else "accelerator"


def entropy_columns(device: torch.device) -> int:
    return ENTROPY_COLUMNS[device_kind(device)]


def entropy_from_probs(logits: Tensor, probs: Tensor, maxes: Tensor, confidence: Tensor,
                       scratch: Tensor | None = None) -> Tensor:
    """Fast mode's entropy: rows of ℓ̃ [n,V] fp32, their softmax [n,V], row maxima of ℓ̃ [n,1] and of p [n] -> [n].

    H = -sum_i p_i (ℓ̃_i - max ℓ̃) - log max p: the same quantity as `token_entropy` (log p_i = ℓ̃_i - max ℓ̃ + log
    max p, since the softmax's largest entry is 1 / sum exp(ℓ̃ - max ℓ̃)), from the probabilities the step has
    already computed, in about 2 passes over the vocabulary instead of about 10. Every term of the sum has one sign
    and -log max p >= 0, so nothing cancels: on [128, 32768] rows its largest error against float64 was 5e-6 nats,
    the reference's sequence 1e-5 (the shortcut lse - sum p ℓ̃ would cancel: 1e-3). Log-probabilities are clamped at
    the dtype minimum as `token_entropy` does (masked -inf entries, p = 0, contribute 0). Columns go in fixed blocks
    (`entropy_columns`), each row summed on its own, so any split of the rows into chunks of 2 or more gives the
    same bits (`lean.step_lean` computes it chunk by chunk). scratch: [>= n, >= the block] fp32, or None."""
    num, vocab = logits.shape
    width = min(vocab, entropy_columns(logits.device))
    if scratch is None:
        scratch = torch.empty(num, width, dtype=torch.float32, device=logits.device)
    fmin = torch.finfo(torch.float32).min
    total = torch.zeros(num, dtype=torch.float32, device=logits.device)
    part = torch.empty(num, dtype=torch.float32, device=logits.device)
    for c0 in range(0, vocab, width):
        c1 = min(c0 + width, vocab)
        terms = torch.sub(logits[:, c0:c1], maxes, out=scratch[:num, : c1 - c0]).clamp_(min=fmin)
        total.add_(torch.sum(terms.mul_(probs[:, c0:c1]), dim=-1, out=part))
    return total.neg_().sub_(confidence.log())


@dataclass(frozen=True)
class StepConfig:
    """Sampler settings for one canvas. Defaults are HF's generation defaults (spec §6.1)."""

    num_steps: int = 48  # max_denoising_steps N
    t_min: float | None = 0.4  # None (either one) disables the temperature schedule: T = 1 (§9.4)
    t_max: float | None = 0.8
    accept: AcceptRule = entropy_bound_rule(0.1)
    stop: StopRule | None = all_of(token_stable(1), mean_entropy_below(0.005))  # None: run all N steps
    sample: SampleFn = sample_reference

    def __post_init__(self):
        if isinstance(self.num_steps, bool) or not isinstance(self.num_steps, int) or self.num_steps < 1:
            raise ValueError(f"num_steps must be an int >= 1, got {self.num_steps!r}")
        check_temperatures(self.t_min, self.t_max)  # raises ConfigError (a ValueError)
        if not callable(self.accept) or not callable(self.sample):
            raise ValueError(f"accept and sample must be callables, got {self.accept!r}, {self.sample!r}")
        has_history = isinstance(getattr(self.stop, "num_history", None), int)
        if self.stop is not None and not (callable(self.stop) and has_history):
            raise ValueError(f"stop must be None or a StopRule (callable with int num_history), got {self.stop!r}")

    @classmethod
    def from_generation_config(cls, max_denoising_steps: int = 48, t_min: float | None = 0.4,
                               t_max: float | None = 0.8, entropy_bound: float = 0.1,
                               stability_threshold: int | None = 1, confidence_threshold: float | None = 0.005,
                               sample: SampleFn = sample_reference) -> "StepConfig":
        """HF's sampler from generation_config.json keys; either stop threshold None disables early stopping (§9.4)."""
        stop = None
        if stability_threshold is not None and confidence_threshold is not None:
            stop = all_of(token_stable(stability_threshold), mean_entropy_below(confidence_threshold))
        return cls(max_denoising_steps, t_min, t_max, entropy_bound_rule(entropy_bound), stop, sample)


@dataclass(frozen=True, eq=False)  # eq=False: tensor fields have no truth value to compare
class DenoiseState:
    """Per-canvas sampler state; every field is a tensor with a leading batch dim B (history: [H,B,L])."""

    tokens: Tensor  # [B,L] int64   canvas the decoder reads next
    argmax: Tensor  # [B,L] int64   argmax of the last step's ℓ̃: the commit candidate (§6.3 "commit a, not x")
    sc_logits: Tensor | None  # [B,L,V] fp32 last ℓ̃ for self-conditioning (§5); None = no signal yet
    history: Tensor  # [H,B,L] int64 previous argmax canvases, oldest first, -1 = none yet (stop rules)
    stopped: Tensor  # [B] bool     the stop rule fired (HF's `finished_denoising`)
    done: Tensor  # [B] bool        stopped or all num_steps spent; done rows are frozen
    num_steps_taken: Tensor  # [B] int64 decoder steps this row has used (frozen rows stop counting)
    entropy: Tensor  # [B,L] fp32  last step's per-position entropy of softmax ℓ̃ (nats), for streamers / rules
    confidence: Tensor  # [B,L] fp32 last step's max probability per position
    accepted: Tensor  # [B,L] bool   last step's acceptance mask


def init_state(tokens: Tensor, cfg: StepConfig, sc_logits: Tensor | None = None) -> DenoiseState:
    """State before a canvas's first step. tokens [B,L] (init_canvas or a caller's canvas); argmax starts = tokens."""
    num_rows, length = tokens.shape
    num_history = cfg.stop.num_history if cfg.stop is not None else 0
    dev = tokens.device
    no = torch.zeros(num_rows, dtype=torch.bool, device=dev)
    zeros = torch.zeros(num_rows, length, dtype=torch.float32, device=dev)
    history = torch.full((num_history, num_rows, length), -1, dtype=tokens.dtype, device=dev)
    return DenoiseState(tokens=tokens, argmax=tokens, sc_logits=sc_logits, history=history, stopped=no, done=no,
                        num_steps_taken=torch.zeros(num_rows, dtype=torch.long, device=dev), entropy=zeros,
                        confidence=zeros, accepted=torch.zeros(num_rows, length, dtype=torch.bool, device=dev))


def _check_logits(logits: Tensor, state: DenoiseState) -> None:
    num_rows, length, _ = logits.shape
    if logits.dtype != torch.float32 or state.tokens.shape != (num_rows, length):
        raise ValueError(f"logits must be fp32 [B,L,V] matching tokens {tuple(state.tokens.shape)}, "
                         f"got {logits.dtype} {tuple(logits.shape)}")


def _temperature(state: DenoiseState, cfg: StepConfig) -> Tensor:
    """T(n) [B] fp32 for each row's countdown n = N - steps taken (N on a row's first step).

    n is clamped at 1 so a frozen, exhausted row never divides by T = t_min = 0: it still goes through the proposal
    draw (RNG parity) and NaN probabilities would make multinomial raise."""
    n_remaining = (cfg.num_steps - state.num_steps_taken).clamp(min=1)
    return linear_temperature(n_remaining, cfg.num_steps, cfg.t_min, cfg.t_max)


def step(logits: Tensor, state: DenoiseState, cfg: StepConfig, generator: torch.Generator | None = None,
         constraints: con.CanvasConstraints | None = None) -> DenoiseState:
    """logits [B,L,V] fp32 from the decoder on state.tokens -> the next DenoiseState. generator None = global RNG.
    constraints: clamped positions and allowed-token classes for this canvas (sampling/constraints.py).

    The slow reference: it holds several fp32 [B,L,V] temporaries at once. `lean.step_lean` computes the same state
    in chunks of positions (fast sampling mode) with one [chunk,V] buffer."""
    _check_logits(logits, state)
    if constraints is not None:
        constraints.check(tuple(state.tokens.shape), logits.shape[-1])
    frozen = state.done
    processed = con.mask_logits(logits, constraints) / _temperature(state, cfg)[:, None, None]
    probs = torch.softmax(processed, dim=-1, dtype=torch.float32)
    proposal = cfg.sample(probs, generator)  # RNG draw 1 (all rows)
    argmax = processed.argmax(dim=-1)
    confidence = probs.amax(dim=-1)
    if cfg.sample is sample_reference:  # the reference's own op sequence, for its exact values and tokens
        entropy = token_entropy(processed)
    else:  # fast mode: the same quantity from the probabilities (`entropy_from_probs`)
        vocab = processed.shape[-1]
        flat = processed.reshape(-1, vocab)
        entropy = entropy_from_probs(flat, probs.reshape(-1, vocab), flat.amax(dim=-1, keepdim=True),
                                     confidence.reshape(-1)).view_as(confidence)
    # With no previous signal (first step) there is nothing to keep, so even a row that starts done takes ℓ̃.
    sc_logits = processed if state.sc_logits is None else \
        torch.where(frozen[:, None, None], state.sc_logits, processed)
    return _advance(state, cfg, generator, logits.shape[-1], proposal, argmax, entropy, confidence, sc_logits,
                    constraints)


def _advance(state: DenoiseState, cfg: StepConfig, generator: torch.Generator | None, vocab: int, proposal: Tensor,
             argmax: Tensor, entropy: Tensor, confidence: Tensor, sc_logits: Tensor,
             constraints: con.CanvasConstraints | None = None) -> DenoiseState:
    """The vocabulary-free rest of a step, shared by `step` and `lean.step_lean`: per-position scores [B,L] of ℓ̃
    (proposal, argmax, entropy, confidence; frozen rows' values are discarded here) and the already-merged
    sc_logits -> clamps, acceptance, renoise (RNG draw 2), freezing, stop rule, history."""
    num_rows, length = state.tokens.shape
    frozen = state.done
    c = constraints
    proposal, argmax, entropy, confidence = con.apply_clamps(c, proposal, argmax, entropy, confidence)
    accepted = con.accept(cfg.accept(*con.rule_scores(entropy, confidence, c), state.num_steps_taken + 1), c)
    noise = torch.randint(0, vocab, (num_rows, length), generator=generator, device=state.tokens.device)  # draw 2
    tokens = torch.where(accepted, proposal, noise)  # the previous canvas is NOT carried over (§6.3)

    keep = frozen[:, None]
    tokens, argmax = torch.where(keep, state.tokens, tokens), torch.where(keep, state.argmax, argmax)
    entropy, confidence = torch.where(keep, state.entropy, entropy), torch.where(keep, state.confidence, confidence)
    accepted = torch.where(keep, state.accepted, accepted)

    stopped, history, num_steps_taken, done = stop_and_count(state, cfg, argmax, con.stop_entropy(entropy, c))
    return DenoiseState(tokens=tokens, argmax=argmax, sc_logits=sc_logits, history=history, stopped=stopped, done=done,
                        num_steps_taken=num_steps_taken, entropy=entropy, confidence=confidence, accepted=accepted)


def stop_and_count(state: DenoiseState, cfg: StepConfig, argmax: Tensor, entropy: Tensor,
                   stopped: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The end of every step (`_advance`, engine/settle.py): the stop rule on this step's argmax and entropy [B,L],
    OR-ed into `stopped` (default state.stopped); the argmax pushed into the history; frozen rows' step counts held.
    -> (stopped, history, num_steps_taken, done)."""
    stopped = state.stopped if stopped is None else stopped
    if cfg.stop is not None:  # HF evaluates the rule on every row (frozen ones see their frozen argmax) and ORs it in
        stopped = stopped | cfg.stop(argmax, entropy, state.history)
    history = torch.cat([state.history[1:], argmax[None]]) if state.history.shape[0] else state.history
    num_steps_taken = state.num_steps_taken + (~state.done).long()
    return stopped, history, num_steps_taken, stopped | (num_steps_taken >= cfg.num_steps)
