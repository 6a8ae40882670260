"""Presets end to end on the trained Sudoku model, one user at a time: the reference's generate() against ours on
the same puzzles, speed and puzzles solved measured in one run (issue 5, item 4).

    python bench/sudoku_speed.py                                   # 100 held-out puzzles, the bundled model
    python bench/sudoku_speed.py --puzzles FILE.jsonl --limit 200 --presets exact,confident,settle --int8

Where `bench/presets.py` times random weights (which never stop early, so every variant runs its full budget)
and scales to Sudoku's step counts, this runs the real thing: for each puzzle, batch 1, the reference
(transformers' DiffusionGemmaForBlockDiffusion.generate with the checkpoint's generation_config.json: up to 48
steps, its stop rule) and each variant (ours, its preset's settings, fast sampling) generate the answer canvas,
one after another (alternating, so drifts of the machine's speed hit every side alike). Both commit one canvas
per puzzle, so committed tokens per second are canvases * L / wall and ratio = reference wall / variant wall.
Every side is scored (solved grids, cell accuracy over blanks, steps per canvas); the reference's own score is
the exact algorithm's under another random stream (a floor for how much two exact runs differ).
The Sudoku model is small (4.9M parameters): per-step overheads weigh more here than on the 26B model, on both
sides. Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import dgemma  # noqa: E402
from dgemma.argtypes import positive_int  # noqa: E402
from dgemma.engine.presets import PRESETS  # noqa: E402
from dgemma.sudoku.commands import BUNDLED  # noqa: E402
from dgemma.sudoku.evaluate import cell_accuracy, read_puzzles  # noqa: E402
from dgemma.sudoku.format import ANSWER_TOKENS, answer_cells, check_tokenizer, prompt_ids  # noqa: E402
from dgemma.sudoku.puzzles import generate_puzzles  # noqa: E402


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(BUNDLED), help="Sudoku model directory (default: the bundled one)")
    ap.add_argument("--puzzles", default=None, help="JSONL of {puzzle, solution}; default: --limit generated puzzles "
                                                    "with 30-36 givens, seed 777 (the model card's held-out set)")
    ap.add_argument("--limit", type=positive_int, default=100, help="puzzles to run (default 100)")
    ap.add_argument("--presets", default=",".join(PRESETS), help="comma-separated presets (default: all)")
    ap.add_argument("--int8", action="store_true", help="also run each preset with --int8-dynamic")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    names = [n for n in args.presets.split(",") if n]
    unknown = [n for n in names if n not in PRESETS]
    if unknown:
        raise SystemExit(f"--presets: unknown {unknown}; choose from {list(PRESETS)}")
    from transformers import DiffusionGemmaForBlockDiffusion
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()

    if args.puzzles:
        pairs = read_puzzles(args.puzzles)[: args.limit]
    else:
        pairs = [(p, s) for p, s in generate_puzzles(args.limit, givens=(30, 36), seed=777)]
    ref = DiffusionGemmaForBlockDiffusion.from_pretrained(args.model).eval()
    eng = dgemma.load(args.model, quiet=True)
    table = check_tokenizer(eng.tokenizer)
    L = eng.config.canvas_length
    sides = ["reference"] + [f"{n}{'+int8' if q else ''}" for n in names for q in ((False, True) if args.int8
                                                                                     else (False,))]
    walls = {s: [] for s in sides}
    scores = {s: {"solved": 0, "correct": 0, "blanks": 0, "steps": []} for s in sides}

    def run(side: str, ids: torch.Tensor, i: int):
        if side == "reference":
            torch.manual_seed(args.seed + i)
            out = ref.generate(ids, max_new_tokens=ANSWER_TOKENS, return_dict_in_generate=True)
            return out.sequences[0, ids.shape[1]:], None
        preset, int8 = side.removesuffix("+int8"), side.endswith("+int8")
        eng.use_preset(preset).use_int8_dynamic(int8)
        out = eng.generate(ids, max_new_tokens=ANSWER_TOKENS, sampling="fast", return_dict=True,
                           generator=torch.Generator().manual_seed(args.seed + i))
        eng.use_int8_dynamic(False)
        return out.sequences[0, ids.shape[1]:], float(out.steps_per_canvas[0][0])

    with torch.inference_mode():
        for side in sides:  # one discarded warm-up of every side
            run(side, torch.tensor([prompt_ids(eng.tokenizer, pairs[0][0])]), -1)
        for i, (puzzle, solution) in enumerate(pairs):
            ids = torch.tensor([prompt_ids(eng.tokenizer, puzzle)])
            for side in sides:
                t = time.perf_counter()
                new, steps = run(side, ids, i)
                walls[side].append(time.perf_counter() - t)
                cells = answer_cells(new.tolist(), table)
                sc = scores[side]
                sc["solved"] += tuple(cells) == tuple(solution)
                sc["correct"] += sum(c == s for p, c, s in zip(puzzle, cells, solution) if not p)
                sc["blanks"] += sum(not p for p in puzzle)
                if steps is not None:
                    sc["steps"].append(steps)

    rows = {}
    ref_wall = sum(walls["reference"])
    for side in sides:
        wall, sc = sum(walls[side]), scores[side]
        accuracy = cell_accuracy(sc["correct"], sc["blanks"])  # None: no blank cell to fill
        rows[side] = {"solved_rate": round(sc["solved"] / len(pairs), 3),
                      "cell_accuracy": accuracy and round(accuracy, 4),
                      "mean_steps_per_canvas": round(statistics.mean(sc["steps"]), 2) if sc["steps"] else None,
                      "wall_s": round(wall, 2), "tok_s": round(len(pairs) * L / wall, 1),
                      "ratio": round(ref_wall / wall, 2)}
    print(f"{len(pairs)} puzzles, batch 1, {args.threads} threads, canvas {L}; reference = transformers generate "
          f"with the checkpoint's settings")
    print(f"  {'side':<18}{'solved':>8}{'cell acc':>10}{'steps':>8}{'wall s':>9}{'tok/s':>9}{'ratio':>8}")
    for side, r in rows.items():
        cells = "n/a" if r["cell_accuracy"] is None else r["cell_accuracy"]  # n/a: no blank cell to fill
        print(f"  {side:<18}{r['solved_rate']:>8}{cells:>10}{str(r['mean_steps_per_canvas']):>8}"
              f"{r['wall_s']:>9}{r['tok_s']:>9}{r['ratio']:>8}")
    result = {"bench": "sudoku_speed", "model": args.model, "num_puzzles": len(pairs), "threads": args.threads,
              "canvas_length": L, "rows": rows}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
