"""Memory-lean denoising step: the same math as `sampler.step`, over the vocabulary in chunks of canvas positions.

`step` holds several fp32 [B,L,V] tensors at once (ℓ̃, its softmax, the CDF, the entropy's log-probs, softmax and
product, the self-conditioning merge): about 256 MiB each per canvas row at V = 262,144, L = 256. `step_lean`
produces the SAME DenoiseState, bit for bit, in both sampling modes (cfg.sample `sample_inverse_cdf` or
`sample_reference`) with

    peak extra memory ~ one fp32 [chunk, V] work buffer (two in reference-RNG mode: the noise) + one [chunk, block]
    scratch + O(B*L) per-position outputs

besides the input logits, which it overwrites with ℓ̃ = ℓ / T and returns as `sc_logits` (no second [B,L,V] copy).

How the bits stay equal. Every vocabulary-sized quantity in `step` is a per-position (per-row of the flattened
[B*L, V]) function computed by the same kernels here, on row slices instead of the whole tensor:
  * elementwise ops (÷T, x - max, x - logsumexp, clamp, ×) are exactly rounded or vectorised per element, so the
    result does not depend on which rows share a call; the in-place forms compute the same values as out-of-place;
  * reductions over the last dim (max, argmax, softmax, sum, cumsum, logsumexp) reduce each row on its own; the one
    exception is a reduction whose output is a SINGLE element, which PyTorch CPU splits across threads (measured:
    a one-row sum or entropy at V >= 32768 differs in the last bits from the same row inside a batch), so no
    chunk ever holds exactly one position unless the whole canvas is one position (then `step` does the same);
  * the fast sampler's uniform numbers are drawn for all B*L positions up front with the exact call
    `sample_inverse_cdf` makes (torch.rand(B, L, 1)); nothing else draws before it, and the renoise randint
    comes after, as in `step`. So chunking never changes the random stream.
  * the reference-RNG primitive (`sample_reference`) is one torch.multinomial(p, 1) over all [B*L, V]
    probabilities. For one sample torch draws it as argmax(p / q) with q = empty_like(p).exponential_(1), after
    checks that draw nothing (no inf/NaN/negative entries, no all-zero row). That exponential_ fills q entry by
    entry in memory order, so drawing q chunk by chunk (each chunk's rows, in order, into one reused [chunk, V]
    buffer) consumes the generator exactly as the one big call does (RNG 1: the same numbers); `noise.exponential_`
    draws them bit for bit as torch's serial loop would, about twice as fast. Per chunk the softmax is then divided
    by its rows of q and the argmax taken: the same elementwise division and per-row argmax, without multinomial's
    extra passes, its [B*L, V] noise tensor and the step's other full-size temporaries.
  * the entropy: reference-RNG mode replicates `token_entropy`'s op sequence (the reference's values); fast mode
    takes `entropy_from_probs` (the same quantity from the softmax it has computed, in about 2 passes instead of
    10), whose fixed column blocks and per-row sums `step` uses too, so chunking does not change it either;
  * argmaxes: ℓ̃'s comes from torch.max(dim), which returns argmax's index (the first maximal one, or the first NaN)
    and amax's values (reused by the logsumexp) in one pass; p / q's is taken on the int32 view of those finite,
    non-negative floats, which order as their bit patterns do (see `_argmax_nonnegative`). Both are several times
    faster than torch.argmax on fp32 rows on CPU (tests/test_sampler_lean.py checks ties, zeros, inf and NaN).
Any other cfg.sample falls back to `step`.

Frozen rows. A done row's step results are all discarded (`_advance` keeps its tokens, argmax, entropy and
confidence, the merge its ℓ̃), so on the CPU a chunk that holds only frozen rows' positions is not computed: it
gets the kept values and the old ℓ̃ (`_keep_frozen`), and in reference-RNG mode its noise is still drawn. With the
engine's canvas loop skipping done rows in the decoder too (engine/scheduler.py `Rows.computed_rows`), a finished
row costs a batch no vocabulary work and no forward until its canvas is committed.

Why overwriting the logits in place is safe: ℓ is only ever used as ℓ / T (§6.2) and the engine's canvas loop
passes the decoder's fresh output straight into the step and never reads it again. A caller that needs the raw
logits afterwards passes inplace=False (one [B,L,V] copy) or a clone. The returned sc_logits IS that buffer, which
the next step does not touch (it writes into the next step's own logits), so states yielded earlier stay valid.
(Logits made under torch.inference_mode can only be overwritten inside it, where the canvas loop runs its steps.)

Verified on CPU (torch 2.13, MKL, AVX-512, 1 and 2 threads) by tests/test_sampler_lean.py, which also guards the
replicated logsumexp sequence against a torch upgrade; not yet verified on CUDA.
"""

