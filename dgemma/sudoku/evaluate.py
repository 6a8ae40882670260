"""Solve Sudoku puzzles with a model and score it: diffusion sampler (default) or an autoregressive baseline.

The diffusion path is the ordinary `Engine.generate` (one canvas per puzzle, batched; the puzzle's prompt is
always 83 tokens, so batches need no padding). Steps are read from `steps_per_canvas`. With `clamp_givens` the
canvas is constrained (`GivensPlan`): the given cells are clamped to their digits, blanks may only become 1-9,
and the tail after the 81 cells is clamped to <eos>, so the sampler only ever decides the blanks (what only a
diffusion model can do: it sees and keeps the givens in place while it fills the rest). The baseline runs the
same weights left to right through the causal encoder (`dgemma.engine.autoregressive`), greedy, one forward
per token, and reports its forwards where the diffusion path reports steps.

Symmetric views (`views=K`, test-time compute): the Sudoku symmetry group maps a puzzle to another with the same
unique solution, relabelled and moved. Each puzzle is solved K times, as itself and as K-1 random images of
itself (all K as rows of one batch), each answer is mapped back, and the answer most views gave wins (ties go to
the earlier view, the puzzle as given first). No rule checking is involved: a wrong answer that several views
share still wins; the model's errors on different images of a puzzle are just rarely the same error. It costs
K canvases per puzzle.
"""

from __future__ import annotations

import math
import random
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import torch

from .format import ANSWER_TOKENS, answer_cells, check_tokenizer, prompt_ids, puzzle_from_prompt
from ..sampling.constraints import CanvasConstraints
from ..train.data import DataError, read_jsonl
from .puzzles import (
    IDENTITY,
    Grid,
    SudokuError,
    Symmetry,
    band_of,
    is_valid_solution,
    num_givens,
    parse_grid,
    random_symmetry,
    solve_unique,
)

BASELINES = ("ar",)


class GivensPlan:
    """A CanvasPlan (dgemma.engine.generate) for one Sudoku canvas: givens clamped, blanks restricted to 1-9."""

    def __init__(self, puzzles: Sequence[Sequence[int]], table: dict[int, int], eos: int, length: int, vocab: int,
                 device):
        ids_of = {d: t for t, d in table.items()}
        clamp = torch.full((len(puzzles), length), -1, dtype=torch.long)
        for row, puzzle in enumerate(puzzles):
            for cell, digit in enumerate(puzzle):
                if digit:
                    clamp[row, cell] = ids_of[digit]
        clamp[:, 81:] = eos
        allowed = torch.zeros(1, vocab, dtype=torch.bool)
        allowed[0, [ids_of[d] for d in range(1, 10)]] = True
        self.constraints = CanvasConstraints(clamp.to(device), allowed.to(device),
                                             torch.zeros_like(clamp, device=device))

    def for_canvas(self, canvas_index: int, committed):
        return self.constraints if canvas_index == 0 else None

    def commit(self, canvas_index: int, argmax: torch.Tensor, processed) -> torch.Tensor:
        return argmax


def read_puzzles(path: str | Path) -> list[tuple[Grid, Grid]]:
    """(puzzle, solution) pairs from JSONL: {"puzzle", "solution"?} lines, or trainer lines {"prompt", "completion"}.

    A missing solution is computed (the puzzle must then have exactly one). Errors name FILE:LINE."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"puzzle file {path} {'is a directory' if path.is_dir() else 'does not exist'}; pass "
                                "a JSONL file of puzzles (`dgemma sudoku generate --count 200 --seed 1 --out "
                                "FILE.jsonl` makes one)")
    pairs = []
    for where, record in _records(path):
        if "puzzle" in record:
            puzzle = parse_grid(_text(record, "puzzle", where), what=f"{where}: puzzle")
            solution = None if record.get("solution") is None else _text(record, "solution", where)
        elif "prompt" in record:
            puzzle = puzzle_from_prompt(_text(record, "prompt", where), what=f"{where}: prompt")
            solution = None if record.get("completion") is None else _text(record, "completion", where)
            solution = None if solution is None else solution.split("<")[0]
        else:
            raise SudokuError(f"{where}: expected a \"puzzle\" field (81 chars) and optionally \"solution\"")
        if solution is None:
            solution = solve_unique(puzzle, what=f"{where}: puzzle")
        else:
            solution = parse_grid(solution, what=f"{where}: solution")
            if not is_valid_solution(solution, puzzle):
                raise SudokuError(f"{where}: the solution is not a valid completion of the puzzle")
        pairs.append((puzzle, solution))
    if not pairs:
        raise SudokuError(f"{path}: no puzzles in the file")
    return pairs


def _records(path: Path):
    """read_jsonl's ("file:line", JSON object) pairs; its errors (not JSON, not an object) say what a puzzle file is."""
    try:
        yield from read_jsonl(path)
    except DataError as e:
        raise SudokuError(f"{e}; a puzzle file has one JSON object per line, {{\"puzzle\": \"81 cells\", "
                          "\"solution\": \"81 digits\"} (the solution optional), as `dgemma sudoku generate` "
                          "writes it") from None


