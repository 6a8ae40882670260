"""The ONE generation loop (spec §6.4): encode -> denoise a canvas step by step -> commit its argmax -> repeat.

    cache <- encode(prompt)                                  # causal, writes K/V
    for each canvas (ceil(max_new_tokens / L) at most):
        canvas <- uniform random ids; sampler state <- fresh
        until every row is done (stable and confident, or N steps):
            logits <- denoise(canvas, self-conditioning, cache)   # reads the cache only
            state  <- sampling.step_lean(logits, state)          # yields a `Step` event
        committed <- argmax, truncated after the first stop id  # yields a `Commit` event
        stop if every row has finished; else encode(committed)   # commit = causal pass, same positions

It is a Python generator of events so that `generate` (collect everything) and streaming front-ends run
the same code. The random stream (canvas init, then per step multinomial + randint) is the reference's,
so with the same seed and the reference sampling primitive the tokens are the reference's.
An optional `plan` (a `CanvasPlan`) constrains it: before each canvas the plan gives that canvas's
`CanvasConstraints` (clamped positions, allowed-token classes, seeded start tokens; applied inside the sampler
step), and at each commit it may repair the argmax before it is committed (JSON closes what the canvas left open).
Infill, in-place edits and JSON output are all plans over this one loop.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import torch

from ..config import GenerationConfig
from ..sampling import (CanvasConstraints, DenoiseState, StepConfig, init_canvas, init_state, sample_inverse_cdf,
                        sample_reference, step_lean, truncate_at_stop_ids)

# "reference": the reference's exact random stream (same seed -> same tokens); "fast": the same distributions
# from one uniform number per position (the default of the text API, the CLI and the server)
SAMPLERS = {"reference": sample_reference, "fast": sample_inverse_cdf}
SC_CHUNK = 64  # positions per self-conditioning chunk: smaller re-reads E too often on CPU (measured)
from .cache import KVCache


class CanvasPlan(Protocol):
    """What constrains the canvas loop (see the module docstring). `committed` holds the tokens of the canvases
    committed so far in this call ([B,L] each, after repair and stop-id truncation)."""

    def for_canvas(self, canvas_index: int, committed: list[torch.Tensor]) -> CanvasConstraints | None: ...

    def commit(self, canvas_index: int, argmax: torch.Tensor, processed: torch.Tensor | None) -> torch.Tensor:
        """argmax [B,L] and the last step's ℓ̃ [B,L,V] (None if no step ran) -> the tokens to commit [B,L]."""
        ...


@dataclass
class Step:
    """After one denoising step of canvas `canvas_index` (state.argmax is the draft, state.confidence its shading)."""

    canvas_index: int
    state: DenoiseState


@dataclass
class Commit:
    """A finished canvas: `tokens` [B,L] after stop-id truncation; `finished` [B] rows that have hit a stop id."""

    canvas_index: int
    tokens: torch.Tensor
    finished: torch.Tensor
    num_steps: torch.Tensor  # [B] decoder steps each row used on this canvas


def step_config(gen: GenerationConfig, accept=None, sampling: str = "reference") -> StepConfig:
    """GenerationConfig (reference knob names) -> the sampler's StepConfig; `accept` overrides the rule,
    `sampling` picks the proposal primitive ("reference" or "fast")."""
    if sampling not in SAMPLERS:
        raise ValueError(f"sampling must be one of {sorted(SAMPLERS)}, got {sampling!r}")
    kwargs = {"sample": SAMPLERS[sampling]}
    cfg = StepConfig.from_generation_config(gen.max_denoising_steps, gen.t_min, gen.t_max, gen.entropy_bound,
                                            gen.stability_threshold, gen.confidence_threshold, **kwargs)
    if accept is not None:
        cfg = StepConfig(cfg.num_steps, cfg.t_min, cfg.t_max, accept, cfg.stop, cfg.sample)
    return cfg


