"""Reused step-logits buffers on the CPU: one canvas with the step's logits in new memory or in reused buffers.

    python bench/logits_buffers.py                          # config small, 16 steps, 5 measured reps, 2 threads
    python bench/logits_buffers.py --config small --steps 16 --reps 7 --threads 2

Random weights for the config (as bench/vs_reference.py builds them), one 256-token canvas at the fast preset's
knobs with fixed steps (no stop id), fast sampling, batch 1. Variants, run in turn in every rep after a warm-up rep:
  float-new     float; each step's logits in a new tensor (as before 2026-11-28: `scheduler.REUSE_LOGITS = False`);
  float-reused  float; the logits in the Rows' two alternating buffers (`Rows.logits_buffer`, the default);
  int8-new      `--int8-dynamic`, logits in a new tensor and the int8 head one call over the vocabulary (before
                2026-11-28, its product came back in a second new tensor);
  int8-reused   `--int8-dynamic` as shipped: reused buffers, the int8 head in blocks of `HEAD_COLUMNS` columns.
Per variant: median wall, minor page faults and kernel (system) CPU seconds per canvas (getrusage), and the speed
of `reused` over `new`. Ends with one JSON line.
"""

from __future__ import annotations

import resource
import statistics
import sys
import time


import _canvas

VARIANTS = ("float-new", "float-reused", "int8-new", "int8-reused")


def configure(engine, variant: str) -> None:
    """Set the loop's buffer reuse and the int8 head's blocks for `variant` (int8 forms are made anew each time)."""
    from dgemma.engine import scheduler
    from dgemma.quant import dynamic

    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    kind, how = variant.split("-")
    scheduler.REUSE_LOGITS = how == "reused"
    engine.use_int8_dynamic(False)
    if kind == "int8":
        shipped = dynamic.HEAD_COLUMNS
        dynamic.HEAD_COLUMNS = shipped if how == "reused" else engine.config.vocab_size
        try:
            engine.use_int8_dynamic()
        finally:
            dynamic.HEAD_COLUMNS = shipped


def main(argv=None) -> dict:
    args = _canvas.parse(__doc__.splitlines()[0], argv)
    from dgemma.engine import scheduler

    label, eng, ids = _canvas.setup(args)
    L = eng.config.canvas_length
    runs = {v: [] for v in VARIANTS}
    try:
        for rep in range(args.reps + 1):  # rep 0 warms up
            for variant in VARIANTS:
                configure(eng, variant)
                before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
                _canvas.run(eng, ids, args)
                wall, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF)
                if rep:
                    runs[variant].append((wall, after.ru_minflt - before.ru_minflt, after.ru_stime - before.ru_stime))
    finally:
        scheduler.REUSE_LOGITS = True
        eng.use_int8_dynamic(False)
    rows = {}
    for v, rs in runs.items():
        rows[v] = {"wall_s": round(statistics.median(r[0] for r in rs), 3),
                   "page_faults": int(statistics.median(r[1] for r in rs)),
                   "system_s": round(statistics.median(r[2] for r in rs), 3), "walls": [round(r[0], 3) for r in rs]}
    for kind in ("float", "int8"):
        new, reused = rows[f"{kind}-new"], rows[f"{kind}-reused"]
        reused["speed_vs_new"] = round(new["wall_s"] / reused["wall_s"], 3)
    print(_canvas.title(label, args, L))
    print(f"  {'variant':<14}{'median wall':>12}{'page faults':>13}{'system s':>10}{'speed vs new':>14}")
    for v, r in rows.items():
        print(f"  {v:<14}{r['wall_s']:>11.3f}s{r['page_faults']:>13}{r['system_s']:>10.3f}"
              f"{r.get('speed_vs_new', ''):>14}")
    return _canvas.result("logits_buffers", label, args, rows)


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
