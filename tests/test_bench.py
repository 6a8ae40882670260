"""Smoke tests of bench/vs_reference.py on the tiny config: it runs end to end, ends with one JSON line with the
documented keys, and its analytic FLOP count equals what torch's FlopCounterMode sees in our decoder step."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from conftest import TINY_CONFIG

pytest.importorskip("transformers")
BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))
import vs_reference  # noqa: E402
from _common import StepCost  # noqa: E402

TOP_KEYS = {"config", "hardware", "device", "dtype", "threads", "batch", "steps", "prompt_len", "new_tokens",
            "canvases", "reps", "ratio", "ratio_reference_rng", "tokens_identical", "matmul_peak_gflops",
            "decoder_gflop_per_step", "mem_ratio", "sides"}
SIDE_KEYS = {"wall_s", "ms_per_step", "ms_forward", "ms_sampler", "ms_prefill", "ms_commit", "ttfc_s", "tok_s",
             "peak_mem_bytes", "gflops", "pct_of_matmul_peak", "gbps", "steps_per_canvas", "tokens_per_forward"}


@pytest.mark.parametrize("new_tokens, canvases", [(16, 1), (17, 2)], ids=["one_canvas_probe", "two_canvases"])
def test_vs_reference_tiny(tmp_path, capsys, new_tokens, canvases):
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(TINY_CONFIG))
    vs_reference.main(["--config", str(config), "--steps", "2", "--reps", "1", "--prompt-len", "8",
                       "--new-tokens", str(new_tokens), "--threads", "1", "--matmul-size", "128"])
    lines = capsys.readouterr().out.strip().splitlines()
    result = json.loads(lines[-1])
    assert TOP_KEYS <= result.keys(), f"missing {TOP_KEYS - result.keys()}"
    assert set(result["sides"]) == {"reference", "fast", "reference_rng"}
    for side, numbers in result["sides"].items():
        assert SIDE_KEYS <= numbers.keys(), f"{side}: missing {SIDE_KEYS - numbers.keys()}"
        assert numbers["steps_per_canvas"] == 2, "adaptive stopping must be off: every canvas runs all steps"
        assert numbers["ms_commit"] is not None and numbers["ms_commit"] > 0
        assert numbers["tok_s"] > 0 and numbers["gflops"] > 0
    assert result["canvases"] == canvases and result["batch"] == 1 and result["steps"] == 2
    assert result["tokens_identical"] is True, "reference-RNG mode must reproduce the reference's tokens"
    assert result["ratio"] > 0 and result["ratio_reference_rng"] > 0 and result["matmul_peak_gflops"] > 0


@pytest.mark.parametrize("batch, context", [(1, 5), (2, 20)])
def test_step_flops_match_flop_counter(reference_checkpoint, batch, context):
    """Every matmul of our decoder step (with and without self-conditioning) is counted exactly once. Attention
    is left out of the comparison: FlopCounterMode does not see the CPU scaled_dot_product_attention kernel, nor
    torch._grouped_mm, so the experts run their (bit-identical) per-expert loop here."""
    import dgemma
    from torch.utils.flop_counter import FlopCounterMode

    from dgemma.model import moe

    _, path = reference_checkpoint()
    eng = dgemma.load(path, quiet=True)
    cfg, module = eng.config, eng.module
    cost = StepCost(cfg, batch, 4)
    cache = eng.new_cache(batch)
    g = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        module.encode(torch.randint(3, 500, (batch, context), generator=g), cache)
        tokens = torch.randint(0, cfg.vocab_size, (batch, cfg.canvas_length), generator=g)
        logits = module.denoise(tokens, cache)
        moe.set_grouped_dispatch("off")
        try:
            for self_conditioning in (False, True):
                with FlopCounterMode(display=False) as counter:
                    soft = module.soft_embedding(logits) if self_conditioning else None
                    module.denoise(tokens, cache, soft=soft)
                assert counter.get_total_flops() == cost.flops(context, self_conditioning, attention=False)
        finally:
            moe.set_grouped_dispatch("auto")


def test_presets_ratio_at_sudoku_steps_uses_the_fitted_step_cost():
    import presets

    # ours: float walls 1 + 0.5*steps, int8 walls 1 + 0.25*steps; the reference: 16 steps in 16 s
    speed = {"reference": {"wall_s": 16.0, "steps": 16}}
    for label, per_step in (("exact", 0.5), ("fast", 0.5), ("exact+int8", 0.25), ("fast+int8", 0.25)):
        steps = 48 if label.startswith("exact") else 16
        speed[label] = {"wall_s": 1 + per_step * steps, "steps": steps}
    sudoku = {k: {"mean_steps_per_canvas": s} for k, s in
              (("exact", 12.0), ("exact+int8", 12.0), ("fast", 6.0), ("fast+int8", 6.0))}
    presets.at_sudoku_steps(speed, sudoku)
    # the reference at exact's 12 steps: 12 s; fast at 6 steps: 1 + 3 = 4 s; fast+int8: 1 + 1.5 s
    assert sudoku["exact"]["ratio_at_sudoku_steps"] == pytest.approx(12 / 7, abs=0.01)
    assert sudoku["fast"]["ratio_at_sudoku_steps"] == pytest.approx(3.0)
    assert sudoku["fast+int8"]["ratio_at_sudoku_steps"] == pytest.approx(12 / 2.5, abs=0.01)


def test_row_skipping_bench_runs_both_ways_and_restores_the_switch(capsys):
    """bench/row_skipping.py on a few puzzles: the same answers both ways, fewer decoder rows when skipping, and the
    scheduler's switch and tick are restored afterwards."""
    import row_skipping

    import dgemma.engine.scheduler as scheduler_module
    tick = scheduler_module.Scheduler.tick
    result = row_skipping.main(["--count", "4", "--views", "2", "--batch-size", "2", "--threads", "1"])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == result
    assert result["identical"] and result["forwards"]["skip"] == result["forwards"]["whole"]
    assert result["decoder_rows"]["skip"] < result["decoder_rows"]["whole"]
    assert scheduler_module.SKIP_DONE_ROWS is True and scheduler_module.Scheduler.tick is tick


