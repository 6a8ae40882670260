"""Pure-Python Sudoku toolkit: parse, check, solve (with solution counting), generate unique puzzles.

A grid is a tuple of 81 ints in row-major order, 0 for a blank cell. The solver is bitmask backtracking
that always branches on the most-constrained blank cell (fewest candidates); it counts solutions up to a
limit, so `count_solutions(p) == 1` is the uniqueness test. Puzzles are made by digging holes: start from
a random complete grid, remove cells in random order and keep a removal only while the solution stays
unique, until the requested number of givens is left (a fresh grid if this order cannot get there).

Fast path for large training sets: the Sudoku symmetry group (relabel digits, permute bands, rows within
a band, stacks, columns within a stack, transpose) maps a unique puzzle with k givens to another unique
puzzle with k givens, so one dug puzzle yields many distinct ones (`random_symmetry` / `apply_symmetry`).
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

Grid = tuple[int, ...]

ALL = 0x1FF  # bit d-1 set = digit d present
ROW = tuple(i // 9 for i in range(81))
COL = tuple(i % 9 for i in range(81))
BOX = tuple((i // 27) * 3 + (i % 9) // 3 for i in range(81))
BIT = (0,) + tuple(1 << (d - 1) for d in range(1, 10))
POPCOUNT = tuple(bin(m).count("1") for m in range(512))
MASK_DIGITS = tuple(tuple(d for d in range(1, 10) if m >> (d - 1) & 1) for m in range(512))
UNITS = tuple([tuple(r * 9 + c for c in range(9)) for r in range(9)]
              + [tuple(r * 9 + c for r in range(9)) for c in range(9)]
              + [tuple((b // 3) * 27 + (b % 3) * 3 + r * 9 + c for r in range(3) for c in range(3))
                 for b in range(9)])
UNIT_NAMES = tuple([f"row {r + 1}" for r in range(9)] + [f"column {c + 1}" for c in range(9)]
                   + [f"box {b + 1}" for b in range(9)])

# Difficulty by number of givens (a common proxy; fewer givens = more deduction needed).
LEVELS: dict[str, tuple[int, int]] = {"easy": (40, 45), "medium": (36, 39), "hard": (30, 35), "expert": (25, 29)}
TARGET_BAND = (30, 36)  # the band the Sudoku model is trained and evaluated on
MIN_GIVENS = 17  # no unique 9x9 Sudoku has fewer


class SudokuError(ValueError):
    """Bad puzzle text, a contradictory grid, or an impossible request; the message says what and where."""


# --- text <-> grid -----------------------------------------------------------------------------------
BOX_DRAWING = frozenset(map(chr, range(0x2500, 0x2580)))  # Unicode's box-drawing block: ─ │ ┼ ═ ║ ╬ ...
RULE_CHARS = frozenset("-+=|") | BOX_DRAWING  # what a grid drawing's horizontal rule lines are made of


def parse_grid(text: str, *, what: str = "puzzle") -> Grid:
    """81 cells from text: digits 1-9, and 0 or '.' for blanks; whitespace (incl. newlines) is ignored, and so is a
    grid drawing (format_grid's, or box-drawing characters): lines of rule characters alone, and '|' (or a Unicode
    box-drawing character) between cells. A byte-order mark (what Windows editors put first) is ignored too."""
    if not isinstance(text, str):
        raise SudokuError(f"{what} must be a string of 81 cells, got {type(text).__name__}")
    cells = []
    pos = 0
    for line in text.splitlines(keepends=True):
        rule = all(ch.isspace() or ch in RULE_CHARS for ch in line)  # a horizontal rule, e.g. ------+-------+------
        for ch in line:
            if ch.isspace() or rule or ch == "|" or ch in BOX_DRAWING or ch == "\ufeff":  # \ufeff: a BOM
                pass
            elif ch == "." or ch == "0":
                cells.append(0)
            elif "1" <= ch <= "9":
                cells.append(ord(ch) - 48)
            else:
                raise SudokuError(f"{what}: invalid character {ch!r} at position {pos}; use digits 1-9 and 0 or '.' "
                                  "for blanks (whitespace and a grid drawing's | and rule lines are ignored)")
            pos += 1
    if len(cells) != 81:
        raise SudokuError(f"{what}: expected 81 cells, got {len(cells)} (digits 1-9, 0 or '.' for blanks)")
    return tuple(cells)


def grid_to_string(grid: Sequence[int], blank: str = "0") -> str:
    return "".join(str(d) if d else blank for d in grid)


def format_grid(grid: Sequence[int], blank: str = ".") -> str:
    """A 9x9 block with box rules, for terminals."""
    lines = []
    for r in range(9):
        if r and r % 3 == 0:
            lines.append("------+-------+------")
        row = [str(d) if d else blank for d in grid[r * 9:(r + 1) * 9]]
        lines.append(" | ".join(" ".join(row[c:c + 3]) for c in (0, 3, 6)))
    return "\n".join(lines)


def num_givens(grid: Sequence[int]) -> int:
    return sum(1 for d in grid if d)


# --- checks ------------------------------------------------------------------------------------------
def conflicts(grid: Sequence[int]) -> list[str]:
    """Human-readable descriptions of digits repeated within a row, column or box (empty if none)."""
    found = []
    for name, unit in zip(UNIT_NAMES, UNITS):
        seen = set()
        for i in unit:
            d = grid[i]
            if d and d in seen:
                found.append(f"digit {d} appears twice in {name}")
            seen.add(d)
    return found


def check_puzzle(grid: Sequence[int], *, what: str = "puzzle") -> None:
    """Raise SudokuError if the grid has the wrong shape, bad values or contradictory givens."""
    if len(grid) != 81 or any(not isinstance(d, int) or not 0 <= d <= 9 for d in grid):
        raise SudokuError(f"{what}: a grid is 81 integers in 0..9 (0 = blank)")
    bad = conflicts(grid)
    if bad:
        raise SudokuError(f"{what} is contradictory: " + "; ".join(bad[:3]) + ("; ..." if len(bad) > 3 else ""))


def is_valid_solution(grid: Sequence[int] | None, puzzle: Sequence[int] | None = None) -> bool:
    """True if `grid` is a complete valid Sudoku (every unit a permutation of 1-9) agreeing with `puzzle`'s givens."""
    if grid is None or len(grid) != 81 or any(d not in range(1, 10) for d in grid):
        return False
    if any(sum(BIT[grid[i]] for i in unit) != ALL for unit in UNITS):
        return False
    return puzzle is None or all(p == 0 or p == g for p, g in zip(puzzle, grid))


