"""The ONE generation loop (spec §6.4): encode -> denoise a canvas step by step -> commit its argmax -> repeat.

    cache <- encode(prompt)                                  # causal, writes K/V
    for each canvas (ceil(max_new_tokens / L) at most):
        canvas <- uniform random ids; sampler state <- fresh
        until every row is done (stable and confident, or N steps):
            logits <- denoise(canvas, self-conditioning, cache)   # reads the cache only
            state  <- sampling.step_lean(logits, state)          # yields a `Step` event
        committed <- argmax, truncated after the first stop id  # yields a `Commit` event
        stop if every row has finished; else encode(committed)   # commit = causal pass, same positions

The loop lives in engine/scheduler.py (a `Rows` alone in a `Scheduler`; the server puts many requests' Rows in
one scheduler so they share decoder forwards). It is a Python generator of events so that `generate` (collect everything) and streaming front-ends run
the same code. The random stream (canvas init, then per step multinomial + randint) is the reference's,
so with the same seed and the reference sampling primitive the tokens are the reference's.
An optional `plan` (a `CanvasPlan`) constrains it: before each canvas the plan gives that canvas's
`CanvasConstraints` (clamped positions, allowed-token classes, seeded start tokens; applied inside the sampler
step), and at each commit it may repair the argmax before it is committed (JSON closes what the canvas left open).
Infill, in-place edits and JSON output are all plans over this one loop.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from ..config import ConfigError, GenerationConfig
from ..sampling import StepConfig, parse_accept, sample_inverse_cdf, sample_reference
from .cache import KVCache
from .scheduler import SC_CHUNK, CanvasPlan, Commit, Rows, Step, run_alone  # noqa: F401  (re-exported)

# "reference": the reference's exact random stream (same seed -> same tokens); "fast": the same distributions
# from one uniform number per position (the default of the text API, the CLI and the server)
SAMPLERS = {"reference": sample_reference, "fast": sample_inverse_cdf}


def seeded_generator(seed: int | None, device=None) -> torch.Generator | None:
    """A request's seeded random stream (None: no seed, the global RNG); a seed torch cannot take is a ValueError
    naming it (the text API's, infill's and edit's `seed`, the CLI's --seed)."""
    if seed is None:
        return None
    try:
        if isinstance(seed, bool):
            raise TypeError
        return torch.Generator(device if device is not None else "cpu").manual_seed(seed)
    except (TypeError, RuntimeError, ValueError):  # a non-integer, or outside [-2**63, 2**64)
        raise ValueError(f"seed must be an integer in [-2**63, 2**64 - 1], got {seed!r}") from None


def check_rule_choice(accept, bound_given: bool) -> None:
    """An acceptance rule replaces the entropy-bound rule, so an entropy_bound the caller gave beside it would be
    lost unseen: refused (a preset's or the checkpoint's bound is only a default, which `accept` overrides)."""
    if accept is not None and bound_given:
        raise ConfigError("an acceptance rule (accept, --accept, the server's \"acceptance\") replaces the "
                          "entropy-bound rule, so the entropy_bound (--entropy-bound) given beside it would be "
                          "ignored: give one of them (the entropy rule with bound B is entropy_bound=B alone, or "
                          "accept='entropy:B')")


def step_config(gen: GenerationConfig, accept=None, sampling: str = "reference", *,
                bound_given: bool = False) -> StepConfig:
    """GenerationConfig (reference knob names) -> the sampler's StepConfig; `accept` overrides the rule (an
    AcceptRule or its text, 'confidence:0.9' as the CLI's --accept; linear-quota takes gen's step count),
    `sampling` picks the proposal primitive ("reference" or "fast"). bound_given: the caller set entropy_bound
    itself (refused beside `accept`: `check_rule_choice`)."""
    check_rule_choice(accept, bound_given)
    if sampling not in SAMPLERS:
        raise ValueError(f"sampling must be one of {sorted(SAMPLERS)}, got {sampling!r}")
    if isinstance(accept, str):
        accept = parse_accept(accept, gen.max_denoising_steps)
    elif accept is not None and not callable(accept):
        raise ValueError(f"accept must be an acceptance rule (dgemma.sampling.entropy_bound(B), "
                         f"confidence_threshold(T), quota(K), linear_quota(N)) or its text ('entropy:B', "
                         f"'confidence:T', 'quota:K', 'linear-quota'), got {accept!r}")
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
    constrains each canvas (rows with no free position start done: no decoder step is spent on them).
    The rows run alone in the scheduler (engine/scheduler.py); the next canvas is only encoded when the caller
    asks for the event after a Commit."""
    rows = Rows(module, input_ids, gen, cfg, attention_mask=attention_mask, generator=generator, cache=cache,
                plan=plan)
    return run_alone(module, rows)