def run_canvas_bench_tiny(bench, tmp_path, capsys) -> dict:
    """A bench built on bench/_canvas.py (int8_parts, logits_buffers) on the tiny config, 2 steps, 1 rep: its
    result, checked to be the JSON line it printed last and to hold a row for each of its variants."""
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(TINY_CONFIG))
    result = bench.main(["--config", str(config), "--steps", "2", "--reps", "1", "--prompt-len", "8",
                         "--threads", "1"])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == result
    assert set(result["variants"]) == set(bench.VARIANTS)
    return result


def test_int8_parts_bench_configures_each_variant_and_runs_them_all(tmp_path, capsys, random_engine):
    """bench/int8_parts.py: each variant puts back exactly its named part in float, and on the tiny config every
    variant is timed, with ratios against int8 and float, ending in one JSON line."""
    from dgemma.model.moe import Experts
    from dgemma.quant import dynamic
    try:
        dynamic.check_available()
    except dynamic.DynamicInt8Error as e:
        pytest.skip(str(e))
    import int8_parts

    module = random_engine.module

    def state():
        kinds = {type(m) for m in module.modules()}
        return (module.soft_product is not None, module.head_logits is not None,
                dynamic.DynamicInt8Experts in kinds, dynamic.DynamicInt8Linear in kinds)

    expected = {"float": (False, False, False, False), "int8": (True, True, True, True),
                "int8-soft-float": (False, True, True, True), "int8-head-float": (True, False, True, True),
                "int8-experts-float": (True, True, False, True)}
    try:
        for variant in int8_parts.VARIANTS:
            int8_parts.configure(random_engine, variant)
            assert state() == expected[variant], variant
        assert any(type(m) is Experts for m in module.modules())  # the float experts are back in place
    finally:
        random_engine.use_int8_dynamic(False)
    with pytest.raises(ValueError, match="unknown variant"):
        int8_parts.configure(random_engine, "int4")

    result = run_canvas_bench_tiny(int8_parts, tmp_path, capsys)
    for name, row in result["variants"].items():
        assert row["wall_s"] > 0 and len(row["walls"]) == 1, name
    assert result["variants"]["int8"]["vs_int8"] == 1.0 and result["variants"]["float"]["speed_vs_float"] == 1.0


