"""Sudoku toolkit, format and evaluation: solver vs brute force, unique generation, symmetries, parse errors,
the prompt/answer format through the tokenizer, and evaluate()/CLI end to end on a tiny RANDOM-weight model."""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import random

import pytest
import torch

from dgemma.sudoku import commands
from dgemma.sudoku.evaluate import evaluate, plurality, predict, read_puzzles, solve, view_symmetries
from dgemma.sudoku.format import (
    ANSWER_TOKENS,
    CANVAS_LENGTH,
    PROMPT_TOKENS,
    answer_text,
    build_sudoku_tokenizer,
    check_tokenizer,
    parse_answer,
    prompt_ids,
    prompt_text,
    puzzle_from_prompt,
    to_jsonl_examples,
)
from dgemma.sudoku.puzzles import (
    IDENTITY,
    SudokuError,
    apply_symmetry,
    band_of,
    count_solutions,
    format_grid,
    generate_puzzles,
    grid_to_string,
    is_valid_solution,
    num_givens,
    parse_givens,
    parse_grid,
    random_symmetry,
    solve_grid,
    solve_unique,
)

# Two classics (Wikipedia's example; Arto Inkala's 21-given "hardest"), solutions as published; each is checked
# below by the independent brute rule check and by the solver.
WIKIPEDIA = ("530070000600195000098000060800060003400803001700020006060000280000419005000080079",
             "534678912672195348198342567859761423426853791713924856961537284287419635345286179")
INKALA = ("800000000003600000070090200050007000000045700000100030001000068008500010090000400",
          "812753649943682175675491283154237896369845721287169534521974368438526917796318452")