def _text(record: dict, key: str, where: str) -> str:
    value = record[key]
    if not isinstance(value, str):
        raise SudokuError(f"{where}: \"{key}\" must be a string of 81 cells, got {type(value).__name__}")
    return value


# --- prediction --------------------------------------------------------------------------------------
class Prediction(NamedTuple):
    cells: Grid  # the 81 answer cells by position, 0 = not a digit
    steps: float  # denoising steps per canvas (baseline 'ar': decoder forwards), mean over the views
    votes: int = 1  # how many views gave this answer


def view_symmetries(views: int, seed: int = 0) -> list[Symmetry]:
    """The maps of `views` views: the puzzle as given, then views-1 random symmetric images (from `seed`)."""
    if not isinstance(views, int) or views < 1:
        raise SudokuError(f"views must be a whole number >= 1, got {views!r}")
    rng = random.Random(seed)
    return [IDENTITY] + [random_symmetry(rng) for _ in range(views - 1)]


def plurality(answers: Sequence[Grid]) -> tuple[Grid, int]:
    """The answer most views gave and how many gave it; a tie goes to the earliest view."""
    counts = Counter(answers)
    best = max(counts.values())
    return next(a for a in answers if counts[a] == best), best


def predict(engine, puzzles: Sequence[Sequence[int]], *, steps: int | None = None, batch_size: int = 64,
            seed: int = 0, baseline: str | None = None, clamp_givens: bool = False,
            views: int = 1) -> list[Prediction]:
    """One Prediction per puzzle. batch_size counts puzzles: a batch runs batch_size x views canvases."""
    if baseline not in (None, *BASELINES):
        raise SudokuError(f"unknown baseline {baseline!r}; choose one of {BASELINES}")
    if baseline and clamp_givens:
        raise SudokuError("clamp_givens constrains the diffusion canvas; the autoregressive baseline has none")
    if baseline and steps is not None:
        raise SudokuError("steps bounds the denoising steps of a canvas; the autoregressive baseline takes one "
                          f"forward per token ({ANSWER_TOKENS} at most) and has none; drop one")
    if clamp_givens and engine.config.canvas_length < ANSWER_TOKENS:
        raise SudokuError(f"clamp_givens needs the whole answer in one canvas (canvas_length >= {ANSWER_TOKENS}), "
                          f"this model's is {engine.config.canvas_length}")
    maps = view_symmetries(views, seed)
    tokenizer = engine.require_tokenizer()
    table = check_tokenizer(tokenizer)
    results: list[Prediction] = []
    generator = torch.Generator(device=engine.device).manual_seed(seed)
    for start in range(0, len(puzzles), batch_size):
        batch = [m.apply(p) for p in puzzles[start:start + batch_size] for m in maps]  # puzzle-major
        ids = torch.tensor([prompt_ids(tokenizer, p) for p in batch], dtype=torch.long, device=engine.device)
        if baseline == "ar":
            new, used = _autoregressive(engine, ids, tokenizer.stop_ids)
        else:
            plan = GivensPlan(batch, table, _eos(tokenizer), engine.config.canvas_length, engine.config.vocab_size,
                              engine.device) if clamp_givens else None
            new, used = _diffusion(engine, ids, steps, generator, plan)
        answers = [maps[k % views].invert(answer_cells(row, table)) for k, row in enumerate(new.tolist())]
        for first in range(0, len(answers), views):
            cells, votes = plurality(answers[first:first + views])
            results.append(Prediction(cells, sum(used[first:first + views]) / views, votes))
    return results


def _eos(tokenizer) -> int:
    eos = tokenizer.plain_eos_id
    if eos is None:
        raise SudokuError("the tokenizer has no <eos> token, which ends every Sudoku answer")
    return eos


def _diffusion(engine, ids: torch.Tensor, steps: int | None, generator, plan=None) -> tuple[torch.Tensor, list[float]]:
    knobs = {} if steps is None else {"max_denoising_steps": steps}
    out = engine.generate(ids, max_new_tokens=ANSWER_TOKENS, return_dict=True, generator=generator, plan=plan,
                          **knobs)
    new = out.sequences[:, ids.shape[1]:]
    # the canvases that hold the 81 cells (one when canvas_length >= 81)
    used = max(1, min(len(out.steps_per_canvas), math.ceil(81 / engine.config.canvas_length)))
    per_row = torch.stack([s.float() for s in out.steps_per_canvas[:used]]).mean(0)
    return new, per_row.tolist()


def _autoregressive(engine, ids: torch.Tensor, stop_ids) -> tuple[torch.Tensor, list[float]]:
    try:
        from ..engine.autoregressive import generate_autoregressive
    except ImportError as e:
        raise SudokuError("the autoregressive baseline needs dgemma.engine.autoregressive.generate_autoregressive, "
                          f"which this install does not have ({e})") from None
    with torch.inference_mode():
        out = generate_autoregressive(engine.module, ids, max_new_tokens=ANSWER_TOKENS, temperature=0,
                                      eos_token_id=list(stop_ids))
    new = out[:, ids.shape[1]:]  # ids [B, T+n] include the prompt; n < ANSWER_TOKENS if every row stopped early
    forwards = []
    for row in new.tolist():  # one forward per token up to and including the first stop id
        stop = next((k for k, t in enumerate(row) if t in stop_ids), len(row) - 1)
        forwards.append(float(stop + 1))
    return new, forwards