from __future__ import annotations

import itertools

import torch
from torch import Tensor

from . import constraints as con, noise
from .sampler import DenoiseState, StepConfig, _advance, _check_logits, _temperature, device_kind, \
    entropy_columns, entropy_from_probs, sample_inverse_cdf, sample_reference, step

INVALID_PROBS = "probability tensor contains either `inf`, `nan` or element < 0"  # torch.multinomial's words

# Work buffer sizes by device type. CPU: small enough to stay in cache (16 MiB = 16 positions at V = 262,144, 128 at
# V = 32,768). An accelerator: a chunk costs ~40 kernel launches whatever its size, so 16-position chunks made the
# step launch-bound (26B-A4B on an H200: ~12 ms a canvas row per step outside the forward, bench/gpu.py 2026-11-27);
# 128 MiB = 128 positions at V = 262,144, two chunks a canvas row.
CHUNK_BYTES = {"cpu": 16 << 20, "accelerator": 128 << 20}
BLOCK_BYTES = {"cpu": 2 << 20, "accelerator": 32 << 20}  # scratch for the entropy's clamped log-probs, per column block


def _budget(table: dict[str, int], device: torch.device | str | None) -> int:
    return table[device_kind(device)]


def work_bytes(device: torch.device | str | None = None) -> int:
    """Bytes of the step's shared work buffer + block scratch on `device` (None = CPU); for the memory planner."""
    return _budget(CHUNK_BYTES, device) + _budget(BLOCK_BYTES, device)