def _rules_ok(grid) -> bool:
    """Brute check, independent of puzzles.py's bitmasks: every row, column and box is {1..9}."""
    rows = [grid[r * 9:(r + 1) * 9] for r in range(9)]
    cols = [grid[c::9] for c in range(9)]
    boxes = [[grid[(b // 3) * 27 + (b % 3) * 3 + r * 9 + c] for r in range(3) for c in range(3)] for b in range(9)]
    return all(sorted(u) == list(range(1, 10)) for u in rows + cols + boxes)


def _brute_count(puzzle) -> int:
    blanks = [i for i, d in enumerate(puzzle) if not d]
    count = 0
    for digits in itertools.product(range(1, 10), repeat=len(blanks)):
        grid = list(puzzle)
        for i, d in zip(blanks, digits):
            grid[i] = d
        count += _rules_ok(grid)
    return count


# --- solver ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("puzzle,solution", [WIKIPEDIA, INKALA])
def test_known_puzzles(puzzle, solution):
    p, s = parse_grid(puzzle), parse_grid(solution)
    assert _rules_ok(s) and all(a in (0, b) for a, b in zip(p, s))
    assert solve_grid(p) == s
    assert count_solutions(p) == 1 and solve_unique(p) == s
    assert is_valid_solution(s, p)
    assert not is_valid_solution(s[:80] + (s[80] % 9 + 1,), p)


def test_solver_counts_match_brute_force():
    rng = random.Random(7)
    (_, solution), = generate_puzzles(1, 40, seed=3)
    multi = 0
    for _ in range(8):
        grid = list(solution)
        for i in rng.sample(range(81), 4):
            grid[i] = 0
        assert count_solutions(grid, limit=100) == _brute_count(grid)
    # an unavoidable rectangle (a b / b a in two rows of one band) blanked: exactly 2 solutions
    for r1, r2 in [(r, r2) for band in range(3) for r in range(band * 3, band * 3 + 3)
                   for r2 in range(r + 1, band * 3 + 3)]:
        for c1, c2 in itertools.combinations(range(9), 2):
            a, b = solution[r1 * 9 + c1], solution[r1 * 9 + c2]
            if solution[r2 * 9 + c1] == b and solution[r2 * 9 + c2] == a:
                grid = list(solution)
                for i in (r1 * 9 + c1, r1 * 9 + c2, r2 * 9 + c1, r2 * 9 + c2):
                    grid[i] = 0
                assert count_solutions(grid, limit=100) == _brute_count(grid) == 2
                multi += 1
                if multi == 2:
                    break
        if multi == 2:
            break
    assert multi == 2, "this grid has no unavoidable rectangle; pick another seed"
    assert count_solutions((0,) * 81) == 2  # counting stops at the limit
    contradictory = list(parse_grid(WIKIPEDIA[0]))
    contradictory[2] = 5  # a second 5 in row 1
    assert count_solutions(contradictory) == 0 and solve_grid(contradictory) is None
    with pytest.raises(SudokuError, match="digit 5 appears twice in row 1"):
        solve_unique(contradictory)
    with pytest.raises(SudokuError, match="more than one solution"):
        solve_unique((0,) * 81)


# --- generation and symmetries ------------------------------------------------------------------------
def test_generated_puzzles_are_unique_with_requested_givens():
    pairs = generate_puzzles(30, "30-36", seed=11)
    assert len({p for p, _ in pairs}) == 30
    for puzzle, solution in pairs:
        assert 30 <= num_givens(puzzle) <= 36
        assert _rules_ok(solution) and is_valid_solution(solution, puzzle)
        assert count_solutions(puzzle) == 1 and solve_grid(puzzle) == solution
    assert generate_puzzles(5, 33, seed=4) == generate_puzzles(5, 33, seed=4)  # reproducible
    assert all(num_givens(p) == 26 for p, _ in generate_puzzles(3, 26, seed=5))
    assert parse_givens("hard") == (30, 35) and parse_givens("34") == (34, 34)
    assert [band_of(g) for g in (25, 30, 36, 45)] == ["expert", "hard", "medium", "easy"]
    for bad in ("12", "40-30", "x"):
        with pytest.raises(SudokuError):
            parse_givens(bad)


def test_symmetries_preserve_validity_uniqueness_and_givens():
    rng = random.Random(0)
    puzzle, solution = parse_grid(INKALA[0]), parse_grid(INKALA[1])
    images = set()
    for _ in range(10):
        p2, s2 = apply_symmetry(random_symmetry(rng), puzzle, solution)
        assert _rules_ok(s2) and is_valid_solution(s2, p2)
        assert num_givens(p2) == num_givens(puzzle)
        assert count_solutions(p2) == 1 and solve_grid(p2) == s2
        images.add(p2)
    assert len(images) == 10
    for sym in [IDENTITY, *(random_symmetry(rng) for _ in range(20))]:  # invert() undoes apply(), both ways
        assert sym.invert(sym.apply(solution)) == solution and sym.apply(sym.invert(puzzle)) == puzzle
    assert IDENTITY.apply(puzzle) == puzzle
    variants = generate_puzzles(12, "30-36", seed=2, variants=4)
    assert len(variants) == 12 and len({p for p, _ in variants}) == 12
    assert all(count_solutions(p) == 1 and is_valid_solution(s, p) for p, s in variants)


def test_parse_errors():
    p = parse_grid(WIKIPEDIA[0].replace("0", "."))
    assert p == parse_grid("\n".join(WIKIPEDIA[0][r * 9:(r + 1) * 9] for r in range(9)))
    with pytest.raises(SudokuError, match="expected 81 cells, got 80"):
        parse_grid(WIKIPEDIA[0][:80])
    with pytest.raises(SudokuError, match="invalid character 'x' at position 3"):
        parse_grid("530x" + WIKIPEDIA[0][4:])
    assert "------+-------+------" in format_grid(p)


def test_grid_drawings_read_back():
    """`dgemma sudoku solve` printed a grid it could not read back: "invalid character '|' at position 6"."""
    p = parse_grid(WIKIPEDIA[0])
    assert parse_grid(format_grid(p)) == p  # the drawing solve prints, blanks as '.'
    framed = "\n".join(["+-------+-------+-------+"] + [f"| {line} |" for line in format_grid(p).splitlines()]
                       + ["+-------+-------+-------+"])
    assert parse_grid(framed) == p
    boxed = format_grid(p).replace("|", "│").replace("------+-------+------", "──────┼───────┼──────")
    assert parse_grid("╔══╗\n" + boxed + "\n╚══╝") == p
    with pytest.raises(SudokuError, match="invalid character '-'"):  # '-' is no blank, nor a separator in a row
        parse_grid(WIKIPEDIA[0].replace("0", "-"))
    assert parse_grid("\ufeff" + WIKIPEDIA[0]) == p  # a file saved with a byte-order mark


# --- format + tokenizer --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return build_sudoku_tokenizer(tmp_path_factory.mktemp("sudoku_tok"))


def test_format_round_trip_one_token_per_digit(tokenizer):
    table = check_tokenizer(tokenizer)
    assert sorted(table.values()) == list(range(10))
    puzzle, solution = parse_grid(WIKIPEDIA[0]), parse_grid(WIKIPEDIA[1])
    ids = prompt_ids(tokenizer, puzzle)
    assert len(ids) == PROMPT_TOKENS and ids[0] == tokenizer.bos_id and ids.count(tokenizer.bos_id) == 1
    assert [table[i] for i in ids[1:82]] == list(puzzle)
    assert puzzle_from_prompt(prompt_text(puzzle)) == puzzle
    answer = tokenizer.encode(answer_text(solution), add_bos=False)
    assert len(answer) == ANSWER_TOKENS <= CANVAS_LENGTH and answer[-1] == tokenizer.eos_id
    assert parse_answer(answer, tokenizer) == solution
    assert parse_answer(torch.tensor(answer + [tokenizer.eos_id] * 14), tokenizer) == solution
    assert parse_answer(tokenizer.decode(answer)) == solution
    assert parse_answer(answer[:80], tokenizer) is None  # too short
    assert parse_answer(answer[:5] + [tokenizer.eos_id] + answer[6:], tokenizer) is None
    assert parse_answer(grid_to_string(puzzle)) is None  # blanks are not an answer
    # special ids sit at their Gemma-4 ids
    assert (tokenizer.special.pad, tokenizer.special.eos, tokenizer.special.bos, tokenizer.special.turn_end) == \
        (0, 1, 2, 106)
    line = json.loads(to_jsonl_examples([puzzle], [solution])[0])
    assert line == {"prompt": "<bos>" + WIKIPEDIA[0] + "\n", "completion": WIKIPEDIA[1], "raw": True}


def test_trainer_sees_the_format(tokenizer, tmp_path):
    """The trainer's raw records become exactly prompt_ids + (answer_text ids + <eos> fill to one canvas)."""
    from dgemma.train import data
    puzzle, solution = parse_grid(WIKIPEDIA[0]), parse_grid(WIKIPEDIA[1])
    path = tmp_path / "train.jsonl"
    path.write_text(to_jsonl_examples([puzzle], [solution])[0] + "\n")
    [example] = data.load_examples(path, tokenizer, canvas_length=CANVAS_LENGTH)
    answer = tokenizer.encode(answer_text(solution), add_bos=False)
    assert list(example.prompt) == prompt_ids(tokenizer, puzzle)
    assert list(example.response) == answer + [tokenizer.eos_id] * (CANVAS_LENGTH - len(answer))


def test_read_puzzles_errors(tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"puzzle": WIKIPEDIA[0]}) + "\n\n" + to_jsonl_examples(
        [parse_grid(INKALA[0])], [parse_grid(INKALA[1])])[0] + "\n")
    assert read_puzzles(good) == [(parse_grid(WIKIPEDIA[0]), parse_grid(WIKIPEDIA[1])),
                                  (parse_grid(INKALA[0]), parse_grid(INKALA[1]))]
    bad = tmp_path / "bad.jsonl"
    for content, message in [
        ('{"puzzle": "' + WIKIPEDIA[0] + '"}\n{"puzzle": 12\n', "bad.jsonl:2: not valid JSON"),
        # a puzzle per line, no JSON: said "expected a JSON object, got int" and nothing of the format
        (WIKIPEDIA[0] + "\n", r'bad.jsonl:1: expected a JSON object, got int; a puzzle file has one JSON object per '
                               r'line, \{"puzzle": "81 cells"'),
        (WIKIPEDIA[0].replace("0", ".") + "\n", r"bad.jsonl:1: not valid JSON .*; a puzzle file has one JSON object"),
        ('{"puzzle": "123"}\n', "bad.jsonl:1: puzzle: expected 81 cells"),
        (json.dumps({"puzzle": "55" + WIKIPEDIA[0][2:]}) + "\n", "bad.jsonl:1: puzzle is contradictory"),
        (json.dumps({"puzzle": WIKIPEDIA[0], "solution": INKALA[1]}) + "\n", "bad.jsonl:1: the solution is not"),
        (json.dumps({"grid": WIKIPEDIA[0]}) + "\n", 'bad.jsonl:1: expected a "puzzle" field'),
        (json.dumps({"puzzle": list(parse_grid(WIKIPEDIA[0]))}) + "\n",  # said "expected a string, got list"
         'bad.jsonl:1: "puzzle" must be a string of 81 cells, got list'),
        (json.dumps({"prompt": "<bos>123\n", "completion": "1"}) + "\n",  # said "puzzle: expected ...", no line
         "bad.jsonl:1: prompt: expected 81 cells, got 3"),
        ("", "no puzzles"),
    ]:
        bad.write_text(content)
        with pytest.raises(ValueError, match=message):  # SudokuError, or the JSONL reader's DataError
            read_puzzles(bad)
    with pytest.raises(FileNotFoundError, match="missing.jsonl does not exist; .*dgemma sudoku generate"):
        read_puzzles(tmp_path / "missing.jsonl")
    with pytest.raises(FileNotFoundError, match="is a directory; pass a JSONL file"):  # said "does not exist"
        read_puzzles(tmp_path)


# --- a tiny random-weight Sudoku model, end to end ------------------------------------------------------
@pytest.fixture(scope="module")
def sudoku_model(tmp_path_factory):
    from dgemma.config import ModelConfig
    from dgemma.model import DiffusionGemma
    from dgemma.model.saving import init_weights, save_checkpoint

    path = tmp_path_factory.mktemp("sudoku_model")
    tok = build_sudoku_tokenizer(path)
    cfg = ModelConfig(vocab_size=512, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                      num_experts=4, top_k_experts=2, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, head_dim=16, global_head_dim=32, num_global_key_value_heads=1,
                      layer_types=("sliding_attention", "full_attention"), sliding_window=128,
                      canvas_length=CANVAS_LENGTH, max_position_embeddings=256, eos_token_id=(1,))
    assert cfg.vocab_size >= tok.vocab_size
    module = DiffusionGemma(cfg)
    init_weights(module, torch.Generator().manual_seed(0))
    save_checkpoint(module, path, generation_config={"max_new_tokens": CANVAS_LENGTH, "max_denoising_steps": 8,
                                                     "eos_token_id": [1], "pad_token_id": 0})
    return path


def test_cell_accuracy_with_no_blank_cell_is_not_applicable(sudoku_model, tmp_path, capsys):
    """Puzzles with 81 givens (`generate --givens 80-81` makes some) have no blank cell to fill: their cell accuracy
    is None / n/a, not 0% (it was correct / max(blanks, 1) = 0), and it does not pull a mixed set's accuracy down."""
    from dgemma.sudoku.evaluate import Prediction, cell_accuracy, score

    full, full_solution = generate_puzzles(1, (81, 81), seed=3)[0]
    puzzle, solution = generate_puzzles(1, (79, 79), seed=4)[0]  # 2 blanks
    assert full == full_solution and sum(not c for c in puzzle) == 2
    half = list(solution)
    half[puzzle.index(0)] = 0  # one of the two blanks left unfilled
    only_full = score([(full, full_solution)], [Prediction(full, 1.0)])
    assert only_full["cell_accuracy"] is None and only_full["bands"]["easy"]["cell_accuracy"] is None
    assert only_full["solved_rate"] == 1.0
    mixed = score([(full, full_solution), (puzzle, solution)], [Prediction(full, 1.0), Prediction(tuple(half), 1.0)])
    assert mixed["cell_accuracy"] == 0.5  # over the 2 blank cells there are: 1 right (not averaged with a 0)
    assert cell_accuracy(0, 0) is None and cell_accuracy(0, 3) == 0.0

    out = tmp_path / "full.jsonl"
    assert _cli(["sudoku", "generate", "--count", "2", "--givens", "81", "--out", str(out)]) == 0
    capsys.readouterr()
    assert _cli(["sudoku", "eval", "--puzzles", str(out), "--model", str(sudoku_model), "--steps", "2"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert json.loads(lines[-1])["cell_accuracy"] is None
    rows = [line.split() for line in lines if line.startswith(("easy", "all"))]
    assert len(rows) == 2 and all(row[5] == "n/a" for row in rows), lines
    assert commands.invalid_line(full, (0,) + full[1:], full) == "valid: no (1 given not copied; '?' = not a digit)"


def test_solve_takes_a_lora_adapter_directory(sudoku_model, tmp_path, capsys):
    """--model RUN/adapter (a LoRA adapter on the Sudoku model) answers as the merged model does (it said "model
    directory ... has no config.json"). The random model's answers are mostly non-digits either way."""
    import shutil

    from dgemma.model import load_module
    from dgemma.model.lora import apply_lora, lora_state_dict, merge_lora, save_adapter
    from dgemma.model.saving import save_checkpoint

    module = load_module(sudoku_model, quiet=True)
    apply_lora(module, rank=2, targets=("attention", "experts"), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for name, p in lora_state_dict(module).items():
            if "lora_B" in name:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
    save_adapter(module, tmp_path / "adapter", base_model=str(sudoku_model))
    merged = tmp_path / "merged"
    save_checkpoint(merge_lora(module), merged)
    for f in sudoku_model.iterdir():
        if f.name != "model.safetensors" and f.name != "config.json":
            shutil.copy(f, merged / f.name)
    capsys.readouterr()
    outputs = []
    for model in (tmp_path / "adapter", merged):
        assert _cli(["sudoku", "solve", WIKIPEDIA[0], "--model", str(model), "--steps", "3", "--json"]) == 0
        outputs.append(json.loads(capsys.readouterr().out))
    assert outputs[0] == outputs[1]


@pytest.fixture(scope="module")
def puzzle_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("sudoku_data") / "eval.jsonl"
    pairs = generate_puzzles(5, "30-36", seed=9) + generate_puzzles(1, "easy", seed=9)
    path.write_text("".join(json.dumps({"puzzle": grid_to_string(p), "solution": grid_to_string(s)}) + "\n"
                            for p, s in pairs))
    return path


def test_evaluate_random_model_end_to_end(sudoku_model, puzzle_file):
    import dgemma

    engine = dgemma.load(sudoku_model)
    result = evaluate(engine, puzzle_file, steps=3, batch_size=4, seed=0)
    assert result["num_puzzles"] == 6 and result["mode"] == "diffusion"
    for key in ("solved_rate", "valid_rate", "cell_accuracy", "parse_rate"):
        assert 0.0 <= result[key] <= 1.0
    assert result["valid_rate"] == result["solved_rate"]  # unique puzzles
    assert 1 <= result["mean_steps_per_canvas"] <= 3
    assert set(result["bands"]) <= {"easy", "medium", "hard", "expert"} and "easy" in result["bands"]
    assert sum(b["num_puzzles"] for b in result["bands"].values()) == 6
    json.dumps(result)
    again = evaluate(engine, puzzle_file, steps=3, batch_size=4, seed=0)
    assert again["cell_accuracy"] == result["cell_accuracy"]  # seeded
    pairs = read_puzzles(puzzle_file)
    out = solve(engine, [p for p, _ in pairs[:2]], steps=2)
    assert len(out) == 2 and all((g is None or len(g) == 81) and 1 <= s <= 2 for g, s in out)

    if importlib.util.find_spec("dgemma.engine.autoregressive") is None:
        with pytest.raises(SudokuError, match="autoregressive baseline needs"):
            evaluate(engine, pairs[:2], baseline="ar")
    else:
        ar = evaluate(engine, pairs[:2], baseline="ar")
        assert ar["mode"] == "autoregressive" and 1 <= ar["mean_steps_per_canvas"] <= ANSWER_TOKENS


def _cli(argv):
    parser = argparse.ArgumentParser(prog="dgemma")
    commands.add_sudoku_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_generate_eval_solve(sudoku_model, tmp_path, capsys):
    out = tmp_path / "p.jsonl"
    assert _cli(["sudoku", "generate", "--count", "3", "--givens", "34-36", "--seed", "1", "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 3 and all(34 <= num_givens(parse_grid(r["puzzle"])) <= 36 for r in rows)
    train = tmp_path / "t.jsonl"
    _cli(["sudoku", "generate", "--count", "2", "--format", "train", "--out", str(train)])
    assert all(json.loads(line)["raw"] is True for line in train.read_text().splitlines())
    capsys.readouterr()

    assert _cli(["sudoku", "eval", "--puzzles", str(out), "--model", str(sudoku_model), "--steps", "2"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) > 3 and "solved" in lines[1]
    last = json.loads(lines[-1])
    assert {"solved_rate", "cell_accuracy", "mean_steps_per_canvas", "num_puzzles"} <= set(last)
    assert last["num_puzzles"] == 3

    assert _cli(["sudoku", "solve", WIKIPEDIA[0], "--model", str(sudoku_model), "--steps", "2"]) == 0
    text = capsys.readouterr().out
    assert "valid: " in text and text.count("------+-------+------") == 4
    assert _cli(["sudoku", "solve", WIKIPEDIA[0], "--model", str(sudoku_model), "--steps", "2", "--views", "3",
                 "--json"]) == 0
    answer = json.loads(capsys.readouterr().out)
    assert answer["views"] == 3 and 1 <= answer["votes"] <= 3 and len(answer["answer"]) == 81
    assert _cli(["sudoku", "eval", "--puzzles", str(out), "--model", str(sudoku_model), "--steps", "2",
                 "--views", "2"]) == 0
    assert "2 views per puzzle" in capsys.readouterr().out


def test_cli_errors(tmp_path, monkeypatch):
    monkeypatch.setattr(commands, "BUNDLED", tmp_path / "none")
    with pytest.raises(FileNotFoundError, match="not been trained yet"):
        _cli(["sudoku", "solve", WIKIPEDIA[0]])
    with pytest.raises(SudokuError, match="contradictory"):
        _cli(["sudoku", "solve", "55" + WIKIPEDIA[0][2:]])
    with pytest.raises(SudokuError, match="expected 81 cells"):
        _cli(["sudoku", "solve", "123"])
    bad = tmp_path / "bad.jsonl"
    bad.write_text("not json\n")
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        _cli(["sudoku", "eval", "--puzzles", str(bad)])


def test_baseline_refuses_the_diffusion_knobs(sudoku_model, puzzle_file):
    """`--baseline ar` silently ignored --steps, --preset and --compile (the answer and the forwards were those of a
    run without them); they configure the denoising sampler or step, which the baseline does not run."""
    import dgemma

    engine = dgemma.load(sudoku_model)
    puzzle = read_puzzles(puzzle_file)[0][0]
    with pytest.raises(SudokuError, match="autoregressive baseline takes one forward per token"):
        predict(engine, [puzzle], baseline="ar", steps=2)
    for flags, message in ((["--steps", "2"], "steps bounds the denoising steps"),
                           (["--preset", "fast"], "--preset fast sets the denoising sampler's knobs"),
                           (["--compile"], "--compile compiles the denoising step")):
        with pytest.raises(ValueError, match=message):
            _cli(["sudoku", "solve", grid_to_string(puzzle), "--model", str(sudoku_model), "--baseline", "ar",
                  *flags])
        with pytest.raises(ValueError, match=message):
            _cli(["sudoku", "eval", "--puzzles", str(puzzle_file), "--model", str(sudoku_model), "--baseline", "ar",
                  *flags])


def test_clamped_givens_stay_and_blanks_are_digits(sudoku_model, puzzle_file):
    """With --clamp-givens even a random model returns a full grid that keeps every given in place."""
    import dgemma

    engine = dgemma.load(sudoku_model)
    pairs = read_puzzles(puzzle_file)
    puzzles = [p for p, _ in pairs]
    free = predict(engine, puzzles, steps=3, batch_size=4, seed=0)
    clamped = predict(engine, puzzles, steps=3, batch_size=4, seed=0, clamp_givens=True)
    for puzzle, (cells, steps, _) in zip(puzzles, clamped):
        assert all(1 <= c <= 9 for c in cells)  # 81 digits: blanks only ever sample 1-9
        assert all(c == g for c, g in zip(cells, puzzle) if g)  # every given kept
        assert 1 <= steps <= 3
    # the random model alone does not keep the givens (the check above could fail without the clamp)
    assert any(c != g for (cells, _, _), puzzle in zip(free, puzzles) for c, g in zip(cells, puzzle) if g)
    result = evaluate(engine, pairs, steps=3, batch_size=4, clamp_givens=True)
    assert result["mode"] == "diffusion, givens clamped" and result["parse_rate"] == 1.0
    with pytest.raises(SudokuError, match="autoregressive baseline has none"):
        predict(engine, puzzles[:1], baseline="ar", clamp_givens=True)
    assert _cli(["sudoku", "eval", "--puzzles", str(puzzle_file), "--model", str(sudoku_model), "--steps", "2",
                 "--clamp-givens", "--json"]) == 0


def test_plurality_and_view_maps():
    a, b, c = (1,) * 81, (2,) * 81, (3,) * 81
    assert plurality([a, b, b]) == (b, 2) and plurality([c, a, b]) == (c, 1)
    assert plurality([b, a, a, b]) == (b, 2)  # a tie goes to the earliest view
    maps = view_symmetries(4, seed=3)
    assert maps[0] == IDENTITY and len(set(maps)) == 4 and view_symmetries(4, seed=3) == maps
    with pytest.raises(SudokuError, match="views must be"):
        view_symmetries(0)


def test_views_vote_over_mapped_back_answers(sudoku_model, puzzle_file):
    """predict(views=K) = the plurality of K canvases per puzzle, each solved in its own symmetric frame and mapped
    back. Rebuilt here by hand: the same rows, in the same batch order, through predict(views=1)."""
    import dgemma

    engine = dgemma.load(sudoku_model)
    puzzles = [p for p, _ in read_puzzles(puzzle_file)]
    k, n = 3, len(puzzles)
    voted = predict(engine, puzzles, steps=3, batch_size=n, seed=5, views=k)  # one batch of n * k canvases
    maps = view_symmetries(k, seed=5)
    single = predict(engine, [m.apply(p) for p in puzzles for m in maps], steps=3, batch_size=n * k, seed=5)
    for i in range(n):
        answers = [maps[v].invert(single[i * k + v].cells) for v in range(k)]
        assert (voted[i].cells, voted[i].votes) == plurality(answers)
        assert voted[i].steps == pytest.approx(sum(single[i * k + v].steps for v in range(k)) / k)
    result = evaluate(engine, puzzle_file, steps=3, batch_size=4, seed=5, views=k)
    assert result["views"] == k and result["mode"] == "diffusion, 3 views voting"
    assert result["steps_per_puzzle"] == pytest.approx(result["mean_steps_per_canvas"] * k, abs=1e-3)
    assert 1 / k <= result["view_agreement"] <= 1


def test_bundled_sudoku_model_is_trained():
    """The shipped model (dgemma/models/sudoku, the default of `dgemma sudoku solve/eval`) loads with its tokenizer
    and fills the blanks of easy held-out puzzles far above chance (1/9 per cell). An untrained model of this config
    at the trainer's initial scale writes no digits at all here (parse rate 0, cell accuracy 0, measured). Its card
    (README.md) names how it was trained and what it scores."""
    import dgemma
    from dgemma.sudoku.puzzles import generate_puzzles

    assert (commands.BUNDLED / "README.md").is_file() and (commands.BUNDLED / "model.safetensors").is_file()
    engine = dgemma.load(commands.BUNDLED)
    assert engine.config.canvas_length >= ANSWER_TOKENS
    pairs = generate_puzzles(6, (42, 45), seed=4242)
    result = evaluate(engine, pairs, steps=16, batch_size=6)
    assert result["num_puzzles"] == 6 and result["parse_rate"] == 1.0
    assert result["cell_accuracy"] > 0.6, result
    # three views of an easy puzzle, each mapped back to the puzzle's frame, agree (read in the wrong frame they
    # could not) and solve it
    voted = predict(engine, [p for p, _ in pairs[:2]], steps=16, views=3)
    assert [(v.cells, v.votes) for v in voted] == [(s, 3) for _, s in pairs[:2]]


def test_sudoku_speed_bench_runs_both_sides(sudoku_model, puzzle_file, capsys):
    """bench/sudoku_speed.py on the tiny model: the reference (transformers) and our presets on the same puzzles."""
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
    import sudoku_speed
    result = sudoku_speed.main(["--model", str(sudoku_model), "--puzzles", str(puzzle_file), "--limit", "3",
                                "--presets", "exact,settle", "--threads", "1"])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == result
    assert result["num_puzzles"] == 3 and set(result["rows"]) == {"reference", "exact", "settle"}
    for side, row in result["rows"].items():
        assert 0 <= row["solved_rate"] <= 1 and 0 <= row["cell_accuracy"] <= 1 and row["wall_s"] > 0
        assert (row["mean_steps_per_canvas"] is None) == (side == "reference")
    assert result["rows"]["reference"]["ratio"] == 1.0
    assert 1 <= result["rows"]["exact"]["mean_steps_per_canvas"] <= 8  # the checkpoint's 8-step budget
    with pytest.raises(SystemExit, match="unknown"):
        sudoku_speed.main(["--model", str(sudoku_model), "--presets", "turbo"])


def test_views_recipe_scores_every_prefix(sudoku_model, puzzle_file, tmp_path, capsys):
    """recipes/sudoku_views.py: per-view answers saved, and the k=1 row is the first view alone."""
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "recipes"))
    import sudoku_views
    out = tmp_path / "views.json"
    result = sudoku_views.main([str(puzzle_file), "--model", str(sudoku_model), "--views", "3", "--batch-size", "4",
                                "--out", str(out)])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == result
    rows = result["rows"]
    assert [r["views"] for r in rows] == [1, 2, 3] and result["num_puzzles"] == 6
    assert rows[0]["solved_rate"] == rows[0]["mean_single_view"] == rows[0]["any_view_solved"]
    assert all(r["solved_rate"] <= r["any_view_solved"] for r in rows)
    saved = json.loads(out.read_text())["answers"]
    assert len(saved) == 3 and all(len(view) == 6 and all(len(a) == 81 for a in view) for view in saved)


def test_solve_verdict_counts_in_words_and_explains_only_what_it_shows():
    """The invalid-answer line: "1 given not copied" (was "1 givens"), and the "'?' = not a digit" legend only
    when the printed answer has a '?' (it was always there)."""
    from dgemma.sudoku.commands import invalid_line

    puzzle, solution = parse_grid(WIKIPEDIA[0]), parse_grid(WIKIPEDIA[1])
    blanks = 81 - sum(1 for c in puzzle if c)
    first_blank = puzzle.index(0)
    first_given = next(i for i, c in enumerate(puzzle) if c)
    wrong = list(solution)
    wrong[first_blank] = solution[first_blank] % 9 + 1
    assert invalid_line(puzzle, wrong, solution) == f"valid: no (1 of {blanks} blank cells wrong or missing)"
    wrong[first_given] = puzzle[first_given] % 9 + 1
    assert invalid_line(puzzle, wrong, solution) == \
        f"valid: no (1 of {blanks} blank cells wrong or missing, 1 given not copied)"
    wrong[first_blank], wrong[first_given + 1] = 0, 0
    line = invalid_line(puzzle, wrong, solution)
    assert line.endswith("; '?' = not a digit)") and "given" in line