def test_logits_buffers_bench_configures_each_variant_and_restores_the_defaults(tmp_path, capsys, random_engine):
    """bench/logits_buffers.py: `new` variants turn buffer reuse off (and int8-new makes the int8 head one block),
    the defaults come back afterwards, and on the tiny config every variant runs, ending in one JSON line."""
    import dgemma.engine.scheduler as scheduler_module
    from dgemma.quant import dynamic
    try:
        dynamic.check_available()
    except dynamic.DynamicInt8Error as e:
        pytest.skip(str(e))
    import logits_buffers

    module, columns = random_engine.module, dynamic.HEAD_COLUMNS
    vocab = random_engine.config.vocab_size
    try:
        for variant in logits_buffers.VARIANTS:
            logits_buffers.configure(random_engine, variant)
            assert scheduler_module.REUSE_LOGITS is variant.endswith("reused"), variant
            head = module.head_logits
            assert (head is not None) is variant.startswith("int8"), variant
            if variant == "int8-new":
                assert [(c0, c1) for c0, c1, _ in head.blocks] == [(0, vocab)]
            assert dynamic.HEAD_COLUMNS == columns
    finally:
        scheduler_module.REUSE_LOGITS = True
        random_engine.use_int8_dynamic(False)
    with pytest.raises(ValueError, match="unknown variant"):
        logits_buffers.configure(random_engine, "int4-new")

    result = run_canvas_bench_tiny(logits_buffers, tmp_path, capsys)
    assert scheduler_module.REUSE_LOGITS is True
    for name, row in result["variants"].items():
        assert row["wall_s"] > 0 and row["page_faults"] >= 0 and len(row["walls"]) == 1, name
    assert result["variants"]["int8-reused"]["speed_vs_new"] > 0


def test_step_profile_charges_every_operator_to_one_phase_and_kind(tmp_path, capsys):
    """bench/step_profile.py on the tiny config (CPU): the kinds add up to the busy time of the steps, each kind the
    tiny model has is seen (its head, experts and attention), the prefill and commit are kept apart, and the
    annotations it wraps around the model still let generation run."""
    import step_profile

    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(TINY_CONFIG))
    r = step_profile.main(["--config", str(config), "--device", "cpu", "--dtype", "fp32", "--steps", "3",
                           "--prompt", "6"])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == r
    kinds = r["kinds_ms_per_step"]
    assert set(kinds) == set(step_profile.KINDS)
    assert sum(kinds.values()) == pytest.approx(r["busy_ms_per_step"], abs=0.05)
    assert r["busy_ms_per_step"] == pytest.approx(r["forward_ms_per_step"] + r["sampler_ms_per_step"], abs=0.02)
    for kind in ("head and self-conditioning", "experts", "attention", "elementwise and reductions"):
        assert kinds[kind] > 0, kind
    assert r["encode_ms"] > 0 and r["forward_ms_per_step"] > 0 and r["sampler_ms_per_step"] > 0
    assert r["encode_ms"] == pytest.approx(r["prefill_ms"] + r["commit_ms"], abs=0.02)
    for phase in ("prefill", "commit"):
        assert r[phase + "_ms"] > 0 and r["operators_encode"][phase] > 10
        assert sum(r[phase + "_kinds_ms"].values()) == pytest.approx(r[phase + "_ms"], abs=0.05)
        assert r[phase + "_kinds_ms"]["experts"] > 0 and r[phase + "_kinds_ms"]["attention"] > 0
    assert r["operators_per_step"]["forward"] > 10 and r["operators_per_step"]["sampler"] > 5
    assert r["busy_share"] > 0 and r["wall_ms_per_step"] > 0 and r["steps"] == 3  # (profiled vs unprofiled runs)


