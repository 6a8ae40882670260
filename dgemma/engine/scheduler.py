"""The ONE canvas loop, as a scheduler of row groups that share decoder forwards (spec §6.4, issue 6 item 3).

A `Rows` is one caller's rows stepping in lockstep: its prompt, GenerationConfig, StepConfig, generator, plan and
KV cache (a whole batch in `generate()`, one request in the server). Its life:

    encode pending tokens (prompt, later each committed canvas) -> start a canvas (noise from ITS generator,
    its plan's constraints) -> denoising steps -> commit (argmax, plan repair, stop-id truncation) -> repeat

A `Scheduler` holds any number of Rows and advances all of them with one `tick()`:

    1. encode: every Rows with pending tokens (a new request's prefill, a continuing one's committed canvas);
       those with the same number of pending tokens share one encoder pass, each at its own position
       (engine/cache.py StackedCaches), then each starts its next canvas;
    2. step: ONE decoder forward over the canvases of every Rows still denoising (rows at different steps,
       canvases and context lengths), then each Rows' own sampler step on its slice of the logits (its own
       settings, stop rule, constraints and random stream: its tokens do not depend on who shares the batch,
       up to the last bits of the decoder's fp32 GEMMs);
    3. commit: every Rows whose canvas is done commits now; Rows with nothing left to generate leave at once.

Events come back as (rows, Step | Commit), in that order for each Rows. `remove()` takes a Rows out between ticks
(cancelled, or its caller has what it needs). `canvas_loop` (engine/generate.py) is one Rows alone in a Scheduler,
so `generate()`, streaming, chat, infill/edit and JSON output run this same code; alone, a Rows' forward is the
plain `module.denoise` on its own cache (the reference's exact arithmetic and random stream).
"""

from __future__ import annotations

import dataclasses
import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Protocol

import torch

from ..config import GenerationConfig
from ..sampling import (CanvasConstraints, DenoiseState, StepConfig, init_canvas, init_state, sample_reference,
                        step_lean, truncate_at_stop_ids)
from .cache import KVCache, StackedCaches
from .settle import Settling

SC_CHUNK = 64  # positions per self-conditioning chunk: smaller re-reads E too often on CPU (measured)


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


class Rows:
    """One caller's rows [B] in lockstep: input_ids [B,T] (left padding False in attention_mask [B,T]); `plan`
    constrains each canvas (rows with no free position start done: no decoder step is spent on them)."""

    def __init__(self, module, input_ids: torch.Tensor, gen: GenerationConfig, cfg: StepConfig, *,
                 attention_mask: torch.Tensor | None = None, generator: torch.Generator | None = None,
                 cache: KVCache | None = None, plan: CanvasPlan | None = None):
        mcfg = module.config
        self.gen, self.cfg, self.generator, self.plan = gen, cfg, generator, plan
        self.batch_size = input_ids.shape[0]
        self.cache = cache if cache is not None else KVCache(mcfg, self.batch_size)
        self.pending: torch.Tensor | None = input_ids  # tokens to encode before the next canvas
        self.valid = None if attention_mask is None or bool(attention_mask.all()) else attention_mask.to(torch.bool)
        self.finished = torch.zeros(self.batch_size, dtype=torch.bool, device=input_ids.device)
        self.committed: list[torch.Tensor] = []
        self.num_canvases = math.ceil(gen.max_new_tokens / mcfg.canvas_length)
        self.canvas_index = -1
        self.state: DenoiseState | None = None
        self.constraints: CanvasConstraints | None = None
        self.settling: Settling | None = None  # this canvas's settled positions (gen.settle_after; engine/settle.py)
        self.left = self.num_canvases <= 0  # nothing more to generate: the scheduler drops it

    @property
    def denoising(self) -> bool:
        return self.pending is None and not self.left and not bool(self.state.done.all())  # one host sync

    def begin(self, module) -> None:
        """After the pending tokens were encoded: the next canvas's noise, constraints and fresh sampler state."""
        mcfg = module.config
        B, L, V = self.batch_size, mcfg.canvas_length, mcfg.vocab_size
        self.pending, self.valid = None, None
        self.canvas_index += 1
        noise = init_canvas(B, L, V, self.generator, self.finished.device)
        c = None if self.plan is None else self.plan.for_canvas(self.canvas_index, self.committed)
        self.constraints = c
        self.settling = None
        if c is None:
            self.state = init_state(noise, self.cfg)
            if self.gen.settle_after is not None:  # plans clamp positions: their canvases never settle
                self.settling = Settling(module, self.state, self.cfg, self.gen.settle_after, self.gen.settle_entropy)
        else:
            c.check((B, L), V)
            c.check_ids(V)
            state = init_state(c.start_canvas(noise), self.cfg)
            nothing_free = c.fully_clamped()  # such rows stop before their first step (frozen, 0 steps)
            self.state = dataclasses.replace(state, stopped=nothing_free, done=nothing_free)

    def soft(self, module) -> torch.Tensor | None:
        """Self-conditioning input for the next step (None on a canvas's first step)."""
        sc = self.state.sc_logits
        if sc is None:
            return None
        # reference-RNG mode promises the reference's tokens: its whole-canvas product, since the chunked one can
        # differ in the last bits with one CPU thread (different GEMM blocking; measured at V=32768, D=512)
        return module.soft_embedding(sc, chunk=None if self.cfg.sample is sample_reference else SC_CHUNK)

    def step(self, logits: torch.Tensor) -> Step:
        """This Rows' slice of a decoder forward [B,L,V] -> its next sampler state (overwrites the logits)."""
        if self.settling is not None:
            self.state = self.settling.step(logits, self.generator)
            return Step(self.canvas_index, self.state)
        self.state = step_lean(logits, self.state, self.cfg, self.generator, constraints=self.constraints)
        return Step(self.canvas_index, self.state)

    def commit(self) -> Commit:
        state, gen = self.state, self.gen
        argmax = state.argmax if self.plan is None else self.plan.commit(self.canvas_index, state.argmax,
                                                                         state.sc_logits)
        tokens, self.finished = truncate_at_stop_ids(argmax, gen.eos_token_id or (), gen.pad_token_id, self.finished)
        self.committed.append(tokens)
        if bool(self.finished.all()) or self.canvas_index + 1 >= self.num_canvases:
            self.left = True
        else:
            self.pending = tokens
        return Commit(self.canvas_index, tokens, self.finished, state.num_steps_taken)