def default_chunk(vocab: int, device: torch.device | str | None = None) -> int:
    """Positions per chunk so that one fp32 [chunk, V] buffer is about the device's CHUNK_BYTES (at least 2)."""
    return max(2, _budget(CHUNK_BYTES, device) // (4 * vocab))


def _chunks(num_positions: int, chunk: int) -> list[tuple[int, int]]:
    """[start, end) ranges of `chunk` positions; a 1-position remainder joins the previous chunk (see module doc)."""
    bounds = list(range(0, num_positions, chunk)) + [num_positions]
    if len(bounds) > 2 and bounds[-1] - bounds[-2] == 1:
        del bounds[-2]
    return list(itertools.pairwise(bounds))


def _argmax_nonnegative(ratio: Tensor, no_zero_noise: bool, out: Tensor) -> None:
    """out <- argmax(ratio, -1) for ratio = p / q, p a softmax (finite, >= +0) and q > 0 noise: then every entry is a
    finite float >= +0, whose bit pattern as an int32 orders exactly as the float does (equal floats, equal ints), so
    the int32 argmax (several times faster on CPU) picks the same first maximal index. A zero in q (u = 0 exactly,
    odds 2^-53 an entry) can make 0/0 = NaN, which argmax treats as the maximum: then the float argmax runs."""
    torch.argmax(ratio.view(torch.int32) if no_zero_noise else ratio, dim=-1, out=out)


def _keep_frozen(state: DenoiseState, start: int, end: int, x: Tensor, old_sc: Tensor, proposal: Tensor,
                 argmax: Tensor, entropy: Tensor, confidence: Tensor, noise_buffer: Tensor | None,
                 generator: torch.Generator | None) -> None:
    """Positions [start, end) of the flattened canvas, all in frozen (done) rows, without their vocabulary work:
    whatever a step computes there is discarded (`_advance` keeps a frozen row's tokens, argmax, entropy and
    confidence; the merge keeps its ℓ̃), so the outputs get the kept values straight away and ℓ̃ its old rows.
    In reference-RNG mode the chunk's exponential noise is still drawn: the reference draws it for every row."""
    if noise_buffer is not None:
        noise.exponential_(noise_buffer, generator)
    x.copy_(old_sc[start:end])
    for out, kept in ((proposal, state.tokens), (argmax, state.argmax), (entropy, state.entropy),
                      (confidence, state.confidence)):
        out[start:end] = kept.reshape(-1)[start:end]


@torch.no_grad()
def step_lean(logits: Tensor, state: DenoiseState, cfg: StepConfig, generator: torch.Generator | None = None,
              chunk: int | None = None, inplace: bool = True,
              constraints: con.CanvasConstraints | None = None) -> DenoiseState:
    """`step` with the vocabulary work done `chunk` positions at a time; the same DenoiseState bit for bit.

    logits [B,L,V] fp32, OVERWRITTEN with ℓ̃ (inplace=True, the default) and returned as the new state's sc_logits
    (a non-contiguous input is copied first). chunk: positions of the flattened B*L canvas per chunk, None =
    `default_chunk(V, logits.device)`; 1 is taken as 2. Fast mode (`sample_inverse_cdf`) and reference-RNG mode
    (`sample_reference`, which adds a [chunk, V] buffer of exponential noise, see the module docstring) are chunked;
    any other sampler runs `step` unchanged (logits are then left untouched).
    constraints: as for `step`; the class masks are applied chunk by chunk (elementwise, so the same bits)."""
    reference_rng = cfg.sample is sample_reference
    if cfg.sample is not sample_inverse_cdf and not reference_rng:
        return step(logits, state, cfg, generator, constraints)
    _check_logits(logits, state)
    num_rows, length, vocab = logits.shape
    if constraints is not None:
        constraints.check((num_rows, length), vocab)
    if chunk is None:
        chunk = default_chunk(vocab, logits.device)
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk must be an int >= 1, got {chunk!r}")
    chunk = max(chunk, 2)  # a 1-position chunk would be a single-output reduction (see the module docstring)
    if not inplace or not logits.is_contiguous():
        logits = logits.contiguous() if inplace else logits.clone(memory_format=torch.contiguous_format)
    n_pos, dev = num_rows * length, logits.device
    x_all = logits.view(n_pos, vocab)  # becomes ℓ̃, chunk by chunk
    old_sc = None if state.sc_logits is None else state.sc_logits.reshape(n_pos, vocab)  # a view when contiguous
    # per position: temperature, frozen flag, and RNG draw 1 exactly as the sampler makes it: one uniform number
    # per position (sample_inverse_cdf), or multinomial's exponential noise for every entry (sample_reference)
    temp = _temperature(state, cfg).repeat_interleave(length)[:, None]
    frozen = state.done.repeat_interleave(length)[:, None]
    if not reference_rng:
        u = torch.rand(num_rows, length, 1, generator=generator, device=dev).view(n_pos, 1)

    proposal = torch.empty(n_pos, dtype=torch.long, device=dev)
    argmax = torch.empty(n_pos, dtype=torch.long, device=dev)
    entropy = torch.empty(n_pos, dtype=torch.float32, device=dev)
    confidence = torch.empty(n_pos, dtype=torch.float32, device=dev)
    ranges = _chunks(n_pos, chunk)
    rows = max(end - start for start, end in ranges)
    work_all = torch.empty(rows, vocab, dtype=torch.float32, device=dev)  # the one [chunk, V] buffer
    if reference_rng:  # the reference's entropy sequence, its clamped log-probs a column block at a time
        block = max(1, min(vocab, _budget(BLOCK_BYTES, dev) // (4 * rows)))
    else:  # `entropy_from_probs`, in its own fixed blocks
        block = min(vocab, entropy_columns(dev))
    scratch_all = torch.empty(rows, block, dtype=torch.float32, device=dev)
    noise_all = torch.empty(rows, vocab, dtype=torch.float32, device=dev) if reference_rng else None
    maxes_all = torch.empty(rows, 1, dtype=torch.float32, device=dev)
    fmin = torch.finfo(torch.float32).min
    # frozen rows keep their previous ℓ̃ (step's torch.where); with none frozen that pass is skipped (a free check on
    # the CPU; elsewhere the where always runs, so that no step waits on the device)
    merge = old_sc is not None and (dev.type != "cpu" or bool(state.done.any()))
    # on the CPU a chunk of frozen rows only is not computed at all (see `_keep_frozen`); elsewhere that would
    # need a host read of `done`
    frozen_rows = state.done.tolist() if merge and dev.type == "cpu" else None
    for start, end in ranges:
        n = end - start
        x, work, scratch = x_all[start:end], work_all[:n], scratch_all[:n]
        if frozen_rows is not None and all(frozen_rows[start // length:(end - 1) // length + 1]):
            _keep_frozen(state, start, end, x, old_sc, proposal, argmax, entropy, confidence,
                         noise_all[:n] if reference_rng else None, generator)
            continue
        con.mask_rows(x, constraints, start, end)  # -inf outside the allowed class, before ÷T as in `step`
        x.div_(temp[start:end])  # ℓ̃ = ℓ / T in place: the same IEEE division as `logits / T`
        # argmax and row max in one reduction: torch.max(dim) also returns the FIRST maximal index (first NaN, if any)
        # as argmax does, at a third of its cost; its values are amax's (the logsumexp below reuses them)
        maxes = maxes_all[:n]
        torch.max(x, dim=-1, keepdim=True, out=(maxes, argmax[start:end, None]))
        torch.ops.aten._softmax.out(x, -1, False, out=work)  # p = softmax(ℓ̃); confidence = max p
        torch.amax(work, dim=-1, out=confidence[start:end])
        if reference_rng:  # multinomial's draw: id = argmax(p / q), q this chunk's rows of the exponential noise
            q = noise.exponential_(noise_all[:n], generator)
            _argmax_nonnegative(torch.div(work, q, out=q), bool(q.amin() > 0), proposal[start:end])
            # token_entropy(ℓ̃), op for op: lse = logsumexp(ℓ̃) (ATen's own sequence: amax, inf -> 0, sub, exp, sum,
            # log, add), log_p = ℓ̃ - lse, p = softmax(log_p), H = -sum(clamp(log_p) * p). log_p is recomputed per
            # column block into the scratch instead of being kept whole.
            maxes.masked_fill_(maxes.abs() == float("inf"), 0)
            lse = torch.sub(x, maxes, out=work).exp_().sum(dim=-1, keepdim=True).log_().add_(maxes)
            torch.sub(x, lse, out=work)
            torch.ops.aten._softmax.out(work, -1, False, out=work)  # in place: a row's max is read before any write
            for c0 in range(0, vocab, block):
                c1 = min(c0 + block, vocab)
                log_p = torch.sub(x[:, c0:c1], lse, out=scratch[:, : c1 - c0]).clamp_(min=fmin)
                work[:, c0:c1].mul_(log_p)  # p * log_p == log_p * p (IEEE multiplication commutes)
            torch.sum(work, dim=-1, out=entropy[start:end]).neg_()
        else:  # entropy from p (`entropy_from_probs`), then inverse CDF: cdf = cumsum p (in place); id = first
            # index with cdf > u * total
            entropy[start:end] = entropy_from_probs(x, work, maxes, confidence[start:end], scratch)
            work.cumsum_(dim=-1)
            ids = torch.searchsorted(work, u[start:end] * work[:, -1:], right=True)
            proposal[start:end] = ids.squeeze(-1).clamp_(max=vocab - 1)
        if merge:  # written into the buffer
            torch.where(frozen[start:end], old_sc[start:end], x, out=x)
    if reference_rng:
        if not bool(torch.isfinite(confidence).all()):  # a NaN/inf anywhere in a row makes its max non-finite
            raise RuntimeError(INVALID_PROBS)
    view = (num_rows, length)
    return _advance(state, cfg, generator, vocab, proposal.view(view), argmax.view(view), entropy.view(view),
                    confidence.view(view), logits, constraints)