def test_step_profile_kinds_from_annotations_and_names():
    import step_profile as sp

    assert sp.kind_of("aten::mm", ["aten::linear", sp.VOCAB, sp.FORWARD]) == "head and self-conditioning"
    assert sp.kind_of("aten::sigmoid", [sp.VOCAB]) == "head and self-conditioning"
    assert sp.kind_of("quantized::linear_dynamic", [sp.EXPERTS, sp.FORWARD]) == "experts"
    assert sp.kind_of("aten::gelu", [sp.EXPERTS, sp.FORWARD]) == "experts"
    assert sp.kind_of("aten::_grouped_mm", [sp.FORWARD]) == "other matrix products"
    assert sp.kind_of("aten::mm", [sp.FORWARD]) == "other matrix products"
    assert sp.kind_of("aten::_scaled_dot_product_flash_attention_for_cpu", [sp.FORWARD]) == "attention"
    assert sp.kind_of("aten::index_select", []) == "copies and indexing"
    assert sp.kind_of("aten::exp", []) == "elementwise and reductions"


def test_presets_ratio_at_sudoku_steps_needs_exact_and_says_so(capsys):
    """`--presets fast,fastest` with speed and Sudoku rows: the reference's Sudoku steps are exact's, so without
    exact there is no ratio to estimate; the script says so instead of a KeyError after all its runs."""
    import presets

    speed = {"reference": {"wall_s": 16.0, "steps": 16}, "fast": {"wall_s": 9.0, "steps": 16},
             "fastest": {"wall_s": 5.0, "steps": 8}}
    sudoku = {"fast": {"mean_steps_per_canvas": 6.0}, "fastest": {"mean_steps_per_canvas": 4.0}}
    presets.at_sudoku_steps(speed, sudoku)
    assert all("ratio_at_sudoku_steps" not in row for row in sudoku.values())
    assert "needs the exact preset" in capsys.readouterr().err


def test_serve_load_random_model_needs_the_bundled_tokenizers_vocabulary(tmp_path):
    """bench/serve_load.py --config: a config whose vocabulary is smaller than the bundled tokenizer's is refused by
    name (it served prompts with ids past the embedding: 'IndexError: index out of range'); a large enough one
    writes a model directory that loads and generates."""
    import serve_load

    import dgemma
    from dgemma.bundled import PACKAGED
    from dgemma.text.tokenizer import load_tokenizer

    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(TINY_CONFIG))
    with pytest.raises(SystemExit, match=r"vocab_size 512 is smaller than the bundled tokenizer's \d+ tokens"):
        serve_load.random_model(str(config), tmp_path / "refused")
    big = json.loads(json.dumps(TINY_CONFIG))
    big["text_config"]["vocab_size"] = load_tokenizer(PACKAGED).vocab_size
    config.write_text(json.dumps(big))
    engine = dgemma.load(serve_load.random_model(str(config), tmp_path / "model"), quiet=True)
    done = engine.complete("def f(x):", max_tokens=4, max_denoising_steps=2, seed=0)
    assert done.completion_tokens == 4 or done.finish_reason == "stop"


@pytest.mark.parametrize("script", ["gpu", "step_profile", "sampler_ops", "vs_reference"])
def test_bench_device_unusable_here_is_a_usage_error(script, capsys):
    """--device names a device this torch or machine cannot use (meta everywhere; cuda on CPU-only torch): an
    argparse error naming it, not a traceback from inside the run."""
    module = __import__(script)
    argv = ["--device", "meta"] + (["--config", "small"] if script == "vs_reference" else [])
    with pytest.raises(SystemExit) as e:
        (module.parse_args if hasattr(module, "parse_args") else module.main)(argv)
    assert e.value.code == 2
    assert "argument --device: device 'meta' is not usable here" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_quant_gpu_check_without_cuda_says_it_needs_one():
    import quant_gpu_check

    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        quant_gpu_check.main([])


