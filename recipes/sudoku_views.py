"""How the solved rate grows with the number of symmetric views (`dgemma sudoku eval --views K`), from one set of runs.

    python recipes/sudoku_views.py PUZZLES.jsonl [--model DIR] [--views 5] [--batch-size 250] [--out views.json]

Each view (the puzzle as given, then random symmetric images of it, `dgemma.sudoku.evaluate.view_symmetries`) is
solved once over the whole file, with its own sampling seed, and its answers are mapped back. Then, for k = 1..K,
the plurality of the first k views is scored, beside the mean single-view rate and the share of puzzles that any
of the k views solved (what a rule checker picking among the views could reach; `--views` does not check rules).
`--views k` itself runs the k views in one batch, so its random stream, and its rate, differ from these by the
sampling noise.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from dgemma.engine.engine import load
from dgemma.sudoku.commands import BUNDLED
from dgemma.sudoku.evaluate import plurality, predict, read_puzzles, view_symmetries


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("puzzles")
    p.add_argument("--model", default=str(BUNDLED))
    p.add_argument("--views", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    pairs = read_puzzles(args.puzzles)
    engine = load(args.model, quiet=True)
    maps = view_symmetries(args.views, args.seed)
    answers = []  # answers[v][i]: view v's answer to puzzle i, in the puzzle's own frame
    for v, m in enumerate(maps):
        start = time.perf_counter()
        out = predict(engine, [m.apply(q) for q, _ in pairs], batch_size=args.batch_size, seed=args.seed + v)
        answers.append([m.invert(o.cells) for o in out])
        rate = sum(a == s for a, (_, s) in zip(answers[-1], pairs)) / len(pairs)
        print(f"view {v}: solved {rate:.3f} ({time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)
    n = len(pairs)
    rows = []
    for k in range(1, len(maps) + 1):
        voted = sum(plurality([answers[v][i] for v in range(k)])[0] == s for i, (_, s) in enumerate(pairs))
        anyone = sum(any(answers[v][i] == s for v in range(k)) for i, (_, s) in enumerate(pairs))
        single = sum(answers[v][i] == s for v in range(k) for i, (_, s) in enumerate(pairs)) / (k * n)
        rows.append({"views": k, "solved_rate": voted / n, "mean_single_view": round(single, 4),
                     "any_view_solved": anyone / n})
        print(f"k={k}: voted {voted / n:.3f}  single-view mean {single:.3f}  any view {anyone / n:.3f}")
    result = {"puzzles": args.puzzles, "num_puzzles": n, "model": args.model, "seed": args.seed, "rows": rows}
    print(json.dumps(result))
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump({**result, "answers": [["".join(map(str, a)) for a in view] for view in answers]}, f)
    return result


if __name__ == "__main__":
    main()
