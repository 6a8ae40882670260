"""Exponential noise with the reference's exact numbers and generator consumption, several times faster on CPU.

The reference-RNG sampler must reproduce `torch.multinomial(p, 1)`, which draws q = empty_like(p).exponential_(1)
and picks argmax(p / q). torch's CPU exponential_ is a serial loop (one core, ~24 ns an entry: about 0.2 s for a
256 x 32768 canvas, 1.6 s at a 262,144 vocabulary). `exponential_(out, generator)` fills `out` with the SAME fp32
values and leaves the generator in the SAME state as `out.exponential_(1, generator=generator)`, by doing that
loop's arithmetic in bulk:

    per entry, in memory order: r = random64() = (w1 << 32) | w2, two consecutive mt19937 words;
    u = (r & (2^53 - 1)) * 2^-53 (exact in float64); value = float32(-log1p(-u))

The words come from numpy's MT19937 (the same standard generator) started from the torch generator's state
(`get_state`: its 624 state words and read position) and written back afterwards (`set_state`); numpy's
full-range uint64 draw returns exactly (w1 << 32) | w2. The rest runs as torch ops on both cores. log1p runs in
torch's vectorised float64 log1p, which may differ from the C library's (the one torch's loop calls) in the last
bits of the float64; an fp32 result can only change when that float64 lies within a few ulps of a halfway point
between two fp32 numbers, so those entries (about one in 10^8) are recomputed with `math.log1p` (the C library).

Guards: the fast path runs only for CPU generators whose state has the layout it parses, and only after a one-time
self-check in the process (a scratch generator at an odd stream position: values and resulting state both equal to
torch's own exponential_). Anything else, or any mismatch, uses torch's exponential_ itself, which stays the slow
reference (`tests/test_sampling_noise.py` compares the two bit for bit). Consecutive calls on consecutive slices
consume the stream exactly as one call on the whole would (the loop fills entries in memory order), so callers
may draw a [B*L, V] noise tensor chunk by chunk.
"""

from __future__ import annotations

import math
import struct

import numpy as np
import torch
from torch import Tensor

MT_N = 624  # mt19937 state words
STATE_BYTES = 5056  # torch's CPUGeneratorImplState on 64-bit Linux (legacy pod + cached normal sample)
SUB_ENTRIES = 1 << 18  # float64 work per sub-chunk: 2 MiB, fits the L2 cache
HALF = 1 << 28  # the low 29 bits of a float64 mantissa at an fp32 halfway point
GUARD = 16  # float64 ulps around that point treated as ambiguous

_verified: bool | None = None


def _usable(out: Tensor, generator: torch.Generator) -> bool:
    return (out.device.type == "cpu" and out.dtype == torch.float32 and out.is_contiguous()
            and generator.device.type == "cpu")


def _read_state(generator: torch.Generator) -> tuple[bytearray, np.random.Generator] | None:
    """The torch generator's state bytes and a numpy Generator positioned at the same point of the stream."""
    raw = bytearray(generator.get_state().numpy().tobytes())
    if len(raw) != STATE_BYTES:
        return None
    left, seeded, position = struct.unpack_from("<iiQ", raw, 8)
    if not seeded or not 1 <= left <= MT_N or position > MT_N:
        return None
    key = np.frombuffer(bytes(raw), dtype="<u8", count=MT_N, offset=24).astype(np.uint32)
    bits = np.random.MT19937()
    # torch regenerates the block when `left` reaches 1 (its next read index is then MT_N, or 0 right after seeding)
    bits.state = {"bit_generator": "MT19937", "state": {"key": key, "pos": MT_N if left == 1 else position}}
    return raw, np.random.Generator(bits)


def _write_state(generator: torch.Generator, raw: bytearray, numpy_gen: np.random.Generator) -> None:
    state = numpy_gen.bit_generator.state["state"]
    position = int(state["pos"])
    struct.pack_into("<iiQ", raw, 8, MT_N + 1 - position, 1, position)
    raw[24:24 + 8 * MT_N] = np.asarray(state["key"], dtype="<u8").tobytes()
    generator.set_state(torch.frombuffer(raw, dtype=torch.uint8).clone())


