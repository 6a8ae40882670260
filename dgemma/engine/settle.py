"""Settled positions: stop computing the canvas positions that have made up their minds (an approximate speed-up).

Off by default (`settle_after=None`); the `settle` preset turns it on. A position SETTLES once its argmax has held
for `settle_after` consecutive steps and its entropy is below `settle_entropy` nats. From then on, for the rest of
the canvas:
  * its argmax, entropy and confidence are final (its token is its argmax);
  * the decoder no longer computes it: each step runs only the unsettled positions of the canvas, whose queries
    attend to the context and to all L canvas keys/values, a settled position's being the ones it had when last
    computed (kept in per-layer canvas buffers, model/decoder.py `canvas_kv_buffers`);
  * its logits row, self-conditioning row and sampler row are not computed either.
So a step's cost falls with the share of settled positions: the layers, the head, the self-conditioning product
and the sampler all run on M < L rows. The exact algorithm recomputes every position each step, where a
settled position's argmax could still flip and the others see its current keys/values; both differences make
this approximate, and its quality cost is measured (README "Speed presets", `python bench/presets.py`).

The sampler step is the ordinary one (`step_lean`) over the M computed positions (a sub-canvas); this module
merges its results into the whole canvas's state and applies the stop rule there (the whole canvas's argmax and
mean entropy, settled positions included). Acceptance (the entropy bound) runs over the computed positions: the
settled ones, all below `settle_entropy`, would have been accepted anyway (their token is their argmax).
A canvas whose every position has settled stops (nothing is left to compute).

Batches: rows settle independently; each step computes M = the most unsettled positions of any row, and a row with
fewer fills up with fillers (index L: they compute on nothing, write the spare slot, and their results are
dropped: their logits are made uniform, so their entropy sorts last and never changes what the others accept).
Rows' random draws then depend on M, as the reference's depend on the batch. The scheduler runs settling rows in
forwards of their own (engine/scheduler.py). Plans (JSON, infill, edits) clamp positions, which this does not
combine with: their canvases run every position every step.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from ..sampling import DenoiseState, StepConfig, init_state, step_lean
from ..sampling.sampler import stop_and_count


class Settling:
    """One Rows' settled-position bookkeeping for one canvas. `state` is the whole canvas's DenoiseState [B,L]
    (its sc_logits stays None; the computed positions' self-conditioning logits live in the sub-canvas)."""

    def __init__(self, module, state: DenoiseState, cfg: StepConfig, after: int, max_entropy: float):
        from ..model.decoder import canvas_kv_buffers
        num_rows, length = state.tokens.shape
        self.cfg, self.after, self.max_entropy = cfg, after, max_entropy
        self.sub_cfg = dataclasses.replace(cfg, stop=None)  # the stop rule runs on the whole canvas (here)
        self.state = state
        dev = state.tokens.device
        self.index = torch.arange(length, device=dev).expand(num_rows, length).clone()  # [B,M] computed positions
        self.sub = init_state(state.tokens.clone(), self.sub_cfg)
        self.sub = dataclasses.replace(self.sub, stopped=state.stopped, done=state.done)
        self.held = torch.zeros(num_rows, length, dtype=torch.long, device=dev)  # steps the argmax has held
        self.settled = torch.zeros(num_rows, length, dtype=torch.bool, device=dev)
        self.kv = canvas_kv_buffers(module, num_rows, length, dev)

    @property
    def length(self) -> int:
        return self.settled.shape[1]

    def forward(self, module, cache, sc_chunk: int) -> Tensor:
        """The decoder over the computed positions -> logits [B,M,V] (fillers' rows uniform). Runs the module's
        eager forward (a compiled step is shaped for whole canvases)."""
        cls = type(module)
        sc = self.sub.sc_logits
        soft = None if sc is None else cls.soft_embedding(module, sc, chunk=sc_chunk)
        logits = cls.denoise(module, self.sub.tokens, cache, soft=soft, positions=self.index, canvas_kv=self.kv)
        return logits.masked_fill_((self.index == self.length)[:, :, None], 0.0)

    def step(self, logits: Tensor, generator: torch.Generator | None) -> DenoiseState:
        """The sampler step on the computed positions, merged into the whole canvas; settles, stops, shrinks."""
        state, index, L = self.state, self.index, self.length
        sub = step_lean(logits, self.sub, self.sub_cfg, generator)
        safe = index.clamp(max=L - 1)  # fillers (index L) read position L-1, under a False `live`
        # computed positions whose results count: not fillers, not settled, not in rows that are done
        live = (index < L) & ~state.done[:, None] & ~self.settled.gather(1, safe)

        def merge(whole: Tensor, part: Tensor) -> Tensor:  # whole [B,L] <- part [B,M] at `index` where live
            wide = torch.cat([whole, whole[:, :1]], dim=1)  # + the spare column L that fillers write
            return wide.scatter(1, index, torch.where(live, part, wide.gather(1, index)))[:, :L]

        computed = merge(torch.zeros_like(self.settled), torch.ones_like(live))
        argmax = merge(state.argmax, sub.argmax)
        entropy, confidence = merge(state.entropy, sub.entropy), merge(state.confidence, sub.confidence)
        accepted, tokens = merge(state.accepted, sub.accepted), merge(state.tokens, sub.tokens)
        # consecutive steps a computed position's argmax held (none before a canvas's second step)
        repeated = (argmax == state.argmax) & (state.num_steps_taken[:, None] > 0)
        held = torch.where(computed, torch.where(repeated, self.held + 1, 0), self.held)
        settled = self.settled | (computed & (held >= self.after) & (entropy < self.max_entropy))
        tokens = torch.where(settled, argmax, tokens)

        # the stop rule on the whole canvas; a canvas with every position settled has nothing left to compute
        stopped, history, num_steps_taken, done = stop_and_count(state, self.cfg, argmax, entropy,
                                                                 state.stopped | settled.all(dim=-1))
        self.state = DenoiseState(tokens=tokens, argmax=argmax, sc_logits=None, history=history, stopped=stopped,
                                  done=done, num_steps_taken=num_steps_taken, entropy=entropy, confidence=confidence,
                                  accepted=accepted)
        self.held, self.settled = held, settled
        # the sub-canvas: settled positions (and fillers) read their argmax; rows that are done compute nothing
        sub_tokens = torch.where(settled.gather(1, safe), argmax.gather(1, safe), sub.tokens)
        self.sub = dataclasses.replace(sub, tokens=sub_tokens, stopped=stopped, done=done,
                                       num_steps_taken=num_steps_taken)
        self._shrink()
        return self.state

    def _shrink(self) -> None:
        """Make newly settled positions fillers and drop columns no row needs: M becomes the most positions any row
        has left to compute (a settled position is never computed again, whatever the batch)."""
        index, L = self.index, self.length
        todo = (~self.settled & ~self.state.done[:, None]).gather(1, index.clamp(max=L - 1)) & (index < L)
        if bool((todo == (index < L)).all()):  # one host sync per step: nothing newly settled or done
            return
        keep = max(1, int(todo.sum(dim=1).max()))  # a canvas with nothing left is done and about to commit
        order = torch.argsort((~todo).to(torch.int8), dim=1, stable=True)[:, :keep]  # still-to-compute first
        self.index = torch.where(todo.gather(1, order), index.gather(1, order), L)  # the rest become fillers
        sub = self.sub

        def pick(t: Tensor) -> Tensor:
            return t.gather(1, order)

        sc = sub.sc_logits.gather(1, order[:, :, None].expand(-1, -1, sub.sc_logits.shape[-1]))
        self.sub = dataclasses.replace(sub, tokens=pick(sub.tokens), argmax=pick(sub.argmax), sc_logits=sc,
                                       entropy=pick(sub.entropy), confidence=pick(sub.confidence),
                                       accepted=pick(sub.accepted))
