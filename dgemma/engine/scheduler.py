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
       up to the last bits of the decoder's fp32 GEMMs). On the CPU a row whose canvas is already done is left out
       of the forward (`Rows.computed_rows`) and of the sampler's vocabulary work: a batch whose rows finish at
       different steps no longer pays for its finished rows until the slowest one is done;
    3. commit: every Rows whose canvas is done commits now; Rows with nothing left to generate leave at once.

Events come back as (rows, Step | Commit), in that order for each Rows. `remove()` takes a Rows out between ticks
(cancelled, or its caller has what it needs). `canvas_loop` (engine/generate.py) is one Rows alone in a Scheduler,
so `generate()`, streaming, chat, infill/edit and JSON output run this same code; alone, a Rows' forward is the
plain `module.denoise` on its own cache (the reference's exact arithmetic and random stream).
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections import defaultdict
from dataclasses import dataclass
from typing import Protocol

import torch

from ..config import GenerationConfig
from ..sampling import (CanvasConstraints, DenoiseState, StepConfig, init_canvas, init_state, sample_reference,
                        step_lean, truncate_at_stop_ids)
from .cache import KVCache, RowSubset, StackedCaches
from .settle import Settling

SC_CHUNK = 64  # positions per self-conditioning chunk: smaller re-reads E too often on CPU (measured)
SKIP_DONE_ROWS = True  # done rows leave the decoder's forward (`Rows.computed_rows`); False only to measure that
REUSE_LOGITS = True  # step logits go into reused buffers on the CPU (`Rows.logits_buffer`); False only to measure that
SETTLE_EAGER = ("settled positions (settle_after, the settle preset) run the decoder eagerly: the compiled step "
                "(--compile, Engine.compile) is shaped for whole canvases, so it does not run here; drop --compile, or "
                "use another preset (confident is settle without settled positions)")


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
        self._subset: tuple[list[int], RowSubset] | None = None  # the cache view of the rows still denoising
        self._logits_buffers: list[torch.Tensor] = []  # reused step logits on the CPU (`logits_buffer`)
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
        self._subset = None  # the cache has grown
        if c is None:
            self.state = _start_done(init_state(noise, self.cfg), self._ended())
            if self.gen.settle_after is not None:  # plans clamp positions: their canvases never settle
                if "denoise" in vars(module):  # (engine/compiled.py installs the compiled step there)
                    warnings.warn(SETTLE_EAGER, stacklevel=2)
                self.settling = Settling(module, self.state, self.cfg, self.gen.settle_after, self.gen.settle_entropy)
        else:
            c.check((B, L), V)
            c.check_ids(V)
            state = init_state(c.start_canvas(noise), self.cfg)
            nothing_free = c.fully_clamped()  # such rows stop before their first step (frozen, 0 steps)
            ended = self._ended()
            self.state = _start_done(state, nothing_free if ended is None else nothing_free | ended)

    def _ended(self) -> torch.Tensor | None:
        """Rows that start this canvas done because they ended in an earlier one (a stop id), in fast mode only.

        Such a row's canvas is committed as all pad whatever is denoised in it (`truncate_at_stop_ids`), so denoising
        it only costs steps: its own, and the batch's, whose canvas lasts until its slowest row is done. The reference
        keeps denoising it, and its steps decide when the canvas ends, so reference-RNG mode does too (the same
        random stream). Without a pad id the ended row's later canvases are returned as denoised: kept as well."""
        if self.cfg.sample is sample_reference or self.gen.pad_token_id is None or not bool(self.finished.any()):
            return None
        return self.finished

    def computed_rows(self, module) -> torch.Tensor | None:
        """The rows the next decoder forward computes: None = all of them, else the indices of those still denoising.

        A done row is frozen: its step's logits would be thrown away (the sampler keeps its tokens and ℓ̃), so it is
        left out of the forward where that saves work and changes no result: on the CPU, where a step is bound by
        arithmetic (a row left out is its compute saved; on a GPU a step is bound by reading the weights, so rows
        are nearly free), on an eager module (a compiled step compiles anew for every batch size), and after the
        canvas's first step (a row frozen from the start has no ℓ̃ to keep yet). The rows computed get the same
        bits as in the whole batch wherever the BLAS rounds a row of a product the same whatever the number of rows,
        the assumption bit-parity with the reference already rests on (README "Parity"). Reference-RNG mode keeps
        the reference's random stream: the sampler still draws for every row."""
        state = self.state
        if not SKIP_DONE_ROWS or state.sc_logits is None or state.tokens.device.type != "cpu" \
                or "denoise" in vars(module):
            return None  # (engine/compiled.py installs the compiled step as the instance attribute `denoise`)
        if not bool(state.done.any()):
            return None
        return (~state.done).nonzero().squeeze(1)

    def decoder_inputs(self, module):
        """(tokens [R,L], cache view, soft [R,L,D] | None, rows) for this Rows' part of the next decoder forward:
        R = all B rows (rows None) or the `computed_rows`."""
        rows = self.computed_rows(module)
        if rows is None:
            return self.state.tokens, self.cache, self.soft(module), None
        key = rows.tolist()
        if self._subset is None or self._subset[0] != key:
            self._subset = (key, RowSubset(self.cache, rows))
        return self.state.tokens.index_select(0, rows), self._subset[1], self.soft(module, rows), rows

    def heads_own_logits(self, module) -> bool:
        """Whether the loop runs the head itself (`logits`) into a reused buffer: on the CPU, with an eager module
        (a compiled step returns logits made in its graph; a GPU's caching allocator reuses memory already)."""
        return REUSE_LOGITS and self.state.tokens.device.type == "cpu" and "denoise" not in vars(module)

    def logits_buffer(self, shape: tuple[int, ...]) -> torch.Tensor:
        """A [B,L,V] fp32 CPU buffer for this step's logits that the sampler state does not read: two alternate.

        Why: logits are 32 MiB per canvas row at V = 32,768 (256 MiB at 262,144), and glibc serves every allocation
        of 32 MiB or more with a fresh mmap, freed back to the kernel, so each step's logits were new pages that the
        kernel zeroed one fault at a time as the head wrote them (8,192 faults a step per canvas row on `small`,
        more with dynamic int8; bench/logits_buffers.py). How: a step's logits become its ℓ̃ (the sampler overwrites
        them in place and keeps them as `sc_logits`), which the NEXT step reads, so the step after next writes into
        that buffer again. A caller keeping a yielded Step's `state.sc_logits` longer than one step must copy it
        (nothing in dgemma does). Memory: the two buffers the loop held anyway at a step's peak, kept for the
        Rows' life instead of returned; a new shape keeps only the buffer the state reads beside the new one."""
        sc = None if self.state is None else self.state.sc_logits
        busy = None if sc is None else sc.untyped_storage().data_ptr()
        for buffer in self._logits_buffers:
            if buffer.untyped_storage().data_ptr() != busy and buffer.shape == shape:
                return buffer
        self._logits_buffers = [b for b in self._logits_buffers if b.untyped_storage().data_ptr() == busy]
        self._logits_buffers.append(torch.empty(shape, dtype=torch.float32))
        return self._logits_buffers[-1]

    def logits(self, module, hidden: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
        """Final-normed states [R,L,D] of this Rows' part of a decoder forward -> logits [B,L,V] for its sampler
        step, written into a reused buffer (`logits_buffer`). With `computed_rows`, each computed row's head product
        is written into its place and a frozen row gets its kept ℓ̃ (what the step keeps for it anyway; it does not
        compute it again, sampling/lean.py)."""
        shape = (self.batch_size, hidden.shape[1], module.config.vocab_size)
        if REUSE_LOGITS:
            out = self.logits_buffer(shape)
        else:
            out = torch.empty(shape, dtype=torch.float32, device=hidden.device)
        if rows is None:
            return module.head(hidden, out=out)
        state = self.state
        for j, i in enumerate(rows.tolist()):
            module.head(hidden[j], out=out[i])
        for i in state.done.nonzero().squeeze(1).tolist():
            out[i].copy_(state.sc_logits[i])
        return out

    def soft(self, module, rows: torch.Tensor | None = None) -> torch.Tensor | None:
        """Self-conditioning input for the next step (None on a canvas's first step), of `rows` only if given."""
        sc = self.state.sc_logits
        if sc is None:
            return None
        if rows is not None:
            sc = sc.index_select(0, rows)
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


def _start_done(state: DenoiseState, rows: torch.Tensor | None) -> DenoiseState:
    """`state` with `rows` [B] bool (None = none) stopped before their first step: frozen, 0 steps."""
    if rows is None:
        return state
    return dataclasses.replace(state, stopped=state.stopped | rows, done=state.done | rows)


class Scheduler:
    """Rows that share decoder forwards; `forwards` counts decoder forwards, `encodes` encoder passes, `rows_computed`
    the canvas rows that went through the decoder (a done row's canvas is skipped: `Rows.computed_rows`)."""

    def __init__(self, module):
        self.module = module
        self.rows: list[Rows] = []
        self.forwards = 0
        self.encodes = 0
        self.rows_computed = 0
        self._view: tuple[list[KVCache], list[int], StackedCaches] | None = None

    def add(self, rows: Rows) -> Rows:
        if not rows.left:
            self.rows.append(rows)
        return rows

    def remove(self, rows: Rows) -> None:
        """Take rows out between ticks (cancelled, or done from its caller's point of view); frees its place."""
        if rows in self.rows:
            self.rows.remove(rows)
        if self._view is not None and any(getattr(c, "cache", c) is rows.cache for c in self._view[0]):
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
                self.rows_computed += r.batch_size
                out.append((r, r.settling.forward(self.module, r.cache, SC_CHUNK)))
        whole = [r for r in stepping if r.settling is None]
        if not whole:
            return out
        self.forwards += 1
        inputs = [r.decoder_inputs(self.module) for r in whole]  # (tokens, cache view, soft, computed rows)
        self.rows_computed += sum(i[0].shape[0] for i in inputs)
        # the head runs per Rows (`Rows.logits`) when rows are skipped or it writes into a reused buffer (eager, CPU)
        own_head = any(i[3] is not None for i in inputs) or whole[0].heads_own_logits(self.module)
        hidden = {"return_hidden": True} if own_head else {}  # (only eager modules; compiled.py has no such knob)
        if len(whole) == 1:
            tokens, cache, soft, rows = inputs[0]
            result = self.module.denoise(tokens, cache, soft=soft, **hidden)
            return out + [(whole[0], whole[0].logits(self.module, result, rows) if own_head else result)]
        soft = None
        if any(i[2] is not None for i in inputs):  # a zero signal is exactly "none" (no biases; rms-norm of 0 is 0)
            w = self.module.embed_tokens.weight
            soft = torch.cat([w.new_zeros(*i[0].shape, w.shape[1]) if i[2] is None else i[2] for i in inputs])
        tokens = torch.cat([i[0] for i in inputs])
        result = self.module.denoise(tokens, self._stacked([i[1] for i in inputs]), soft=soft, **hidden)
        parts = result.split([i[0].shape[0] for i in inputs])
        if not own_head:
            return out + list(zip(whole, parts))
        return out + [(r, r.logits(self.module, part, i[3])) for r, part, i in zip(whole, parts, inputs)]

    def _stacked(self, caches: list) -> StackedCaches:
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
