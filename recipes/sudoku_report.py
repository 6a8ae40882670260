"""Score a Sudoku model under every decoding setting the model card reports, in one process (one model load).

    python recipes/sudoku_report.py MODEL HELDOUT.jsonl [BANDS.jsonl] [--device cuda] [--out report.json]

HELDOUT: the target band (30-36 givens, e.g. `dgemma sudoku generate --count 200 --givens 30-36 --seed 777`).
BANDS: optional puzzles of other difficulty levels, scored with the plain, the clamped and the 5-view settings.
Prints one JSON object per setting as it finishes, then writes all of them to --out. Each setting is what
`dgemma sudoku eval` runs with the same flags (the same `dgemma.sudoku.evaluate.evaluate` call).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from dgemma.engine.engine import load
from dgemma.sudoku.evaluate import evaluate, read_puzzles

SETTINGS = [  # (name, evaluate() keyword arguments, the equivalent `dgemma sudoku eval` flags)
    ("diffusion", {}, ""),
    ("diffusion_clamped", {"clamp_givens": True}, "--clamp-givens"),
    ("diffusion_5_views", {"views": 5}, "--views 5"),
    ("diffusion_clamped_96_steps", {"clamp_givens": True, "steps": 96}, "--clamp-givens --steps 96"),
    ("diffusion_clamped_16_steps", {"clamp_givens": True, "steps": 16}, "--clamp-givens --steps 16"),
    ("autoregressive", {"baseline": "ar"}, "--baseline ar"),
]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("heldout")
    p.add_argument("bands", nargs="?")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, default=200)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    engine = load(args.model, device=args.device, quiet=True)
    report = {"model": args.model, "device": args.device, "results": []}
    jobs = [(args.heldout, name, kw, flags) for name, kw, flags in SETTINGS]
    if args.bands:
        jobs += [(args.bands, name, kw, flags) for name, kw, flags in SETTINGS[:3]]
    for path, name, kw, flags in jobs:
        start = time.perf_counter()
        result = evaluate(engine, read_puzzles(path), batch_size=args.batch_size, **kw)
        row = {"puzzles": path, "setting": name, "flags": flags, "wall_s": round(time.perf_counter() - start, 2),
               **result}
        report["results"].append(row)
        print(json.dumps(row), flush=True)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
