"""Exponential noise with the reference's exact numbers and generator consumption, about twice as fast on CPU.

The reference-RNG sampler must reproduce `torch.multinomial(p, 1)`, which draws q = empty_like(p).exponential_(1)
and picks argmax(p / q). torch's CPU exponential_ is a serial loop (one core, ~24 ns an entry: about 0.2 s for a
256 x 32768 canvas, 1.6 s at a 262,144 vocabulary) that computes, entry by entry in memory order,

    r = generator.random64();  u = (r & (2^53 - 1)) * 2^-53;  value = float32(-1.0 * log1p(-u))   (C library log1p)

`exponential_(out, generator)` gives the SAME fp32 values and leaves the generator in the SAME state by splitting
that loop: the random64 words come from torch's own int64 `random_()`, whose CPU loop draws one random64 per entry
in the same order and keeps its low 63 bits (so the same generator calls, and the same 53 bits of u), and the
arithmetic runs as vectorised torch ops on every core. log(1 - u) stands for log1p(-u) (1 - u is exact; log is the
cheaper kernel); it may differ from the C library's log1p in the last bits of the float64, which can change the
fp32 result only when that float64 lies within a few ulps of a halfway point between two fp32 numbers, so those
entries (about one in 10^7) are recomputed with `math.log1p` (the same C library function the loop calls).

This rests on two details of torch's CPU kernels, so it is checked, not assumed: a one-time self-check per process
compares values and end state with torch's own exponential_ on a scratch generator, and anything unexpected (a
failed check, a CUDA generator or tensor, not fp32, not contiguous) uses torch's exponential_ itself, the slow
reference (`tests/test_sampling_noise.py` compares the two bit for bit). Calls on consecutive slices consume the
stream exactly as one call on the whole would (both loops go in memory order), so callers may draw a [B*L, V]
noise tensor chunk by chunk.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

SUB_ENTRIES = 1 << 18  # entries per pass: 2 MiB of float64 work, in the L2 cache
HALF = 1 << 28  # the low 29 bits of a float64 mantissa at an fp32 halfway point
GUARD = 16  # float64 ulps around that point treated as too close to call
TOP = 1 << 29  # the low-29-bit window

_verified: bool | None = None


def exponential_(out: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """out.exponential_(1, generator=generator), bit for bit and with the same generator consumption; faster on CPU.
    out: any fp32 tensor (the fast path needs a contiguous CPU one). generator None = torch's default generator."""
    gen = torch.default_generator if generator is None else generator
    usable = out.device.type == "cpu" and gen.device.type == "cpu" and out.dtype == torch.float32 \
        and out.is_contiguous()
    if not usable or not _check():
        return out.exponential_(1, generator=generator)
    _fill(out.view(-1), gen)
    return out


def _fill(out: Tensor, generator: torch.Generator) -> None:
    """out (flat fp32) <- the next out.numel() exponential draws of generator, SUB_ENTRIES at a time."""
    size = min(out.numel(), SUB_ENTRIES)
    words, work, bits = (torch.empty(size, dtype=dtype) for dtype in (torch.int64, torch.float64, torch.int64))
    for start in range(0, out.numel(), SUB_ENTRIES):
        n = min(SUB_ENTRIES, out.numel() - start)
        words[:n].random_(generator=generator)  # one random64 per entry, low 63 bits
        _from_words(words[:n], work[:n], bits[:n], out[start:start + n])


def _from_words(words: Tensor, work: Tensor, bits: Tensor, out: Tensor) -> None:
    """out <- float32(-log1p(-u)), u = (words & (2^53 - 1)) * 2^-53. words (int64) is masked in place; work (float64)
    and bits (int64) are scratch of the same size."""
    words.bitwise_and_((1 << 53) - 1)  # v: u = v * 2^-53
    # 1 - u = (2^53 - v) * 2^-53 exactly, so the float64 ops before the log are exact in any order or fusion
    y = torch.add(torch.ones((), dtype=torch.float64), work.copy_(words), alpha=-1.0 / (1 << 53), out=work).log_()
    # float32(0 - y): the loop's float32(-1.0 * log1p(-u)), +0.0 included (u = 0: log(1) = +0 and 0 - 0 = +0)
    torch.sub(torch.zeros((), dtype=torch.float64), y, out=out)
    # rounding too close to call when the low 29 mantissa bits of y are within GUARD of halfway, that is when
    # (HALF - GUARD - 1 - bits) mod 2^29 >= 2^29 - 1 - 2 * GUARD (one max instead of a two-sided window test)
    below = torch.tensor(HALF - GUARD - 1, dtype=torch.int64)
    far = torch.sub(below, y.view(torch.int64), out=bits).bitwise_and_(TOP - 1)
    if int(far.amax()) >= TOP - 1 - 2 * GUARD:  # rare: the C library's log1p decides, as in torch's loop
        for i in torch.nonzero(far >= TOP - 1 - 2 * GUARD).flatten().tolist():
            out[i] = -math.log1p(-(int(words[i]) * 2.0 ** -53))


def _check() -> bool:
    """Once per process: the fast path gives torch's values and end state on a scratch generator, else it stays off."""
    global _verified
    if _verified is None:
        _verified = False  # also if anything below raises
        try:
            ref, fast = torch.Generator().manual_seed(20261127), torch.Generator().manual_seed(20261127)
            torch.rand(3, generator=ref), torch.rand(3, generator=fast)  # an odd position in the stream
            expected = torch.empty(3001).exponential_(1, generator=ref)
            got = torch.empty(3001)
            _fill(got, fast)
            _verified = torch.equal(got, expected) and torch.equal(fast.get_state(), ref.get_state())
        except Exception:  # noqa: BLE001 - any surprise in torch's kernels: use torch's own loop
            _verified = False
    return _verified
