"""Infill: write the middle between a prefix and a suffix, with the suffix fixed IN the canvas (a `CanvasPlan`).

Layout of one candidate row (positions count from the first generated token):

    encoder context : [prompt] + prefix tokens              causal, cached once; the prompt is the chat turn with
                                                            an instruction when one is given, else just <bos>
    canvas(es)      : middle (m free positions) | suffix tokens (clamped) | <eos> ... (clamped)
                      `------- canvas k: the one the middle ends in -------'

Why this layout. The denoiser attends bidirectionally inside a canvas and causally to the cache, so the prefix
belongs in the cache (it is the past, exactly as in training) and the suffix must sit in the SAME canvas as the end
of the middle to be seen at all: it is clamped there, never renoised, and the middle's positions read it at every
step. After the suffix the canvas is clamped to <eos>, the way training filled the tail of a response's last canvas.
Only the part of the suffix that fits in that canvas is placed; the rest cannot influence the middle (nothing later
is visible) and is appended as text, so prefix and suffix come back byte-identical by construction (the output is
prefix + decoded middle + suffix, never a re-decode of the suffix). A middle longer than a canvas fills whole free
canvases first; only its last canvas sees the suffix (the price of block-wise decoding).

How the middle's length is chosen. The length is a layout decision that diffusion cannot make mid-canvas, so every
candidate length is one ROW of a batch and all of them denoise together in the one canvas loop. Each row is then
scored by how much the denoiser agrees with the clamped junction, the first `JUNCTION` suffix tokens (and the
<eos> after a short suffix): the mean log-probability of those clamped tokens under its last step's ℓ̃. The model
was trained on uniformly corrupted canvases, so it never knows which tokens are given and keeps predicting the
clamped ones too; a middle of the wrong length leaves a seam that it predicts badly. Highest score wins (ties: the
shorter). `middle_tokens=N` skips the search.

An empty suffix leaves no junction to score (every length would tie), so it means "continue the prefix": one row,
nothing clamped, ended by the model's first stop id or by max_middle_tokens (default one canvas), like a completion.

Free middle positions may hold any ordinary token but no special token (so no stop id can end the text early).
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field

import torch

from ..sampling import CanvasConstraints, clamped_logprob
from .generate import seeded_generator, step_config
from .scheduler import Commit, Rows, run_alone

JUNCTION = 16  # suffix tokens (plus the <eos> after a short suffix) that score a candidate length
MIN_VISIBLE = 4  # a candidate must leave at least this many suffix/eos positions in its last canvas


@dataclass
class InfillResult:
    middle: str  # the generated text between prefix and suffix
    text: str  # prefix + middle + suffix
    middle_ids: list[int]
    middle_tokens: int  # the chosen length (free positions)
    candidates: list[tuple[int, float]]  # (length, junction score) for every row, best first
    steps_per_canvas: list[int] = field(default_factory=list)  # of the chosen row
    wall_s: float = 0.0


def row_layout(middle: int, suffix_ids: list[int], eos_id: int, canvas_length: int, num_positions: int) -> list[int]:
    """One row's positions: -1 (free) for the middle, then the suffix clamped as far as the canvas the middle ends
    in reaches, then <eos> to the end (later canvases are all <eos>: the row has finished, no steps are spent)."""
    end = ((middle - 1) // canvas_length + 1) * canvas_length  # end of the middle's last canvas
    row = ([-1] * middle + list(suffix_ids))[:end]
    return row + [eos_id] * (num_positions - len(row))


def check_count(name: str, value) -> None:
    """A count option (num_candidates, max_middle_tokens) must be an int >= 1: a clear error, never a quiet 1."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")


def candidate_lengths(canvas_length: int, num_suffix: int, *, max_middle: int, num_candidates: int) -> list[int]:
    """Up to `num_candidates` lengths spread over [1, max_middle], each leaving the junction visible."""
    if max_middle < 1 or num_candidates < 1:
        raise ValueError(f"max_middle_tokens and num_candidates must be >= 1, got {max_middle}, {num_candidates}")
    lengths = [round(max_middle * (i + 1) / num_candidates) for i in range(num_candidates)]
    return sorted({visible_length(m, canvas_length, num_suffix) for m in lengths})


def visible_length(m: int, canvas_length: int, num_suffix: int) -> int:
    """The longest length <= m (>= 1) whose last canvas keeps the junction in sight: a middle that fills its last
    canvas would leave the suffix to the next one, unseen by the middle and with nothing to score the row by."""
    need = min(MIN_VISIBLE, num_suffix + 1)
    m = max(1, m)
    while m > 1 and (m % canvas_length == 0 or canvas_length - m % canvas_length < need):
        m -= 1
    return m