# --- solver ------------------------------------------------------------------------------------------
def _masks(cells: Sequence[int]):
    rows, cols, boxes = [0] * 9, [0] * 9, [0] * 9
    for i, d in enumerate(cells):
        if d:
            bit = BIT[d]
            if (rows[ROW[i]] | cols[COL[i]] | boxes[BOX[i]]) & bit:
                return None  # contradictory givens
            rows[ROW[i]] |= bit
            cols[COL[i]] |= bit
            boxes[BOX[i]] |= bit
    return rows, cols, boxes


def _search(cells: list[int], rows, cols, boxes, limit: int, found: list, rng: random.Random | None = None) -> int:
    """Count completions of `cells` (in place; restored on return) up to `limit`; append the first to `found`.

    Most-constrained-cell backtracking: the blank positions live in `empties`, and at depth k the blank
    with the fewest candidates is swapped into slot k, so each node scans only the still-blank cells."""
    empties = [i for i in range(81) if not cells[i]]
    n = len(empties)

    def rec(k: int) -> int:
        if k == n:
            if not found:
                found.append(tuple(cells))
            return 1
        best_j, best_m, best_c = k, 0, 10
        for j in range(k, n):
            i = empties[j]
            m = ALL & ~(rows[ROW[i]] | cols[COL[i]] | boxes[BOX[i]])
            c = POPCOUNT[m]
            if c < best_c:
                best_j, best_m, best_c = j, m, c
                if c <= 1:
                    break
        if best_c == 0:
            return 0
        empties[k], empties[best_j] = empties[best_j], empties[k]
        i = empties[k]
        r, c, b = ROW[i], COL[i], BOX[i]
        digits = MASK_DIGITS[best_m]
        if rng is not None and len(digits) > 1:
            digits = list(digits)
            rng.shuffle(digits)
        total = 0
        for d in digits:
            bit = BIT[d]
            rows[r] |= bit
            cols[c] |= bit
            boxes[b] |= bit
            cells[i] = d
            total += rec(k + 1)
            rows[r] ^= bit
            cols[c] ^= bit
            boxes[b] ^= bit
            if total >= limit:
                break
        cells[i] = 0
        return total

    return rec(0)


