"""A long prompt's prefill with the encoder's attention in query chunks (the default) or as one call per layer.

    python bench/long_prompt.py                                   # config small, prompts of 1,024-8,192 tokens
    python bench/long_prompt.py --config small --lengths 2048,4096 --reps 3 --threads 2

Random weights for the config (as bench/vs_reference.py builds them), fp32 on the CPU, batch 1. For each prompt
length, after one warm-up of each variant, the variants run in turn `--reps` times:
  one-call  every layer's attention as one SDPA call over the [T, T] mask (`attention.QUERY_CHUNK = None`; the
            reference's way);
  chunked   queries in chunks of `attention.QUERY_CHUNK` that skip the keys they cannot see (the default).
Per length: median prefill wall of each, the speed of `chunked` over `one-call`, and whether the two left the same
bits (final hidden state and every layer's cached K/V). Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from _common import hardware, read_config
from vs_reference import build, random_prompt

from dgemma.argtypes import positive_int


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="small", help="a bench/configs name or a path (default small)")
    p.add_argument("--lengths", default="1024,2048,4096,8192",
                   help="comma-separated prompt lengths in tokens (default 1024,2048,4096,8192)")
    p.add_argument("--reps", type=positive_int, default=3, help="measured reps per variant (default 3)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=positive_int, default=None, help="torch intra-op threads (default torch's)")
    args = p.parse_args(argv)
    try:
        args.lengths = [positive_int(x) for x in args.lengths.split(",")]
    except (ValueError, argparse.ArgumentTypeError) as e:
        p.error(f"--lengths: {e} (give comma-separated token counts, e.g. 2048,4096)")
    if args.threads:
        torch.set_num_threads(args.threads)
    return args


def prefill(engine, ids: torch.Tensor, chunked: bool):
    """(wall seconds, final hidden state, cache) of one prefill of `ids`."""
    from dgemma.model import attention

    shipped = attention.QUERY_CHUNK
    attention.QUERY_CHUNK = shipped if chunked else None
    try:
        cache = engine.new_cache(1)
        start = time.perf_counter()
        hidden = engine.encode(ids, cache, return_hidden=True)
        return time.perf_counter() - start, hidden, cache
    finally:
        attention.QUERY_CHUNK = shipped


def same_bits(a, b) -> bool:
    (h1, c1), (h2, c2) = a, b
    return torch.equal(h1, h2) and all(torch.equal(x, y) for x, y in zip(c1.keys + c1.values, c2.keys + c2.values))


def main(argv=None) -> dict:
    args = parse(argv)
    label, raw = read_config(args.config)
    positions = raw.get("text_config", raw).get("max_position_embeddings", 0)
    if positions and max(args.lengths) > positions:
        sys.exit(f"error: --lengths goes up to {max(args.lengths)} tokens, past the config's {positions} positions")
    with tempfile.TemporaryDirectory(prefix="dgemma-long-prompt-") as tmp:
        ref, engine = build(raw, args.seed, torch.float32, torch.device("cpu"), Path(tmp))
    del ref
    rows = {}
    print(f"{label}, fp32, batch 1, {hardware(torch.device('cpu'))}")
    print(f"  {'prompt':>8}{'one call':>12}{'chunked':>12}{'speed':>8}  same bits")
    for T in args.lengths:
        ids = random_prompt(raw, engine.config.vocab_size, 1, T, args.seed)
        walls = {"one-call": [], "chunked": []}
        outputs = {}
        for rep in range(args.reps + 1):  # rep 0 warms up
            for variant in walls:
                wall, hidden, cache = prefill(engine, ids, variant == "chunked")
                outputs[variant] = (hidden, cache)
                if rep:
                    walls[variant].append(wall)
        one, chunked = statistics.median(walls["one-call"]), statistics.median(walls["chunked"])
        rows[T] = {"one_call_s": round(one, 3), "chunked_s": round(chunked, 3), "speed": round(one / chunked, 3),
                   "same_bits": same_bits(outputs["one-call"], outputs["chunked"]),
                   "walls": {v: [round(w, 3) for w in ws] for v, ws in walls.items()}}
        r = rows[T]
        print(f"  {T:>8}{one:>11.3f}s{chunked:>11.3f}s{r['speed']:>7.2f}x  {'yes' if r['same_bits'] else 'NO'}")
        del outputs
    out = {"bench": "long_prompt", "config": label, "reps": args.reps, "threads": torch.get_num_threads(),
           "hardware": hardware(torch.device("cpu")), "torch": torch.__version__, "lengths": rows}
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
