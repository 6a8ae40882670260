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

import statistics
import sys
import time


import _canvas

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
        module.head_logits = None
    elif variant == "int8-experts-float":
        for name, m in list(module.named_modules()):
            if isinstance(m, DynamicInt8Experts):
                module.set_submodule(name, m.reference)


def main(argv=None) -> dict:
    args = _canvas.parse(__doc__.splitlines()[0], argv)
    label, eng, ids = _canvas.setup(args)
    L = eng.config.canvas_length
    walls = {v: [] for v in VARIANTS}
    for rep in range(args.reps + 1):  # rep 0 warms up
        for variant in VARIANTS:
            configure(eng, variant)
            start = time.perf_counter()
            _canvas.run(eng, ids, args)
            if rep:
                walls[variant].append(time.perf_counter() - start)
    eng.use_int8_dynamic(False)
    medians = {v: statistics.median(w) for v, w in walls.items()}
    rows = {v: {"wall_s": round(medians[v], 3), "vs_int8": round(medians[v] / medians["int8"], 3),
                "speed_vs_float": round(medians["float"] / medians[v], 3), "walls": [round(w, 3) for w in walls[v]]}
            for v in VARIANTS}
    print(_canvas.title(label, args, L))
    print(f"  {'variant':<20}{'median wall':>12}{'wall / int8':>13}{'speed vs float':>16}")
    for v, r in rows.items():
        print(f"  {v:<20}{r['wall_s']:>11.3f}s{r['vs_int8']:>13.3f}{r['speed_vs_float']:>16.3f}")
    return _canvas.result("int8_parts", label, args, rows)


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