def count_solutions(grid: Sequence[int], limit: int = 2) -> int:
    """Number of solutions, counted up to `limit` (0 for contradictory givens). 1 means unique."""
    cells = list(grid)
    masks = _masks(cells)
    return 0 if masks is None else _search(cells, *masks, limit, [])


def solve_grid(grid: Sequence[int]) -> Grid | None:
    """One solution (the first found), or None if there is none."""
    cells = list(grid)
    masks = _masks(cells)
    found: list = []
    if masks is not None:
        _search(cells, *masks, 1, found)
    return found[0] if found else None


def solve_unique(grid: Sequence[int], *, what: str = "puzzle") -> Grid:
    """The unique solution; SudokuError if the puzzle is contradictory, unsolvable or ambiguous."""
    check_puzzle(grid, what=what)
    cells = list(grid)
    found: list = []
    n = _search(cells, *_masks(cells), 2, found)
    if n == 0:
        raise SudokuError(f"{what} has no solution (its givens are consistent but cannot be completed)")
    if n > 1:
        raise SudokuError(f"{what} has more than one solution; give a puzzle with a unique solution")
    return found[0]


def has_other_solution(puzzle: Sequence[int], cell: int, digit: int) -> bool:
    """Whether `puzzle` (known to have a solution with `digit` at blank `cell`) has one with another digit there.

    The dig-hole uniqueness test: cheaper than counting to 2, since the known branch is never searched."""
    cells = list(puzzle)
    rows, cols, boxes = _masks(cells)
    r, c, b = ROW[cell], COL[cell], BOX[cell]
    for d in MASK_DIGITS[ALL & ~(rows[r] | cols[c] | boxes[b]) & ~BIT[digit]]:
        bit = BIT[d]
        rows[r] |= bit
        cols[c] |= bit
        boxes[b] |= bit
        cells[cell] = d
        if _search(cells, rows, cols, boxes, 1, []):
            return True
        rows[r] ^= bit
        cols[c] ^= bit
        boxes[b] ^= bit
    return False


# --- generation --------------------------------------------------------------------------------------
def random_solution(rng: random.Random) -> Grid:
    """A uniformly-ish random complete grid: randomized backtracking from an empty grid."""
    cells = [0] * 81
    found: list = []
    _search(cells, [0] * 9, [0] * 9, [0] * 9, 1, found, rng)
    return found[0]


def dig(solution: Sequence[int], givens: int, rng: random.Random) -> Grid | None:
    """Remove cells of `solution` in random order, keeping each removal only if the puzzle stays unique,
    until `givens` cells are left; None if this order gets stuck above `givens`."""
    cells = list(solution)
    left = 81
    order = list(range(81))
    rng.shuffle(order)
    for i in order:
        if left == givens:
            break
        d = cells[i]
        cells[i] = 0
        if has_other_solution(cells, i, d):
            cells[i] = d
        else:
            left -= 1
    return tuple(cells) if left == givens else None


def parse_givens(text: str | int | tuple[int, int]) -> tuple[int, int]:
    """'30-36', '33', a level name (easy/medium/hard/expert), an int or a (lo, hi) pair -> (lo, hi) inclusive."""
    if isinstance(text, tuple):
        lo, hi = text
    elif isinstance(text, int):
        lo = hi = text
    elif text.strip().lower() in LEVELS:
        lo, hi = LEVELS[text.strip().lower()]
    else:
        a, sep, b = text.strip().partition("-")
        try:
            lo = int(a)
            hi = int(b) if sep else lo
        except ValueError:
            raise SudokuError(f"givens {text!r}: expected N, LO-HI (e.g. 30-36) or one of {sorted(LEVELS)}") from None
    if not MIN_GIVENS <= lo <= hi <= 81:
        raise SudokuError(f"givens {lo}-{hi}: need {MIN_GIVENS} <= LO <= HI <= 81 (no unique Sudoku has fewer than "
                          f"{MIN_GIVENS} givens; digging reliably reaches about 24)")
    return lo, hi


