"""A long prompt's prefill with the encoder's attention in query chunks (the default) or as one call per layer.

    python bench/long_prompt.py                                   # CPU: config small, fp32, prompts of 1K-8K tokens
    python bench/long_prompt.py --config small --lengths 2048,4096 --reps 3 --threads 2
    python bench/long_prompt.py --device cuda                     # GPU: 26b-a4b, bf16, prompts of 1K and 4K tokens

Random weights for the config, built on the device (bench/gpu.py's `build`), batch 1. For each prompt length,
after one warm-up of each variant, the variants run in turn `--reps` times:
  one-call  every layer's attention as one SDPA call over the [T, T] mask (`attention.QUERY_CHUNK = None`; the
            reference's way);
  chunked   queries in chunks of `attention.QUERY_CHUNK` that skip the keys they cannot see (the default);
  pieces    chunked, and the prompt prefilled in pieces of `--pieces` tokens (`Engine.prefill_chunk`): the
            working set of one piece (not the same bits: other matrix shapes)
  gqa-math  (CUDA only) one call per layer with grouped-query heads passed to SDPA as they are
            (`attention.REPEAT_HEADS_ON_CUDA = False`, the dispatch before 2026-11-28), which sends a masked call
            to SDPA's math kernel.
Per length: median prefill wall of each variant, each one's speed over `one-call`, its peak memory above the pass's
start (bench/_common.py's PeakMemory: the pass's temporaries, masks included), the peak of one attention call of a
full and of a sliding layer alone in each variant (where the [T, T] mask shows), and whether they left the same
bits as `one-call` (final hidden state and every layer's cached K/V; on the CPU chunks must, on a GPU other kernels
may round differently, so there the largest difference is printed too, and the median token's: a rounding that
flips a token's expert routing moves that token's state by O(1), so `pieces` has a large maximum and a tiny median).
Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from _common import DTYPES, PeakMemory, device_arg, hardware, read_config, sync  # noqa: E402
from gpu import build  # noqa: E402
from vs_reference import random_prompt  # noqa: E402

from dgemma.argtypes import positive_int  # noqa: E402


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", type=device_arg, default="cpu", help="cpu (default) or cuda")
    p.add_argument("--config", default=None, help="a bench/configs name or a path (default small on the CPU, "
                                                  "26b-a4b on a GPU)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default fp32 on the CPU, bf16 on a GPU")
    p.add_argument("--lengths", default=None, help="comma-separated prompt lengths in tokens (default "
                                                   "1024,2048,4096,8192 on the CPU, 1024,4096 on a GPU)")
    p.add_argument("--reps", type=positive_int, default=3, help="measured reps per variant (default 3)")
    p.add_argument("--pieces", type=positive_int, default=2048,
                   help="tokens per piece of the `pieces` variant (default 2048)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=positive_int, default=None, help="torch intra-op threads (default torch's)")
    args = p.parse_args(argv)
    gpu = args.device != "cpu"
    args.config = args.config or ("26b-a4b" if gpu else "small")
    args.dtype = DTYPES[args.dtype or ("bf16" if gpu else "fp32")]
    try:
        args.lengths = [positive_int(x) for x in (args.lengths or ("1024,4096" if gpu else
                                                                   "1024,2048,4096,8192")).split(",")]
    except (ValueError, argparse.ArgumentTypeError) as e:
        p.error(f"--lengths: {e} (give comma-separated token counts, e.g. 2048,4096)")
    if args.threads:
        torch.set_num_threads(args.threads)
    return args


@contextmanager
def variant_settings(variant: str, engine=None, piece: int | None = None):
    """The switches of `variant` for the code inside `with` (query chunks; CUDA's K/V head repeat; the engine's
    prefill pieces), each put back as it was afterwards."""
    from dgemma.model import attention

    chunk, repeat = attention.QUERY_CHUNK, attention.REPEAT_HEADS_ON_CUDA
    pieces = engine.prefill_chunk if engine is not None else None
    attention.QUERY_CHUNK = chunk if variant in ("chunked", "pieces") else None
    attention.REPEAT_HEADS_ON_CUDA = variant != "gqa-math"
    if engine is not None:
        engine.prefill_chunk = piece if variant == "pieces" else None
    try:
        yield
    finally:
        attention.QUERY_CHUNK, attention.REPEAT_HEADS_ON_CUDA = chunk, repeat
        if engine is not None:
            engine.prefill_chunk = pieces


def prefill(engine, ids: torch.Tensor, variant: str, piece: int | None = None):
    """(wall seconds, peak memory bytes above its start, final hidden state, cache) of one prefill of `ids` in
    `variant`; the cache is made before the meter starts, so the peak is the pass's own temporaries."""
    with variant_settings(variant, engine, piece):
        cache = engine.new_cache(1)
        sync(engine.device)
        with PeakMemory(engine.device) as meter:
            start = time.perf_counter()
            hidden = engine.encode(ids, cache, return_hidden=True)
            sync(engine.device)
            wall = time.perf_counter() - start
        return wall, meter.peak, hidden, cache


