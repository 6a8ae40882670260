"""Sudoku: the task Google used to show DiffusionGemma's SFT (landscape §2.4), as a small model of our own.

    puzzles.py   parse / check / solve (solution counting) / generate unique puzzles, symmetries
    format.py    THE prompt/answer format and tokenizer shared by training data and evaluation
    evaluate.py  solve puzzles with an Engine (diffusion, or an autoregressive baseline) and score them
    commands.py  `dgemma sudoku generate | solve | eval | tokenizer`
"""

from .evaluate import evaluate, predict, read_puzzles, score, solve
from .format import (
    CANVAS_LENGTH,
    answer_text,
    build_sudoku_tokenizer,
    parse_answer,
    prompt_ids,
    prompt_text,
    to_jsonl_examples,
)
from .puzzles import (
    LEVELS,
    SudokuError,
    count_solutions,
    format_grid,
    generate_puzzle,
    generate_puzzles,
    is_valid_solution,
    parse_grid,
    solve_grid,
    solve_unique,
)

__all__ = [
    "CANVAS_LENGTH", "LEVELS", "SudokuError", "answer_text", "build_sudoku_tokenizer", "count_solutions",
    "evaluate", "format_grid", "generate_puzzle", "generate_puzzles", "is_valid_solution", "parse_answer",
    "parse_grid", "predict", "prompt_ids", "prompt_text", "read_puzzles", "score", "solve", "solve_grid",
    "solve_unique", "to_jsonl_examples",
]