def last_json_line(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_sampler_ops_bench_counts_and_times_both_budgets(capsys):
    import sampler_ops

    assert sampler_ops.main(["--vocab", "1024", "--canvas", "16", "--reps", "1", "--threads", "1"]) == 0
    r = last_json_line(capsys)
    assert [row["budget"] for row in r["rows"]] == ["cpu", "accelerator"]
    for row in r["rows"]:
        assert row["chunk_positions"] > 0 and row["aten_calls"] > 10 and row["ms_per_step"] > 0


def test_gpu_bench_runs_on_a_cpu_with_the_tiny_config(tmp_path, capsys):
    """bench/gpu.py's documented CPU smoke run (the scenarios, the JSON line) on the tiny config."""
    import gpu

    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(TINY_CONFIG))
    r = gpu.main(["--config", str(config), "--device", "cpu", "--dtype", "fp32", "--steps", "2", "--short-prompt",
                  "8", "--long-prompt", "20", "--batches", "1,2", "--compile", ""])
    assert last_json_line(capsys) == r
    assert r["steps"] == 2 and r["ms_per_step"] > 0 and r["tok_s_per_canvas"] > 0 and r["quantize"] == "none"


def test_scheduler_rows_bench_shares_forwards(capsys):
    """bench/scheduler_rows.py on the bundled model: two requests' rows share the decoder forwards of one."""
    import scheduler_rows

    assert scheduler_rows.main(["--rows", "1", "2", "--max-tokens", "8", "--steps", "2", "--threads", "1"]) == 0
    r = last_json_line(capsys)
    assert r["levels"]["1"]["forwards"] == r["levels"]["2"]["forwards"] == 2 and r["speedup"] > 0


def test_presets_bench_speed_rows_on_the_tiny_config(tmp_path, capsys):
    """bench/presets.py --skip-quality on the tiny config, one preset: the reference row and the preset's float and
    int8 rows, each variant running its own step budget."""
    import presets

    from dgemma.engine.presets import preset_knobs
    from dgemma.quant import dynamic
    try:
        dynamic.check_available()
    except dynamic.DynamicInt8Error as e:
        pytest.skip(str(e))
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(TINY_CONFIG))
    r = presets.main(["--skip-quality", "--sudoku-model", "none", "--config", str(config), "--presets", "fastest",
                      "--reps", "1", "--prompt-len", "8", "--threads", "1"])
    assert last_json_line(capsys) == r
    assert set(r["speed"]) == {"reference", "fastest", "fastest+int8"}
    steps = preset_knobs("fastest")["max_denoising_steps"]
    assert r["speed"]["fastest"]["steps"] == r["speed"]["fastest+int8"]["steps"] == steps
    assert r["speed"]["fastest"]["ratio"] > 0


def test_sudoku_speed_bench_scores_every_side(capsys):
    """bench/sudoku_speed.py on one generated puzzle: the reference and our preset both answer and are scored."""
    import sudoku_speed

    r = sudoku_speed.main(["--limit", "1", "--presets", "fast", "--threads", "1"])
    assert last_json_line(capsys) == r
    assert set(r["rows"]) == {"reference", "fast"} and r["num_puzzles"] == 1
    assert r["rows"]["fast"]["mean_steps_per_canvas"] >= 1 and 0 <= r["rows"]["fast"]["cell_accuracy"] <= 1