def solve(engine, puzzles: Sequence[Sequence[int]], *, steps: int | None = None, batch_size: int = 64,
          seed: int = 0, baseline: str | None = None, clamp_givens: bool = False,
          views: int = 1) -> list[tuple[Grid | None, float]]:
    """(grid or None, steps per canvas) per puzzle; None when the answer is not 81 digits 1-9."""
    return [(p.cells if all(p.cells) else None, p.steps)
            for p in predict(engine, puzzles, steps=steps, batch_size=batch_size, seed=seed, baseline=baseline,
                             clamp_givens=clamp_givens, views=views)]


# --- scoring -----------------------------------------------------------------------------------------
def cell_accuracy(correct: int, blanks: int) -> float | None:
    """The share of the blank cells filled with the solution's digit; None (not applicable) when there was no blank
    cell to fill (puzzles with 81 givens), which is neither 0% nor 100% and must not be averaged in as either."""
    return correct / blanks if blanks else None


def score(pairs: Sequence[tuple[Sequence[int], Sequence[int]]], predictions: Sequence[Prediction]) -> dict:
    """Metrics over (puzzle, solution) pairs and predict()'s output; also per difficulty band (by givens)."""
    def metrics(indices: list[int]) -> dict:
        solved = valid = parsed = correct = blanks = 0
        total_steps = 0.0
        for k in indices:
            (puzzle, solution), (cells, used, _) = pairs[k], predictions[k]
            parsed += all(cells)
            solved += tuple(cells) == tuple(solution)
            valid += is_valid_solution(cells, puzzle)
            for p, c, s in zip(puzzle, cells, solution):
                if not p:
                    blanks += 1
                    correct += c == s
            total_steps += used
        n = len(indices)
        givens = [num_givens(pairs[k][0]) for k in indices]
        return {"num_puzzles": n, "solved_rate": solved / n, "valid_rate": valid / n, "parse_rate": parsed / n,
                "cell_accuracy": cell_accuracy(correct, blanks), "mean_steps_per_canvas": total_steps / n,
                "givens": [min(givens), max(givens)]}

    result = metrics(list(range(len(pairs))))
    groups: dict[str, list[int]] = {}
    for k, (puzzle, _) in enumerate(pairs):
        groups.setdefault(band_of(num_givens(puzzle)), []).append(k)
    order = ("easy", "medium", "hard", "expert")
    result["bands"] = {name: metrics(groups[name]) for name in order if name in groups}
    return result


def evaluate(engine, puzzle_file: str | Path | Sequence[tuple[Sequence[int], Sequence[int]]], *,
             steps: int | None = None, batch_size: int = 64, seed: int = 0, baseline: str | None = None,
             limit: int | None = None, clamp_givens: bool = False, views: int = 1) -> dict:
    """Score the model on a puzzle file (or a list of (puzzle, solution) pairs).

    Keys: num_puzzles, solved_rate (exact grid = the solution), valid_rate (a valid completion of the puzzle;
    equals solved_rate for unique puzzles), parse_rate (81 digits produced), cell_accuracy (over blank cells; None
    when no puzzle has one), mean_steps_per_canvas, bands (the same per difficulty level), mode,
    max_denoising_steps, views, steps_per_puzzle (steps per canvas x views), view_agreement (mean share of the views
    that gave the chosen answer), seconds."""
    pairs = read_puzzles(puzzle_file) if isinstance(puzzle_file, (str, Path)) else list(puzzle_file)
    if limit is not None:
        pairs = pairs[:limit]
    if not pairs:
        raise SudokuError("no puzzles to evaluate")
    start = time.perf_counter()
    predictions = predict(engine, [p for p, _ in pairs], steps=steps, batch_size=batch_size, seed=seed,
                          baseline=baseline, clamp_givens=clamp_givens, views=views)
    seconds = time.perf_counter() - start
    result = score(pairs, predictions)
    mode = "autoregressive" if baseline == "ar" else ("diffusion, givens clamped" if clamp_givens else "diffusion")
    result.update({
        "mode": mode + (f", {views} views voting" if views > 1 else ""),
        "max_denoising_steps": None if baseline else (steps or engine.generation_config.max_denoising_steps),
        "views": views, "steps_per_puzzle": round(result["mean_steps_per_canvas"] * views, 3),
        "view_agreement": round(sum(p.votes for p in predictions) / (views * len(predictions)), 4),
        "seed": seed, "batch_size": batch_size, "seconds": round(seconds, 3),
        "puzzles_per_s": round(len(pairs) / seconds, 3) if seconds > 0 else None,
    })
    return result