class Scheduler:
    """Rows that share decoder forwards; `forwards` counts decoder forwards, `encodes` encoder passes."""

    def __init__(self, module):
        self.module = module
        self.rows: list[Rows] = []
        self.forwards = 0
        self.encodes = 0
        self._view: tuple[list[KVCache], list[int], StackedCaches] | None = None

    def add(self, rows: Rows) -> Rows:
        if not rows.left:
            self.rows.append(rows)
        return rows

    def remove(self, rows: Rows) -> None:
        """Take rows out between ticks (cancelled, or done from its caller's point of view); frees its place."""
        if rows in self.rows:
            self.rows.remove(rows)
        if self._view is not None and any(c is rows.cache for c in self._view[0]):
            self._view = None  # do not keep a departed request's context alive

    def tick(self) -> list[tuple[Rows, Step | Commit]]:
        events: list[tuple[Rows, Step | Commit]] = []
        # inference mode per computation, never across the caller's code (canvas_loop yields between ticks)
        with torch.inference_mode():
            self._encode([r for r in self.rows if r.pending is not None])
            stepping = [r for r in self.rows if r.denoising]
            for r, part in self._forward(stepping):
                events.append((r, r.step(part)))
            for r in list(self.rows):
                if r.pending is None and bool(r.state.done.all()):
                    events.append((r, r.commit()))
                    if r.left:
                        self.rows.remove(r)
        return events

    def _encode(self, todo: list[Rows]) -> None:
        """Pending tokens of several Rows: one encoder pass per run of equal token counts (no padding needed)."""
        together: dict[int, list[Rows]] = defaultdict(list)
        for r in todo:
            if r.valid is None:
                together[r.pending.shape[1]].append(r)
            else:  # a left-padded batch (generate() with an attention mask) encodes on its own
                self.module.encode(r.pending, r.cache, valid=r.valid)
                self.encodes += 1
        for group in together.values():
            if len(group) == 1:
                self.module.encode(group[0].pending, group[0].cache)
            else:
                self.module.encode(torch.cat([r.pending for r in group]), StackedCaches([r.cache for r in group]))
            self.encodes += 1
        for r in todo:
            r.begin(self.module)

    def _forward(self, stepping: list[Rows]) -> list[tuple[Rows, torch.Tensor]]:
        """The decoder forwards of a tick -> (rows, its logits) for each stepping Rows: ONE forward over the canvases
        of all whole-canvas Rows, and one per Rows with settled positions (each computes its own subset)."""
        out = []
        for r in stepping:
            if r.settling is not None:
                self.forwards += 1
                out.append((r, r.settling.forward(self.module, r.cache, SC_CHUNK)))
        whole = [r for r in stepping if r.settling is None]
        if not whole:
            return out
        self.forwards += 1
        if len(whole) == 1:
            r = whole[0]
            return out + [(r, self.module.denoise(r.state.tokens, r.cache, soft=r.soft(self.module)))]
        softs = [r.soft(self.module) for r in whole]
        soft = None
        if any(s is not None for s in softs):  # a zero signal is exactly "none" (no biases; rms-norm of 0 is 0)
            w = self.module.embed_tokens.weight
            soft = torch.cat([w.new_zeros(*r.state.tokens.shape, w.shape[1]) if s is None else s
                              for r, s in zip(whole, softs)])
        tokens = torch.cat([r.state.tokens for r in whole])
        logits = self.module.denoise(tokens, self._stacked([r.cache for r in whole]), soft=soft)
        return out + list(zip(whole, logits.split([r.batch_size for r in whole])))

    def _stacked(self, caches: list[KVCache]) -> StackedCaches:
        """The stacked view of these caches, rebuilt only when the set of rows or a cache's length changed."""
        lengths = [c.length for c in caches]
        if self._view is not None:
            old, old_lengths, view = self._view
            if len(old) == len(caches) and all(a is b for a, b in zip(old, caches)) and old_lengths == lengths:
                return view
        view = StackedCaches(caches)
        self._view = (caches, lengths, view)
        return view


def run_alone(module, rows: Rows):
    """One Rows through its own Scheduler: the canvas loop's events (Step ..., Commit, ...) as a generator."""
    scheduler = Scheduler(module)
    scheduler.add(rows)
    while scheduler.rows:
        for _, event in scheduler.tick():
            yield event