def test_structured_bench_infill_rows(capsys):
    """bench/structured.py's infill half on the bundled model, one held-out case: what it reads from infill (the
    InfillRun result) and complete is there and in range."""
    import structured

    import dgemma
    from dgemma.bundled import PACKAGED

    engine = dgemma.load(PACKAGED, quiet=True)
    i = structured.run_infill(engine, 1, 0)
    assert i["functions"] == 1 and 0 <= i["syntax_valid_rate"] <= 1 and i["infill_s_mean"] > 0
    assert "infill  0 valid=" in capsys.readouterr().out


@pytest.mark.parametrize("script, entry, argv", [
    ("_canvas", "parse", ["--reps", "0"]),
    ("row_skipping", "main", ["--count", "0"]),
    ("quant_quality", "main", ["--examples", "0"]),
    ("presets", "main", ["--reps", "0"]),
    ("sudoku_speed", "main", ["--limit", "0"]),
    ("scheduler_rows", "main", ["--max-tokens", "0"]),
    ("sampler_ops", "parse_args", ["--vocab", "0"]),
    ("gpu", "parse_args", ["--device", "cpu", "--steps", "0"]),
    ("gpu", "parse_args", ["--device", "cpu", "--batches", "1,0"]),
    ("step_profile", "main", ["--device", "cpu", "--prompt", "0"]),
])
def test_bench_counts_below_one_are_usage_errors(script, entry, argv, capsys):
    """A count of 0 (reps, puzzles, tokens, steps, ...) is refused while parsing, by flag name; it used to fail after
    the model was built (no median of zero runs, an empty batch, an IndexError, a ZeroDivisionError)."""
    module = __import__(script)
    fn = getattr(module, entry)
    with pytest.raises(SystemExit) as e:
        fn("x", argv) if entry == "parse" else fn(argv)
    assert e.value.code == 2
    assert "must be at least 1, got 0" in capsys.readouterr().err


def test_sudoku_speed_bench_warms_up_every_side(monkeypatch, capsys):
    """Each side gets one discarded warm-up (bench/README.md): ours too, not only the reference, so our first
    puzzle's wall does not carry one-time costs the reference's does not."""
    import sudoku_speed

    import dgemma
    calls = []
    generate = dgemma.Engine.generate
    monkeypatch.setattr(dgemma.Engine, "generate", lambda self, *a, **k: calls.append(1) or generate(self, *a, **k))
    sudoku_speed.main(["--limit", "1", "--presets", "fast", "--threads", "1"])
    assert len(calls) == 2  # the warm-up and the one puzzle


def test_long_prompt_bench_times_both_variants_and_restores_chunking(tmp_path, capsys):
    """bench/long_prompt.py on the tiny config (window 8) at a chunked length: both variants run, leave the same
    bits, the JSON line says so, and the shipped chunk size is back afterwards; a length past the config's
    positions is a usage error before anything is built."""
    import long_prompt

    from dgemma.model import attention

    raw = json.loads(json.dumps(TINY_CONFIG))
    raw["text_config"]["max_position_embeddings"] = 2048
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(raw))
    result = long_prompt.main(["--config", str(config), "--lengths", "1800", "--reps", "1", "--pieces", "512"])
    assert attention.QUERY_CHUNK == 1024 and attention.REPEAT_HEADS_ON_CUDA is True
    row = result["lengths"][1800]
    assert row["same_bits"] is True and row["max_diff"]["chunked"] == 0.0
    # pieces: the same math in other shapes, not the same bits (a flipped expert routing may move a token far)
    assert row["max_diff"]["pieces"] > 0 and row["median_token_diff"]["pieces"] < 1e-4
    assert min(row["wall_s"].values()) > 0 and row["wall_s"].keys() == {"one-call", "chunked", "pieces"}
    assert row["peak_mib"].keys() == {"one-call", "chunked", "pieces"} and min(row["peak_mib"].values()) >= 0
    assert {k: p.keys() for k, p in row["attention_peak_mib"].items()} == {
        "one-call": {"full", "sliding"}, "chunked": {"full", "sliding"}}
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["bench"] == "long_prompt"
    with pytest.raises(SystemExit, match="past the config's 2048 positions"):
        long_prompt.main(["--config", str(config), "--lengths", "4096", "--reps", "1"])