def canvas_loop(module, input_ids: torch.Tensor, gen: GenerationConfig, cfg: StepConfig, *,
                attention_mask: torch.Tensor | None = None, generator: torch.Generator | None = None,
                cache: KVCache | None = None, plan: CanvasPlan | None = None) -> Iterator[Step | Commit]:
    """Run generation for input_ids [B,T] (left-padded rows marked False in attention_mask [B,T]); `plan`
    constrains each canvas (rows with no free position start done: no decoder step is spent on them)."""
    mcfg = module.config
    B = input_ids.shape[0]
    L, V = mcfg.canvas_length, mcfg.vocab_size
    device = input_ids.device
    cache = cache if cache is not None else KVCache(mcfg, B)
    valid = None if attention_mask is None or bool(attention_mask.all()) else attention_mask.to(torch.bool)
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    to_encode = input_ids
    committed: list[torch.Tensor] = []
    # inference mode is entered per computation, never across a `yield`: the caller's code between events
    # must not run inside it
    for canvas_index in range(math.ceil(gen.max_new_tokens / L)):
        with torch.inference_mode():
            module.encode(to_encode, cache, valid=valid)
            noise = init_canvas(B, L, V, generator, device)
            c = None if plan is None else plan.for_canvas(canvas_index, committed)
            if c is None:
                state = init_state(noise, cfg)
            else:
                c.check((B, L), V)
                c.check_ids(V)
                state = init_state(c.start_canvas(noise), cfg)
                nothing_free = c.fully_clamped()  # such rows stop before their first step (frozen, 0 steps)
                state = dataclasses.replace(state, stopped=nothing_free, done=nothing_free)
        while not bool(state.done.all()):  # one host sync per step, outside the model
            with torch.inference_mode():
                # both pieces work position-chunk by position-chunk: no extra full [B,L,V] fp32 buffer
                soft = None if state.sc_logits is None else module.soft_embedding(state.sc_logits, chunk=SC_CHUNK)
                state = step_lean(module.denoise(state.tokens, cache, soft=soft), state, cfg, generator,
                                  constraints=c)
            yield Step(canvas_index, state)
        with torch.inference_mode():
            argmax = state.argmax if plan is None else plan.commit(canvas_index, state.argmax, state.sc_logits)
            tokens, finished = truncate_at_stop_ids(argmax, gen.eos_token_id or (), gen.pad_token_id, finished)
        committed.append(tokens)
        yield Commit(canvas_index, tokens, finished, state.num_steps_taken)
        if bool(finished.all()):
            break
        to_encode, valid = tokens, None


@dataclass
class GenerateOutput:
    sequences: torch.Tensor  # [B, T + num_canvases * L] prompt included
    tokens_per_forward: torch.Tensor  # [B] non-pad generated tokens / decoder steps (the reference's metric)
    steps_per_canvas: list[torch.Tensor]  # one [B] tensor per canvas
    cache: KVCache


@torch.inference_mode()
def generate(module, input_ids: torch.Tensor, gen: GenerationConfig, cfg: StepConfig, *,
             attention_mask: torch.Tensor | None = None, generator: torch.Generator | None = None,
             plan: CanvasPlan | None = None) -> GenerateOutput:
    B = input_ids.shape[0]
    cache = KVCache(module.config, B)
    pieces, steps = [input_ids], []
    forwards = torch.zeros(B, dtype=torch.long, device=input_ids.device)
    finished_before = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
    for event in canvas_loop(module, input_ids, gen, cfg, attention_mask=attention_mask, generator=generator,
                             cache=cache, plan=plan):
        if isinstance(event, Commit):
            pieces.append(event.tokens)
            steps.append(event.num_steps)
            # rows that finished in an earlier canvas still ride along in the batch but do not count (reference)
            forwards += torch.where(finished_before, 0, event.num_steps)
            finished_before = event.finished
    new = torch.cat(pieces[1:], dim=1)
    if gen.pad_token_id is not None:
        num_valid = (new != gen.pad_token_id).sum(-1)
    else:
        num_valid = torch.full_like(forwards, new.shape[1])
    return GenerateOutput(torch.cat(pieces, dim=1), num_valid / forwards.clamp(min=1), steps, cache)