def _fill(out: Tensor, numpy_gen: np.random.Generator) -> None:
    """out (flat fp32) <- -log1p(-u) for the next out.numel() random64 draws of numpy_gen."""
    total = out.numel()
    size = min(total, SUB_ENTRIES)
    work, bits = torch.empty(size, dtype=torch.float64), torch.empty(size, dtype=torch.int64)
    one, zero = torch.ones((), dtype=torch.float64), torch.zeros((), dtype=torch.float64)
    below = torch.tensor(HALF - GUARD - 1, dtype=torch.int64)
    for start in range(0, total, SUB_ENTRIES):
        n = min(SUB_ENTRIES, total - start)
        words = torch.from_numpy(numpy_gen.integers(0, 1 << 64, size=n, dtype=np.uint64).view(np.int64))
        words.bitwise_and_((1 << 53) - 1)  # v: the 53 random bits, u = v * 2^-53
        # log(1 - u) == log1p(-u) up to the last float64 bits (both exact inputs: 1 - u = (2^53 - v) * 2^-53), and
        # log is the cheaper kernel; the float64 ops before it are exact, whatever their order or fusion
        y = torch.add(one, work[:n].copy_(words), alpha=-1.0 / (1 << 53), out=work[:n]).log_()
        # float32(0 - y): the loop's float32(-1.0 * log1p(-u)), +0.0 included (u = 0: log(1) = +0, 0 - 0 = +0)
        dst = torch.sub(zero, y, out=out[start:start + n])
        # the fp32 rounding is too close to call when the low 29 mantissa bits of y lie within GUARD of halfway:
        # (HALF - GUARD - 1 - bits) mod 2^29 >= 2^29 - 1 - 2 * GUARD exactly then (one max instead of a window test)
        far = torch.sub(below, y.view(torch.int64), out=bits[:n]).bitwise_and_((1 << 29) - 1)
        if int(far.amax()) >= (1 << 29) - 1 - 2 * GUARD:  # rare: the C library's log1p decides, as in torch's loop
            for i in torch.nonzero(far >= (1 << 29) - 1 - 2 * GUARD).flatten().tolist():
                dst[i] = -math.log1p(-(int(words[i]) * 2.0 ** -53))


def _check() -> bool:
    """Once per process: the fast path gives torch's values and end state on a scratch generator, else it stays off."""
    global _verified
    if _verified is None:
        _verified = False  # also if anything below raises
        try:
            ref, fast = torch.Generator().manual_seed(20261127), torch.Generator().manual_seed(20261127)
            torch.rand(3, generator=ref), torch.rand(3, generator=fast)  # an odd position in the stream
            expected = torch.empty(3001).exponential_(1, generator=ref)
            read = _read_state(fast)
            if read is not None:
                got = torch.empty(3001)
                _fill(got, read[1])
                _write_state(fast, *read)
                _verified = torch.equal(got, expected) and torch.equal(fast.get_state(), ref.get_state())
        except Exception:  # noqa: BLE001 - any surprise in torch's or numpy's internals: use torch's own loop
            _verified = False
    return _verified


def exponential_(out: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """out.exponential_(1, generator=generator), bit for bit and with the same generator consumption; faster on CPU.
    out: any fp32 tensor (the fast path needs a contiguous CPU one). generator None = torch's default generator."""
    gen = torch.default_generator if generator is None else generator
    if not _usable(out, gen) or not _check():
        return out.exponential_(1, generator=generator)
    read = _read_state(gen)
    if read is None:
        return out.exponential_(1, generator=generator)
    raw, numpy_gen = read
    _fill(out.view(-1), numpy_gen)
    _write_state(gen, raw, numpy_gen)
    return out