@dataclass
class GenerateOutput:
    sequences: torch.Tensor  # [B, T + num_canvases * L] prompt included
    tokens_per_forward: torch.Tensor  # [B] non-pad generated tokens / decoder steps (the reference's metric)
    steps_per_canvas: list[torch.Tensor]  # one [B] tensor per canvas
    cache: KVCache


class ContextError(ValueError):
    """A request that the model's positions cannot hold (Engine.check_context): the prompt, or the prompt and its
    canvases, past max_position_embeddings."""


def fit_max_length(gen: GenerationConfig, prompt_len: int) -> GenerationConfig:
    """The reference's `max_length` (total length, prompt and its padding included; spec §6.4, §9.4) as the
    max_new_tokens the loop runs: with max_new_tokens at the reference's default 256, max_length decides
    (max_length - prompt_len new tokens); otherwise max_new_tokens decides and max_length still ends generation
    after the canvas that reaches it. Either way the count is rounded up to whole canvases. A max_length that
    leaves no room after the prompt is a ValueError (the reference returns the prompt alone, or one canvas)."""
    if gen.max_length is None:
        return gen
    room = gen.max_length - prompt_len
    if room < 1:
        raise ValueError(f"max_length={gen.max_length} leaves no room after the prompt of {prompt_len} tokens "
                         "(max_length counts the prompt, padding included): raise it, or give max_new_tokens")
    new = room if gen.max_new_tokens == 256 else min(gen.max_new_tokens, room)  # 256: the reference's test
    return dataclasses.replace(gen, max_new_tokens=new)


def _copy_cpu(t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    return t.to("cpu", dtype, copy=True)  # the loop reuses its buffers: a streamer keeps its own copy


@torch.inference_mode()
def generate(module, input_ids: torch.Tensor, gen: GenerationConfig, cfg: StepConfig, *,
             attention_mask: torch.Tensor | None = None, generator: torch.Generator | None = None,
             plan: CanvasPlan | None = None, streamer=None) -> GenerateOutput:
    """Run the loop to the end. `streamer` (the reference's protocol, spec §9.4) is fed from its events: put(prompt),
    put_draft after each Step if it has one (value=argmax [B,L], or logits=ℓ̃ [B,L,V] in the weights' dtype if
    `streamer._takes_logits`), put(committed canvas [B,L]) after each Commit, end()."""
    B = input_ids.shape[0]
    cache = KVCache(module.config, B)
    pieces, steps = [input_ids], []
    forwards = torch.zeros(B, dtype=torch.long, device=input_ids.device)
    finished_before = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
    drafts = streamer is not None and hasattr(streamer, "put_draft")
    if streamer is not None:
        streamer.put(_copy_cpu(input_ids))
    for event in canvas_loop(module, input_ids, gen, cfg, attention_mask=attention_mask, generator=generator,
                             cache=cache, plan=plan):
        if isinstance(event, Step) and drafts:
            if getattr(streamer, "_takes_logits", False):
                # in the embedding dtype, as the reference keeps its self-conditioning logits
                streamer.put_draft(logits=_copy_cpu(event.state.sc_logits, module.embed_tokens.weight.dtype))
            else:
                streamer.put_draft(value=_copy_cpu(event.state.argmax))
        if isinstance(event, Commit):
            if streamer is not None:
                streamer.put(_copy_cpu(event.tokens))
            pieces.append(event.tokens)
            steps.append(event.num_steps)
            # rows that finished in an earlier canvas still ride along in the batch but do not count (reference)
            forwards += torch.where(finished_before, 0, event.num_steps)
            finished_before = event.finished
    if streamer is not None:
        streamer.end()
    new = torch.cat(pieces[1:], dim=1)
    if gen.pad_token_id is not None:
        num_valid = (new != gen.pad_token_id).sum(-1)
    else:
        num_valid = torch.full_like(forwards, new.shape[1])
    return GenerateOutput(torch.cat(pieces, dim=1), num_valid / forwards.clamp(min=1), steps, cache)