class InfillPlan:
    """CanvasPlan: rows = candidate middle lengths; clamps the suffix and <eos>; records junction scores."""

    def __init__(self, lengths: list[int], suffix_ids: list[int], eos_id: int, canvas_length: int,
                 middle_class: torch.Tensor, seeds: list[list[int]] | None = None, device=None):
        L = canvas_length
        self.lengths, self.L, self.device = lengths, L, device
        self.num_canvases = max((m - 1) // L + 1 for m in lengths)
        n = self.num_canvases * L
        self.layout = torch.tensor([row_layout(m, suffix_ids, eos_id, L, n) for m in lengths], dtype=torch.long)
        self.allowed = middle_class[None].to(device)
        start = torch.full_like(self.layout, -1)
        for r, seed in enumerate(seeds or []):  # an edit starts its middle from (part of) the old span
            k = min(len(seed), lengths[r])
            start[r, :k] = torch.tensor(seed[:k], dtype=torch.long)
        self.start = start
        # junction: the clamped positions right after each row's middle that score the row
        self.junction = torch.zeros_like(self.layout, dtype=torch.bool)
        for r, m in enumerate(lengths):
            end = min(m + min(JUNCTION, len(suffix_ids) + 1), (m - 1) // L * L + L)
            self.junction[r, m:end] = True
        self.scores = torch.full((len(lengths),), float("nan"))

    def for_canvas(self, index: int, committed) -> CanvasConstraints:
        cols = slice(index * self.L, (index + 1) * self.L)
        clamp = self.layout[:, cols].to(self.device)
        return CanvasConstraints(clamp, self.allowed, torch.zeros_like(clamp), self.start[:, cols].to(self.device))

    def commit(self, index: int, argmax: torch.Tensor, processed: torch.Tensor | None) -> torch.Tensor:
        cols = slice(index * self.L, (index + 1) * self.L)
        junction = self.junction[:, cols].to(argmax.device)
        rows = junction.any(dim=-1)
        if processed is not None and bool(rows.any()):
            c = CanvasConstraints(self.layout[:, cols].to(argmax.device))
            logp = clamped_logprob(processed, c)
            mean = (logp * junction).sum(-1) / junction.sum(-1).clamp(min=1)
            self.scores = torch.where(rows.cpu(), mean.float().cpu(), self.scores)
        return argmax


def middle_class(tokenizer, vocab_size: int) -> torch.Tensor:
    """bool [V]: ordinary tokens (no special or added token, none past the tokenizer's vocabulary)."""
    allowed = torch.zeros(vocab_size, dtype=torch.bool)
    allowed[: min(vocab_size, tokenizer.vocab_size)] = True
    for i in tokenizer.added_id_set | set(tokenizer.stop_ids):
        if i < vocab_size:
            allowed[i] = False
    return allowed


def context_ids(engine, prefix: str, instruction: str | None) -> list[int]:
    """Encoder context: the prefix after <bos>, or after a chat turn holding the instruction (the prefix then
    starts the model's answer)."""
    tok = engine.require_tokenizer()
    if instruction is None:
        return tok.encode(prefix, add_bos=True)
    head = tok.encode_chat([{"role": "user", "content": instruction}], add_generation_prompt=True)
    return head + tok.encode(prefix, add_bos=False) if prefix else head


def infill(engine, prefix: str, suffix: str, **options) -> InfillResult:
    """Generate the text between `prefix` and `suffix` (see the module docstring for the layout and length choice).

    middle_tokens: exact length of the middle in tokens, or a list of candidate lengths; else `num_candidates`
    lengths up to max_middle_tokens (default: what fits in one canvas with the junction visible) race as batch rows.
    An empty suffix without middle_tokens continues the prefix up to max_middle_tokens (default: one canvas) or
    the model's first stop id (then `candidates` is empty: no length was raced).
    seeds_from: token ids the middle STARTS from (an in-place edit), instead of noise. Other options as for
    `Engine.stream` (max_denoising_steps, entropy_bound, t_min, t_max, ...)."""
    run = open_infill(engine, prefix, suffix, **options)
    for event in run_alone(engine.module, run.rows):
        run.on_event(event)
    return run.result()


class InfillRun:
    """One infill as a scheduler `Rows` (a row per candidate length) and what collects its result: `on_event` for
    each of its Step/Commit events, then `result()` once `rows.left`. `infill` runs it alone; the server's batched
    worker puts `rows` in its shared scheduler, so an infill steps beside other requests and can be cancelled."""

    def __init__(self, engine, rows: Rows, plan: InfillPlan, lengths: list[int], prefix: str, suffix: str,
                 started: float, continuation: int | None = None):
        self.engine, self.rows, self.plan, self.lengths = engine, rows, plan, lengths
        self.prefix, self.suffix, self.started = prefix, suffix, started
        self.continuation = continuation  # an empty suffix: one free row, cut here and before its first stop id
        self.pieces: list[torch.Tensor] = []
        self.steps: list[torch.Tensor] = []

    def on_event(self, event) -> None:
        if isinstance(event, Commit):
            self.pieces.append(event.tokens.cpu())
            self.steps.append(event.num_steps.cpu())

    def result(self) -> InfillResult:
        tok = self.engine.require_tokenizer()
        tokens = torch.cat(self.pieces, dim=1)
        if self.continuation is not None:  # the one row, up to its first stop id
            row, candidates = 0, []
            middle_ids = tokens[0, :self.continuation].tolist()
            middle_ids = middle_ids[:next((k for k, t in enumerate(middle_ids) if t in tok.stop_ids), None)]
        else:  # the best-scoring length (ties: the shorter)
            lengths, scores = self.lengths, self.plan.scores.nan_to_num(float("-inf"))
            order = sorted(range(len(lengths)), key=lambda r: (-float(scores[r]), lengths[r]))
            row, candidates = order[0], [(lengths[r], float(scores[r])) for r in order]
            middle_ids = tokens[row, : lengths[row]].tolist()
        middle = tok.decode(middle_ids)
        return InfillResult(middle, self.prefix + middle + self.suffix, middle_ids, len(middle_ids), candidates,
                            [int(s[row]) for s in self.steps], time.perf_counter() - self.started)


def open_infill(engine, prefix: str, suffix: str, *, instruction: str | None = None,
                middle_tokens: int | list[int] | None = None,
                max_middle_tokens: int | None = None, num_candidates: int = 4, seed: int | None = None,
                sampling: str = "fast", accept=None, seeds_from: list[int] | None = None, **knobs) -> InfillRun:
    """An infill's rows and plan, checked (bad options raise here); nothing runs yet. Options as for `infill`."""
    started = time.perf_counter()
    if not isinstance(prefix, str) or not isinstance(suffix, str):
        raise ValueError("prefix and suffix must be strings (either may be empty)")
    tok = engine.require_tokenizer()
    L = engine.config.canvas_length
    suffix_ids = tok.encode(suffix, add_bos=False) if suffix else []
    check_count("num_candidates", num_candidates)
    if max_middle_tokens is not None:
        check_count("max_middle_tokens", max_middle_tokens)
    if middle_tokens is not None and max_middle_tokens is not None:
        raise ValueError("give middle_tokens (the exact length) or max_middle_tokens (the longest candidate), not both")
    if middle_tokens is not None:
        lengths = [middle_tokens] if not isinstance(middle_tokens, (list, tuple)) else list(middle_tokens)
        if not lengths or any(isinstance(m, bool) or not isinstance(m, int) or m < 1 for m in lengths):
            raise ValueError(f"middle_tokens must be an int >= 1 or a list of them, got {middle_tokens!r}")
        blind = [m for m in lengths if suffix_ids and visible_length(m, L, len(suffix_ids)) != m]
        if blind:  # the caller's own lengths are kept, but what they cost is said
            warnings.warn(f"middle_tokens {', '.join(map(str, blind))}: a middle of that length leaves fewer than "
                          f"{min(MIN_VISIBLE, len(suffix_ids) + 1)} positions of its last {L}-token canvas to the "
                          "suffix, so the middle sees little or none of it (the rest falls in the next canvas) and the "
                          "length is scored on little or nothing; "
                          + ", ".join(f"{m} -> {visible_length(m, L, len(suffix_ids))}" for m in blind)
                          + " would keep the suffix in sight", stacklevel=3)
    elif not suffix_ids:  # continue the prefix: one row whose canvases are all free, a stop id may end it
        limit = max_middle_tokens if max_middle_tokens is not None else L
        lengths = [-(-limit // L) * L]
    else:
        limit = max_middle_tokens if max_middle_tokens is not None else L - min(JUNCTION, len(suffix_ids) + 1)
        lengths = candidate_lengths(L, len(suffix_ids), max_middle=max(1, limit), num_candidates=num_candidates)
    continuation = not suffix_ids and middle_tokens is None
    eos = tok.eos_id if tok.eos_id is not None else tok.stop_ids[0]
    ctx = context_ids(engine, prefix, instruction)
    allowed = middle_class(tok, engine.config.vocab_size)
    if continuation:
        allowed[[i for i in tok.stop_ids if i < len(allowed)]] = True
    plan = InfillPlan(lengths, suffix_ids, eos, L, allowed, [seeds_from] * len(lengths) if seeds_from else None,
                      engine.device)
    gen = engine.generation_settings(**knobs, max_new_tokens=plan.num_canvases * L, eos_token_id=list(tok.stop_ids))
    try:
        engine.check_context(len(ctx), gen.max_new_tokens)
    except ValueError as e:  # its advice names max_tokens, which infill does not take
        raise ValueError(f"the prefix ({len(ctx)} tokens) and a middle of up to {max(lengths)} tokens "
                         f"({plan.num_canvases} canvases of {L}) do not fit: {str(e).split(';')[0]}; shorten the "
                         "prefix or lower middle_tokens / max_middle_tokens (--middle-tokens / --max-middle-tokens)"
                         ) from None
    generator = seeded_generator(seed, engine.device)
    input_ids = torch.tensor([ctx] * len(lengths), dtype=torch.long, device=engine.device)
    cfg = step_config(gen, accept, sampling, bound_given="entropy_bound" in knobs)
    rows = Rows(engine.module, input_ids, gen, cfg, generator=generator, plan=plan)
    return InfillRun(engine, rows, plan, lengths, prefix, suffix, started, limit if continuation else None)