def generate_puzzle(rng: random.Random, givens: int | tuple[int, int] = TARGET_BAND,
                    max_grids: int = 200) -> tuple[Grid, Grid]:
    """(puzzle, solution): a unique puzzle whose number of givens is drawn uniformly from the band."""
    lo, hi = parse_givens(givens)
    target = rng.randint(lo, hi)
    for _ in range(max_grids):
        solution = random_solution(rng)
        puzzle = dig(solution, target, rng)
        if puzzle is not None:
            return puzzle, solution
    raise SudokuError(f"could not dig a unique puzzle down to {target} givens from {max_grids} grids; "
                      "ask for more givens (digging in random order rarely gets below ~24)")


# --- symmetries --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Symmetry:
    """A validity-, uniqueness- and givens-preserving map: new[r][c] = relabel[old[rows[r]][cols[c]]], then an
    optional transpose. rows/cols permute bands (stacks) and the lines within each, so boxes stay boxes."""

    rows: tuple[int, ...]  # source row of each target row
    cols: tuple[int, ...]
    relabel: tuple[int, ...]  # relabel[d] = new digit for digit d; relabel[0] = 0
    transpose: bool

    def apply(self, grid: Sequence[int]) -> Grid:
        out = [self.relabel[grid[self.rows[r] * 9 + self.cols[c]]] for r in range(9) for c in range(9)]
        if self.transpose:
            out = [out[c * 9 + r] for r in range(9) for c in range(9)]
        return tuple(out)

    def invert(self, grid: Sequence[int]) -> Grid:
        """The grid that apply() maps to `grid`: a view's answer back in the original puzzle's frame."""
        cells = [grid[c * 9 + r] for r in range(9) for c in range(9)] if self.transpose else list(grid)
        back = [0] * 10
        for digit, new in enumerate(self.relabel):
            back[new] = digit
        out = [0] * 81
        for r in range(9):
            for c in range(9):
                out[self.rows[r] * 9 + self.cols[c]] = back[cells[r * 9 + c]]
        return tuple(out)


IDENTITY = Symmetry(tuple(range(9)), tuple(range(9)), tuple(range(10)), False)


def _line_order(rng: random.Random) -> tuple[int, ...]:
    # permute the three bands (stacks), then the three lines within each
    bands = [0, 1, 2]
    rng.shuffle(bands)
    order = []
    for band in bands:
        inner = [0, 1, 2]
        rng.shuffle(inner)
        order += [band * 3 + k for k in inner]
    return tuple(order)


def random_symmetry(rng: random.Random) -> Symmetry:
    digits = list(range(1, 10))
    rng.shuffle(digits)
    return Symmetry(_line_order(rng), _line_order(rng), (0, *digits), rng.random() < 0.5)


def apply_symmetry(sym: Symmetry, *grids: Sequence[int]) -> tuple[Grid, ...]:
    return tuple(sym.apply(g) for g in grids)


def iter_puzzles(count: int, givens: int | str | tuple[int, int] = TARGET_BAND, *, seed: int = 0,
                 variants: int = 1) -> Iterator[tuple[Grid, Grid]]:
    """`count` (puzzle, solution) pairs, reproducible from `seed`.

    variants=1: every puzzle is dug from its own random grid. variants=k>1: each dug puzzle is followed by
    k-1 random symmetric images of it (distinct puzzles, same difficulty, ~1000x cheaper each), the fast
    path for big training sets. Keep evaluation sets at variants=1 and on a different seed."""
    if count < 0 or variants < 1:
        raise SudokuError(f"count must be >= 0 and variants >= 1, got count={count}, variants={variants}")
    band = parse_givens(givens)
    rng = random.Random(seed)
    made = 0
    while made < count:
        puzzle, solution = generate_puzzle(rng, band)
        yield puzzle, solution
        made += 1
        for _ in range(min(variants - 1, count - made)):
            yield apply_symmetry(random_symmetry(rng), puzzle, solution)
            made += 1


def generate_puzzles(count: int, givens: int | str | tuple[int, int] = TARGET_BAND, *, seed: int = 0,
                     variants: int = 1) -> list[tuple[Grid, Grid]]:
    return list(iter_puzzles(count, givens, seed=seed, variants=variants))


def band_of(givens: int) -> str:
    """Difficulty level name for a number of givens (levels' edges extended to cover 17..81)."""
    if givens <= LEVELS["expert"][1]:
        return "expert"
    if givens <= LEVELS["hard"][1]:
        return "hard"
    if givens <= LEVELS["medium"][1]:
        return "medium"
    return "easy"