ROOT = BENCH.parent
DOCS = [ROOT / "README.md", BENCH / "README.md", ROOT / "docs" / "performance-history.md",
        *sorted((ROOT / "dgemma" / "models").glob("*/README.md"))]


def _doc_lines(path: Path):
    """(line number, text) of a document, a shell command continued with a trailing backslash joined into one."""
    number, held = 0, ""
    for n, line in enumerate(path.read_text().splitlines(), 1):
        number = number if held else n
        if line.endswith("\\"):
            held += line[:-1] + " "
            continue
        yield number, held + line
        held = ""


def _command_options(parser, prefix=()) -> dict[str, set[str]]:
    """'generate', 'sudoku eval', ... -> the option strings that command's --help lists."""
    import argparse
    found = {" ".join(prefix): {s for a in parser._actions for s in a.option_strings}} if prefix else {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found.update(_command_options(sub, prefix + (name,)))
    return found


def test_readme_flags_are_in_each_commands_help():
    """Every `dgemma CMD --flag` and `python bench/X.py --flag` the README, bench/README.md, the performance history
    and the model cards write names an option that command has, with that spelling."""
    import re

    from dgemma.cli import build_parser
    commands = _command_options(build_parser())
    shared = (BENCH / "_canvas.py").read_text() + (BENCH / "_common.py").read_text()
    wrong = []
    for doc in DOCS:
        for n, line in _doc_lines(doc):
            for m in re.finditer(r"\bdgemma ((?:sudoku )?[a-z]+)([^`|#\n]*)", line):
                for flag in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", m.group(2)):
                    if m.group(1) in commands and flag not in commands[m.group(1)]:
                        wrong.append(f"{doc.relative_to(ROOT)}:{n}: dgemma {m.group(1)} has no {flag}")
            for m in re.finditer(r"\b((?:bench|recipes)/\w+)\.(?:py|sh)\b([^`|#\n]*)", line):
                script = ROOT / (m.group(1) + (".py" if (ROOT / (m.group(1) + ".py")).exists() else ".sh"))
                source = script.read_text() + shared + (BENCH / "gpu.py").read_text() * script.name.startswith("gpu")
                for flag in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", m.group(2)):
                    if f'"{flag}"' not in source:
                        wrong.append(f"{doc.relative_to(ROOT)}:{n}: {script.name} has no {flag}")
    assert not wrong, "\n".join(wrong)


def test_readme_file_paths_exist():
    """Every repository path the documents name (file map rows, tests, recipes, bench scripts) exists."""
    import re
    missing = []
    for doc in DOCS:
        for n, line in _doc_lines(doc):
            for path in re.findall(r"(?<![\w/.-])((?:dgemma|bench|tests|recipes|docs)/[\w./-]*\w/?)", line):
                if not (ROOT / path).exists():
                    missing.append(f"{doc.relative_to(ROOT)}:{n}: {path}")
    assert not missing, "\n".join(missing)


def test_readme_python_example_runs_as_written(random_model_dir, capsys):
    """README 'Use': its Python example, with the model path and device swapped for a tiny CPU model, runs as written
    (it used an `input_ids` it never made)."""
    readme = (ROOT / "README.md").read_text()
    example = readme.split("## Use", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    assert example.count('"path/to/diffusiongemma-26B-A4B-it"') == 1 and example.count('device="cuda"') == 1
    example = example.replace('"path/to/diffusiongemma-26B-A4B-it"', repr(str(random_model_dir)))
    example = example.replace('device="cuda"', 'device="cpu"').replace("max_new_tokens=512", "max_new_tokens=8")
    scope = {}
    exec(compile(example, "README.md 'Use'", "exec"), scope)
    assert scope["ids"].shape[0] == 1 and scope["ids"].shape[1] > scope["input_ids"].shape[1]
    assert capsys.readouterr().out  # done.output.answer and its stats were printed