def attention_peak(T: int, window: int | None, variant: str, dtype, device) -> float:
    """Peak memory (MiB) above its inputs of one encoder attention call over T tokens (2 query heads of 32, one
    K/V head): the mask and the kernel's temporaries, which grow as T^2 in one call and as T x chunk in chunks."""
    from dgemma.model import attention
    from dgemma.model.encoder import EncoderMask

    g = torch.Generator(device).manual_seed(T)
    q = torch.randn(1, 2, T, 32, generator=g, device=device, dtype=dtype)
    k = torch.randn(1, 1, T, 32, generator=g, device=device, dtype=dtype)
    with variant_settings(variant), PeakMemory(device) as meter:
        attention.attend(q, k, k, attention.chunk_queries(EncoderMask(0, T, 0, window, None, device)))
        sync(device)
    return round(meter.peak / 2**20, 1)


def token_difference(a, b) -> float:
    """Median over the prompt's tokens of the largest |a - b| in each one's final hidden state: the typical token,
    where `difference` (the largest anywhere) is set by the few whose expert routing a rounding flipped."""
    return (a[0].float() - b[0].float()).abs().amax(dim=-1).median().item()


def difference(a, b) -> float:
    """Largest |a - b| over the final hidden state and every layer's cached K/V (0.0: the same bits)."""
    (h1, c1), (h2, c2) = a, b
    return max((x.float() - y.float()).abs().max().item() for x, y in zip([h1] + c1.keys + c1.values,
                                                                           [h2] + c2.keys + c2.values))


def main(argv=None) -> dict:
    args = parse(argv)
    device = torch.device(args.device)
    label, raw = read_config(args.config)
    positions = raw.get("text_config", raw).get("max_position_embeddings", 0)
    if positions and max(args.lengths) > positions:
        sys.exit(f"error: --lengths goes up to {max(args.lengths)} tokens, past the config's {positions} positions")
    engine = build(raw, args.dtype, device, args.seed)
    variants = ("one-call", "chunked", "pieces") + (("gqa-math",) if device.type == "cuda" else ())
    dtype = str(args.dtype).removeprefix("torch.")
    rows = {}
    print(f"{label}, {dtype}, batch 1, {hardware(device)}; peak memory: {PeakMemory(device).method}")
    print(f"  {'prompt':>8}" + "".join(f"{v:>12}" for v in variants) + "  speed over one-call, max |diff|")
    for T in args.lengths:
        ids = random_prompt(raw, engine.config.vocab_size, 1, T, args.seed).to(device)
        walls, peaks = {v: [] for v in variants}, {v: [] for v in variants}
        outputs = {}
        for rep in range(args.reps + 1):  # rep 0 warms up
            for variant in variants:
                wall, peak, hidden, cache = prefill(engine, ids, variant, args.pieces)
                outputs[variant] = (hidden, cache)
                if rep:
                    walls[variant].append(wall)
                    peaks[variant].append(peak)
        medians = {v: statistics.median(ws) for v, ws in walls.items()}
        row = {"wall_s": {v: round(m, 3) for v, m in medians.items()},
               "speed": {v: round(medians["one-call"] / m, 3) for v, m in medians.items() if v != "one-call"},
               "max_diff": {v: difference(outputs["one-call"], outputs[v]) for v in variants if v != "one-call"},
               "median_token_diff": {v: token_difference(outputs["one-call"], outputs[v])
                                     for v in variants if v != "one-call"},
               "walls": {v: [round(w, 3) for w in ws] for v, ws in walls.items()},
               "peak_mib": {v: round(max(ps) / 2**20, 1) for v, ps in peaks.items()},
               "attention_peak_mib": {v: {kind: attention_peak(T, w, v, args.dtype, device)
                                          for kind, w in (("full", None), ("sliding", engine.config.sliding_window))}
                                      for v in ("one-call", "chunked")}}
        row["same_bits"] = row["max_diff"]["chunked"] == 0.0
        rows[T] = row
        print(f"  {T:>8}" + "".join(f"{m:>11.3f}s" for m in medians.values()) + "  " +
              ", ".join(f"{v} {row['speed'][v]:.2f}x, {row['max_diff'][v]:.1e} (median token "
                        f"{row['median_token_diff'][v]:.1e})" for v in row["speed"]) +
              "; peak MiB " + ", ".join(f"{v} {m:.0f}" for v, m in row["peak_mib"].items()) +
              "; one attention call's peak MiB (full/sliding) " + ", ".join(
                  f"{v} {p['full']:.0f}/{p['sliding']:.0f}" for v, p in row["attention_peak_mib"].items()))
        del outputs
    out = {"bench": "long_prompt", "config": label, "dtype": dtype, "reps": args.reps, "pieces": args.pieces,
           "threads": torch.get_num_threads(), "hardware": hardware(device), "torch": torch.__version__,
           "lengths": rows}
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
