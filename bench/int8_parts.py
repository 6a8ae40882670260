"""Which parts of dynamic int8 pay: one fast-preset canvas with each int8 part of `--int8-dynamic` on or off.

    python bench/int8_parts.py                          # config small, 16 steps, 5 measured reps, 2 threads
    python bench/int8_parts.py --config small --steps 16 --reps 7 --threads 2

Random weights for the config (as bench/vs_reference.py builds them), one 256-token canvas at the fast preset's
knobs with fixed steps (no stop id), fast sampling. Variants, run in turn in every rep after one warm-up rep:
  float            no int8 at all;
  int8             everything `--int8-dynamic` swaps (dgemma/quant/dynamic.py);
  int8-soft-float  int8, but the self-conditioning product softmax(ℓ̃) @ E in float;
  int8-head-float  int8, but the tied head's product in float;
  int8-experts-float  int8, but the stacked experts in float (the grouped GEMM).
Prints each variant's median wall and its ratio against `int8` (above 1: that part's int8 form pays) and against
`float`; ends with one JSON line.
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

VARIANTS = ("float", "int8", "int8-soft-float", "int8-head-float", "int8-experts-float")


def configure(engine, variant: str) -> None:
    """Float, or int8 with the named part's float form put back (the int8 forms are made anew each time)."""
    from dgemma.quant.dynamic import DynamicInt8Experts

    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    module = engine.module
    engine.use_int8_dynamic(False)
    if variant == "float":
        return
    engine.use_int8_dynamic()
    if variant == "int8-soft-float":
        module.soft_product = None
    elif variant == "int8-head-float":
        module.head_product = None
    elif variant == "int8-experts-float":
        for name, m in list(module.named_modules()):
            if isinstance(m, DynamicInt8Experts):
                module.set_submodule(name, m.reference)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="small", help="a bench/configs name or a path (default small)")
    p.add_argument("--steps", type=int, default=16, help="denoising steps of the canvas (default 16, fast's budget)")
    p.add_argument("--reps", type=int, default=5, help="measured reps, after one warm-up (default 5)")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default torch's choice)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    label, raw = read_config(args.config)
    with tempfile.TemporaryDirectory(prefix="dgemma-int8-parts-") as tmp:
        ref, eng = build(raw, args.seed, torch.float32, torch.device("cpu"), Path(tmp))
    del ref
    ids = random_prompt(raw, eng.config.vocab_size, 1, args.prompt_len, args.seed)
    L = eng.config.canvas_length
    eng.use_preset("fast")
    walls = {v: [] for v in VARIANTS}
    for rep in range(args.reps + 1):  # rep 0 warms up
        for variant in VARIANTS:
            configure(eng, variant)
            start = time.perf_counter()
            eng.generate(ids.clone(), max_new_tokens=L, max_denoising_steps=args.steps, eos_token_id=None,
                         stability_threshold=None, confidence_threshold=None, sampling="fast",
                         generator=torch.Generator().manual_seed(args.seed))
            if rep:
                walls[variant].append(time.perf_counter() - start)
    eng.use_int8_dynamic(False)
    medians = {v: statistics.median(w) for v, w in walls.items()}
    rows = {v: {"wall_s": round(medians[v], 3), "vs_int8": round(medians[v] / medians["int8"], 3),
                "speed_vs_float": round(medians["float"] / medians[v], 3), "walls": [round(w, 3) for w in walls[v]]}
            for v in VARIANTS}
    print(f"{label}, {args.steps} steps, one {L}-token canvas, {hardware(torch.device('cpu'))}")
    print(f"  {'variant':<20}{'median wall':>12}{'wall / int8':>13}{'speed vs float':>16}")
    for v, r in rows.items():
        print(f"  {v:<20}{r['wall_s']:>11.3f}s{r['vs_int8']:>13.3f}{r['speed_vs_float']:>16.3f}")
    result = {"bench": "int8_parts", "config": label, "steps": args.steps, "reps": args.reps,
              "threads": torch.get_num_threads(), "hardware": hardware(torch.device("cpu")), "variants": rows}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
