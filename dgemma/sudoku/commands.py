"""`dgemma sudoku {generate,solve,eval,tokenizer}`: parse flags, call the library, print. Errors are ValueError /
FileNotFoundError with a message meant for the user (the top-level CLI prints them)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from ..argtypes import positive_int

BUNDLED = Path(__file__).resolve().parent.parent / "models" / "sudoku"

TRAIN_HINT = ("train one: `dgemma sudoku tokenizer TOK` (the tokenizer), `dgemma sudoku generate --count 20000 "
              "--seed 1000 --variants 10 --format train --out train.jsonl` (the data), then `dgemma train --config "
              "recipes/sudoku-config-h192.json --tokenizer TOK --data train.jsonl --raw --out RUN` (on a GPU: "
              "recipes/sudoku-gpu.sh RUN SECONDS does all three) and pass --model RUN/model; see the README's Sudoku "
              "section")


def _load(args):
    from ..config import is_adapter
    from ..engine.engine import load

    if args.baseline and args.preset != "exact":  # a preset's knobs are the diffusion sampler's: none would apply
        raise ValueError(f"--preset {args.preset} sets the denoising sampler's knobs; --baseline {args.baseline} "
                         "decodes one token per forward and uses none of them; drop one")
    if args.baseline and args.compile:  # --compile compiles the denoising step, which the baseline never runs
        raise ValueError(f"--compile compiles the denoising step; --baseline {args.baseline} runs the causal encoder "
                         "only and would run it uncompiled; drop one")
    path = Path(args.model) if args.model else BUNDLED
    if not ((path / "config.json").is_file() or is_adapter(path)):
        if args.model:
            raise FileNotFoundError(f"model directory {path} has no config.json; pass a DiffusionGemma model "
                                    "directory (Hugging Face layout) trained on the Sudoku format, or a LoRA "
                                    "adapter directory (adapter_config.json) of one")
        raise FileNotFoundError(f"no bundled Sudoku model at {path}: it has not been trained yet; {TRAIN_HINT}")
    engine = load(path, dtype=args.dtype, device=args.device, quiet=True, preset=args.preset,
                  int8_dynamic=args.int8_dynamic, compile=args.compile)
    if engine.tokenizer is None:
        raise FileNotFoundError(f"{path} has no tokenizer.json; the Sudoku model needs its tokenizer "
                                "(`dgemma sudoku tokenizer DIR` writes one)")
    return engine, path


# --- generate ----------------------------------------------------------------------------------------
def cmd_generate(args) -> int:
    from .format import puzzle_record, to_jsonl_examples
    from .puzzles import iter_puzzles, parse_givens

    band = parse_givens(args.givens)
    start = time.perf_counter()
    out = sys.stdout if args.out in (None, "-") else open(args.out, "w", encoding="utf-8")
    try:
        for puzzle, solution in iter_puzzles(args.count, band, seed=args.seed, variants=args.variants):
            line = (to_jsonl_examples([puzzle], [solution])[0] if args.format == "train"
                    else puzzle_record(puzzle, solution))
            out.write(line + "\n")
    finally:
        if out is not sys.stdout:
            out.close()
    seconds = time.perf_counter() - start
    print(f"dgemma sudoku: {args.count} unique puzzles, {band[0]}-{band[1]} givens, seed {args.seed}, "
          f"variants {args.variants}: {seconds:.2f} s ({args.count / max(seconds, 1e-9):.0f} puzzles/s)"
          + ("" if out is sys.stdout else f" -> {args.out}"), file=sys.stderr)
    return 0


# --- solve -------------------------------------------------------------------------------------------
def cmd_solve(args) -> int:
    from .evaluate import predict
    from .puzzles import format_grid, is_valid_solution, num_givens, parse_grid, solve_unique

    text = sys.stdin.read() if args.puzzle == "-" else args.puzzle
    puzzle = parse_grid(text)
    solution = solve_unique(puzzle)  # rejects contradictory, unsolvable and ambiguous puzzles up front
    engine, path = _load(args)
    [(cells, steps, votes)] = predict(engine, [puzzle], steps=args.steps, seed=args.seed, baseline=args.baseline,
                                      clamp_givens=args.clamp_givens, views=args.views)
    valid = is_valid_solution(cells, puzzle)
    if args.json:
        print(json.dumps({"puzzle": "".join(map(str, puzzle)), "answer": "".join(map(str, cells)), "valid": valid,
                          "solved": tuple(cells) == solution, "steps": steps, "views": args.views,
                          "votes": votes}))
        return 0
    print(f"puzzle ({num_givens(puzzle)} givens):\n{format_grid(puzzle)}\n")
    how = "autoregressive, forwards" if args.baseline else "denoising steps"
    if args.views > 1:
        how = f"{how} per view: {steps:g}; {votes} of {args.views} views gave this answer"
    else:
        how = f"{how}: {steps:g}"
    print(f"model answer ({path}, {how}):\n{format_grid(cells, blank='?')}\n")
    if valid:
        print("valid: yes (the puzzle's unique solution)")
    else:
        print(invalid_line(puzzle, cells, solution))
    return 0


def invalid_line(puzzle, cells, solution) -> str:
    """`solve`'s verdict on an invalid answer: blanks wrong or missing, givens not copied, and what '?' means when
    the printed answer has one (a cell that is not a digit)."""
    from .puzzles import num_givens

    wrong = sum(1 for p, c, s in zip(puzzle, cells, solution) if not p and c != s)
    changed = sum(1 for p, c in zip(puzzle, cells) if p and c != p)
    blanks = 81 - num_givens(puzzle)
    parts = [f"{wrong} of {blanks} blank cells wrong or missing"] if blanks else []  # 81 givens: nothing to fill
    if changed:
        parts.append(f"{changed} given{'s' if changed != 1 else ''} not copied")
    legend = "; '?' = not a digit" if 0 in cells else ""
    return f"valid: no ({', '.join(parts)}{legend})"


# --- eval --------------------------------------------------------------------------------------------
def _table(result: dict) -> str:
    head = f"{'band':<8}{'givens':>8}{'puzzles':>9}{'solved':>9}{'valid':>8}{'cells':>8}{'steps':>8}"
    rows = [head, "-" * len(head)]
    for name, m in [*result["bands"].items(), ("all", result)]:
        lo, hi = m["givens"]
        cells = "n/a" if m["cell_accuracy"] is None else f"{m['cell_accuracy']:.1%}"  # no blank cell to fill
        rows.append(f"{name:<8}{f'{lo}-{hi}':>8}{m['num_puzzles']:>9}{m['solved_rate']:>9.1%}{m['valid_rate']:>8.1%}"
                    f"{cells:>8}{m['mean_steps_per_canvas']:>8.1f}")
    return "\n".join(rows)


def cmd_eval(args) -> int:
    from .evaluate import evaluate, read_puzzles

    pairs = read_puzzles(args.puzzles)  # file errors before the (slow) model load
    engine, path = _load(args)
    result = evaluate(engine, pairs, steps=args.steps, batch_size=args.batch_size, seed=args.seed,
                      baseline=args.baseline, limit=args.limit, clamp_givens=args.clamp_givens, views=args.views)
    result = {"model": str(path), "puzzles": str(args.puzzles), **result}
    if not args.json:
        print(f"Sudoku eval: {path} on {args.puzzles} ({result['mode']}, "
              f"max steps {result['max_denoising_steps']}, {result['seconds']:.1f} s)")
        print(_table(result))
        if result["views"] > 1:
            what = "decoder forwards" if args.baseline else "denoising steps"
            print(f"{result['views']} views per puzzle: {result['steps_per_puzzle']:.1f} {what} per puzzle in all; "
                  f"on average {result['view_agreement']:.0%} of the views gave the chosen answer")
    print(json.dumps(result))
    return 0


# --- tokenizer ---------------------------------------------------------------------------------------
def cmd_tokenizer(args) -> int:
    from .format import build_sudoku_tokenizer

    tokenizer = build_sudoku_tokenizer(args.directory)
    print(f"dgemma sudoku: wrote the Sudoku tokenizer ({tokenizer.vocab_size} tokens, one per digit) to "
          f"{args.directory}")
    return 0


def _model_flags(p) -> None:
    p.add_argument("--model", help="model directory (default: the bundled Sudoku model, dgemma/models/sudoku/)")
    p.add_argument("--steps", type=positive_int, default=None, help="max denoising steps per canvas")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--baseline", choices=["ar"], default=None,
                   help="decode autoregressively (greedy, causal encoder) instead of by diffusion; takes neither "
                        "--steps, --clamp-givens, --compile nor a --preset")
    p.add_argument("--clamp-givens", action="store_true",
                   help="constrain the canvas: givens clamped in place, blanks restricted to 1-9 (diffusion only)")
    p.add_argument("--views", type=positive_int, default=1,
                   help="solve each puzzle as itself and as VIEWS-1 symmetric images of itself, and answer what "
                        "most views answered (VIEWS canvases per puzzle; the Sudoku card measures 5; default 1)")
    p.add_argument("--device", default=None, help="torch device, e.g. cpu or cuda (default cpu)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="weight dtype (default: as stored)")
    from ..engine.presets import add_speed_flags
    add_speed_flags(p)


def add_sudoku_parser(subparsers) -> argparse.ArgumentParser:
    """Register `sudoku` and its sub-commands on the top-level CLI's subparsers."""
    parser = subparsers.add_parser("sudoku", help="generate Sudoku puzzles, solve and evaluate with a Sudoku model")
    sub = parser.add_subparsers(dest="sudoku_command", required=True)

    p = sub.add_parser("generate", help="write unique-solution puzzles as JSONL")
    p.add_argument("--count", type=positive_int, required=True, help="number of puzzles")
    p.add_argument("--givens", default="30-36",
                   help="givens per puzzle: N, LO-HI, or easy|medium|hard|expert (default 30-36)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--out", default=None, help="output file (default: stdout)")
    p.add_argument("--format", choices=["puzzles", "train"], default="puzzles",
                   help="puzzles: {puzzle, solution} lines; train: trainer lines {prompt, completion, raw}")
    p.add_argument("--variants", type=positive_int, default=1,
                   help="symmetric images per dug puzzle (fast path for training sets; keep 1 for eval sets)")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("solve", help="solve one puzzle with the model and check the answer")
    p.add_argument("puzzle", help="81 cells (digits, 0 or . for blanks; whitespace and a grid drawing's | and rule "
                                  "lines ignored, so a grid this command printed reads back), or - for stdin")
    _model_flags(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_solve)

    p = sub.add_parser("eval", help="score the model on a puzzle file; ends with one JSON line")
    p.add_argument("--puzzles", required=True, help="JSONL with {puzzle, solution} (or trainer) lines")
    _model_flags(p)
    p.add_argument("--batch-size", type=positive_int, default=64, help="puzzles per batch (default 64)")
    p.add_argument("--limit", type=positive_int, default=None, help="only the first N puzzles")
    p.add_argument("--json", action="store_true", help="print only the JSON line")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("tokenizer", help="write the Sudoku model's tokenizer files into a directory")
    p.add_argument("directory")
    p.set_defaults(func=cmd_tokenizer)
    return parser
