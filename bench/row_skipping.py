"""Done rows skipped vs computed: a batch whose canvases finish at different steps, with and without skipping.

    python bench/row_skipping.py                                   # bundled Sudoku model, 100 puzzles, 5 views
    python bench/row_skipping.py --puzzles heldout.jsonl --limit 200 --views 1 --batch-size 64 --threads 2

A batched canvas runs until its slowest row is done. Since 2026-11-28 a row whose canvas is done leaves the
decoder's forward and the sampler's vocabulary work (engine/scheduler.py `Rows.computed_rows`, sampling/lean.py);
before, every row was computed on every step of the batch. This runs the Sudoku solver (`dgemma.sudoku.predict`,
the code behind `dgemma sudoku eval`) on the same puzzles both ways (`scheduler.SKIP_DONE_ROWS`), alternating,
after one discarded warm-up batch of each, and reports wall time, decoder rows computed (canvas rows through the
decoder, summed over forwards), whether the answers and step counts are identical, and the solved rate. Ends
with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from _common import cpu_model, median


def main(argv=None) -> dict:
    from dgemma.argtypes import positive_int

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="model directory (default: the bundled Sudoku model)")
    p.add_argument("--puzzles", default=None, help="JSONL of puzzles (default: --count generated ones)")
    p.add_argument("--count", type=positive_int, default=100, help="puzzles to generate without --puzzles (100)")
    p.add_argument("--givens", default="30-36", help="givens of generated puzzles (30-36, the card's band)")
    p.add_argument("--limit", type=positive_int, default=None, help="use the first N puzzles of the file")
    p.add_argument("--views", type=positive_int, default=5, help="views per puzzle (5)")
    p.add_argument("--batch-size", type=positive_int, default=50,
                   help="puzzles per batch (50: 250 canvases at 5 views)")
    p.add_argument("--reps", type=positive_int, default=1, help="measured runs per side (1)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (0)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default torch's choice)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    import dgemma
    import dgemma.engine.scheduler as scheduler_module
    from dgemma.sudoku import commands
    from dgemma.sudoku.evaluate import predict, read_puzzles
    from dgemma.sudoku.puzzles import generate_puzzles, parse_givens

    engine = dgemma.load(args.model or commands.BUNDLED, quiet=True)
    if args.puzzles:
        pairs = read_puzzles(args.puzzles)[:args.limit]
    else:
        pairs = generate_puzzles(args.count, parse_givens(args.givens), seed=777)
    puzzles = [p for p, _ in pairs]

    counted = {"rows": 0, "forwards": 0}
    tick = scheduler_module.Scheduler.tick

    def counting_tick(self):  # this script's meter: the decoder rows and forwards of every scheduler tick
        rows, forwards = self.rows_computed, self.forwards
        events = tick(self)
        counted["rows"] += self.rows_computed - rows
        counted["forwards"] += self.forwards - forwards
        return events

    scheduler_module.Scheduler.tick = counting_tick

    def run(skip: bool, subset) -> dict:
        scheduler_module.SKIP_DONE_ROWS = skip
        counted.update(rows=0, forwards=0)
        started = time.perf_counter()
        out = predict(engine, subset, batch_size=args.batch_size, seed=args.seed, views=args.views)
        return {"wall_s": time.perf_counter() - started, "predictions": out, **counted}

    try:
        for skip in (True, False):  # warm-up: one batch each way
            run(skip, puzzles[:args.batch_size])
        runs = {"skip": [], "whole": []}
        for rep in range(args.reps):
            for skip in ((True, False) if rep % 2 == 0 else (False, True)):
                runs["skip" if skip else "whole"].append(run(skip, puzzles))
    finally:
        scheduler_module.SKIP_DONE_ROWS = True
        scheduler_module.Scheduler.tick = tick

    first = {side: r[0] for side, r in runs.items()}
    identical = all(r["predictions"] == first["skip"]["predictions"] for rs in runs.values() for r in rs)
    solved = sum(pred.cells == solution for pred, (_, solution) in zip(first["skip"]["predictions"], pairs))
    walls = {side: median([r["wall_s"] for r in rs]) for side, rs in runs.items()}
    steps = sum(pred.steps for pred in first["skip"]["predictions"]) / len(puzzles)
    result = {"bench": "row_skipping", "model": args.model or "bundled sudoku", "hardware": cpu_model(),
              "cpus": os.cpu_count(), "threads": torch.get_num_threads(), "dtype": "float32",
              "puzzles": len(puzzles), "views": args.views, "batch_canvases": args.batch_size * args.views,
              "reps": args.reps, "mean_steps_per_canvas": round(steps, 2),
              "wall_s": {side: round(w, 2) for side, w in walls.items()},
              "ratio": round(walls["whole"] / walls["skip"], 2),
              "decoder_rows": {side: r["rows"] for side, r in first.items()},
              "forwards": {side: r["forwards"] for side, r in first.items()},
              "identical": identical, "solved_rate": round(solved / len(puzzles), 4)}
    print(f"{len(puzzles)} puzzles x {args.views} views, batches of {result['batch_canvases']} canvases, "
          f"{steps:.1f} steps per canvas on average")
    for side in ("whole", "skip"):
        print(f"  {side:>5}: {walls[side]:8.2f} s, {first[side]['rows']:7d} decoder rows in "
              f"{first[side]['forwards']} forwards")
    print(f"  ratio {result['ratio']}x, answers and steps identical: {identical}, solved {result['solved_rate']}")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
