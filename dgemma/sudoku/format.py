"""THE Sudoku prompt/answer format, shared by training data, the tokenizer and evaluation (one source of truth).

    prompt  = <bos> c0 c1 ... c80 \\n          83 tokens: the puzzle row-major, 0 for a blank, then a separator
    answer  = s0 s1 ... s80 <eos>             82 tokens: the solution row-major, then <eos>
    canvas  = s0 ... s80 <eos> <eos> ...      CANVAS_LENGTH = 96: one canvas holds the whole answer

Every digit is one token (the tokenizer's pre-tokenizer splits digits singly; `check_tokenizer` verifies it), so
cell i of the answer is always canvas position i and cell i of the puzzle always prompt position 1+i: the
offset from an answer cell to its own given is the same constant (82) for all 81 cells, which a small
bidirectional transformer with relative (RoPE) positions picks up at once, and row/column/box membership is a
fixed function of position. No row separators: in the answer they would not be clean anchors anyway (the canvas
starts as uniform noise, separators included), and in the prompt alone they would make the prompt-to-answer
offset depend on the row. 96 (not 128) keeps the denoiser's work per step small while leaving the 14-token
EOS tail the trainer pads with (spec §6.5); with a 256-token canvas the format works unchanged.

Tried and measured (2026-11-27, one H200, the h192 recipe config, batch 256, lr 1.5e-3, warm-up 200): a prompt of
cell tokens naming cell and given ("<r1c1=5>", 810 added tokens) instead of bare digits learned far more slowly:
accuracy on corrupted canvas positions 0.34 at step 200 and 0.37 at step 250, against 0.67 and 0.72 for this
format (a given is then no plain copy of a prompt token). Bare digits stay.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path

from .puzzles import Grid, SudokuError, grid_to_string, parse_grid

SEPARATOR = "\n"  # an ordinary token (id 107, as in Gemma-4)
BOS, EOS = "<bos>", "<eos>"
PROMPT_TOKENS = 83  # <bos> + 81 cells + separator
ANSWER_TOKENS = 82  # 81 cells + <eos>
CANVAS_LENGTH = 96  # recommended canvas_length for the Sudoku model (>= ANSWER_TOKENS)


def prompt_text(puzzle: Sequence[int] | str) -> str:
    """'<bos>' + 81 digits (0 = blank) + separator. Encode with add_bos=True: the tokenizer never doubles <bos>."""
    grid = parse_grid(puzzle) if isinstance(puzzle, str) else puzzle
    return BOS + grid_to_string(grid, "0") + SEPARATOR


def answer_text(solution: Sequence[int] | str) -> str:
    """81 digits + '<eos>'; the trainer pads the rest of the canvas (more <eos>)."""
    grid = parse_grid(solution, what="solution") if isinstance(solution, str) else solution
    if any(not 1 <= d <= 9 for d in grid):
        raise SudokuError("solution: every cell must be a digit 1-9")
    return grid_to_string(grid) + EOS


def puzzle_from_prompt(text: str, *, what: str = "prompt") -> Grid:
    """Inverse of prompt_text (accepts it with or without <bos> and the separator)."""
    body = text.removeprefix(BOS).removesuffix(SEPARATOR)
    return parse_grid(body, what=what)


# --- tokenizer -----------------------------------------------------------------------------------------
def digit_ids(tokenizer) -> dict[int, int]:
    """token id -> digit (0-9). Raises if a digit is not exactly one token."""
    table = {}
    for d in range(10):
        ids = tokenizer.encode(str(d), add_bos=False)
        if len(ids) != 1:
            raise SudokuError(f"tokenizer splits digit {d} into {len(ids)} tokens; the Sudoku format needs one token "
                              "per digit (build one with dgemma.sudoku.format.build_sudoku_tokenizer)")
        table[ids[0]] = d
    return table


def check_tokenizer(tokenizer) -> dict[int, int]:
    """Verify one token per digit and per cell position (prompt of 83 tokens); return the digit table."""
    table = digit_ids(tokenizer)
    probe = tokenizer.encode(prompt_text((0,) * 81), add_bos=True)
    answer = tokenizer.encode(answer_text(tuple(range(1, 10)) * 9), add_bos=False)
    if len(probe) != PROMPT_TOKENS or len(answer) != ANSWER_TOKENS:
        raise SudokuError(f"tokenizer gives {len(probe)} prompt / {len(answer)} answer tokens, expected "
                          f"{PROMPT_TOKENS} / {ANSWER_TOKENS}; cells must tokenize one per token")
    return table


def prompt_ids(tokenizer, puzzle: Sequence[int]) -> list[int]:
    ids = tokenizer.encode(prompt_text(puzzle), add_bos=True)
    if len(ids) != PROMPT_TOKENS:
        raise SudokuError(f"prompt tokenized to {len(ids)} tokens, expected {PROMPT_TOKENS} (one per cell)")
    return ids


def answer_cells(ids: Sequence[int], table: dict[int, int]) -> Grid:
    """The 81 cells of a generated answer by position (0 where the token is not a digit 1-9, or missing)."""
    ids = [int(i) for i in ids[:81]]
    cells = [table.get(i, 0) for i in ids] + [0] * (81 - len(ids))
    return tuple(cells)


def parse_answer(text_or_ids: str | Sequence[int], tokenizer=None) -> Grid | None:
    """A generated answer -> the solved grid, or None unless its first 81 cells are all digits 1-9.

    Text: whitespace is ignored and anything after the 81st cell (e.g. '<eos>') too. Ids (a list or a 1-D
    tensor of the generated tokens, the canvas) need the tokenizer; cell i is token i."""
    if isinstance(text_or_ids, str):
        body = "".join(text_or_ids.split())
        cells = tuple(ord(ch) - 48 if "1" <= ch <= "9" else 0 for ch in body[:81])
    else:
        if tokenizer is None:
            raise SudokuError("parse_answer: token ids need the tokenizer (parse_answer(ids, tokenizer))")
        table = tokenizer if isinstance(tokenizer, dict) else digit_ids(tokenizer)
        cells = answer_cells(list(text_or_ids), table)
    return cells if len(cells) == 81 and all(cells) else None


def build_sudoku_tokenizer(directory: str | Path | None = None):
    """Train the Sudoku model's tokenizer (Gemma-4 specials at their ids, one token per digit); write it to
    `directory` (tokenizer.json, tokenizer_config.json, chat_template.jinja) if given. Returns a Tokenizer."""
    from ..text import Tokenizer, save_tokenizer_files, train_tokenizer
    from ..text.build import MIN_VOCAB_SIZE
    from .puzzles import generate_puzzles

    texts = [prompt_text(p) + answer_text(s) for p, s in generate_puzzles(16, seed=12345)]
    backend = train_tokenizer(texts, vocab_size=MIN_VOCAB_SIZE)
    tokenizer = Tokenizer(backend, config={"bos_token": BOS, "eos_token": EOS, "pad_token": "<pad>"})
    check_tokenizer(tokenizer)
    if directory is not None:
        save_tokenizer_files(backend, directory)
        tokenizer = Tokenizer.from_dir(directory)
    return tokenizer


# --- JSONL -------------------------------------------------------------------------------------------
def to_jsonl_examples(puzzles: Iterable[Sequence[int]], solutions: Iterable[Sequence[int]]) -> list[str]:
    """Trainer lines {"prompt": prompt_text, "completion": 81 digits, "raw": true} (raw = no chat template).

    The completion is answer_text without its '<eos>': the trainer appends '<eos>' after raw text itself
    (dgemma/train/data.py), then fills the canvas with more, so the trained canvas is exactly answer_text's
    tokens + <eos> fill (tests/test_sudoku.py pins this against the trainer)."""
    lines = []
    for puzzle, solution in zip(puzzles, solutions, strict=True):
        completion = answer_text(solution).removesuffix(EOS)
        lines.append(json.dumps({"prompt": prompt_text(puzzle), "completion": completion, "raw": True}))
    return lines


def puzzle_record(puzzle: Sequence[int], solution: Sequence[int]) -> str:
    """Puzzle-file line: {"puzzle": 81 chars (0 = blank), "solution": 81 digits}."""
    return json.dumps({"puzzle": grid_to_string(puzzle), "solution": grid_to_string(solution)})
